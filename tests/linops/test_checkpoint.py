"""Checkpoints you can trust (issue 16): fingerprints, damaged chunks, races and kills.

Every case builds tiny float64 operators. Faults are injected for real: processes are forked
(no interpreter start-up) and killed with SIGKILL at random points, chunk files get flipped
bytes and truncations, and two computations are started together on one empty directory.
Random choices come from seeded generators, so a failure reproduces.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import linops
from linops._checkpoint import CheckpointWarning, ColumnCheckpoint
from linops._fingerprint import operator_fingerprint
from linops.distributed import dense_columns
from linops.training import TrainingJacobianOperator
from trainers.functional import SGD, DataSchedule, TrainingRun
from trainers.models import MLP

F64 = torch.float64
ROOT = Path(__file__).resolve().parents[2]
CHUNK = 8  # columns per chunk: the 38 x 38 Hessian below has 5 chunks
FORK = mp.get_context("fork")
#: bounds on waits for other processes: hang guards, not speed assertions
PATIENCE_S = 120


@pytest.fixture(autouse=True)
def _one_thread():
    """Forked children and this process compute with one thread, so their bits agree."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------- cases
def squared_error(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A user-defined loss: identified by its name and bytecode, never by its address."""
    return ((out - target) ** 2).mean()


def scaled_loss(scale: float) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    def loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return scale * ((out - target) ** 2).sum()

    return loss


class Scale(nn.Module):
    """A module whose plain attribute changes its outputs."""

    def __init__(self, s: float) -> None:
        super().__init__()
        self.s = s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.s * x


def make_model(seed: int = 0, *, bn: bool = False, scale: float | None = None) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2)]
    if bn:
        layers.insert(1, nn.BatchNorm1d(6))
    if scale is not None:
        layers.append(Scale(scale))
    model = nn.Sequential(*layers).double().eval()
    if bn:
        with torch.no_grad():
            model[1].running_mean.copy_(torch.linspace(-1, 1, 6, dtype=F64))
    return model


def make_data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(10, 3, generator=g, dtype=F64), torch.randn(10, 2, generator=g, dtype=F64)


def hessian(seed: int = 0, data_seed: int = 0, loss=squared_error, **kwargs):
    return linops.HessianOperator(make_model(seed), loss, make_data(data_seed), **kwargs)


def make_run(*, seed: int = 0, lr: float = 0.1, momentum: float = 0.9, **kwargs) -> TrainingRun:
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(12, 3, generator=g, dtype=F64), torch.randint(0, 3, (12,), generator=g)
    model = MLP(3, 3, widths=(4,), activation="tanh", seed=torch.Generator().manual_seed(seed))
    data = DataSchedule(X, y, 4, epochs=kwargs.pop("epochs", 2), shuffle=True, seed=1)
    loss = kwargs.pop("loss", "cross_entropy")
    return TrainingRun(model.double(), loss, data, SGD(momentum), lr, **kwargs)


def training(run: TrainingRun | None = None, shift: float = 0.0) -> TrainingJacobianOperator:
    run = run or make_run()
    return TrainingJacobianOperator(run, run.initial_values() + shift)


def fingerprints() -> dict[str, str]:
    """Fingerprints of several operators (compared across processes)."""
    J = linops.JacobianOperator(make_model(), make_data()[0])
    return {
        "hessian": operator_fingerprint(hessian()),
        "closure": operator_fingerprint(hessian(loss=scaled_loss(2.0))),
        "module loss": operator_fingerprint(hessian(loss=nn.MSELoss())),
        "composite": operator_fingerprint(J.T @ J + 2 * linops.IdentityOperator(J.shape[1])),
        "ntk": operator_fingerprint(linops.NTKOperator(make_model(), make_data()[0])),
        "training": operator_fingerprint(training()),
        "training, user loss": operator_fingerprint(
            training(make_run(loss=lambda out, y: nn.functional.cross_entropy(out, y)))
        ),
    }


def counting(op) -> list[int]:
    """Record the columns of every product ``op`` computes from now on."""
    computed: list[int] = []
    apply = op._apply
    op._apply = lambda X, adjoint=False: computed.append(X.shape[1]) or apply(X, adjoint)
    return computed


# --------------------------------------------------------------------------- fingerprints
OPERATORS = {
    "hessian": lambda: hessian(),
    "hessian, batches": lambda: hessian(batch_size=3, reduction="mean"),
    "ggn": lambda: linops.GGNOperator(make_model(), nn.MSELoss(), make_data()),
    "jacobian": lambda: linops.JacobianOperator(make_model(bn=True), make_data()[0]),
    "ntk": lambda: linops.NTKOperator(make_model(), make_data()[0]),
    "output hessian": lambda: linops.OutputHessianOperator(make_model(), make_data()[0][:1], 1),
    "composite": lambda: 2 * hessian() - linops.IdentityOperator(38, dtype=F64),
    "dense": lambda: linops.aslinearoperator(torch.eye(4, dtype=F64)),
    "training": lambda: training(),
}


@pytest.mark.parametrize("name", list(OPERATORS))
def test_fingerprint_does_not_change_when_products_are_computed(name):
    op = OPERATORS[name]()
    before = operator_fingerprint(op)
    assert len(before) == 64 and before == operator_fingerprint(OPERATORS[name]())
    X = torch.randn(op.shape[1], 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    op @ X
    op @ X[:, 0]
    op.H @ torch.randn(op.shape[0], 2, dtype=F64)
    assert operator_fingerprint(op) == before


def _variants() -> dict[str, Callable[[], object]]:
    """Operators that each differ from ``hessian()`` or ``training()`` in one thing."""

    def nudged_weight():
        op = hessian()
        with torch.no_grad():
            w = op.model[0].weight
            w[0, 0] = torch.nextafter(w[0, 0], torch.tensor(1.0, dtype=F64))
        return linops.HessianOperator(op.model, squared_error, make_data())

    def other_targets():
        X, y = make_data()
        return linops.HessianOperator(make_model(), squared_error, (X, y + 1))

    def other_buffer():
        model = make_model(bn=True)
        model[1].running_var.mul_(2)
        return linops.JacobianOperator(model, make_data()[0])

    def untrained_changed():
        run = make_run(params=["layers.0.weight", "layers.0.bias"])
        with torch.no_grad():
            run.space.model.layers[2].weight.add_(1.0)
        return training(run)

    return {
        "hessian": hessian,
        "weights": lambda: hessian(seed=1),
        "one weight by one ulp": nudged_weight,
        "inputs": lambda: hessian(data_seed=1),
        "targets": other_targets,
        "batching": lambda: hessian(batch_size=5, reduction="mean"),
        "loss code": lambda: hessian(loss=lambda out, t: ((out - t) ** 2).sum()),
        "loss closure 1": lambda: hessian(loss=scaled_loss(1.0)),
        "loss closure 2": lambda: hessian(loss=scaled_loss(2.0)),
        "module loss": lambda: hessian(loss=nn.MSELoss()),
        "module loss sum": lambda: hessian(loss=nn.MSELoss(reduction="sum")),
        "reduction": lambda: hessian(reduction="sum"),
        "dtype": lambda: hessian(dtype=torch.float32),
        "operator": lambda: linops.GGNOperator(make_model(), squared_error, make_data()),
        "module attribute 1": lambda: linops.HessianOperator(
            make_model(scale=1.0), squared_error, make_data()
        ),
        "module attribute 2": lambda: linops.HessianOperator(
            make_model(scale=2.0), squared_error, make_data()
        ),
        "jacobian": lambda: linops.JacobianOperator(make_model(bn=True), make_data()[0]),
        "buffer": other_buffer,
        "output index": lambda: linops.JacobianOperator(
            make_model(bn=True), make_data()[0], output_index=1
        ),
        "training": training,
        "theta0": lambda: training(shift=1e-3),
        "trained subset": lambda: training(make_run(params=["layers.0.weight", "layers.0.bias"])),
        "untrained values": untrained_changed,
        "learning rate": lambda: training(make_run(lr=0.2)),
        "momentum": lambda: training(make_run(momentum=0.8)),
        "epochs": lambda: training(make_run(epochs=3)),
        "loss by callable": lambda: training(
            make_run(loss=lambda out, y: nn.functional.cross_entropy(out, y))
        ),
        "engine": lambda: training(make_run(engine="func")),
    }


def test_fingerprint_changes_with_everything_a_column_depends_on():
    prints = {name: operator_fingerprint(make()) for name, make in _variants().items()}
    same = [(a, b) for a in prints for b in prints if a < b and prints[a] == prints[b]]
    assert same == [], f"equal fingerprints for different computations: {same}"


def test_fingerprint_is_the_same_in_a_new_process(tmp_path):
    """A user-defined loss (and a lambda, and a closure) must not put addresses in it; the
    new process also writes a checkpoint this one resumes without recomputing anything."""
    ckpt = tmp_path / "ckpt"
    script = (
        "import json, sys, torch\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "torch.set_num_threads(1)\n"
        "from tests.linops.test_checkpoint import fingerprints, hessian, CHUNK\n"
        f"hessian().to_dense(max_vectors=CHUNK, checkpoint_dir={str(ckpt)!r})\n"
        "print(json.dumps(fingerprints()))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = json.loads(proc.stdout.strip().splitlines()[-1])
    assert theirs == fingerprints()
    op = hessian()
    computed = counting(op)
    resumed = op.to_dense(max_vectors=CHUNK, checkpoint_dir=ckpt)
    assert computed == []
    torch.testing.assert_close(resumed, hessian().to_dense(), rtol=1e-13, atol=1e-13)


# --------------------------------------------------------------------------- silently wrong before
def test_hessian_of_other_weights_or_data_is_refused(tmp_path):
    """Regression (issue 16): these resumed from the old chunks (errors 0.16 and 0.42)."""
    hessian().to_dense(max_vectors=CHUNK, checkpoint_dir=tmp_path)
    for other in (hessian(seed=1), hessian(data_seed=1)):
        with pytest.raises(ValueError, match="holds a different computation"):
            other.to_dense(max_vectors=CHUNK, checkpoint_dir=tmp_path)


def test_training_jacobian_with_changed_untrained_params_is_refused(tmp_path):
    """Regression (issue 16): a run whose untrained parameters changed resumed (error 0.15)."""
    subset = ["layers.0.weight", "layers.0.bias"]
    training(make_run(params=subset)).to_dense(max_vectors=8, checkpoint_dir=tmp_path)
    run = make_run(params=subset)
    with torch.no_grad():
        run.space.model.layers[2].weight.mul_(1.5)
    with pytest.raises(ValueError, match="holds a different computation"):
        training(run).to_dense(max_vectors=8, checkpoint_dir=tmp_path)


def test_deleted_manifest_never_mixes_computations(tmp_path):
    """Regression (issue 16): with manifest.json deleted, another computation reused the chunks."""
    hessian().to_dense(max_vectors=CHUNK, checkpoint_dir=tmp_path)
    (tmp_path / "manifest.json").unlink()
    other = hessian(seed=1)
    computed = counting(other)
    with pytest.warns(CheckpointWarning, match="ignoring 5 chunk file"):
        got = other.to_dense(max_vectors=CHUNK, checkpoint_dir=tmp_path)
    assert torch.equal(got, hessian(seed=1).to_dense(max_vectors=CHUNK))
    assert sum(computed) == 38
    # the first computation, its manifest deleted too, still finds (only) its own chunks
    (tmp_path / "manifest.json").unlink()
    again = hessian()
    computed = counting(again)
    with pytest.warns(CheckpointWarning, match="ignoring 5 chunk file"):
        got = again.to_dense(max_vectors=CHUNK, checkpoint_dir=tmp_path)
    assert computed == [] and torch.equal(got, hessian().to_dense(max_vectors=CHUNK))


# --------------------------------------------------------------------------- damaged chunks
@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> tuple[Path, torch.Tensor]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        directory = tmp_path_factory.mktemp("clean")
        dense = hessian().to_dense(max_vectors=CHUNK, checkpoint_dir=directory)
    finally:
        torch.set_num_threads(threads)
    return directory, dense


def _damage(path: Path, how: str, rng: random.Random) -> str:
    data = bytearray(path.read_bytes())
    if how == "truncate":
        cut = rng.randrange(len(data))
        path.write_bytes(bytes(data[:cut]))
        return f"truncated to {cut} of {len(data)} bytes"
    header = data.index(b"\n") + 1  # the .npy header ends with a newline
    lo, hi = (0, header) if how == "flip header" else (header, len(data))
    i, bit = rng.randrange(lo, hi), 1 << rng.randrange(8)
    data[i] ^= bit
    path.write_bytes(bytes(data))
    return f"bit {bit} of byte {i} flipped"


@pytest.mark.parametrize("how", ["flip data", "flip header", "truncate"])
def test_damaged_chunk_is_named_and_recomputed(clean, tmp_path, how):
    """5 chunks x 3 kinds of damage: 15 trials, each bit-identical to the clean matrix."""
    source, dense = clean
    rng = random.Random(f"damage {how}")
    for victim in sorted(p.name for p in source.glob("cols_*.npy")):
        directory = tmp_path / victim
        shutil.copytree(source, directory)
        what = _damage(directory / victim, how, rng)
        op = hessian()
        computed = counting(op)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = op.to_dense(max_vectors=CHUNK, checkpoint_dir=directory)
        messages = [str(w.message) for w in caught if w.category is CheckpointWarning]
        assert len(messages) == 1 and f"{victim} is damaged" in messages[0], (what, messages)
        assert torch.equal(got, dense), what
        span = victim.split(".")[0].split("_")[1:]
        assert computed == [int(span[1]) - int(span[0])], what
        # the directory is whole again: nothing warned, nothing recomputed
        op = hessian()
        computed = counting(op)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert torch.equal(op.to_dense(max_vectors=CHUNK, checkpoint_dir=directory), dense)
        assert computed == []


def test_checkpoint_dir_that_is_a_file_is_refused(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(ValueError, match="checkpoint_dir: expected a directory"):
        hessian().to_dense(checkpoint_dir=path)


# --------------------------------------------------------------------------- two computations
def test_manifest_is_created_by_exactly_one_of_racing_threads(tmp_path):
    """20 trials of 4 threads released together on one empty directory."""
    for trial in range(20):
        directory = tmp_path / str(trial)
        barrier, results = threading.Barrier(4), []

        def open_it(i: int, directory=directory, barrier=barrier, results=results) -> None:
            barrier.wait()
            try:
                ColumnCheckpoint(directory, shape=(3, 4), dtype=np.float64, fingerprint=f"f{i}")
                results.append(i)
            except ValueError:
                pass

        threads = [threading.Thread(target=open_it, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(results) == 1, f"trial {trial}: {len(results)} computations opened it"


def _compute_into(op, directory: Path, barrier, out: Path) -> None:
    torch.set_num_threads(1)
    barrier.wait()
    try:
        dense = dense_columns(op, max_vectors=CHUNK, checkpoint_dir=directory)
    except ValueError as err:
        out.with_suffix(".txt").write_text(str(err))
        sys.exit(3)
    np.save(out, dense.numpy())


def _race(ops: list, directory: Path) -> list[tuple[int | None, Path]]:
    barrier = FORK.Barrier(len(ops))
    outs = [directory.parent / f"{directory.name}-{i}.npy" for i in range(len(ops))]
    procs = [
        FORK.Process(target=_compute_into, args=(op, directory, barrier, out))
        for op, out in zip(ops, outs, strict=True)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(PATIENCE_S)
        if p.is_alive():
            p.kill()
            pytest.fail("a computation hung")
    return [(p.exitcode, out) for p, out in zip(procs, outs, strict=True)]


def test_two_computations_started_together_on_one_empty_folder(tmp_path):
    """Regression (issue 16): in 4 of 8 trials both exited 0 with wrong matrices.

    8 trials: exactly one computation succeeds, with its own matrix; the other refuses.
    """
    refs = [hessian().to_dense(max_vectors=CHUNK), hessian(seed=1).to_dense(max_vectors=CHUNK)]
    for trial in range(8):
        results = _race([hessian(), hessian(seed=1)], tmp_path / f"trial{trial}")
        codes = sorted(code for code, _ in results)
        assert codes == [0, 3], f"trial {trial}: exit codes {codes}"
        for (code, out), ref in zip(results, refs, strict=True):
            if code == 0:
                assert np.array_equal(np.load(out), ref.numpy())
            else:
                assert "holds a different computation" in out.with_suffix(".txt").read_text()


def test_the_same_computation_twice_on_one_folder_succeeds(tmp_path):
    ref = hessian().to_dense(max_vectors=CHUNK).numpy()
    for trial in range(2):
        results = _race([hessian(), hessian()], tmp_path / f"trial{trial}")
        assert [code for code, _ in results] == [0, 0]
        for _, out in results:
            assert np.array_equal(np.load(out), ref)


# --------------------------------------------------------------------------- kills
_KILL_POINTS = ("fsync", "replace", "link")


def _count_kill_points(monkeypatch, directory: Path) -> int:
    count = [0]
    for name in _KILL_POINTS:
        real = getattr(os, name)

        def counted(*args, real=real, **kwargs):
            count[0] += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(os, name, counted)
    dense_columns(hessian(), max_vectors=CHUNK, checkpoint_dir=directory)
    monkeypatch.undo()
    return count[0]


def _die_at(n: int, after: bool, op, directory: Path) -> None:
    """Run the checkpointed computation, SIGKILL-ing this process at the n-th file operation."""
    torch.set_num_threads(1)
    count = [0]
    for name in _KILL_POINTS:
        real = getattr(os, name)

        def hooked(*args, real=real, **kwargs):
            count[0] += 1
            if count[0] == n and not after:
                os.kill(os.getpid(), signal.SIGKILL)
            out = real(*args, **kwargs)
            if count[0] == n and after:
                os.kill(os.getpid(), signal.SIGKILL)
            return out

        setattr(os, name, hooked)
    dense_columns(op, max_vectors=CHUNK, checkpoint_dir=directory)


def test_kill_at_random_points_and_resume_bit_identically(tmp_path, monkeypatch):
    """12 trials: SIGKILL just before or after a random fsync / rename / link of the run."""
    total = _count_kill_points(monkeypatch, tmp_path / "count")
    assert total == 3 + 3 * 5  # the manifest, then 5 chunks: each fsync, rename, directory fsync
    reference = hessian().to_dense(max_vectors=CHUNK)
    rng = random.Random("kill points")
    for trial in range(12):
        n, after = rng.randint(1, total), rng.random() < 0.5
        directory = tmp_path / f"trial{trial}"
        p = FORK.Process(target=_die_at, args=(n, after, hessian(), directory))
        p.start()
        p.join(PATIENCE_S)
        assert p.exitcode == -signal.SIGKILL, f"trial {trial}: exit code {p.exitcode}"
        finished = len(list(directory.glob("cols_*.npy"))) if directory.exists() else 0
        op = hessian()
        computed = counting(op)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a kill never leaves a damaged chunk behind
            resumed = op.to_dense(max_vectors=CHUNK, checkpoint_dir=directory)
        assert torch.equal(resumed, reference), f"trial {trial}: kill point {n}, after={after}"
        assert len(computed) == 5 - finished
        assert list(directory.glob("*.tmp")) == [], "the dead writer's temporaries are swept"


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
    return out


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _slow_dense(op, directory: Path, workers: int) -> None:
    """The training Jacobian's dense build with every chunk slowed down (so kills land in it)."""
    torch.set_num_threads(1)
    fast = op._matmat_torch

    def slow(X):
        time.sleep(0.4)
        return fast(X)

    op._matmat_torch = slow
    op.to_dense(max_vectors=3, checkpoint_dir=directory, workers=workers)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("workers", [1, 2])
def test_killed_training_jacobian_resumes_and_takes_its_workers_along(tmp_path, workers):
    """2 trials per worker count: SIGKILL the computing process at a random time after its
    first chunk landed; its forked workers must exit too, and the resumed matrix is
    bit-identical to an uninterrupted build."""
    reference = training().to_dense(max_vectors=3)
    rng = random.Random(f"kill training {workers}")
    for trial in range(2):
        directory = tmp_path / f"trial{trial}"
        p = FORK.Process(target=_slow_dense, args=(training(), directory, workers))
        p.start()
        start = time.monotonic()
        while not list(directory.glob("cols_*.npy")):
            assert p.is_alive() and time.monotonic() - start < PATIENCE_S, "no chunk landed"
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.4))
        helpers = _children(p.pid)
        assert len(helpers) == (workers if workers > 1 else 0)
        os.kill(p.pid, signal.SIGKILL)
        p.join()
        start = time.monotonic()
        while any(_running(h) for h in helpers):
            assert time.monotonic() - start < PATIENCE_S, "a worker outlived its killed parent"
            time.sleep(0.05)
        finished = len(list(directory.glob("cols_*.npy")))
        assert 1 <= finished < 11, "killed part way"
        op = training()
        computed = counting_matmat(op)
        resumed = op.to_dense(max_vectors=3, checkpoint_dir=directory)
        assert torch.equal(resumed, reference), f"trial {trial}"
        assert len(computed) == 11 - finished


def counting_matmat(op) -> list[int]:
    computed: list[int] = []
    matmat = op._matmat_torch
    op._matmat_torch = lambda X: computed.append(X.shape[1]) or matmat(X)
    return computed


class _Diagonal(linops.TorchLinearOperator):
    """A user-defined operator: fingerprinted by its class and attributes."""

    is_symmetric = True

    def __init__(self, d: torch.Tensor) -> None:
        super().__init__((len(d), len(d)), dtype=d.dtype, device=d.device)
        self.d = d

    def _matmat_torch(self, X: torch.Tensor) -> torch.Tensor:
        return self.d[:, None] * X


class _Node:
    __slots__ = ("next", "value")

    def __init__(self, value: float, nxt: object = None) -> None:
        self.value, self.next = value, nxt


def test_fingerprint_of_other_operator_kinds():
    import functools

    import scipy.sparse
    import scipy.sparse.linalg as spla

    S = scipy.sparse.random(6, 6, density=0.5, random_state=0, format="csr")
    chain = None
    for i in range(5000):  # deeper than the recursion limit would allow unguarded
        chain = _Node(float(i), chain)
    variants = {
        "sparse": lambda: linops.aslinearoperator(S),
        "sparse x2": lambda: linops.aslinearoperator(2 * S),
        "scipy f": lambda: linops.aslinearoperator(
            spla.LinearOperator((3, 3), matvec=lambda v: v, dtype=np.float64)
        ),
        "scipy g": lambda: linops.aslinearoperator(
            spla.LinearOperator((3, 3), matvec=lambda v: 2 * v, dtype=np.float64)
        ),
        "user 1": lambda: _Diagonal(torch.ones(3, dtype=F64)),
        "user 2": lambda: _Diagonal(torch.arange(3, dtype=F64)),
        "partial 1": lambda: hessian(loss=functools.partial(torch.nn.functional.mse_loss)),
        "partial 2": lambda: hessian(
            loss=functools.partial(torch.nn.functional.mse_loss, reduction="sum")
        ),
    }
    prints = {name: operator_fingerprint(make()) for name, make in variants.items()}
    assert len(set(prints.values())) == len(prints)
    assert all(operator_fingerprint(variants[n]()) == p for n, p in prints.items())
    from linops._fingerprint import value_fingerprint

    assert value_fingerprint(chain) == value_fingerprint(chain)
