"""One rank of the 2-process Gloo runs of ``test_distributed.py`` (not a test module).

Usage: ``python distributed_worker.py SCENARIO OUTDIR`` with ``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR`` (127.0.0.1), ``MASTER_PORT`` and ``LINOPS_TEST_TIMEOUT`` (seconds) in the
environment. Every rank writes ``OUTDIR/rank<r>.npz`` (arrays) and ``OUTDIR/rank<r>.json``
(error messages), which the test compares with the single-process operators.
"""

from __future__ import annotations

import datetime
import inspect
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import linops
from linops.distributed import DistributedError, shard, shared_seed
from linops.lanczos import lanczos
from linops.randomized import randomized_svd
from linops.svds import svds

N_SAMPLES, D_IN, WIDTH, D_OUT = 11, 3, 6, 2


def make_problem(width: int = WIDTH) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """Seeded float64 MLP and regression data shared by the workers and the test."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(D_IN, width), torch.nn.Tanh(), torch.nn.Linear(width, D_OUT)
    ).double()
    X = torch.randn(N_SAMPLES, D_IN, dtype=torch.float64)
    y = torch.randn(N_SAMPLES, D_OUT, dtype=torch.float64)
    return model, X, y


def probes(n: int, k: int, seed: int) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def hutchinson(op: linops.TorchLinearOperator, num: int, seed: int) -> float:
    """Rademacher Hutchinson with a seeded generator, as the trace estimators draw probes."""
    gen = torch.Generator().manual_seed(seed)
    Z = torch.randint(0, 2, (op.shape[1], num), generator=gen, dtype=torch.float64) * 2 - 1
    return float((Z * op._apply(Z)).sum() / num)


def library_traces(op: linops.TorchLinearOperator, seed: int) -> dict[str, float]:
    """The project's trace estimators, if they exist yet, with the same seed on every rank."""
    try:
        import estimators.trace as trace
    except ImportError:
        return {}
    out = {}
    for name in ("hutchinson_trace", "hutchpp_trace", "xtrace"):
        fn = getattr(trace, name, None)
        if fn is None:
            continue
        params = inspect.signature(fn).parameters
        kwargs = {"seed": seed} if "seed" in params else {}
        for budget in ("num_matvecs", "num_samples", "m"):
            if budget in params:
                kwargs[budget] = 12
                break
        res = fn(op, **kwargs)
        value = getattr(res, "mean", getattr(res, "estimate", res))
        out[name] = float(value)
    return out


def scenario_products(rank: int, out: dict, errors: dict) -> None:
    world = dist.group.WORLD
    model, X, y = make_problem()
    loss = torch.nn.MSELoss()
    data = shard((X, y), world)
    H = linops.HessianOperator(model, loss, data, process_group=world, batch_size=2)
    G = linops.GGNOperator(
        model, torch.nn.MSELoss(reduction="sum"), data, process_group=world, batch_size=4
    )
    J = linops.JacobianOperator(model, shard(X, world), process_group=world, batch_size=2)
    K = linops.NTKOperator(model, shard(X, world), process_group=world)
    m, nd = H.shape[0], J.shape[0]
    V, U = probes(m, 3, 1), probes(nd, 2, 2)
    out["H_V"], out["H_v"], out["H_dense"] = H @ V, H @ V[:, 0], H.to_dense()
    out["G_V"], out["J_V"], out["JT_U"] = G @ V, J @ V, J.T @ U
    out["K_U"], out["J_dense"] = K @ U, J.to_dense()
    # the curvature family: products all-reduced (EF, Fisher), factors all-reduced (KFAC, EKFAC)
    ef = linops.EmpiricalFisherOperator(model, loss, data, process_group=world, batch_size=2)
    fisher = linops.FisherOperator(model, loss, data, process_group=world, batch_size=3)
    out["EF_V"], out["F_V"] = ef @ V, fisher @ V
    for cls in (linops.KFACOperator, linops.EKFACOperator):
        kfac = cls(model, loss, data, process_group=world, batch_size=2)
        out[f"{cls.__name__}_dense"] = kfac.to_dense()
    out["JTJ_V"] = (J.T @ J) @ V  # Gauss-Newton-type product through the replicated J
    out["lanczos_H"] = lanczos(H, 4, "LA", seed=3).eigenvalues
    out["lanczos_K"] = lanczos(K, 3, "LA", seed=4).eigenvalues
    out["svds_J"] = svds(J, 3, seed=5).singular_values
    out["rsvd_J"] = randomized_svd(J, 3, seed=9).singular_values
    out["hutch_H"] = torch.tensor(hutchinson(H, 6, seed=6))
    out["hutch_K"] = torch.tensor(hutchinson(K, 6, seed=7))
    for name, value in library_traces(H, seed=8).items():
        out[f"lib_{name}_H"] = torch.tensor(value)
    out["shared_seed"] = torch.tensor(shared_seed(world))
    # column-parallel dense construction of a local (replicated) operator, with checkpoints
    local = linops.HessianOperator(model, loss, (X, y))
    ckpt = Path(os.environ["LINOPS_TEST_OUT"]) / "ckpt"
    out["colpar_dense"] = local.to_dense(process_group=world, max_vectors=5, checkpoint_dir=ckpt)
    out["colpar_resumed"] = local.to_dense(process_group=world, max_vectors=5, checkpoint_dir=ckpt)
    try:
        H.to_dense(process_group=world)
    except ValueError as exc:
        errors["colpar_refused"] = str(exc)


class _CorruptLoader:
    def __iter__(self):
        raise ValueError("corrupt shard: cannot decode sample 3")


def _expect_error(name: str, errors: dict, fn) -> None:
    start = time.monotonic()
    try:
        fn()
        errors[name] = None
    except DistributedError as exc:
        errors[name] = {"message": str(exc), "failed": exc.failed_ranks}
    errors[f"{name}_seconds"] = time.monotonic() - start


def scenario_failures(rank: int, out: dict, errors: dict) -> None:
    world = dist.group.WORLD
    model, X, y = make_problem()
    loss = torch.nn.MSELoss()
    data = shard((X, y), world)
    m = linops.HessianOperator(model, loss, data).shape[0]
    v = probes(m, 1, 0)

    bad = _CorruptLoader() if rank == 1 else data
    H_bad = linops.HessianOperator(model, loss, bad, process_group=world)
    _expect_error("data_error", errors, lambda: H_bad @ v)

    wide = make_problem(width=WIDTH + rank)[0]
    H_wide = linops.HessianOperator(wide, loss, data, process_group=world)
    _expect_error("shape_mismatch", errors, lambda: H_wide @ probes(H_wide.shape[0], 1, 0))

    _expect_error(
        "jacobian_shape_mismatch",
        errors,
        lambda: linops.JacobianOperator(wide, shard(X, world), process_group=world),
    )

    H = linops.HessianOperator(model, loss, data, process_group=world)
    _expect_error("columns_mismatch", errors, lambda: H @ probes(m, 1 + rank, 0))
    _expect_error("seed_mismatch", errors, lambda: lanczos(H, 2, seed=rank))

    def raise_on_rank1(out_, y_):
        if rank == 1:
            raise RuntimeError("loss exploded on rank 1")
        return loss(out_, y_)

    H_loss = linops.HessianOperator(
        model, raise_on_rank1, data, process_group=world, reduction="sum"
    )
    _expect_error("loss_error", errors, lambda: H_loss @ v)

    # what differs between the ranks is named, with each rank's value
    dtype = torch.float32 if rank == 1 else torch.float64
    H_dtype = linops.HessianOperator(model, loss, data, process_group=world, dtype=dtype)
    _expect_error("dtype_mismatch", errors, lambda: H_dtype @ v)
    _expect_error("k_mismatch", errors, lambda: randomized_svd(H, 2 + rank, seed=9))

    # a non-finite product on one rank raises on every rank (not NaN everywhere, silently)
    def nan_on_rank1(out_, y_):
        value = loss(out_, y_)
        return value * float("nan") if rank == 1 else value

    H_nan = linops.HessianOperator(model, nan_on_rank1, data, process_group=world, reduction="mean")
    _expect_error("nan_product", errors, lambda: H_nan @ v)
    local_nan = linops.HessianOperator(model, nan_on_rank1, (X, y), reduction="mean")
    _expect_error(
        "colpar_nan", errors, lambda: local_nan.to_dense(process_group=world, max_vectors=5)
    )
    # the process group is still usable after all of the above
    out["after_failures"] = H @ v


def scenario_unresponsive(rank: int, out: dict, errors: dict) -> None:
    """Rank 1 stays alive but never joins; rank 0 must get an error after the group timeout."""
    group = dist.new_group(ranks=[0, 1], timeout=datetime.timedelta(seconds=3))
    model, X, y = make_problem()
    H = linops.HessianOperator(model, torch.nn.MSELoss(), shard((X, y)), process_group=group)
    if rank == 1:
        time.sleep(6)  # busy elsewhere, longer than the group's timeout
    else:
        _expect_error("unresponsive", errors, lambda: H @ probes(H.shape[0], 1, 0))
    dist.barrier()


def scenario_dead(rank: int, out: dict, errors: dict) -> None:
    """Rank 1 exits without a word; rank 0's next product must raise, not hang."""
    model, X, y = make_problem()
    world = dist.group.WORLD
    H = linops.HessianOperator(model, torch.nn.MSELoss(), shard((X, y)), process_group=world)
    dist.barrier()
    if rank == 1:
        return
    time.sleep(1)
    _expect_error("dead", errors, lambda: H @ probes(H.shape[0], 1, 0))


SCENARIOS = {
    "all": ("products", "failures", "unresponsive", "dead"),
    "products": ("products",),
    "failures": ("failures",),
}


def main() -> None:
    scenario, outdir = sys.argv[1], Path(sys.argv[2])
    os.environ["LINOPS_TEST_OUT"] = str(outdir)
    torch.set_num_threads(1)
    timeout = datetime.timedelta(seconds=float(os.environ.get("LINOPS_TEST_TIMEOUT", "30")))
    t0 = time.monotonic()
    dist.init_process_group("gloo", timeout=timeout)
    rank = dist.get_rank()
    print(f"rank {rank}: init {time.monotonic() - t0:.2f} s", flush=True)
    out: dict = {}
    errors: dict = {}
    for name in SCENARIOS[scenario]:
        globals()[f"scenario_{name}"](rank, out, errors)
    print(f"rank {rank}: {scenario} done at {time.monotonic() - t0:.2f} s", flush=True)
    arrays = {
        k: np.asarray(v.detach().numpy() if torch.is_tensor(v) else v) for k, v in out.items()
    }
    np.savez(outdir / f"rank{rank}.npz", **arrays)
    (outdir / f"rank{rank}.json").write_text(json.dumps(errors))
    if "dead" in SCENARIOS[scenario]:
        os._exit(0)  # rank 1 has died already: no barrier, no clean shutdown
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
