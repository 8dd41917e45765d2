"""Warm, back-to-back product cost: single vector against 32 vectors per vector.

``bench/operators.py`` times single and 32-vector products in interleaved rounds (each call
follows other operators' calls), which is what its "32-per-vec/1" target column uses. This
script times each operator on its own, consecutive calls only, as inside Lanczos or CG: the
median of ``--singles`` single-vector products and of ``--batches`` 32-vector products, for the
10k-parameter MLP of ``bench/operators.py`` (same model, data and loss).

Usage::

    python bench/warm_products.py [--quick] [--out DIR] [--rounds 3]

Writes ``DIR/warm_products.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import operators as ops_bench  # noqa: E402


def median_seconds(op: Any, x: torch.Tensor, n: int) -> float:
    """Median wall time of ``n`` consecutive products ``op @ x``."""
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        op @ x
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return ts[len(ts) // 2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "warm_products")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--singles", type=int, default=50)
    p.add_argument("--batches", type=int, default=10)
    args = p.parse_args()
    torch.set_num_threads(2)
    if args.quick:
        args.rounds, args.singles, args.batches = 1, 5, 2
    case = ops_bench.make_cases(args.quick)[0]
    loss = torch.nn.CrossEntropyLoss()
    rows = []
    for name in ops_bench.OPERATORS:
        op = ops_bench.make_operator(case, loss, name)
        gen = torch.Generator().manual_seed(0)
        v = torch.randn(op.shape[1], generator=gen, dtype=op.torch_dtype)
        V = torch.randn(op.shape[1], 32, generator=gen, dtype=op.torch_dtype)
        for _ in range(3):  # warm up: primal pass, allocator
            op @ v
            op @ V
        for r in range(args.rounds):
            one = median_seconds(op, v, args.singles)
            per = median_seconds(op, V, args.batches) / 32
            rows.append(
                {
                    "model": case.name,
                    "operator": name,
                    "route": ops_bench._route(op),
                    "round": r,
                    "single_ms": 1e3 * one,
                    "per_vector_32_ms": 1e3 * per,
                    "ratio": per / one,
                }
            )
            print(
                f"{case.name} {name:10s} round {r}: single {1e3 * one:.2f} ms, "
                f"32 per vector {1e3 * per:.2f} ms, ratio {per / one:.2f}"
            )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "warm_products.json").write_text(json.dumps({"rows": rows}, indent=1))


if __name__ == "__main__":
    main()
