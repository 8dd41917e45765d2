"""Thick-restart Lanczos against dense float64 references (numpy eigh)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from linops import TorchLinearOperator
from linops.angles import principal_angles
from linops.lanczos import LanczosNoConvergence, lanczos

EPS64 = np.finfo(np.float64).eps


def spectrum_matrix(lam: np.ndarray, seed: int = 0) -> np.ndarray:
    """``Q diag(lam) Q^T`` with a Haar-random orthogonal ``Q``."""
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((lam.size, lam.size)))
    return (Q * lam) @ Q.T


def reference(w: np.ndarray, k: int, which: str) -> np.ndarray:
    if which == "LA":
        return w[-k:]
    if which == "SA":
        return w[:k]
    if which == "LM":
        return np.sort(w[np.argsort(-np.abs(w), kind="stable")[:k]])
    return np.r_[w[: k // 2], w[-(k - k // 2) :]]


SPECTRA = {
    "decay": 1.0 / np.arange(1, 121),
    "indefinite": np.r_[
        np.linspace(-5, -1, 10), np.linspace(-0.5, 0.5, 100), np.linspace(1, 4, 10)
    ],
    "repeated": np.r_[[3.0] * 3, [-3.0] * 3, np.linspace(-2, 2, 114)],
    "clustered": np.r_[1 + 1e-6 * np.arange(4), 1e-3 * np.arange(116)],
}


@pytest.mark.parametrize("name", list(SPECTRA))
@pytest.mark.parametrize("which", ["LA", "SA", "LM", "BE"])
def test_eigenvalues_match_dense_reference(name: str, which: str) -> None:
    lam = SPECTRA[name]
    A = spectrum_matrix(lam)
    w = np.linalg.eigh(A)[0]
    bs = 3 if name == "repeated" else 1
    res = lanczos(A, 4, which, rtol=1e-10, seed=1, block_size=bs)
    ref = reference(w, 4, which)
    scale = np.abs(w).max()
    if which == "LM":  # "repeated" ties +-3 in magnitude: any 4 of the six are the largest
        got, ref = np.sort(np.abs(res.eigenvalues)), np.sort(np.abs(ref))
    else:
        got = res.eigenvalues
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-10 * scale)
    resid = np.linalg.norm(A @ res.eigenvectors - res.eigenvectors * res.eigenvalues, axis=0)
    assert resid.max() <= 1e-9 * scale
    np.testing.assert_allclose(res.eigenvectors.T @ res.eigenvectors, np.eye(4), atol=1e-12)
    assert res.converged and isinstance(res.eigenvalues, np.ndarray)


def test_eigenvectors_within_angle_of_reference() -> None:
    lam = np.r_[10.0, 9.0, 8.0, np.linspace(0, 5, 97)]
    A = spectrum_matrix(lam, seed=3)
    w, X = np.linalg.eigh(A)
    res = lanczos(A, 3, "LA", rtol=1e-12, seed=0)
    for i in range(3):
        angle = principal_angles(X[:, [-3 + i]], res.eigenvectors[:, [i]])
        assert angle[0] <= 1e-8


def test_no_ghost_eigenvalues_with_repeated_spectrum() -> None:
    lam = np.r_[[2.0] * 5, np.linspace(-1, 1, 95)]
    A = spectrum_matrix(lam, seed=4)
    w = np.linalg.eigh(A)[0]
    res = lanczos(A, 8, "LA", seed=0)
    # every returned value is an eigenvalue of A with at most its true multiplicity
    for val in np.unique(np.round(res.eigenvalues, 8)):
        count = np.sum(np.abs(res.eigenvalues - val) < 1e-8)
        assert count <= np.sum(np.abs(w - val) < 1e-8)
    assert np.all(np.min(np.abs(res.eigenvalues[:, None] - w[None]), axis=1) < 1e-10)
    blocked = lanczos(A, 8, "LA", seed=0, block_size=5)
    np.testing.assert_allclose(blocked.eigenvalues, w[-8:], atol=1e-10)


def test_float32_and_torch_outputs() -> None:
    A = torch.from_numpy(spectrum_matrix(SPECTRA["indefinite"])).float()
    res = lanczos(A, 3, "LM", rtol=1e-5, seed=0)
    assert isinstance(res.eigenvalues, torch.Tensor) and res.eigenvectors.dtype == torch.float32
    w = np.linalg.eigh(A.double().numpy())[0]
    np.testing.assert_allclose(res.eigenvalues.numpy(), reference(w, 3, "LM"), atol=1e-4)


def test_small_operator_full_space_and_identity() -> None:
    res = lanczos(2.0 * np.eye(6), 6, "LA", seed=0)
    np.testing.assert_allclose(res.eigenvalues, 2.0 * np.ones(6), atol=1e-12)
    res = lanczos(np.diag([1.0, 2.0, 3.0]), 3, "SA", seed=0)
    np.testing.assert_allclose(res.eigenvalues, [1.0, 2.0, 3.0], atol=1e-12)


def test_no_convergence_carries_partial_result() -> None:
    A = spectrum_matrix(1.0 / np.arange(1, 201))
    with pytest.raises(LanczosNoConvergence, match=r"1 restarts .*\d+/6 converged") as info:
        lanczos(A, 6, "SA", maxiter=1, ncv=12, seed=0)
    partial = info.value.result
    assert not partial.converged and partial.eigenvalues.shape == (6,)
    assert partial.num_matvecs > 0


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10**6), c=st.floats(0.1, 10.0), which=st.sampled_from(["LA", "SA"]))
def test_orthogonal_similarity_and_scaling(seed: int, c: float, which: str) -> None:
    lam = np.r_[np.linspace(-3, -1, 4), np.linspace(-0.5, 0.5, 40), np.linspace(1, 2, 4)]
    A = spectrum_matrix(lam, seed)
    B = spectrum_matrix(lam, seed + 1)  # orthogonally similar to A
    ra, rb = lanczos(A, 3, which, seed=0), lanczos(B, 3, which, seed=0)
    np.testing.assert_allclose(ra.eigenvalues, rb.eigenvalues, atol=1e-10)
    rc = lanczos(c * A, 3, which, seed=0)
    np.testing.assert_allclose(rc.eigenvalues, c * ra.eigenvalues, atol=1e-10 * c * 3)
    flip = "SA" if which == "LA" else "LA"
    rn = lanczos(-c * A, 3, flip, seed=0)
    np.testing.assert_allclose(rn.eigenvalues[::-1], -c * ra.eigenvalues, atol=1e-10 * c * 3)


class _NaNAfter(TorchLinearOperator):
    is_symmetric = True

    def __init__(self, A: torch.Tensor, after: int) -> None:
        super().__init__(A.shape, dtype=A.dtype, device=A.device)
        self.A, self.after, self.calls = A, after, 0

    def _matmat_torch(self, X: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        Y = self.A @ X
        return Y * float("nan") if self.calls > self.after else Y


class _TorchOnly(TorchLinearOperator):
    """Refuses anything but torch tensors on its device (proves no host/numpy round trip)."""

    is_symmetric = True

    def __init__(self, A: torch.Tensor) -> None:
        super().__init__(A.shape, dtype=A.dtype, device=A.device)
        self.A = A

    def _matmat_torch(self, X: torch.Tensor) -> torch.Tensor:
        if not isinstance(X, torch.Tensor) or X.device != self.device:
            raise TypeError(f"torch tensors on {self.device} only, got {type(X)}")
        return self.A @ X


def test_device_resident_torch_path() -> None:
    A = torch.from_numpy(spectrum_matrix(SPECTRA["decay"]))
    res = lanczos(_TorchOnly(A), 3, seed=0)
    assert isinstance(res.eigenvectors, torch.Tensor) and res.converged


def test_bad_input_raises() -> None:
    A = spectrum_matrix(SPECTRA["decay"])
    with pytest.raises(ValueError, match="k: expected an integer >= 1 and <= 120, got 121"):
        lanczos(A, 121)
    with pytest.raises(ValueError, match="expected a square"):
        lanczos(np.ones((5, 4)), 2)
    with pytest.raises(ValueError, match="which: expected one of"):
        lanczos(A, 2, "XX")
    with pytest.raises(ValueError, match=r"got 'SM'; .* shift and invert: lanczos\(linops.inverse"):
        lanczos(A, 2, "SM")
    with pytest.raises(ValueError, match="nonzero start vector"):
        lanczos(A, 2, v0=np.zeros(120))
    with pytest.raises(ValueError, match="v0: expected shape"):
        lanczos(A, 2, v0=np.ones(7))
    with pytest.raises(ValueError, match="tol: expected a positive"):
        lanczos(A, 2, rtol=0.0)
    with pytest.raises(TypeError, match="seed: expected"):
        lanczos(A, 2, seed="x")
    with pytest.raises(FloatingPointError, match="NaN or inf at product 4"):  # no probe
        lanczos(_NaNAfter(torch.from_numpy(A), 3), 2, seed=0)


class _Columns(TorchLinearOperator):
    """Counts the vectors it is applied to."""

    def __init__(self, A: torch.Tensor, declared: bool) -> None:
        super().__init__(A.shape, dtype=A.dtype, device=A.device)
        self.A, self.columns, self.is_symmetric = A, 0, declared

    def _matmat_torch(self, X: torch.Tensor) -> torch.Tensor:
        self.columns += X.shape[1]
        return self.A @ X


@pytest.mark.parametrize("declared", [True, False])
def test_declared_symmetric_operators_skip_the_symmetry_probe(declared: bool) -> None:
    """Hessians and GGNs are symmetric by construction: no probe products for them; an
    operator that does not declare it pays the two probe vectors, and is refused when it is
    not symmetric."""
    op = _Columns(torch.from_numpy(spectrum_matrix(SPECTRA["decay"])), declared)
    res = lanczos(op, 3, seed=0)
    assert res.converged and res.num_matvecs == op.columns
    plain = lanczos(_Columns(op.A, True), 3, seed=0).num_matvecs
    assert res.num_matvecs == plain + (0 if declared else 2)
    if not declared:
        with pytest.raises(ValueError, match="expected a symmetric"):
            lanczos(_Columns(torch.from_numpy(_nonsymmetric(120)), False), 3, seed=0)


@pytest.mark.parametrize("name", ["1/i", "1/i^2", "0.9^i", "outliers"])
def test_no_more_products_than_arpack(name: str) -> None:
    """Top-10 at tol 1e-6 with at most as many products as ARPACK from the same start, plus
    the 10 of the true-residual check and the 2 of the symmetry probe that ARPACK skips."""
    from scipy.sparse.linalg import LinearOperator, eigsh

    n = 400
    i = np.arange(1.0, n + 1)
    bulk = np.random.default_rng(0).uniform(0, 1, n - 10)
    lam = {"1/i": 1 / i, "1/i^2": 1 / i**2, "0.9^i": 0.9 ** (i - 1)}.get(
        name, np.r_[np.linspace(10, 5, 10), bulk]
    )
    A = spectrum_matrix(lam, seed=2)
    count = [0]

    def mv(x: np.ndarray) -> np.ndarray:
        count[0] += 1 if x.ndim == 1 else x.shape[1]
        return A @ x

    v0 = np.random.default_rng(5).standard_normal(n)
    eigsh(LinearOperator(A.shape, matvec=mv, matmat=mv, dtype=A.dtype), 10, tol=1e-6, v0=v0)
    res = lanczos(A, 10, "LA", rtol=1e-6, v0=v0)
    assert res.num_matvecs <= count[0] + 10 + 2
    resid = np.linalg.norm(A @ res.eigenvectors - res.eigenvectors * res.eigenvalues, axis=0)
    assert resid.max() <= 1e-6 * np.abs(lam).max() * (1 + 1e-3)


# ---- issue 16: no silently wrong answer (each fails on the code before the fix) ----


def _true_residuals(A: np.ndarray, vals: np.ndarray, vecs: np.ndarray) -> np.ndarray:
    """``||A v - lambda v||`` evaluated in float64 with the dense matrix."""
    V = np.asarray(vecs, dtype=np.float64)
    return np.linalg.norm(A.astype(np.float64) @ V - V * np.asarray(vals, np.float64), axis=0)


def _outliers(n: int = 300, seed: int = 1) -> np.ndarray:
    lam = np.r_[np.linspace(10, 5, 10), np.random.default_rng(0).uniform(0, 1, n - 10)]
    return spectrum_matrix(lam, seed)


@pytest.mark.parametrize("tol", [1e-8, 1e-10])
def test_float32_tolerance_below_reach_raises_early(tol: float) -> None:
    """float32 cannot reach 1e-8 ||A||: it used to return converged=True with estimated
    residuals <= 1e-8 while the true ones were ~1.2e-7 (and at 1e-10 ran ~1200 products)."""
    A = _outliers().astype(np.float32)
    reachable = lanczos(A, 5, "LA", rtol=1e-5, seed=0)
    assert reachable.converged
    with pytest.raises(LanczosNoConvergence, match=r"below what torch.float32 reaches") as info:
        lanczos(A, 5, "LA", rtol=tol, seed=0)
    assert re.search(r"use rtol >= 1e-0[5-7]", str(info.value))
    partial = info.value.result
    assert not partial.converged
    assert partial.num_matvecs <= 3 * reachable.num_matvecs
    true = _true_residuals(A, partial.eigenvalues, partial.eigenvectors)
    assert np.all(partial.residuals >= 0.5 * true)  # reported residuals are the true ones


def test_float32_reported_residuals_are_true_residuals() -> None:
    """Reported residuals and ``converged`` come from ``||A v - lambda v||`` itself, not from
    the Krylov estimates (which fell to 5e-8 ||A|| while the true ones were 1.2e-7 ||A||)."""
    A = _outliers().astype(np.float32)
    res = lanczos(A, 5, "LA", rtol=1e-6, seed=0)
    true = _true_residuals(A, res.eigenvalues, res.eigenvectors)
    assert res.converged and true.max() <= 1e-6 * 10
    assert np.all(res.residuals >= 0.5 * true)


@pytest.mark.parametrize("seed", [0, 1])
def test_float32_cluster_of_ten_all_found(seed: int) -> None:
    """Ten eigenvalues within 1e-5 of 1 in float32: all ten, not 6-9 of them plus values near
    0.9 flagged converged."""
    lam = np.r_[1 + 1e-6 * np.arange(10), np.linspace(0, 0.9, 290)]
    A = spectrum_matrix(lam, seed).astype(np.float32)
    res = lanczos(A, 10, "LA", seed=seed)
    assert res.converged
    np.testing.assert_allclose(res.eigenvalues, np.sort(lam)[-10:], atol=1e-4)
    true = _true_residuals(A, res.eigenvalues, res.eigenvectors)
    assert true.max() <= 1e-3
    V = np.asarray(res.eigenvectors, np.float64)
    np.testing.assert_allclose(V.T @ V, np.eye(10), atol=1e-4)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_repeated_eigenvalues_every_copy_with_single_vector(dtype: type) -> None:
    """Eigenvalues 3 (x3) and 2 (x4) with block_size=1: k=7 returns all seven copies."""
    lam = np.r_[[3.0] * 3, [2.0] * 4, np.linspace(1.5, -1.5, 93)]
    A = spectrum_matrix(lam, 7).astype(dtype)
    tol = 1e-12 if dtype == np.float64 else None
    for seed in range(3):
        res = lanczos(A, 7, "LA", rtol=tol, seed=seed)
        assert res.converged
        np.testing.assert_allclose(res.eigenvalues, [2, 2, 2, 2, 3, 3, 3], atol=1e-4)
        scale = 1e-10 if dtype == np.float64 else 1e-3
        assert _true_residuals(A, res.eigenvalues, res.eigenvectors).max() <= scale * 3


def test_repeated_values_without_room_to_search_raise() -> None:
    """With a basis too small to look for missing copies it says so instead of guessing."""
    lam = np.r_[[3.0] * 3, [2.0] * 4, np.linspace(1.5, -1.5, 93)]
    with pytest.raises(LanczosNoConvergence, match="repeated values.*raise ncv"):
        lanczos(spectrum_matrix(lam, 7), 7, "LA", ncv=8, seed=0)


def _nonsymmetric(n: int = 100) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((n, n))


def test_non_symmetric_operator_refused() -> None:
    """A non-symmetric matrix used to come back converged=True with wrong eigenvalues."""
    with pytest.raises(ValueError, match=r"A: expected a symmetric \(Hermitian\) operator"):
        lanczos(_nonsymmetric(), 3, "LM", seed=0)


def test_randomized_eigh_and_spectral_density_refuse_non_symmetric() -> None:
    from estimators.density import spectral_density
    from linops.randomized import randomized_eigh

    with pytest.raises(ValueError, match=r"A: expected a symmetric \(Hermitian\) operator"):
        randomized_eigh(_nonsymmetric(), 3, seed=0)
    with pytest.raises(ValueError, match=r"A: expected a symmetric \(Hermitian\) operator"):
        spectral_density(_nonsymmetric(), num_probes=2, num_steps=10, seed=0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_symmetry_probe_accepts_rounding_and_rejects_small_skew(dtype: type) -> None:
    """Symmetric up to roundoff passes (float32, n=1500); a skew part of 1% is refused."""
    B = _nonsymmetric(1500).astype(dtype)
    S = (B + B.T) / 2
    res = lanczos(S, 2, "LA", seed=0)
    assert res.converged
    with pytest.raises(ValueError, match="relative asymmetry"):
        lanczos(S + 1e-2 * (B - B.T), 2, "LA", seed=0)


def test_slowly_decaying_smallest_within_arpack_products() -> None:
    """The 10 smallest of i^(-1/2) (n=600, ncv=40, accuracy 5e-8 ||A||): at most 1.2x
    ARPACK's products at the same basis size and accuracy, plus the k + 2 products of the
    symmetry probe and the true-residual check (it took 1.36x + 12 before ARPACK's keep rule)."""
    from scipy.sparse.linalg import LinearOperator, eigsh

    n, k, target = 600, 10, 5e-8
    lam = np.arange(1.0, n + 1) ** -0.5
    A = spectrum_matrix(lam, seed=0)
    count = [0]

    def mv(x: np.ndarray) -> np.ndarray:
        count[0] += 1 if x.ndim == 1 else x.shape[1]
        return A @ x

    v0 = np.random.default_rng(0).standard_normal(n)
    op = LinearOperator(A.shape, matvec=mv, matmat=mv, dtype=A.dtype)
    eigsh(op, k, which="SA", tol=target / lam.min(), ncv=40, v0=v0)  # ||r|| <= tol |theta|
    res = lanczos(A, k, "SA", rtol=target, ncv=40, v0=v0)
    assert res.converged
    assert res.num_matvecs <= 1.2 * count[0] + k + 2
    np.testing.assert_allclose(res.eigenvalues, np.sort(lam)[:k], atol=1e-7)
    assert _true_residuals(A, res.eigenvalues, res.eigenvectors).max() <= target * 1.001


def test_column_norms_are_accurate_in_float32() -> None:
    """Block column norms to float32 rounding (vector_norm(dim=0) measured 3.5e-5 here)."""
    from linops._krylov import column_norms

    W = torch.randn(272_000, 8, generator=torch.Generator().manual_seed(0))
    exact = W.double().pow(2).sum(0).sqrt()
    assert float(((column_norms(W).double() - exact) / exact).abs().max()) < 3e-7
    big = torch.full((5, 2), 1e30)  # squares would overflow float32
    assert torch.allclose(column_norms(big), torch.full((2,), 1e30 * 5**0.5), rtol=1e-6)
    assert torch.equal(column_norms(torch.zeros(4, 3)), torch.zeros(3))
    Z = torch.randn(1000, 3, dtype=torch.complex128, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(column_norms(Z), torch.linalg.vector_norm(Z, dim=0), rtol=1e-14)


def test_residual_norms_and_symmetry_defect_are_the_same_by_row_chunks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Row chunks keep big blocks from being converted to double at once; values unchanged."""
    from linops import _krylov

    g = torch.Generator().manual_seed(0)
    Y, AY = torch.randn(1000, 3, generator=g), torch.randn(1000, 3, generator=g)
    vals = torch.tensor([0.5, -2.0, 3.0])
    whole = torch.linalg.vector_norm(AY.double() - Y.double() * vals.double(), dim=0)
    A = torch.randn(1000, 1000, generator=g, dtype=torch.float64)
    Z = torch.randn(1000, 4, generator=g, dtype=torch.float64)
    before = _krylov.symmetry_defect(Z, A @ Z)
    monkeypatch.setattr(_krylov, "CHUNK_ROWS", 64)
    chunked = _krylov.residual_norms(AY, Y, vals)
    assert chunked.dtype == torch.float32
    torch.testing.assert_close(chunked.double(), whole, rtol=1e-7, atol=0)
    assert _krylov.symmetry_defect(Z, A @ Z) == pytest.approx(before, rel=1e-12)
    assert _krylov.symmetry_defect(Z, (A + A.T) @ Z) < 1e-12


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("name", ["decay", "repeated"])
def test_a_budget_without_stored_products_gives_verified_pairs(dtype: type, name: str) -> None:
    """A budget that holds the basis but not ``A V`` (a 124M-parameter model's top-5): the
    same eigenvalues, residuals that bound the true ones of the vectors returned, and every
    copy of repeated values (the locking path, which recombines the basis alone)."""
    A = spectrum_matrix(SPECTRA[name]).astype(dtype)
    n, k, itemsize = A.shape[0], 6, np.dtype(dtype).itemsize
    tol = 1e-10 if dtype == np.float64 else None
    full = lanczos(A, k, "LA", rtol=tol, seed=0)
    ncv = 2 * 6 + 30 if name == "decay" else 41
    budget = (ncv + 3) * n * itemsize  # the basis, the pending vector, two work vectors
    lean = lanczos(A, k, "LA", rtol=tol, seed=0, ncv=ncv, memory_budget=budget)
    assert lean.converged
    np.testing.assert_allclose(
        lean.eigenvalues, reference(np.sort(SPECTRA[name]), k, "LA"), atol=1e-4
    )
    np.testing.assert_allclose(lean.eigenvalues, full.eigenvalues, atol=10 * np.finfo(dtype).eps)
    true = _true_residuals(A, lean.eigenvalues, lean.eigenvectors)
    assert (np.asarray(lean.residuals, np.float64) >= true * (1 - 1e-6)).all()
    assert true.max() <= (1e-10 if dtype == np.float64 else 1e-3) * 3


def test_a_small_budget_shrinks_the_default_basis_and_refuses_an_explicit_one() -> None:
    from linops.lanczos import _fit_budget

    assert _fit_budget(40, 1000, 5, 1, 8, 10**9, True) == (40, True)
    assert _fit_budget(40, 1000, 5, 1, 8, 43 * 8000, True) == (40, False)
    assert _fit_budget(40, 1000, 5, 1, 8, 12 * 8000, False) == (9, False)
    A = spectrum_matrix(SPECTRA["decay"])
    res = lanczos(A, 3, "LA", seed=0, memory_budget=10 * A.shape[0] * 8)  # ncv 7
    np.testing.assert_allclose(
        res.eigenvalues, reference(np.sort(SPECTRA["decay"]), 3, "LA"), atol=1e-8
    )
    with pytest.raises(ValueError, match="the largest ncv that fits is 7"):
        lanczos(A, 3, "LA", ncv=30, memory_budget=10 * A.shape[0] * 8)
    with pytest.raises(ValueError, match="not even k \\+ 1 = 4 vectors fit"):
        lanczos(A, 3, "LA", memory_budget=5 * A.shape[0] * 8)


@pytest.mark.parametrize("which", ["LA", "SA", "LM", "BE"])
@pytest.mark.parametrize("k", [2, 4, 6])
def test_an_exact_breakdown_is_not_taken_for_the_wanted_values(which: str, k: int) -> None:
    """Eigenvalue 0 repeated exactly 117 times beside 1, 2, -1: the start vector's Krylov
    space closes after 4 steps, and its 4 exact Ritz values came back as the 4 largest (and as
    the 4 smallest), converged. The complement is searched once after a breakdown."""
    g = torch.Generator().manual_seed(0)
    n = 120
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    w = np.sort(np.r_[np.zeros(n - 3), [1.0, 2.0, -1.0]])
    A = (Q * torch.tensor(w)) @ Q.T
    for seed in range(3):
        r = lanczos(A, k, which, rtol=1e-10, seed=seed)
        assert r.converged
        np.testing.assert_allclose(
            np.sort(r.eigenvalues.numpy()), np.sort(reference(w, k, which)), atol=1e-9
        )


def test_the_null_space_of_a_psd_operator_is_returned_with_all_its_wanted_copies() -> None:
    """A PSD matrix of rank 40 in 300 dimensions (a GGN with more parameters than outputs):
    one start vector sees the null space once, and "SA" with k = 4 returned one 0 and the
    three smallest nonzero eigenvalues (1e-5 and up), each a verified eigenpair, with
    converged=True (with 1 and 2 threads; the rounding of other cases made a cluster)."""
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(300, 300, generator=g, dtype=torch.float64))
    d = torch.zeros(300, dtype=torch.float64)
    d[:40] = torch.logspace(-5, 0, 40, dtype=torch.float64)
    A = (Q * d) @ Q.T
    res = lanczos(A, 4, "SA", rtol=1e-8, seed=0)
    assert res.converged
    torch.testing.assert_close(
        res.eigenvalues, torch.zeros(4).to(res.eigenvalues), rtol=0, atol=1e-8
    )
    # one value wanted: its copies cannot change it, and no search is run
    one = lanczos(A, 1, "SA", rtol=1e-8, seed=0)
    assert abs(float(one.eigenvalues[0])) < 1e-8 and one.num_matvecs < res.num_matvecs
    # a positive definite matrix's distinct smallest values are not searched
    d[40:] = torch.logspace(-3, -2, 260, dtype=torch.float64)
    res = lanczos((Q * d) @ Q.T, 4, "SA", rtol=1e-8, seed=0)
    torch.testing.assert_close(res.eigenvalues, torch.sort(d).values[:4], rtol=0, atol=1e-8)


@pytest.mark.parametrize(("dtype", "scale"), [(torch.float64, 1e155), (torch.float32, 1e20)])
def test_lanczos_on_an_operator_whose_plain_norms_overflow(
    dtype: torch.dtype, scale: float
) -> None:
    """Entries of 1e155 (float64) or 1e19 (float32): the plain column norm squared to inf, every
    column counted as a breakdown, and [1.58, 1.60] x scale came back converged with inf
    residuals where [1.99, 2.00] x scale is right."""
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(100, 100, generator=g, dtype=torch.float64))
    lam = torch.linspace(1, 2, 100, dtype=torch.float64)
    A = ((Q * (lam * scale)) @ Q.T).to(dtype)
    res = lanczos(A, 2, "LA", seed=0)
    got = torch.as_tensor(res.eigenvalues).double() / scale
    torch.testing.assert_close(
        got, lam[-2:], rtol=1e-5 if dtype == torch.float32 else 1e-10, atol=0
    )
    assert bool(torch.isfinite(torch.as_tensor(res.residuals)).all())
