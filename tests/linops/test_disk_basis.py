"""Lanczos with its basis on disk (``basis_dir``) and eigenvalues only, against dense references."""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import linops
from linops import _disk_basis, _krylov
from linops._disk_basis import DiskColumns
from linops.lanczos import LanczosNoConvergence, lanczos
from tests.linops.test_lanczos import reference

SPECTRA = {
    "decay": 1.0 / np.arange(1, 121),
    "indefinite": np.r_[
        np.linspace(-5, -1, 10), np.linspace(-0.5, 0.5, 100), np.linspace(1, 4, 10)
    ],
    "repeated": np.r_[[3.0] * 3, [2.0] * 4, np.linspace(1.5, -1.5, 113)],
}


@pytest.fixture(autouse=True, scope="module")
def small_chunks() -> Iterator[None]:
    """Chunks of 37 rows, so every pass over the file crosses chunk boundaries."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_disk_basis, "CHUNK_ROWS", 37)
        yield


def spectrum_matrix(lam: np.ndarray, dtype: type = np.float64, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = lam.size
    if np.dtype(dtype).kind == "c":
        Z = rng.standard_normal((n, n)) + 1j * rng.standard_normal((n, n))
    else:
        Z = rng.standard_normal((n, n))
    Q, _ = np.linalg.qr(Z)
    A = (Q * lam) @ Q.conj().T
    return ((A + A.conj().T) / 2).astype(dtype)


def true_residuals(A: np.ndarray, vals, vecs) -> np.ndarray:
    Y = np.asarray(vecs, np.complex128 if np.iscomplexobj(A) else np.float64)
    return np.linalg.norm(A.astype(Y.dtype) @ Y - Y * np.asarray(vals, np.float64), axis=0)


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.complex128])
@pytest.mark.parametrize("name", list(SPECTRA))
@pytest.mark.parametrize(("which", "block_size"), [("LA", 1), ("BE", 2)])
def test_a_basis_on_disk_gives_verified_pairs(
    tmp_path: Path, dtype: type, name: str, which: str, block_size: int
) -> None:
    """Same eigenvalues as the dense reference and the in-memory basis, true residuals that
    bound the vectors' own, an orthonormal result, every copy of repeated values (the locking
    path recombines the file in place), and nothing left in the directory."""
    lam = SPECTRA[name]
    A = spectrum_matrix(lam, dtype)
    k = 7 if name == "repeated" else 4
    f64 = np.dtype(dtype) in (np.float64, np.complex128)
    tol = 1e-10 if f64 else None
    kw = {"rtol": tol, "seed": 3, "block_size": block_size}
    disk = lanczos(A, k, which, basis_dir=tmp_path, **kw)
    memory = lanczos(A, k, which, **kw)
    assert disk.converged and memory.converged
    atol = 1e-9 if f64 else 2e-4
    np.testing.assert_allclose(disk.eigenvalues, reference(np.sort(lam), k, which), atol=atol)
    np.testing.assert_allclose(disk.eigenvalues, memory.eigenvalues, atol=atol)
    true = true_residuals(A, disk.eigenvalues, disk.eigenvectors)
    assert (np.asarray(disk.residuals, np.float64) >= true * (1 - 1e-6)).all()
    assert true.max() <= (1e-10 if f64 else 1e-3) * np.abs(lam).max() * 3
    Y = np.asarray(disk.eigenvectors)
    np.testing.assert_allclose(Y.conj().T @ Y, np.eye(k), atol=1e-12 if f64 else 1e-5)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("where", ["memory, A V kept", "memory, no A V", "disk"])
@pytest.mark.parametrize("name", ["decay", "repeated"])
def test_eigenvalues_only_are_the_same_run_without_vectors(
    tmp_path: Path, where: str, name: str
) -> None:
    """``return_eigenvectors=False`` changes nothing but the vectors: bit-identical eigenvalues
    and residuals, the same number of products."""
    A = spectrum_matrix(SPECTRA[name])
    n = A.shape[0]
    kw: dict = {"rtol": 1e-10, "seed": 0, "ncv": 41}
    if where == "memory, no A V":
        kw["memory_budget"] = (41 + 3) * n * 8
    elif where == "disk":
        kw["basis_dir"] = tmp_path
    full = lanczos(A, 7, "LA", **kw)
    lean = lanczos(A, 7, "LA", return_eigenvectors=False, **kw)
    assert lean.eigenvectors is None and full.eigenvectors.shape == (n, 7)
    np.testing.assert_array_equal(lean.eigenvalues, full.eigenvalues)
    np.testing.assert_array_equal(lean.residuals, full.residuals)
    assert lean.num_matvecs == full.num_matvecs and lean.converged


def test_the_file_is_gone_after_no_convergence_and_carries_the_partial_result(
    tmp_path: Path,
) -> None:
    A = spectrum_matrix(SPECTRA["decay"])
    with pytest.raises(LanczosNoConvergence) as info:
        lanczos(A, 6, "LA", rtol=1e-14, ncv=8, maxiter=1, seed=0, basis_dir=tmp_path)
    res = info.value.result
    assert not res.converged and res.eigenvectors.shape == (120, 6)
    true = true_residuals(A, res.eigenvalues, res.eigenvectors)
    assert (np.asarray(res.residuals) >= true * (1 - 1e-6)).all()
    assert os.listdir(tmp_path) == []
    with pytest.raises(LanczosNoConvergence) as info:
        lanczos(A, 6, "LA", rtol=1e-14, ncv=8, maxiter=1, seed=0, return_eigenvectors=False)
    assert info.value.result.eigenvectors is None


def test_disk_columns_match_the_same_products_in_memory(tmp_path: Path) -> None:
    """Projections (Gram-Schmidt twice, in place), ``V S`` and the in-place recombination."""
    gen = torch.Generator().manual_seed(0)
    n, m = 200, 9
    V, _ = torch.linalg.qr(torch.randn(n, m, dtype=torch.float64, generator=gen))
    cols = DiskColumns(n, m, torch.float64, torch.device("cpu"), tmp_path)
    cols.write(0, V[:, :4])
    cols.write(4, V[:, 4:])
    W = torch.randn(n, 3, dtype=torch.float64, generator=gen)
    ref_W, ref_C = _krylov._project_twice(W, V)
    got_W, got_C = cols.project_twice(W.clone())
    torch.testing.assert_close(got_W, ref_W, rtol=0, atol=1e-13)
    torch.testing.assert_close(got_C, ref_C, rtol=0, atol=1e-13)
    assert float((V.T @ got_W).abs().max()) < 1e-14
    S = torch.randn(m, 5, dtype=torch.float64, generator=gen)
    torch.testing.assert_close(cols.combine(S), V @ S, rtol=0, atol=1e-13)
    small = cols.view(6)
    assert small.shape == (n, 6)
    small.recombine_(S[:6])
    torch.testing.assert_close(
        cols.view(5).combine(torch.eye(5, dtype=torch.float64)), V[:, :6] @ S[:6]
    )
    torch.testing.assert_close(
        cols.view(9).combine(torch.eye(9, dtype=torch.float64))[:, 5:], V[:, 5:]
    )
    cols.close()
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("layout", ["column-major", "row-major"])
def test_a_last_chunk_of_one_row_is_written_whole(tmp_path: Path, layout: str) -> None:
    """n = 38 with chunks of 37 rows: the last chunk's columns are single strided elements
    (found by the property test below: they could not be viewed as bytes)."""
    X = torch.randn(38, 3, dtype=torch.float64)
    X = X.T.contiguous().T if layout == "column-major" else X.contiguous()
    cols = DiskColumns(38, 3, torch.float64, torch.device("cpu"), tmp_path)
    cols.write(0, X)
    assert torch.equal(cols.combine(torch.eye(3, dtype=torch.float64)), X)
    cols.close()


def test_a_model_hessian_on_disk_equals_its_dense_eigenvalues(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    model.double()
    X, y = torch.randn(20, 5, dtype=torch.float64), torch.randint(0, 3, (20,))
    H = linops.HessianOperator(model, torch.nn.CrossEntropyLoss(), (X, y))
    dense = np.linalg.eigvalsh(H @ np.eye(H.shape[0]))
    res = lanczos(H, 3, "LA", rtol=1e-10, seed=0, basis_dir=tmp_path, return_eigenvectors=False)
    assert res.converged and res.eigenvectors is None
    np.testing.assert_allclose(res.eigenvalues, dense[-3:], rtol=0, atol=1e-10 * dense.max())


def test_bad_directories_and_budgets_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    A = spectrum_matrix(SPECTRA["decay"])
    with pytest.raises(ValueError, match="is not a directory"):
        lanczos(A, 3, basis_dir=tmp_path / "missing")
    with pytest.raises(ValueError, match="with the basis on disk.*raise memory_budget"):
        lanczos(A, 3, basis_dir=tmp_path, memory_budget=3 * 120 * 8)
    with pytest.raises(ValueError, match="not even k \\+ 1 = 4 vectors fit.*basis_dir"):
        lanczos(A, 3, memory_budget=5 * 120 * 8)
    # the same budget with the basis on disk: the pending vector, its product, two more
    res = lanczos(A, 3, rtol=1e-10, seed=0, basis_dir=tmp_path, memory_budget=4 * 120 * 8)
    np.testing.assert_allclose(res.eigenvalues, np.sort(SPECTRA["decay"])[-3:], atol=1e-10)

    def full(fd: int, offset: int, size: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full, raising=False)
    with pytest.raises(ValueError, match="cannot reserve.*No space left"):
        lanczos(A, 3, basis_dir=tmp_path)
    assert os.listdir(tmp_path) == []


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), k=st.integers(1, 5), n=st.integers(12, 60))
def test_disk_and_dense_agree_on_random_spectra(seed: int, k: int, n: int) -> None:
    """Property: any symmetric matrix, any size, any k: the disk basis finds the top values."""
    rng = np.random.default_rng(seed)
    lam = rng.standard_normal(n) * 10.0 ** rng.uniform(-3, 3)
    A = spectrum_matrix(lam, seed=seed)
    with tempfile.TemporaryDirectory() as d:
        res = lanczos(A, k, "LA", rtol=1e-10, seed=seed, basis_dir=d, return_eigenvectors=False)
        assert os.listdir(d) == []
    scale = np.abs(lam).max()
    np.testing.assert_allclose(res.eigenvalues, np.sort(lam)[-k:], rtol=0, atol=1e-9 * scale)
