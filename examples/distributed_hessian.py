r"""Data-parallel Hessian of an MLP on the digits: top eigenvalues with ``torchrun``.

Every rank loads the data, keeps its contiguous shard (:func:`linops.shard`) and builds the
same :class:`linops.HessianOperator` with ``process_group``: a product is the all-reduce of the
ranks' local Hessian-vector products, so it is the Hessian of the mean loss over the *whole*
dataset, replicated on every rank. ``lanczos`` then runs unchanged on every rank; the seed comes
from :func:`linops.shared_seed` so every rank draws the same start vector.

Run on one machine with 2 processes (Gloo on CPU, NCCL on GPUs)::

    torchrun --nproc_per_node=2 examples/distributed_hessian.py --quick

or as a single process (no ``torchrun``): ``python examples/distributed_hessian.py --quick``.
``--check`` also builds the single-process Hessian on the full data on every rank and reports
the largest difference of a product and of the eigenvalues. Rank 0 writes
``DIR/distributed_hessian.json`` (default ``results/distributed_hessian/``) and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import linops
from linops.lanczos import lanczos
from reports.runs import SMOKE_NOTE, print_written, run_metadata, write_text_atomic
from trainers.data import digits
from trainers.models import MLP


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("results/distributed_hessian"))
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 400 samples, 5 eigenvalues (about 8 CPU-seconds measured)",
    )
    p.add_argument("--k", type=int, default=10, help="number of top eigenvalues")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--check", action="store_true", help="compare with the single-process operator")
    p.add_argument("--timeout-s", type=float, default=300, help="collective timeout (hang guard)")
    return p.parse_args()


def init(timeout_s: float) -> tuple[object | None, torch.device]:
    """The default group under torchrun (NCCL with GPUs, else Gloo); ``None`` without it."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(
        "nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s)
    )
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    return dist.group.WORLD, device


def main() -> None:
    args = parse_args()
    group, device = init(args.timeout_s)
    rank, world = (dist.get_rank(), dist.get_world_size()) if group is not None else (0, 1)
    n_train, k = (400, min(args.k, 5)) if args.quick else (1600, args.k)
    data = digits(n_train=n_train, dtype=torch.float64)
    model = MLP(64, 10, widths=(args.width,), seed=torch.Generator().manual_seed(0))
    model = model.double().to(device)
    loss = torch.nn.CrossEntropyLoss()
    X, y = data.X_train.to(device), data.y_train.to(device)

    H = linops.HessianOperator(model, loss, linops.shard((X, y), group), process_group=group)
    seed = linops.shared_seed(group, seed=args.seed)
    start = time.perf_counter()
    res = lanczos(H, k, "LA", seed=seed)
    seconds_lanczos = time.perf_counter() - start
    v = torch.randn(H.shape[1], generator=torch.Generator().manual_seed(seed), dtype=H.torch_dtype)
    v = v.to(device)
    start = time.perf_counter()
    Hv = H @ v
    seconds_product = time.perf_counter() - start

    summary = {
        **run_metadata(quick=args.quick, seed=args.seed),
        **({"smoke_note": SMOKE_NOTE} if args.quick else {}),
        "model": f"MLP 64-{args.width}-10, float64, on {n_train} digits",
        "world_size": world,
        "backend": dist.get_backend(group) if group is not None else "none",
        "num_params": H.shape[0],
        "num_samples": H.num_samples,
        "samples_per_rank": len(linops.shard(X, group)),
        "eigenvalues": res.eigenvalues.tolist(),
        "residuals": res.residuals.tolist(),
        "num_matvecs": res.num_matvecs,
        "seconds_lanczos": seconds_lanczos,
        "seconds_hessian_product": seconds_product,
    }
    if args.check:
        H1 = linops.HessianOperator(model, loss, (X, y))
        ref = lanczos(H1, k, "LA", seed=seed)
        summary["max_abs_diff_product"] = float((H1 @ v - Hv).abs().max())
        summary["max_abs_diff_eigenvalues"] = float((ref.eigenvalues - res.eigenvalues).abs().max())
    if rank == 0:
        args.out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(args.out / "distributed_hessian.json", json.dumps(summary, indent=1))
        if args.quick:
            print(SMOKE_NOTE)
        print(f"Hessian of {H.shape[0]} parameters over {H.num_samples} samples, {world} rank(s)")
        print(f"{'i':>3} {'eigenvalue':>14} {'residual':>10}")
        for i, (lam, r) in enumerate(
            zip(res.eigenvalues.tolist(), res.residuals.tolist(), strict=True)
        ):
            print(f"{i:>3} {lam:>14.6e} {r:>10.2e}")
        print(f"lanczos: {res.num_matvecs} products in {seconds_lanczos:.2f} s")
        for key in ("max_abs_diff_product", "max_abs_diff_eigenvalues"):
            if key in summary:
                print(f"{key}: {summary[key]:.2e}")
        print_written("distributed_hessian", args.out)
    if group is not None:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
