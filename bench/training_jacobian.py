"""Dense training Jacobian of "Understanding Gradient Descent through the Training Jacobian" (anonymous submission): linops against ``jax.jacfwd``, and matrix-free rank(J - I).

Setup (its section 3): digits 1600/197, MLP 64-64-10 GELU (4810 parameters), mean
cross-entropy, batch 64 in a fixed order, 25 epochs (625 steps) of SGD with momentum 0.9 and
cosine decay from 0.1. Both dense computations run in fresh subprocesses of this run, one after
the other, in the same dtype (float32: JAX's default, which the paper used), and their peak
resident memory is read from ``getrusage``. linops runs ``TrainingJacobianOperator.to_dense``
(hand-derived forward-over-reverse MLP tangents batched over column chunks, ``--workers``
forked processes with one thread each); JAX runs ``jax.jit(jax.jacfwd(train))`` over a
``lax.scan`` of the same steps (``bench/_jax_training_jacobian.py``), with its default threading.

Then :math:`\\operatorname{rank}(J - I)` is counted densely (float64 SVD of the linops matrix)
and estimated matrix-free with :func:`estimators.dimension.training_dimension` (block Krylov,
adaptive range finder, and deflated stochastic Lanczos quadrature per threshold), whose product
counts are compared with the ``m`` products of a dense computation.

Usage::

    python bench/training_jacobian.py [--quick] [--out DIR] [--workers 2] [--chunk 128]

Writes ``DIR/training_jacobian.json`` (``seconds_linops``, ``seconds_jax``,
``bytes_peak_linops``, ``bytes_peak_jax``, ...) and ``DIR/training_jacobian.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/_harness.py

from _harness import markdown_table, parser, save_array, save_figure, write_json, write_markdown  # noqa: E402

NAME = "training_jacobian"


def _config(quick: bool) -> dict:
    if quick:
        return {"width": 14, "epochs": 2, "batch_size": 64, "lr": 0.1, "momentum": 0.9}
    return {"width": 64, "epochs": 25, "batch_size": 64, "lr": 0.1, "momentum": 0.9}


def _rss_bytes(who: int) -> int:
    return int(resource.getrusage(who).ru_maxrss) * 1024  # Linux reports KiB


# --------------------------------------------------------------------------- child processes
def _child_linops(cfg: dict, out: Path, workers: int, chunk: int, dtype: str) -> dict:
    import torch

    from linops import TrainingJacobianOperator
    from trainers.setups import digits_mlp_run

    base = _rss_bytes(resource.RUSAGE_SELF)
    setup = digits_mlp_run(dtype=getattr(torch, dtype), **cfg)
    op = TrainingJacobianOperator(setup.run, setup.theta0)
    t0, c0 = time.perf_counter(), time.process_time()
    J = op.to_dense(max_vectors=chunk, workers=workers)
    seconds = time.perf_counter() - t0
    cpu = time.process_time() - c0 + resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime
    save_array(out / "J_linops.npy", J.numpy())
    save_array(out / "theta0.npy", setup.theta0.numpy())
    save_array(out / "thetaT_linops.npy", op.final_params().numpy())
    parent, child = _rss_bytes(resource.RUSAGE_SELF), _rss_bytes(resource.RUSAGE_CHILDREN)
    return {
        "seconds": seconds,
        "cpu_seconds": cpu,
        "bytes_peak": parent + (workers * child if workers > 1 else 0),
        "bytes_peak_parent": parent,
        "bytes_peak_worker": child if workers > 1 else 0,
        "bytes_after_import": base,
        "dim": setup.run.dim,
        "steps": setup.run.num_steps,
    }


def _child_jax(cfg: dict, out: Path, dtype: str) -> dict:
    from bench._jax_training_jacobian import jax_training_jacobian
    from trainers.data import digits

    base = _rss_bytes(resource.RUSAGE_SELF)
    data = digits()
    theta0 = np.load(out / "theta0.npy")
    t0, c0 = time.perf_counter(), time.process_time()
    J, thetaT = jax_training_jacobian(
        theta0,
        data.X_train.numpy(),
        data.y_train.numpy(),
        width=cfg["width"],
        batch_size=cfg["batch_size"],
        epochs=cfg["epochs"],
        lr=cfg["lr"],
        momentum=cfg["momentum"],
        dtype=dtype,
    )
    seconds = time.perf_counter() - t0
    cpu = time.process_time() - c0
    save_array(out / "J_jax.npy", J)
    save_array(out / "thetaT_jax.npy", thetaT)
    return {
        "seconds": seconds,
        "cpu_seconds": cpu,
        "bytes_peak": _rss_bytes(resource.RUSAGE_SELF),
        "bytes_after_import": base,
    }


def _spawn(kind: str, args: argparse.Namespace, cfg: dict) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        kind,
        "--out",
        str(args.out),
        "--config",
        json.dumps(cfg),
    ]
    cmd += ["--workers", str(args.workers), "--chunk", str(args.chunk), "--dtype", args.dtype]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode:
        raise RuntimeError(f"{kind} child failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- rank(J - I)
def _rank_study(cfg: dict, args: argparse.Namespace, J: np.ndarray) -> dict:
    import torch

    from estimators.dimension import training_dimension
    from linops import TrainingJacobianOperator
    from trainers.setups import digits_mlp_run

    torch.set_num_threads(2)
    m = J.shape[0]
    s = torch.linalg.svdvals(torch.from_numpy(J).double() - torch.eye(m, dtype=torch.float64))
    taus = args.rank_thresholds
    setup = digits_mlp_run(dtype=getattr(torch, args.dtype), **cfg)
    out: dict = {
        "rank_thresholds": taus,
        "products_dense": m,
        "singular_values_J_minus_I": s.tolist(),
    }
    out["rank_dense"] = [int((s > t).sum()) for t in taus]
    for method in ("krylov", "range_finder"):
        op = TrainingJacobianOperator(setup.run, setup.theta0, max_vectors=args.chunk)
        t0 = time.perf_counter()
        res = training_dimension(
            op, taus, num_matvecs=m // 2, method=method, block_size=args.rank_block
        )
        est = [int((res.singular_values > t).sum()) for t in taus]
        out[f"rank_{method}"] = est
        out[f"rank_relative_error_{method}"] = [
            abs(e - d) / max(d, 1) for e, d in zip(est, out["rank_dense"], strict=True)
        ]
        out[f"products_{method}"] = res.num_matvecs
        out[f"seconds_rank_{method}"] = time.perf_counter() - t0
    # Krylov-deflated SLQ: one shared basis, one quadrature per threshold, each count within
    # m / 2 products (basis + its quadrature)
    from estimators.counting import singular_value_count
    from linops import IdentityOperator

    op = TrainingJacobianOperator(setup.run, setup.theta0, max_vectors=args.chunk)
    shifted = op - IdentityOperator(m, dtype=op.torch_dtype, device=op.device)
    t0 = time.perf_counter()
    res = singular_value_count(shifted, taus, m // 2, block_size=args.rank_block_deflated)
    out["seconds_rank_deflated_total"] = time.perf_counter() - t0
    out["rank_deflated"] = res.counts.round().to(torch.int64).tolist()
    out["rank_estimate_deflated"] = res.counts.tolist()
    out["rank_stderr_deflated"] = res.stderrs.tolist()
    out["rank_krylov_part_deflated"] = res.krylov_counts.tolist()
    out["products_deflated"] = res.num_matvecs  # per threshold
    out["products_deflated_total"] = op.num_matvecs
    out["deflated_setup"] = {
        "block_size": res.block_size,
        "basis_size": res.basis_size,
        "probes": res.probes,
        "steps": res.steps,
        "smoothing": res.smoothing,
    }
    out["rank_relative_error_deflated"] = [
        abs(e - d) / max(d, 1)
        for e, d in zip(out["rank_estimate_deflated"], out["rank_dense"], strict=True)
    ]
    return out


def lenet(args: argparse.Namespace) -> dict:
    """The paper's appendix A.1 at small scale: LeNet-5 (61,706 parameters) on digits upsampled to
    32x32, Adam with cosine decay from 0.01 (the appendix's optimizer), top singular values and
    rank(J - I) matrix-free. No dense 61,706 x 61,706 matrix is formed."""
    import torch

    from estimators.dimension import training_dimension
    from linops import TrainingJacobianOperator, svds
    from trainers.data import digits
    from trainers.functional import Adam, CosineLR, DataSchedule, TrainingRun
    from trainers.models import LeNet5

    torch.set_num_threads(2)
    torch.manual_seed(0)
    data = digits(size=32)
    n = 256 if args.quick else 1600
    X, y = data.X_train[:n], data.y_train[:n]
    model = LeNet5(act="relu")
    sched = DataSchedule(X, y, 64, epochs=1 if args.quick else args.lenet_epochs)
    run = TrainingRun(model, "cross_entropy", sched, Adam(), CosineLR(0.01, sched.num_steps))
    theta0 = run.initial_values()
    op = TrainingJacobianOperator(run, theta0, max_vectors=args.lenet_chunk)
    out: dict = {"dim": run.dim, "steps": run.num_steps, "engine": run.engine.name, "n_train": n}
    t0 = time.perf_counter()
    run.trajectory(theta0)
    out["seconds_trajectory"] = time.perf_counter() - t0
    k = 4 if args.quick else args.lenet_k
    t0, p0 = time.perf_counter(), op.num_matvecs
    top = svds(op, k, rtol=1e-3, block_size=k, seed=0)
    out["seconds_top_singular_values"] = time.perf_counter() - t0
    out["top_singular_values"] = torch.as_tensor(top.singular_values).tolist()
    out["products_top_singular_values"] = op.num_matvecs - p0
    budget = 64 if args.quick else args.lenet_budget
    taus = [2.0, 3.0, 5.0, 10.0]
    t0 = time.perf_counter()
    dim = training_dimension(op, taus, num_matvecs=budget, block_size=min(32, budget // 2))
    out["seconds_rank"] = time.perf_counter() - t0
    out["rank_thresholds"] = taus
    out["rank_krylov"] = [int((dim.singular_values > t).sum()) for t in taus]
    out["products_rank"] = dim.num_matvecs
    out["rank_note"] = (
        "counts above a threshold are lower bounds when the Krylov basis is not converged"
    )
    out["bytes_peak"] = _rss_bytes(resource.RUSAGE_SELF)
    out["bytes_dense_would_be"] = run.dim**2 * 4
    write_json(args.out, f"{NAME}_lenet", out)
    print(f"LeNet-5 ({out['dim']} parameters, {out['steps']} steps, engine {out['engine']})")
    print(
        f"top singular values {[round(v, 3) for v in out['top_singular_values']]}: {out['seconds_top_singular_values']:.0f} s, {out['products_top_singular_values']} products"
    )
    print(
        f"rank(J - I) > {taus}: {out['rank_krylov']} ({out['products_rank']} products, {out['seconds_rank']:.0f} s); peak {out['bytes_peak'] / 2**20:.0f} MiB"
    )
    return out


def main(argv: list[str] | None = None) -> dict:
    # not results/training_jacobian/: that is the example's directory (same script name)
    p = parser(__doc__, ROOT / "results" / f"bench_{NAME}")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--chunk", type=int, default=128)
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--rank-thresholds", type=float, nargs="+", default=[2.0, 3.0, 1.0, 0.5])
    p.add_argument("--rank-block", type=int, default=64)
    p.add_argument("--rank-block-deflated", type=int, default=16)
    p.add_argument("--skip-jax", action="store_true")
    p.add_argument("--lenet", action="store_true", help="only the LeNet-5 matrix-free scale run")
    p.add_argument("--lenet-epochs", type=int, default=2)
    p.add_argument("--lenet-chunk", type=int, default=16)
    p.add_argument("--lenet-k", type=int, default=10)
    p.add_argument("--lenet-budget", type=int, default=256)
    p.add_argument("--child", choices=["linops", "jax"], help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.child:
        cfg = json.loads(args.config)
        if args.child == "linops":
            res = _child_linops(cfg, args.out, args.workers, args.chunk, args.dtype)
        else:
            res = _child_jax(cfg, args.out, args.dtype)
        print(json.dumps(res))
        return res
    if args.lenet:
        return lenet(args)
    cfg = _config(args.quick)
    load0 = os.getloadavg()
    lin = _spawn("linops", args, cfg)
    result: dict = {
        "config": cfg,
        "dtype": args.dtype,
        "workers": args.workers,
        "chunk": args.chunk,
    }
    result.update({"dim": lin["dim"], "steps": lin["steps"], "cpu_count": os.cpu_count()})
    result.update({f"{k}_linops": v for k, v in lin.items() if k not in ("dim", "steps")})
    J = np.load(args.out / "J_linops.npy")
    if not args.skip_jax:
        jx = _spawn("jax", args, cfg)
        result.update({f"{k}_jax": v for k, v in jx.items()})
        Jj = np.load(args.out / "J_jax.npy")
        result["relative_difference_frobenius"] = float(np.linalg.norm(J - Jj) / np.linalg.norm(Jj))
        result["max_abs_difference"] = float(np.abs(J - Jj).max())
        result["speedup_vs_jax"] = result["seconds_jax"] / result["seconds_linops"]
    result["loadavg_start"], result["loadavg_end"] = list(load0), list(os.getloadavg())
    result.update(_rank_study(cfg, args, J))
    write_json(args.out, NAME, result)
    _plot(result, args.out)
    _summary(result, args.out)
    return result


def _plot(r: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    names = ["linops"] + (["jax.jacfwd"] if "seconds_jax" in r else [])
    secs = [r["seconds_linops"]] + ([r["seconds_jax"]] if "seconds_jax" in r else [])
    mem = [r["bytes_peak_linops"] / 2**20] + (
        [r["bytes_peak_jax"] / 2**20] if "bytes_peak_jax" in r else []
    )
    ax[0].bar(names, secs, color=["C0", "C1"][: len(names)])
    ax[0].set_ylabel("seconds (dense training Jacobian)")
    ax[1].bar(names, mem, color=["C0", "C1"][: len(names)])
    ax[1].set_ylabel("peak resident memory (MiB)")
    fig.suptitle(f"{r['dim']} x {r['dim']} training Jacobian, {r['steps']} steps, {r['dtype']}")
    fig.tight_layout()
    save_figure(fig, out / f"{NAME}.png", dpi=120)
    plt.close(fig)


def _summary(r: dict, out: Path) -> None:
    """Print and write (``training_jacobian.md``) the times, memory and rank estimates."""
    times = markdown_table(
        ["", "seconds", "cpu s", "peak MiB"],
        [
            (who, f"{r[f'seconds_{who}']:.1f}", f"{r[f'cpu_seconds_{who}']:.1f}",
             f"{r[f'bytes_peak_{who}'] / 2**20:.0f}")
            for who in ("linops", "jax")
            if f"seconds_{who}" in r
        ],
    )  # fmt: skip
    parts = [times]
    if "speedup_vs_jax" in r:
        parts.append(
            f"speedup vs jax.jacfwd: {r['speedup_vs_jax']:.2f}x; relative Frobenius difference "
            f"{r['relative_difference_frobenius']:.2e}"
        )
    parts.append(
        markdown_table(
            ["threshold", "dense", "block Krylov", "range finder", "deflated SLQ"],
            [
                (
                    f"{t:g}",
                    r["rank_dense"][i],
                    f"{r['rank_krylov'][i]} ({r['products_krylov']} products)",
                    f"{r['rank_range_finder'][i]} ({r['products_range_finder']} products)",
                    f"{r['rank_estimate_deflated'][i]:.1f} +- {r['rank_stderr_deflated'][i]:.1f} "
                    f"({r['products_deflated']} products)",
                )
                for i, t in enumerate(r["rank_thresholds"])
            ],
        )
    )
    parts.append(
        f"rank(J - I): dense needs {r['products_dense']} products; deflated SLQ, all "
        f"thresholds: {r['products_deflated_total']} products, "
        f"{r['seconds_rank_deflated_total']:.0f} s"
    )
    write_markdown(
        out, NAME,
        f"bench/training_jacobian.py: dense {r['dim']}x{r['dim']} training Jacobian over "
        f"{r['steps']} steps ({r['dtype']})",
        "\n\n".join(parts),
    )  # fmt: skip


if __name__ == "__main__":
    main()
