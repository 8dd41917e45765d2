"""Hessian products with linops' double-backward kernels against torch's, by size.

A Hessian's graph computes batch norm in eval mode as its affine map and convolutions
through three autograd Functions (:mod:`linops._double_backward`) when a call's input has at
least ``MIN_ELEMENTS`` entries. This times ``H v`` on one operator per setting, all built
on the same model and batch in one process and called in interleaved rounds: torch's
kernels (both thresholds out of reach, the baseline), batch norm alone, convolutions alone,
and both at every size. Models: a 3-layer CNN with batch norm (eval) at growing channel
counts, image sizes and batches (the input elements of its convolutions in the table), and
the CIFAR ResNet-20 of ``bench/pyhessian.py`` on 128 images. Every setting's product is
checked against the baseline's (relative difference printed). The crossover sets the
default ``MIN_ELEMENTS``.

Run: ``python3 bench/double_backward.py`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

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
from scale import cifar_batches, resnet20  # noqa: E402
from torch import nn  # noqa: E402

from linops import HessianOperator, _double_backward  # noqa: E402

NEVER = 2**62
SETTINGS = {
    "torch": {"batch_norm": NEVER, "convolution": NEVER},
    "batch norm": {"batch_norm": 0, "convolution": NEVER},
    "convolutions": {"batch_norm": NEVER, "convolution": 0},
    "both": {"batch_norm": 0, "convolution": 0},
}
#: (channels, image side, batch) of the small CNN
SIZES = ((4, 8, 8), (8, 8, 16), (8, 16, 16), (16, 16, 16), (16, 16, 64), (16, 32, 32))


def cnn(channels: int) -> nn.Module:
    """Three 3x3 convolutions with batch norm (eval, non-trivial statistics) and ReLU."""
    layers: list[nn.Module] = []
    for c_in in (3, channels, channels):
        layers += [nn.Conv2d(c_in, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU()]
    model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 10))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 2.0)
            m.running_mean.uniform_(-0.5, 0.5)
    return model.eval()


def measure(
    name: str, elements: int, model: nn.Module, x: torch.Tensor, y: torch.Tensor, repeats: int
) -> Any:
    """Time ``H v`` under each of :data:`SETTINGS` (``elements``: a convolution's input)."""
    ops, outs = {}, {}
    n = sum(p.numel() for p in model.parameters())
    v = torch.randn(n, generator=torch.Generator(), dtype=x.dtype)
    for setting, thresholds in SETTINGS.items():  # each graph built under its setting
        _double_backward.MIN_ELEMENTS = dict(thresholds)
        ops[setting] = HessianOperator(model, nn.CrossEntropyLoss(), (x, y))
        outs[setting] = ops[setting] @ v
    times: dict[str, list[float]] = {s: [] for s in SETTINGS}
    for _ in range(repeats):
        for setting, op in ops.items():
            start = time.perf_counter()
            op @ v
            times[setting].append(time.perf_counter() - start)
    base = statistics.median(times["torch"])
    ref = outs["torch"]
    return {
        "model": name,
        "conv_input_elements": elements,
        "torch_seconds": base,
        "ratio": {s: statistics.median(t) / base for s, t in times.items()},
        "max_relative_difference": max(float((o - ref).norm() / ref.norm()) for o in outs.values()),
    }


def main() -> None:
    p = parser(__doc__, "results/double_backward")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    sizes = SIZES[:2] if args.quick else SIZES
    repeats = 2 if args.quick else args.repeats
    torch.set_num_threads(args.threads)
    defaults = dict(_double_backward.MIN_ELEMENTS)
    rows = []
    try:
        for channels, side, batch in sizes:
            torch.manual_seed(0)
            x, y = torch.randn(batch, 3, side, side), torch.randint(0, 10, (batch,))
            name = f"CNN c={channels} {side}x{side} batch {batch}"
            elements = batch * channels * side * side
            rows.append(measure(name, elements, cnn(channels).to(dtype), x.to(dtype), y, repeats))
            print(rows[-1], flush=True)
        if not args.quick:
            x, y = cifar_batches(128, 128, seed=1)[0]
            model = resnet20(width=16, seed=0).eval().to(dtype)
            elements = 128 * 16 * 32 * 32
            rows.append(measure("ResNet-20, 128 images", elements, model, x.to(dtype), y, 5))
            print(rows[-1], flush=True)
    finally:
        _double_backward.MIN_ELEMENTS = defaults
    payload = {
        "dtype": args.dtype,
        "threads": args.threads,
        "load_average": list(os.getloadavg()),
        "rows": rows,
    }
    write_json(args.out, "double_backward", payload)
    table = markdown_table(
        ["model", "conv input elements", "torch ms", "batch norm", "convolutions", "both", "max rel diff"],
        [
            (
                r["model"], r["conv_input_elements"], f"{1e3 * r['torch_seconds']:.2f}",
                *(f"{r['ratio'][s]:.2f}" for s in ("batch norm", "convolutions", "both")),
                f"{r['max_relative_difference']:.1e}",
            )
            for r in rows
        ],
    )  # fmt: skip
    write_markdown(
        args.out,
        "double_backward",
        "Hessian products: linops' double-backward kernels / torch's (time ratios)",
        table
        + f"\n\n{args.dtype}, {args.threads} threads, medians of {repeats} interleaved rounds\n",
    )
    print(table)


if __name__ == "__main__":
    main()
