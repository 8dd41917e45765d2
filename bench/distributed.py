r"""Strong scaling of the data-parallel Hessian on ``torch.distributed`` (Gloo, loopback).

For each process count :math:`P` (default 1 and 2) the script launches :math:`P` ranks on
127.0.0.1 (the way ``torchrun --nproc_per_node=P`` would), each holding :math:`1/P` of the same
dataset, and measures on the same MLP / digits problem:

* one Hessian-vector product (``k = 1``) and one block product (``k = 8``), median of repeats
  after a warm-up (the first batched backward pays a one-off vmap start-up);
* ``lanczos`` for the top ``--k`` eigenvalues (same seed on every rank);
* the time spent inside collectives (``all_reduce``/``all_gather``, timed by wrapping them):
  transfer *and* waiting for the slowest rank, reported as the communication share.

:math:`P = 1` is the plain single-process operator (no process group), the baseline of the
speed-ups. Every rank uses ``--threads`` intra-op threads (default 1), so :math:`P` ranks use
:math:`P` cores; on a 2-core machine :math:`P > 2` oversubscribes and cannot scale.

Run ``python bench/distributed.py [--quick] [--procs 1 2 4] [--out DIR]``; writes
``DIR/distributed.json`` (default ``results/distributed/``) and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/_harness.py

from _harness import markdown_table, parser, write_json, write_markdown

import linops
from linops.lanczos import lanczos
from trainers.data import digits
from trainers.models import MLP

NAME = "distributed"


def parse_args() -> argparse.Namespace:
    p = parser(__doc__, f"results/{NAME}", quick_help="small run (CI smoke test)")
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per rank")
    p.add_argument("--k", type=int, default=10, help="top eigenvalues for lanczos")
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--samples", type=int, default=1600)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--timeout-s", type=float, default=600, help="per launch (hang guard)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args()


# --------------------------------------------------------------------------- one rank
class CollectiveTimer:
    """Wraps ``torch.distributed`` collectives to add up the seconds spent inside them."""

    def __init__(self) -> None:
        self.seconds = 0.0
        for name in ("all_reduce", "all_gather", "broadcast"):
            setattr(dist, name, self._timed(getattr(dist, name)))

    def _timed(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        return wrapper


def timed(fn: Callable[[], Any], repeats: int, timer: CollectiveTimer) -> tuple[float, float]:
    """Median wall seconds of ``fn()`` and the median seconds in collectives."""
    walls, comms = [], []
    for _ in range(repeats):
        c0, t0 = timer.seconds, time.perf_counter()
        fn()
        walls.append(time.perf_counter() - t0)
        comms.append(timer.seconds - c0)
    return statistics.median(walls), statistics.median(comms)


def worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    world = int(os.environ["WORLD_SIZE"])
    timeout = datetime.timedelta(seconds=args.timeout_s)
    group = None
    if world > 1:
        dist.init_process_group("gloo", timeout=timeout)
        group = dist.group.WORLD
    timer = CollectiveTimer()
    data = digits(n_train=args.samples, dtype=torch.float64)
    model = MLP(64, 10, widths=(args.width,), seed=torch.Generator().manual_seed(0)).double()
    X, y = data.X_train, data.y_train
    H = linops.HessianOperator(
        model, torch.nn.CrossEntropyLoss(), linops.shard((X, y), group), process_group=group
    )
    gen = torch.Generator().manual_seed(1)
    v = torch.randn(H.shape[1], 1, generator=gen, dtype=torch.float64)
    V = torch.randn(H.shape[1], 8, generator=gen, dtype=torch.float64)
    for _ in range(2):  # warm-up: graphs, vmap start-up, first collectives
        H._apply(v), H._apply(V)
    s_hvp, c_hvp = timed(lambda: H._apply(v), args.repeats, timer)
    s_blk, c_blk = timed(lambda: H._apply(V), max(1, args.repeats // 2), timer)
    seed = linops.shared_seed(group, seed=0)
    c0, t0 = timer.seconds, time.perf_counter()
    res = lanczos(H, args.k, "LA", seed=seed)
    s_lan, c_lan = time.perf_counter() - t0, timer.seconds - c0
    if world == 1 or dist.get_rank() == 0:
        row = {
            "processes": world,
            "threads_per_process": args.threads,
            "num_params": H.shape[0],
            "num_samples": H.num_samples,
            "seconds_hvp": s_hvp,
            "seconds_hvp_collectives": c_hvp,
            "seconds_hvp_block8": s_blk,
            "seconds_hvp_block8_collectives": c_blk,
            "seconds_lanczos": s_lan,
            "seconds_lanczos_collectives": c_lan,
            "lanczos_products": res.num_matvecs,
            "eigenvalues": res.eigenvalues.tolist(),
        }
        write_json(args.out, f"p{world}", row, indent=None)
    if group is not None:
        dist.barrier()
        dist.destroy_process_group()


# --------------------------------------------------------------------------- launcher
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: argparse.Namespace, procs: int) -> dict:
    """Run ``procs`` ranks of this script on loopback, bounded by ``--timeout-s``."""
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "WORLD_SIZE": str(procs),
        "GLOO_SOCKET_IFNAME": "lo",
        "OMP_NUM_THREADS": str(args.threads),
    }
    argv = [sys.executable, __file__, "--worker", "--out", str(args.out)]
    argv += ["--threads", str(args.threads), "--k", str(args.k), "--width", str(args.width)]
    argv += ["--samples", str(args.samples), "--repeats", str(args.repeats)]
    argv += ["--timeout-s", str(args.timeout_s)]
    ranks = [
        subprocess.Popen(argv, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)})
        for r in range(procs)
    ]
    deadline = time.monotonic() + args.timeout_s
    try:
        for p in ranks:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for p in ranks:
            if p.poll() is None:
                p.kill()
                p.wait()
    if any(p.returncode for p in ranks):
        raise RuntimeError(f"{procs} processes: a rank exited with {[p.returncode for p in ranks]}")
    return json.loads((args.out / f"p{procs}.json").read_text())


def main() -> None:
    args = parse_args()
    if args.quick:
        args.samples, args.repeats, args.k, args.width = 400, 3, 5, 64
    args.out.mkdir(parents=True, exist_ok=True)
    if args.worker:
        worker(args)
        return
    rows = [launch(args, p) for p in args.procs]
    base = rows[0]
    for row in rows:
        for key in ("seconds_hvp", "seconds_hvp_block8", "seconds_lanczos"):
            row[f"speedup_{key.removeprefix('seconds_')}"] = base[key] / row[key]
            row[f"share_collectives_{key.removeprefix('seconds_')}"] = (
                row[f"{key}_collectives"] / row[key]
            )
        row["max_abs_diff_eigenvalues_vs_first"] = max(
            abs(a - b) for a, b in zip(row["eigenvalues"], base["eigenvalues"], strict=True)
        )
    result = {
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "backend": "gloo (127.0.0.1)",
        "quick": args.quick,
        "rows": rows,
    }
    write_json(args.out, NAME, result)
    table = markdown_table(
        ["P", "HVP ms", "comm", "x", "HV8 ms", "comm", "x", "lanczos s", "#Hv", "comm", "x",
         "abs diff of eigenvalues"],
        [
            (r["processes"], f"{1e3 * r['seconds_hvp']:.1f}", f"{r['share_collectives_hvp']:.0%}",
             f"{r['speedup_hvp']:.2f}", f"{1e3 * r['seconds_hvp_block8']:.1f}",
             f"{r['share_collectives_hvp_block8']:.0%}", f"{r['speedup_hvp_block8']:.2f}",
             f"{r['seconds_lanczos']:.2f}", r["lanczos_products"],
             f"{r['share_collectives_lanczos']:.0%}", f"{r['speedup_lanczos']:.2f}",
             f"{r['max_abs_diff_eigenvalues_vs_first']:.1e}")
            for r in rows
        ],
    )  # fmt: skip
    write_markdown(
        args.out, NAME,
        f"bench/distributed.py: Hessian of {base['num_params']} params over "
        f"{base['num_samples']} samples, {args.threads} thread(s) per process, "
        f"{os.cpu_count()} CPUs",
        table,
    )  # fmt: skip


if __name__ == "__main__":
    main()
