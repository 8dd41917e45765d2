"""Streamed datasets: peak memory of a Hessian over many batches against one batch (issue 22).

A loss Hessian over ``--batches`` batches whose loader makes each batch when it is drawn (the
dataset never exists in memory), with ``memory_budget=1`` so that nothing is cached: every
product draws the loader again and rebuilds each batch's graph. It is compared with the same
operator over a single batch (its graph cached, the default), and with the operator over all
batches cached (the default budget), each in its own process:

* memory: the peak resident set size (``VmHWM`` of ``/proc/self/status``, reset through
  ``/proc/self/clear_refs`` once the model is built and torch is warm: one product of a
  throwaway operator on two samples has run and been freed) above the resident size at that
  moment, i.e. what the operator and its products added;
* products: ``--products`` single-vector products ``H v`` with seeded ``v``; the streamed and
  the cached operator over the same batches must agree bit for bit (float64, CPU): their
  SHA-256 are compared.

Modes run interleaved, ``--repeats`` times each; medians are reported with the load average.
The resident size also holds what glibc's ``malloc`` keeps of freed memory: by default it
raises its mmap threshold after each large free (up to 32 MiB) and keeps freed blocks below it
in its heap, which the graphs rebuilt by a streamed pass fragment (a streamed pass lowers the
threshold to 16 MiB while it runs: ``linops.memory.streamed_pass_allocation``);
``--malloc return`` runs the children with ``MALLOC_MMAP_THRESHOLD_=131072`` (freed blocks
above 128 KiB go back to the system), which leaves what the operator itself holds; ``--malloc return-huge`` also
asks glibc (2.35 or later) for transparent huge pages, which makes faulting the mapped blocks
in again cheaper.
Run: ``python3 bench/streaming.py`` (``--model mlp`` for an MLP, ``--quick`` for a smoke run).
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from _harness import markdown_table, parser, write_json, write_markdown  # noqa: E402

MODES = ("one", "streamed", "cached")


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def _model(kind: str) -> Any:
    import torch
    from torch import nn

    torch.manual_seed(0)
    if kind == "mlp":
        return nn.Sequential(
            nn.Flatten(), nn.Linear(3 * 16 * 16, 256), nn.Tanh(), nn.Linear(256, 256),
            nn.Tanh(), nn.Linear(256, 10),
        )  # fmt: skip

    class Block(nn.Module):
        def __init__(self, c: int) -> None:
            super().__init__()
            self.c1, self.b1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
            self.c2, self.b2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

        def forward(self, x: Any) -> Any:
            h = torch.relu(self.b1(self.c1(x)))
            return torch.relu(x + self.b2(self.c2(h)))

    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(), Block(16),
        nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        Block(32), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )  # fmt: skip
    return net.eval()


class Loader:
    """Batch ``i`` made from seed ``i`` when drawn: CIFAR-shaped (3 x 16 x 16), 10 classes."""

    def __init__(self, batches: int, size: int, dtype: Any) -> None:
        self.batches, self.size, self.dtype = batches, size, dtype

    def __iter__(self) -> Any:
        import torch

        for i in range(self.batches):
            g = torch.Generator().manual_seed(i)
            x = torch.randn(self.size, 3, 16, 16, generator=g, dtype=self.dtype)
            yield x, torch.randint(0, 10, (self.size,), generator=g)


def child(args: Any) -> None:
    """One mode in this process: print a JSON line with its memory, time and products."""
    import torch
    from torch import nn

    from linops import HessianOperator

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    model = _model(args.model).to(dtype)
    batches = 1 if args.child == "one" else args.batches
    loader = Loader(batches, args.batch_size, dtype)
    # warm up: one product on two samples touches the code and one-time state that every
    # operator needs (library pages, autograd's and the dispatcher's caches), then is freed
    warm = Loader(1, 2, dtype)
    HessianOperator(model, nn.CrossEntropyLoss(), warm, memory_budget=1) @ torch.ones(
        sum(p.numel() for p in model.parameters()), dtype=dtype
    )
    gc.collect()
    open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
    base = _status("VmRSS")
    start = time.perf_counter()
    budget = 1 if args.child == "streamed" else None
    H = HessianOperator(model, nn.CrossEntropyLoss(), loader, memory_budget=budget)
    g = torch.Generator().manual_seed(1)
    digest = hashlib.sha256()
    for _ in range(args.products):
        v = torch.randn(H.shape[1], generator=g, dtype=dtype)
        digest.update((H @ v).numpy().tobytes())
    seconds = time.perf_counter() - start
    info = H.cache_info()
    print(
        json.dumps(
            {
                "mode": args.child,
                "bytes_peak_above_start": _status("VmHWM") - base,
                "bytes_rss_start": base,
                "seconds": seconds,
                "sha256_products": digest.hexdigest(),
                "batches_cached": info.batches_cached,
                "graphs_cached": info.graphs_cached,
                "num_batches": info.num_batches,
                "parameters": H.shape[1],
            }
        )
    )


def main() -> None:
    p = parser(__doc__, "results/streaming")
    p.add_argument("--model", choices=("resnet", "mlp"), default="resnet")
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--products", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    p.add_argument(
        "--modes", nargs="+", choices=MODES, default=list(MODES), help="which runs (default all)"
    )
    p.add_argument(
        "--malloc",
        choices=("default", "return", "return-huge"),
        default="default",
        help="glibc's malloc as it is, or 'return': MALLOC_MMAP_THRESHOLD_=131072 in the "
        "children, so blocks above 128 KiB are mapped and given back to the system when freed "
        "(glibc's default raises that threshold after each large free, up to 32 MiB, and keeps "
        "freed blocks below it in its heap, where a streamed pass's rebuilt graphs fragment it); "
        "'return-huge': the same threshold as GLIBC_TUNABLES with glibc.malloc.hugetlb=1 "
        "(glibc 2.35 or later), so the mapped blocks are faulted in as transparent huge pages "
        "where the kernel allows them (/sys/kernel/mm/transparent_hugepage/enabled: madvise)",
    )
    p.add_argument("--child", choices=MODES, help=argparse_hidden())
    args, _ = p.parse_known_args()
    if args.child:
        child(args)
        return
    if args.quick:
        args.batches, args.batch_size, args.repeats, args.products = 4, 16, 1, 1
    modes = [m for m in MODES if m in args.modes]
    env = dict(os.environ)
    if args.malloc == "return":
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    elif args.malloc == "return-huge":
        env["GLIBC_TUNABLES"] = "glibc.malloc.hugetlb=1:glibc.malloc.mmap_threshold=131072"
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    for _ in range(args.repeats):
        for mode in modes:  # interleaved
            cmd = [sys.executable, __file__, "--child", mode, "--model", args.model]
            cmd += ["--batches", str(args.batches), "--batch-size", str(args.batch_size)]
            cmd += ["--products", str(args.products), "--threads", str(args.threads)]
            cmd += ["--dtype", args.dtype]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
            runs[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
    med = {m: statistics.median(r["bytes_peak_above_start"] for r in runs[m]) for m in modes}
    sec = {m: statistics.median(r["seconds"] for r in runs[m]) for m in modes}
    same = {r["sha256_products"] for m in ("streamed", "cached") if m in runs for r in runs[m]}
    ratio = {f"ratio_{m}_over_one_batch": med[m] / med["one"] for m in modes if "one" in med}
    payload = {
        "model": args.model,
        "batches": args.batches,
        "batch_size": args.batch_size,
        "products": args.products,
        "dtype": args.dtype,
        "threads": args.threads,
        "malloc": args.malloc,
        "parameters": runs[modes[0]][0]["parameters"],
        "load_average": list(os.getloadavg()),
        "bytes_peak_above_start_median": med,
        "seconds_median": sec,
        **ratio,
        "streamed_equals_cached_bitwise": len(same) == 1 if "cached" in runs else None,
        "runs": runs,
    }
    write_json(args.out, "streaming", payload)
    table = markdown_table(
        ["mode", "peak above start (MB)", "seconds"],
        [(m, f"{med[m] / 1e6:.1f}", f"{sec[m]:.2f}") for m in modes],
    )
    notes = (
        "; ".join(f"{k}: {v:.3f}" for k, v in ratio.items())
        + f"; streamed == cached bit for bit: {payload['streamed_equals_cached_bitwise']}; "
        f"malloc {args.malloc}; load {payload['load_average']}"
    )
    write_markdown(
        args.out, "streaming", "bench/streaming.py: one batch's memory over a streamed dataset",
        f"{table}\n\n{notes}",
    )  # fmt: skip


def argparse_hidden() -> str:
    """Return argparse's marker for an internal option."""
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
