"""Where the time of a product goes on ``bench/models.py``'s models: linops against curvlinops.

For each model and operator (``H``, ``GGN``, ``J``, ``J^T``) and each of linops and curvlinops
3.0.1 with 1 and 32 vectors, one product runs under ``torch.profiler`` after a warm-up. The
table gives its wall time, its FLOPs (torch's counter: matmuls and convolutions), the rate
those FLOPs ran at against this machine's float32 GEMM rate, the share of the CPU time spent
in matrix-multiply and convolution kernels, and the three most expensive other kernels. A
product whose GEMM share is small is bound by the memory traffic of its elementwise and
normalisation kernels, not by arithmetic: two tools running the same kernels on the same
tensors cannot differ much in time, whatever their formulation.

Usage::

    python bench/profile_models.py [--quick] [--models transformer,residual-ln-mlp] [--out DIR]

writes ``profile_models.json`` and ``.md`` under ``--out`` (default ``results/profile_models``)
and prints the table (one profiled call per cell: read ratios, not absolute times).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import _plain_kernels, make_cases
from operators import K, _curvlinops_ops, _gemm_fn, _meta, count_flops, make_operator, write

#: kernels that do the arithmetic of dense layers, attention and convolutions
GEMM = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::mkldnn_convolution")
#: wrappers whose self time is their children's, not work of their own
_WRAPPERS = ("aten::matmul", "aten::linear", "aten::convolution", "aten::_convolution")


def profile_call(f: Any) -> tuple[float, float, list[tuple[str, float]]]:
    """Wall seconds, GEMM share of self CPU time, and the top three other kernels (name, share)."""
    f()  # warm-up (graphs, probes, allocator)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        f()
        wall = time.perf_counter() - t0
    self_us: dict[str, float] = defaultdict(float)
    for e in prof.key_averages():
        if e.key.startswith("aten::") and e.key not in _WRAPPERS:
            self_us[e.key] += e.self_cpu_time_total
    total = sum(self_us.values()) or 1.0
    gemm = sum(v for k, v in self_us.items() if k in GEMM) / total
    others = sorted(
        ((k, v / total) for k, v in self_us.items() if k not in GEMM), key=lambda x: -x[1]
    )
    return wall, gemm, others[:3]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="the 64-sample models of --quick")
    p.add_argument("--models", default="residual-ln-mlp,transformer", help="comma-separated")
    p.add_argument("--out", type=Path, default=Path("results/profile_models"), help="folder")
    args = p.parse_args(argv)
    rows: list[dict[str, Any]] = []
    lines = [
        "| model | op | tool | vectors | ms per vector | GFLOP/s | GEMM share | top other kernels |",
        "|---|---|---|---|---|---|---|---|",
    ]
    gemm = _gemm_fn()
    gemm()
    t0 = time.perf_counter()
    for _ in range(5):
        gemm()
    gemm_rate = 5 * 2 * 512**3 / (time.perf_counter() - t0) / 1e9
    wanted = set(args.models.split(","))
    loss = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(1)
    for case in make_cases(args.quick):
        if case.name not in wanted:
            continue
        curv = _curvlinops_ops(case, loss)
        with _plain_kernels(case.model):
            for name in ("hessian", "ggn", "jacobian", "jacobian_t"):
                op = make_operator(case, loss, name)
                for k in (1, K):
                    V = torch.randn(op.shape[1], k, generator=gen)
                    V = V[:, 0] if k == 1 else V
                    for tool, fn in (
                        ("linops", lambda op=op, V=V: op @ V),
                        ("curvlinops", lambda c=curv[name], V=V: c @ V),
                    ):
                        cells = [case.name, name, tool, str(k)]
                        row: dict[str, Any] = {"model": case.name, "op": name, "tool": tool}
                        row["vectors"] = k
                        try:  # curvlinops' GGN raises under the profiler and the FLOP counter
                            wall, share, others = profile_call(fn)
                            rate = count_flops(fn) / wall / 1e9
                        except RuntimeError as err:
                            row["error"] = str(err)[:200]
                            cells.append(f"fails: {str(err)[:60]}")
                        else:
                            top = ", ".join(f"{n[6:]} {s:.0%}" for n, s in others)
                            cells += [f"{1e3 * wall / k:.2f}", f"{rate:.0f}", f"{share:.0%}", top]
                            row.update(
                                ms_per_vector=1e3 * wall / k,
                                gflops_per_second=rate,
                                gemm_share=share,
                                top_other_kernels=dict(others),
                            )
                        rows.append(row)
                        lines.append("| " + " | ".join(cells) + " |")
                        print(lines[-1], file=sys.stderr, flush=True)
    args.repeats = 1  # one profiled call per cell
    meta = _meta(args)
    meta["gemm_gflops_per_second"] = gemm_rate
    footer = (
        f"\nfloat32 GEMM rate (512^3 matmul): {gemm_rate:.0f} GFLOP/s, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}\n"
    )
    write(args.out, "profile_models", {"meta": meta, "rows": rows}, "\n".join(lines) + footer)


if __name__ == "__main__":
    main()
