"""TrainingJacobianOperator: products against jacrev, adjoint identity, resumable dense builds."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse.linalg as spla
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import jacrev

from linops import IdentityOperator, TrainingJacobianOperator
from linops._checkpoint import CheckpointWarning
from trainers.functional import SGD, Adam, CosineLR, DataSchedule, TrainingRun
from trainers.models import MLP

F64 = torch.float64
ROOT = Path(__file__).resolve().parents[2]


def _run(opt=None, steps_epochs: int = 4, engine: str = "auto") -> TrainingRun:
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(12, 3, generator=g, dtype=F64), torch.randint(0, 3, (12,), generator=g)
    model = MLP(3, 3, widths=(4,), activation="gelu", seed=g).double()
    data = DataSchedule(X, y, 4, epochs=steps_epochs, shuffle=True, seed=1)
    return TrainingRun(
        model,
        "cross_entropy",
        data,
        opt or SGD(0.9),
        CosineLR(0.1, 3 * steps_epochs),
        engine=engine,
    )


@pytest.fixture(scope="module")
def case():
    run = _run()
    theta0 = run.initial_values()
    return run, theta0, jacrev(run)(theta0)


def test_products_and_dense_match_jacrev(case) -> None:
    run, theta0, J = case
    op = TrainingJacobianOperator(run, theta0, max_vectors=5)
    torch.testing.assert_close(op.to_dense(), J, atol=1e-10, rtol=1e-10)
    g = torch.Generator().manual_seed(3)
    X = torch.randn(31, 7, generator=g, dtype=F64)
    torch.testing.assert_close(op @ X, J @ X, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(op.H @ X, J.T @ X, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(op.rmatvec(X[:, 0]), J.T @ X[:, 0], atol=1e-10, rtol=1e-10)
    # numpy in, numpy out: SciPy algorithms run on it as is
    x = X[:, 0].numpy()
    np.testing.assert_allclose(op.matvec(x), (J @ X[:, 0]).numpy(), atol=1e-10)
    s = spla.svds(op, k=2, return_singular_vectors=False, random_state=0)
    np.testing.assert_allclose(np.sort(s), np.sort(torch.linalg.svdvals(J).numpy()[:2]), rtol=1e-8)
    # J - I composes (dimension of training, seed 004 section 2)
    shifted = op - IdentityOperator(31)
    torch.testing.assert_close(
        shifted @ X, (J - torch.eye(31, dtype=F64)) @ X, atol=1e-10, rtol=1e-10
    )
    torch.testing.assert_close(op.final_params(), run(theta0), atol=1e-12, rtol=1e-12)
    assert op.num_matvecs > 0


def test_adam_operator_against_finite_differences() -> None:
    run = _run(Adam(), steps_epochs=2)
    theta0 = run.initial_values()
    op = TrainingJacobianOperator(run, theta0)
    v = torch.randn(run.dim, dtype=F64, generator=torch.Generator().manual_seed(1))
    eps = 1e-6
    fd = (run.final(theta0 + eps * v) - run.final(theta0 - eps * v)) / (2 * eps)
    torch.testing.assert_close(op @ v, fd, atol=1e-6, rtol=1e-6)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), k=st.integers(1, 4), j=st.integers(1, 3))
def test_adjoint_identity(case, seed: int, k: int, j: int) -> None:
    run, theta0, _ = case
    op = TrainingJacobianOperator(run, theta0)
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(31, k, generator=g, dtype=F64)
    Y = torch.randn(31, j, generator=g, dtype=F64)
    lhs = Y.T @ (op @ X)
    rhs = (op.H @ Y).T @ X
    torch.testing.assert_close(lhs, rhs, atol=1e-10, rtol=1e-10)


def test_checkpoint_resume_after_kill_is_bitwise_identical(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    script = textwrap.dedent(
        f"""
        import sys, time, torch
        sys.path.insert(0, {str(ROOT)!r})
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        torch.set_num_threads(1)
        from test_training import _run
        from linops import TrainingJacobianOperator
        run = _run()
        op = TrainingJacobianOperator(run, run.initial_values())
        op.to_dense(max_vectors=3, checkpoint_dir={str(ckpt)!r}, on_chunk=lambda a, b: time.sleep(0.25))
        print("finished")
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 120
        while len(list(ckpt.glob("cols_*.npy"))) < 3:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(
                    f"worker ended early: {proc.communicate()[1].decode()[-2000:]}"
                )
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    done = len(list(ckpt.glob("cols_*.npy")))
    assert 3 <= done < 11, "the worker must have been killed part way"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run = _run()
        op = TrainingJacobianOperator(run, run.initial_values())
        computed = []
        resumed = op.to_dense(
            max_vectors=3, checkpoint_dir=ckpt, on_chunk=lambda a, b: computed.append(a)
        )
        fresh = TrainingJacobianOperator(_run(), run.initial_values()).to_dense(max_vectors=3)
    finally:
        torch.set_num_threads(threads)
    assert len(list(ckpt.glob("cols_*.npy"))) == 11
    assert torch.equal(resumed, fresh)
    torch.testing.assert_close(resumed, jacrev(run)(run.initial_values()), atol=1e-10, rtol=1e-10)


def test_checkpoint_refuses_other_computation(tmp_path: Path) -> None:
    run = _run(steps_epochs=1)
    op = TrainingJacobianOperator(run, run.initial_values())
    op.to_dense(max_vectors=16, checkpoint_dir=tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["shape"] == [31, 31]
    other = TrainingJacobianOperator(run, run.initial_values() + 1.0)
    with pytest.raises(ValueError, match="holds a different computation"):
        other.to_dense(max_vectors=16, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="holds a different computation"):
        op.to_dense(max_vectors=8, checkpoint_dir=tmp_path)
    # a file that is not one of this computation's chunks is ignored, with a warning
    np.save(tmp_path / "cols_000000000_000000016.npy", np.zeros((3, 3)))
    before = op.to_dense(max_vectors=16)
    with pytest.warns(CheckpointWarning, match="ignoring 1 chunk file"):
        assert torch.equal(op.to_dense(max_vectors=16, checkpoint_dir=tmp_path), before)
    # a chunk of ours that was overwritten is named, never unpickled, and recomputed
    (chunk,) = tmp_path.glob("cols_000000000_000000016.*.*.npy")
    np.save(chunk, np.zeros((3, 3)))
    with pytest.warns(CheckpointWarning, match=f"{chunk.name} is damaged"):
        assert torch.equal(op.to_dense(max_vectors=16, checkpoint_dir=tmp_path), before)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid manifest"):
        op.to_dense(max_vectors=16, checkpoint_dir=tmp_path)


def test_errors(case) -> None:
    run, theta0, _ = case
    with pytest.raises(TypeError, match="run: expected a trainers.functional.TrainingRun"):
        TrainingJacobianOperator(lambda t: t, theta0)
    with pytest.raises(ValueError, match=r"theta0: expected a tensor of shape \(31,\)"):
        TrainingJacobianOperator(run, theta0[:3])
    with pytest.raises(TypeError, match="theta0: expected a floating dtype"):
        TrainingJacobianOperator(run, torch.zeros(31, dtype=torch.int64))
    op = TrainingJacobianOperator(run, theta0)
    with pytest.raises(ValueError, match="max_vectors: expected a positive integer"):
        op.to_dense(max_vectors=-2)
    with pytest.raises(ValueError, match="dimension mismatch"):
        op @ torch.zeros(5, dtype=F64)


def test_checkpoint_keeps_live_writers_temporaries_and_sweeps_dead_ones(tmp_path: Path) -> None:
    """Ranks share a directory: opening it must not delete another live writer's temporary."""
    from linops._checkpoint import _HOST, _SEP, ColumnCheckpoint

    live = tmp_path / f"manifest.json.{_HOST}{_SEP}{os.getppid()}{_SEP}abc.tmp"
    dead_pid = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    dead = tmp_path / f"cols_000000000_000000002.npy.{_HOST}{_SEP}{dead_pid}{_SEP}xyz.tmp"
    live.write_bytes(b"partial")
    dead.write_bytes(b"partial")
    ColumnCheckpoint(tmp_path, shape=(3, 4), dtype=np.float64, fingerprint="f")
    assert live.exists()
    assert not dead.exists()
    assert (tmp_path / "manifest.json").exists()


def _mse_run(loss, engine: str) -> TrainingRun:
    g = torch.Generator().manual_seed(5)
    X, y = torch.randn(8, 3, generator=g, dtype=F64), torch.randn(8, 2, generator=g, dtype=F64)
    model = MLP(3, 2, widths=(4,), activation="tanh", seed=g).double()
    return TrainingRun(model, loss, DataSchedule(X, y, 4, epochs=2), SGD(0.9), 0.1, engine=engine)


def _plain_mse_jacobian(run: TrainingRun, theta0: torch.Tensor) -> torch.Tensor:
    """jacrev of an independent loop with the squared error written out (no F.mse_loss)."""

    def loop(theta: torch.Tensor) -> torch.Tensor:
        def batch_loss(th: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            out = run.space.functional_call(run.space.unflatten(th), X)
            return ((out - y) ** 2).mean()

        g = torch.func.grad(batch_loss)
        state = run.optimizer.init(theta)
        for t in range(run.num_steps):
            X, y = run.data.batch(t, F64)
            theta, state = run.optimizer.update(t, run.schedule(t), theta, state, g(theta, X, y))
        return theta

    return jacrev(loop)(theta0)


@pytest.mark.parametrize(
    "loss",
    ["mse", torch.nn.MSELoss(), lambda out, y: torch.nn.functional.mse_loss(out, y)],
    ids=["name", "module", "callable"],
)
def test_mse_loss_on_the_func_engine(loss) -> None:
    """Regression (issue 16): every product raised 'ZeroTensors are immutable'."""
    run = _mse_run(loss, "func")
    theta0 = run.initial_values()
    op = TrainingJacobianOperator(run, theta0)
    J = _plain_mse_jacobian(run, theta0)
    torch.testing.assert_close(op.to_dense(), J, atol=1e-10, rtol=1e-10)
    U = torch.randn(run.dim, 3, generator=torch.Generator().manual_seed(1), dtype=F64)
    torch.testing.assert_close(op.H @ U, J.T @ U, atol=1e-10, rtol=1e-10)
    # central finite differences of the run along two columns
    for j in (0, run.dim - 1):
        e = torch.zeros(run.dim, dtype=F64)
        e[j] = 1e-6
        fd = (run.final(theta0 + e) - run.final(theta0 - e)) / 2e-6
        torch.testing.assert_close(op @ (e / 1e-6), fd, atol=1e-7, rtol=1e-6)
    # the plain loop itself is forward-mode differentiable, and the MLP fast path agrees
    _, jv = torch.func.jvp(run, (theta0,), (U[:, 0],))
    torch.testing.assert_close(jv, J @ U[:, 0], atol=1e-10, rtol=1e-10)
    if loss == "mse":
        fast = TrainingJacobianOperator(_mse_run(loss, "chain"), theta0)
        torch.testing.assert_close(fast.to_dense(), J, atol=1e-10, rtol=1e-10)
