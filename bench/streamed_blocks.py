"""Streamed blocks wider than a pass: one visit of each batch per block against one per chunk.

A block of ``--columns`` vectors through an operator over a streamed dataset (``--batches``
batches of ``--batch-size`` made when drawn, ``memory_budget=1``: no graph kept) with
``max_vectors=--width``: the block takes ``columns / width`` passes. linops takes them in
slots inside its loop over the batches (each batch drawn and its graph built once per block,
:meth:`linops._model.ModelOperator._in_slots`); the baseline, timed in the same process on
the same operator, is the loop over chunks outside the batches (every batch drawn and every
graph built once per chunk), which the operator takes when slots are switched off
(``_slotted_directions = ()``). Both give the same bits (checked).

Models: an MLP (64-256-256-10, tanh) on the chain route and on the autograd route, and a
small CNN with BatchNorm (eval), whose products go one vector per pass (slots of one column,
the engine's route for convolutions since the ninth session: its baseline loops over the
columns). Operators: ``H V``, ``G V``, ``J V``, ``J^T U``, and ``trace``:
``estimators.hutchinson_trace(H, --probes)``, whose probes after its first group go in one
group on such an operator (its baseline: groups of ``--width`` probes, one visit each).
Medians of ``--repeats`` interleaved repeats after a warm-up block.
Run: ``python3 bench/streamed_blocks.py`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import hashlib
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import torch  # noqa: E402
from _harness import markdown_table, parser, write_json, write_markdown  # noqa: E402
from torch import nn  # noqa: E402

import estimators  # noqa: E402
from linops import GGNOperator, HessianOperator, JacobianOperator  # noqa: E402

OPERATORS = ("H", "GGN", "J", "JT", "trace")
MODELS = ("mlp-chain", "mlp-autograd", "cnn")


class Loader:
    """Batch ``i`` made from seed ``i`` when drawn; counts its passes."""

    def __init__(self, shape: tuple[int, ...], batches: int, size: int) -> None:
        self.shape, self.batches, self.size, self.passes = shape, batches, size, 0

    def __iter__(self) -> Any:
        self.passes += 1
        for i in range(self.batches):
            g = torch.Generator().manual_seed(i)
            x = torch.randn(self.size, *self.shape, generator=g)
            yield x, torch.randint(0, 10, (self.size,), generator=g)


def _model(kind: str) -> tuple[nn.Module, tuple[int, ...], str]:
    torch.manual_seed(0)
    if kind.startswith("mlp"):
        net = nn.Sequential(
            nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 10)
        )  # fmt: skip
        return net, (64,), kind.split("-")[1]
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        nn.Linear(64, 10),
    ).eval()  # fmt: skip
    return net, (3, 16, 16), "auto"


def _operator(which: str, kind: str, loader: Loader, width: int) -> Any:
    model, _, route = _model(kind)
    kw: dict[str, Any] = {"memory_budget": 1, "max_vectors": width, "route": route}
    if which == "trace":  # no graph kept, within the default budget (which bounds the groups)
        which, kw = "H", {"cache": False, "max_vectors": width, "route": route}
    if which in ("J", "JT"):
        J = JacobianOperator(model, loader, **kw)
        return J, (J.T if which == "JT" else J)
    cls = HessianOperator if which == "H" else GGNOperator
    op = cls(model, nn.CrossEntropyLoss(), loader, **kw)
    return op, op


def _timed(f: Any) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = f()
    return time.perf_counter() - start, out


def measure(which: str, kind: str, args: Any) -> dict[str, Any]:
    """Seconds of a block in slots and in chunks (same operator), passes and equality."""
    _, shape, _ = _model(kind)
    loader = Loader(shape, args.batches, args.batch_size)
    op, A = _operator(which, kind, loader, args.width)
    g = torch.Generator().manual_seed(1)
    V = torch.randn(args.columns, A.shape[1], generator=g).T  # column-major
    A @ V[:, 0]  # decides single products' way
    A @ V  # and the block pass's
    if which == "trace":

        def product() -> torch.Tensor:
            est = estimators.hutchinson_trace(A, args.probes, seed=0)
            return torch.tensor([est.estimate, est.stderr], dtype=torch.float64)

    else:

        def product() -> torch.Tensor:
            return A @ V

    times: dict[str, list[float]] = {"slots": [], "chunks": []}
    passes: dict[str, int] = {}
    builds: dict[str, int] = {}
    digests: set[str] = set()
    for _ in range(args.repeats):
        for mode in ("slots", "chunks"):
            if mode == "chunks":
                op._slotted_directions = ()  # the loop over chunks outside the batches
            before, built = loader.passes, op.cache_info().graphs_built
            seconds, out = _timed(product)
            passes[mode] = loader.passes - before
            builds[mode] = op.cache_info().graphs_built - built
            if mode == "chunks":
                del op._slotted_directions
            times[mode].append(seconds)
            digests.add(hashlib.sha256(out.contiguous().numpy().tobytes()).hexdigest())
    med = {m: statistics.median(t) for m, t in times.items()}
    return {
        "operator": which,
        "model": kind,
        "route": op.route,
        "seconds_median": med,
        "speedup": med["chunks"] / med["slots"],
        "loader_passes": passes,
        "graph_builds": builds,
        "bitwise_equal": len(digests) == 1,
        "times": times,
    }


def main() -> None:
    p = parser(__doc__, "results/streamed_blocks")
    p.add_argument("--batches", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--columns", type=int, default=16)
    p.add_argument("--width", type=int, default=4, help="max_vectors: columns per pass")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--probes", type=int, default=64, help="probes of the trace row")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--operators", nargs="+", choices=OPERATORS, default=list(OPERATORS))
    args = p.parse_args()
    if args.quick:
        args.batches, args.batch_size, args.columns, args.repeats, args.probes = 3, 8, 5, 1, 9
    torch.set_num_threads(args.threads)
    rows = [measure(w, k, args) for k in args.models for w in args.operators]
    payload = {
        "batches": args.batches, "batch_size": args.batch_size, "columns": args.columns,
        "width": args.width, "repeats": args.repeats, "threads": args.threads,
        "load_average": list(os.getloadavg()), "rows": rows,
    }  # fmt: skip
    write_json(args.out, "streamed_blocks", payload)
    table = markdown_table(
        [
            "model", "operator", "route", "chunks s", "slots s", "speed-up", "loader passes",
            "graph builds", "same bits",
        ],
        [
            (
                r["model"], r["operator"], r["route"], f"{r['seconds_median']['chunks']:.3f}",
                f"{r['seconds_median']['slots']:.3f}", f"{r['speedup']:.2f}",
                f"{r['loader_passes']['chunks']} -> {r['loader_passes']['slots']}",
                f"{r['graph_builds']['chunks']} -> {r['graph_builds']['slots']}",
                r["bitwise_equal"],
            )
            for r in rows
        ],
    )  # fmt: skip
    write_markdown(
        args.out,
        "streamed_blocks",
        "bench/streamed_blocks.py: a streamed block in slots against a loop over chunks",
        f"{table}\n\n{args.columns} columns in passes of {args.width}, {args.batches} streamed "
        f"batches of {args.batch_size}; load {payload['load_average']}",
    )


if __name__ == "__main__":
    main()
