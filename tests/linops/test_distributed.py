"""Data-parallel operators on 2 Gloo processes (loopback) against the single-process operators.

Each test launches ``distributed_worker.py`` twice (ranks 0 and 1) as subprocesses on
127.0.0.1 with a free port; every launch is bounded by a wall-clock timeout (a hang guard, not
a speed assertion) and the processes are killed if it runs out. The process groups use a short
collective timeout, so a rank that dies surfaces as an error, not a hang.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import linops
from linops._checkpoint import CheckpointWarning
from linops.distributed import DistributedError, dense_columns, shard, shard_range, shared_seed
from linops.lanczos import lanczos
from linops.randomized import randomized_svd
from linops.svds import svds

WORKER = Path(__file__).with_name("distributed_worker.py")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(WORKER.parent))
from distributed_worker import make_problem, probes  # noqa: E402

TOL = 1e-12
LAUNCH_TIMEOUT_S = 90


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(scenario: str, out: Path, *, collective_timeout_s: float = 30) -> list[dict]:
    """Run both ranks of ``scenario``; returns per-rank ``{"arrays": ..., "errors": ...}``."""
    out.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "WORLD_SIZE": "2",
        "GLOO_SOCKET_IFNAME": "lo",
        "LINOPS_TEST_TIMEOUT": str(collective_timeout_s),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT),
    }
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), scenario, str(out)],
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for r in range(2)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=LAUNCH_TIMEOUT_S)[0].decode(errors="replace"))
    except subprocess.TimeoutExpired:
        pytest.fail(f"{scenario}: the 2-process run hung for more than {LAUNCH_TIMEOUT_S} s")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    results = []
    for r, p in enumerate(procs):
        json_path, npz_path = out / f"rank{r}.json", out / f"rank{r}.npz"
        if not json_path.exists():
            results.append(None)
            continue
        with np.load(npz_path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        results.append({"arrays": arrays, "errors": json.loads(json_path.read_text())})
        assert p.returncode == 0, f"rank {r} exited with {p.returncode}:\n{logs[r]}"
    assert all(results), "a rank wrote no results:\n" + "\n".join(logs)
    return results


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """One 2-rank launch for every scenario (starting Python with torch costs seconds)."""
    return _launch("all", tmp_path_factory.mktemp("distributed"))


# --------------------------------------------------------------------------- single-process references
@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    model, X, y = make_problem()
    H = linops.HessianOperator(model, torch.nn.MSELoss(), (X, y), batch_size=5)
    G = linops.GGNOperator(model, torch.nn.MSELoss(reduction="sum"), (X, y))
    J = linops.JacobianOperator(model, X)
    K = linops.NTKOperator(model, X)
    V, U = probes(H.shape[0], 3, 1), probes(J.shape[0], 2, 2)
    ref = {
        "H_V": H @ V,
        "H_v": H @ V[:, 0],
        "H_dense": H.to_dense(),
        "G_V": G @ V,
        "J_V": J @ V,
        "JT_U": J.T @ U,
        "K_U": K @ U,
        "J_dense": J.to_dense(),
        "JTJ_V": (J.T @ J) @ V,
        "lanczos_H": lanczos(H, 4, "LA", seed=3).eigenvalues,
        "lanczos_K": lanczos(K, 3, "LA", seed=4).eigenvalues,
        "svds_J": svds(J, 3, seed=5).singular_values,
        "rsvd_J": randomized_svd(J, 3, seed=9).singular_values,
        "EF_V": linops.EmpiricalFisherOperator(model, torch.nn.MSELoss(), (X, y)) @ V,
        "F_V": linops.FisherOperator(model, torch.nn.MSELoss(), (X, y)) @ V,
    }
    for cls in (linops.KFACOperator, linops.EKFACOperator):
        ref[f"{cls.__name__}_dense"] = cls(model, torch.nn.MSELoss(), (X, y)).to_dense()
    from distributed_worker import hutchinson, library_traces

    ref["hutch_H"] = torch.tensor(hutchinson(H, 6, seed=6))
    ref["hutch_K"] = torch.tensor(hutchinson(K, 6, seed=7))
    for name, value in library_traces(H, seed=8).items():
        ref[f"lib_{name}_H"] = torch.tensor(value)
    ref["colpar_dense"] = ref["colpar_resumed"] = H.to_dense()
    return {k: v.numpy() for k, v in ref.items()}


KEYS = [
    "H_V", "H_v", "H_dense", "G_V", "J_V", "JT_U", "K_U", "J_dense", "JTJ_V",
    "lanczos_H", "lanczos_K", "svds_J", "rsvd_J", "hutch_H", "hutch_K", "colpar_dense", "colpar_resumed",
    "EF_V", "F_V", "KFACOperator_dense", "EKFACOperator_dense",
]  # fmt: skip


@pytest.mark.parametrize("key", KEYS)
def test_distributed_equals_single_process(run, reference, key):
    for rank in (0, 1):
        got = run[rank]["arrays"][key]
        np.testing.assert_allclose(got, reference[key], rtol=TOL, atol=TOL * 1e-2)


def test_library_trace_estimators_equal_single_process(run, reference):
    keys = [k for k in reference if k.startswith("lib_")]
    if not keys:
        pytest.skip("estimators.trace is not available yet")
    for key in keys:
        for rank in (0, 1):
            np.testing.assert_allclose(run[rank]["arrays"][key], reference[key], rtol=TOL)


def test_products_are_bitwise_identical_on_every_rank(run):
    a0, a1 = run[0]["arrays"], run[1]["arrays"]
    assert a0.keys() == a1.keys()
    for key in a0:
        np.testing.assert_array_equal(a0[key], a1[key], err_msg=key)


def test_column_parallel_refuses_data_parallel_operator(run):
    for rank in (0, 1):
        msg = run[rank]["errors"]["colpar_refused"]
        assert "expected an operator whose products are local" in msg


def test_checkpointed_dense_resumes_from_saved_chunks(reference, tmp_path):
    model, X, y = make_problem()
    H = linops.HessianOperator(model, torch.nn.MSELoss(), (X, y))
    dense = H.to_dense(max_vectors=5, checkpoint_dir=tmp_path)
    np.testing.assert_allclose(dense.numpy(), reference["H_dense"], rtol=TOL, atol=TOL * 1e-2)
    files = sorted(tmp_path.glob("cols_*.npy"))
    assert len(files) == -(-H.shape[1] // 5)
    # saved chunks are loaded, not recomputed
    computed = []
    apply = H._apply
    H._apply = lambda X, adjoint=False: computed.append(X.shape[1]) or apply(X, adjoint)
    seen = []
    resumed = dense_columns(
        H, max_vectors=5, checkpoint_dir=tmp_path, on_chunk=lambda *c: seen.append(c)
    )
    torch.testing.assert_close(resumed, dense, rtol=0, atol=0)
    assert computed == [] and seen[0] == (0, 5) and seen[-1][1] == H.shape[1]
    # a chunk overwritten with other values fails its checksum: named, recomputed
    np.save(files[0], np.full((H.shape[0], 5), 7.0), allow_pickle=False)
    with pytest.warns(CheckpointWarning, match=f"{files[0].name} is damaged"):
        resumed = H.to_dense(max_vectors=5, checkpoint_dir=tmp_path)
    torch.testing.assert_close(resumed, dense, rtol=0, atol=0)
    assert computed == [5]
    with pytest.raises(ValueError, match="checkpoint: .* holds a different computation"):
        H.to_dense(max_vectors=4, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="max_vectors: expected a positive integer"):
        dense_columns(H, max_vectors=-1)


# --------------------------------------------------------------------------- failures
def _failure(run: list[dict], name: str) -> list[dict]:
    return [run[r]["errors"][name] for r in (0, 1)]


@pytest.mark.parametrize(
    ("name", "pattern", "failed"),
    [
        ("data_error", r"failed on rank\(s\) \[1\] of 2: rank 1: ValueError: corrupt shard", [1]),
        ("loss_error", r"failed on rank\(s\) \[1\].*loss exploded on rank 1", [1]),
        (
            "shape_mismatch",
            r"counting samples: the ranks disagree on parameters \(rank 0: 38; rank 1: 44\)",
            [],
        ),
        (
            "jacobian_shape_mismatch",
            r"constructing: the ranks disagree on parameters \(rank 0: 38; rank 1: 44\)",
            [],
        ),
        (
            "columns_mismatch",
            r"product #1: the ranks disagree on columns of the block \(an algorithm's k or block size\) \(rank 0: 1; rank 1: 2\)$",
            [],
        ),
        (
            "seed_mismatch",
            r"the values of the input vectors, .*checksums rank 0: .*; rank 1: .*\): the ranks drew different random vectors \(pass the same seed on every rank",
            [],
        ),
        (
            "dtype_mismatch",
            r"the ranks disagree on dtype \(rank 0: torch.float64; rank 1: torch.float32\)$",
            [],
        ),
        (
            "k_mismatch",
            r"the ranks disagree on columns of the block \(an algorithm's k or block size\) \(rank 0: (\d+); rank 1: (?!\1)\d+\)$",
            [],
        ),
        (
            "nan_product",
            r"product #1 failed on rank\(s\) \[1\] of 2: rank 1: \w+: .*(finite|NaN)",
            [1],
        ),
        ("colpar_nan", r"failed on rank\(s\) \[1\] of 2: rank 1: \w+: .*(finite|NaN)", [1]),
    ],
)
def test_failure_on_one_rank_raises_on_every_rank(run, name, pattern, failed):
    import re

    for err in _failure(run, name):
        assert err is not None, f"{name}: no error raised"
        assert re.search(pattern, err["message"]), err["message"]
        assert err["failed"] == failed


def test_process_group_usable_after_failures(run, reference):
    model, X, y = make_problem()
    H = linops.HessianOperator(model, torch.nn.MSELoss(), (X, y))
    want = (H @ probes(H.shape[0], 1, 0)).numpy()
    for rank in (0, 1):
        np.testing.assert_allclose(run[rank]["arrays"]["after_failures"], want, rtol=TOL)


def test_unresponsive_rank_gives_an_error_after_the_group_timeout(run):
    err = run[0]["errors"]["unresponsive"]
    assert err is not None, "no error raised"
    assert "did not join the collective" in err["message"] and "Timed out" in err["message"]
    assert run[0]["errors"]["unresponsive_seconds"] < 30  # the group's timeout is 3 s


def test_dead_rank_gives_an_error_not_a_hang(run):
    err = run[0]["errors"]["dead"]
    assert err is not None, "no error raised"
    assert "did not join the collective" in err["message"]


# --------------------------------------------------------------------------- single process, no spawn
@pytest.mark.parametrize("world", [1, 2, 3, 4, 7, 12])
@pytest.mark.parametrize("n", [0, 1, 5, 11])
def test_shard_range_covers_in_rank_order(monkeypatch, world, n):
    """shard_range's own split (was: a range computed in the test, which could not fail): the
    ranks' ranges are contiguous, in rank order, cover 0..n-1 once and differ in size by <= 1."""
    group = object()  # a stand-in process group: only the world size is read from it
    monkeypatch.setattr(linops.distributed, "world_rank", lambda pg: (world, 0))
    ranges = [shard_range(n, group, rank=r) for r in range(world)]
    assert [i for r in ranges for i in r] == list(range(n))
    assert max(map(len, ranges)) - min(map(len, ranges)) <= 1
    monkeypatch.undo()
    assert shard_range(n) == range(n)  # no process group: one process owns everything
    with pytest.raises(ValueError, match=r"^n: expected a non-negative integer, got -1$"):
        shard_range(-1)


def test_training_jacobian_to_dense_takes_process_group():
    """TrainingJacobianOperator.to_dense has the base method's process_group (issue 17)."""
    from trainers.functional import SGD, DataSchedule, TrainingRun
    from trainers.models import MLP

    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(8, 3, generator=g, dtype=torch.float64), torch.arange(8) % 2
    torch.manual_seed(0)
    run = TrainingRun(
        MLP(3, 2, widths=4).double(), "cross_entropy", DataSchedule(X, y, 4), SGD(0.9), 0.1
    )
    J = linops.TrainingJacobianOperator(run, run.initial_values())
    want = torch.func.jacrev(run)(run.initial_values())
    torch.testing.assert_close(J.to_dense(process_group=None, max_vectors=7), want)
    for kw in ({"workers": 2}, {"progress": True}, {"on_chunk": print}):
        with pytest.raises(ValueError, match=r"^process_group: expected progress=False"):
            J.to_dense(process_group=object(), **kw)


def test_shard_without_process_group_is_identity():
    X, y = torch.arange(6.0), torch.arange(6)
    assert torch.equal(shard(X), X)
    Xs, ys = shard((X, y))
    assert torch.equal(Xs, X) and torch.equal(ys, y)
    assert shared_seed(seed=7) == 7


def test_bad_inputs_are_refused():
    model, X, y = make_problem()
    with pytest.raises(TypeError, match="data: expected a tensor or a tuple of tensors"):
        shard([1, 2, 3])
    with pytest.raises(ValueError, match="data: expected tensors of equal length"):
        shard((X, y[:3]))
    with pytest.raises(ValueError, match="n: expected a non-negative integer"):
        shard_range(-1)
    with pytest.raises(TypeError, match="process_group: expected a torch.distributed Process"):
        linops.HessianOperator(model, torch.nn.MSELoss(), (X, y), process_group="world")
    H = linops.HessianOperator(model, torch.nn.MSELoss(), (X, y))
    assert not linops.distributed.is_data_parallel(H)
    D = dense_columns(H, max_vectors=7)
    np.testing.assert_allclose(D.numpy(), H.to_dense().numpy(), rtol=TOL)
    err = DistributedError("rank 1 failed", failed_ranks=(1, 3))
    assert err.failed_ranks == [1, 3] and DistributedError("x").failed_ranks == []
    with pytest.raises(RuntimeError, match="rank 1 failed"):  # callers may catch RuntimeError
        raise err
