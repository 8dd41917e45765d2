"""Randomized range finder, SVD, eigh and Nystrom against dense references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from linops import TorchLinearOperator
from linops.randomized import nystrom, randomized_eigh, randomized_svd, range_finder


def spectrum_matrix(lam: np.ndarray, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((lam.size, lam.size)))
    return (Q * lam) @ Q.T


FAST = 0.7 ** np.arange(200)


@pytest.mark.parametrize("method", ["block_krylov", "subspace"])
def test_randomized_svd_fast_decay(method: str) -> None:
    A = spectrum_matrix(FAST)
    res = randomized_svd(A, 5, power_iters=3, method=method, seed=0)
    np.testing.assert_allclose(res.singular_values, FAST[:5], rtol=1e-10)
    U, V = res.left_vectors, res.right_vectors
    assert np.linalg.norm(A @ V - U * res.singular_values, axis=0).max() <= 1e-8
    assert res.num_matvecs == 15 * 8


def test_block_krylov_beats_subspace_at_equal_budget() -> None:
    lam = 1.0 / np.arange(1, 301)
    A = spectrum_matrix(lam)
    bk = randomized_svd(A, 10, power_iters=2, seed=0)
    ss = randomized_svd(A, 10, power_iters=2, method="subspace", seed=0)
    assert bk.num_matvecs <= ss.num_matvecs == 120
    err_bk = np.abs(bk.singular_values - lam[:10]).max()
    err_ss = np.abs(ss.singular_values - lam[:10]).max()
    assert err_bk < err_ss


def test_rectangular_wide_and_tall() -> None:
    rng = np.random.default_rng(0)
    A = rng.standard_normal((40, 90)) @ np.diag(0.6 ** np.arange(90))
    ref = np.linalg.svd(A, compute_uv=False)[:4]
    for M in (A, A.T):
        res = randomized_svd(M, 4, power_iters=3, seed=1)
        np.testing.assert_allclose(res.singular_values, ref, rtol=1e-8)


def test_range_finder_adaptive_tolerance_and_fixed_rank() -> None:
    A = spectrum_matrix(FAST)
    res = range_finder(A, atol=1e-8, seed=0)
    Q = res.basis
    true_err = np.linalg.norm(A - Q @ (Q.T @ A), 2)
    assert true_err <= 1e-8 and res.error_estimate <= 1e-8
    assert Q.shape[1] < 100
    np.testing.assert_allclose(Q.T @ Q, np.eye(Q.shape[1]), atol=1e-12)
    fixed = range_finder(A, 10, oversample=5, power_iters=1, seed=0)
    assert fixed.basis.shape == (200, 15) and fixed.num_matvecs == 45


def test_randomized_eigh_indefinite_and_nystrom_psd() -> None:
    lam = np.r_[-8.0, 6.0, -4.0, 0.5 ** np.arange(97)]
    A = spectrum_matrix(lam)
    res = randomized_eigh(A, 3, seed=0)
    np.testing.assert_allclose(res.eigenvalues, [-8.0, -4.0, 6.0], rtol=1e-10)
    P = spectrum_matrix(FAST[:100])
    ny = nystrom(P, 5, oversample=40, seed=0)
    np.testing.assert_allclose(ny.eigenvalues, FAST[:5][::-1], rtol=1e-6)
    with pytest.raises(ValueError, match="positive semidefinite"):
        nystrom(-P, 3, seed=0)


class _TorchOnly(TorchLinearOperator):
    def __init__(self, A: torch.Tensor) -> None:
        super().__init__(A.shape, dtype=A.dtype, device=A.device)
        self.A = A

    def _matmat_torch(self, X: torch.Tensor) -> torch.Tensor:
        assert isinstance(X, torch.Tensor) and X.device == self.device
        return self.A @ X

    def _rmatmat_torch(self, Y: torch.Tensor) -> torch.Tensor:
        assert isinstance(Y, torch.Tensor) and Y.device == self.device
        return self.A.T @ Y


def test_device_resident_torch_path() -> None:
    from linops.svds import svds

    A = _TorchOnly(
        torch.randn(50, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    )
    for res in (randomized_svd(A, 3, seed=0), svds(A, 3, seed=0)):
        assert isinstance(res.singular_values, torch.Tensor)


def test_bad_input_raises() -> None:
    A = np.eye(10)
    with pytest.raises(ValueError, match="expected exactly one of rank and atol"):
        range_finder(A)
    with pytest.raises(ValueError, match="rank: expected an integer >= 1 and <= 10, got 11"):
        randomized_svd(A, 11)
    with pytest.raises(ValueError, match="method: expected one of"):
        randomized_svd(A, 2, method="lanczos")
    with pytest.raises(ValueError, match="tol: expected a positive"):
        range_finder(A, atol=-1.0)
    with pytest.raises(ValueError, match="expected a square"):
        randomized_eigh(np.ones((4, 3)), 2)


def _true_error(A: np.ndarray, Q: np.ndarray) -> float:
    """``||(I - QQ^T) A||_2`` in float64 for the operator ``A`` (float32 entries kept)."""
    A64, Q64 = A.astype(np.float64), Q.astype(np.float64)
    return float(np.linalg.norm(A64 - Q64 @ (Q64.T @ A64), 2))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_range_finder_keeps_only_the_directions_needed(dtype) -> None:
    """Issue 16: with a tolerance it returned 10 columns for the zero operator and 20 (float64)
    or 80 (float32) for a rank-3 one."""
    rng = np.random.default_rng(0)
    zero = np.zeros((100, 80), dtype)
    res = range_finder(zero, atol=1e-3, seed=0)
    assert res.basis.shape == (100, 0) and res.error_estimate == 0.0 and res.converged
    B = (rng.standard_normal((100, 3)) @ rng.standard_normal((3, 80))).astype(dtype)
    res = range_finder(B, atol=1e-3, seed=0)
    assert res.basis.shape == (100, 3) and res.converged
    assert _true_error(B, res.basis) <= res.error_estimate <= 1e-3
    assert res.num_matvecs == 20  # one block finds the range, one certifies it


def test_range_finder_float32_reachable_tolerance() -> None:
    """Issue 16: in float32 a reachable tolerance (1e-4 on a 0.7^i spectrum) ran to the full
    dimension (200 products); it needs about as many products as in float64."""
    A = spectrum_matrix(FAST).astype(np.float32)
    res = range_finder(A, atol=1e-4, seed=0)
    ref = range_finder(A.astype(np.float64), atol=1e-4, seed=0)
    assert res.converged and res.error_estimate <= 1e-4
    assert _true_error(A, res.basis) <= res.error_estimate
    assert res.num_matvecs <= ref.num_matvecs + 10 < 100


@pytest.mark.parametrize("tol", [1e-7, 1e-10])
def test_range_finder_float32_unreachable_tolerance_is_reported(tol: float) -> None:
    """Issue 16: a tolerance float32 cannot reach ran to the full dimension and reported an
    error estimate of 0.0 (true error about 1e-6). It must stop early with
    ``converged=False`` and an estimate that bounds the true error."""
    A = spectrum_matrix(FAST).astype(np.float32)
    res = range_finder(A, atol=tol, seed=0)
    assert not res.converged
    assert res.error_estimate > tol
    assert _true_error(A, res.basis) <= res.error_estimate
    assert res.num_matvecs <= 100  # half the dimension: detected, not exhausted


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_range_finder_full_basis_estimate_is_never_zero(dtype) -> None:
    """A slowly decaying spectrum drives the basis to the full dimension: the estimate must
    still bound the true (rounding-level) error, not be 0.0."""
    A = spectrum_matrix(1.0 / np.arange(1, 121)).astype(dtype)
    res = range_finder(A, atol=1e-9, seed=0)
    assert res.basis.shape == (120, 120)
    true = _true_error(A, res.basis)
    assert 0.0 < true <= res.error_estimate
    assert res.converged == (res.error_estimate <= 1e-9)
    assert not range_finder(A.astype(np.float32), atol=1e-9, seed=0).converged


def test_range_finder_estimate_bounds_the_error_over_seeds() -> None:
    """The posterior estimate is a bound with probability 1 - 10^-block_size: over 30 seeds
    and three tolerances it is never below the true error, and converged means <= tol."""
    A = spectrum_matrix(0.8 ** np.arange(150))
    for seed in range(30):
        for tol in (1e-3, 1e-6, 1e-9):
            res = range_finder(A, atol=tol, block_size=5, seed=seed)
            assert res.converged and res.error_estimate <= tol
            assert _true_error(A, res.basis) <= res.error_estimate


def test_range_finder_max_rank_cap_is_not_converged() -> None:
    A = spectrum_matrix(FAST)
    res = range_finder(A, atol=1e-10, max_rank=20, seed=0)
    assert res.basis.shape[1] == 20 and not res.converged
    assert _true_error(A, res.basis) <= res.error_estimate
    assert res.error_estimate > 1e-10
    fixed = range_finder(A, 5, seed=0)
    assert fixed.converged and np.isnan(fixed.error_estimate)
    for bad in (0.0, -1.0, float("nan"), float("inf"), True, "1e-3"):
        with pytest.raises(ValueError, match="tol: expected a positive finite number"):
            range_finder(A, atol=bad)


def test_randomized_svd_says_when_it_returns_fewer_than_rank() -> None:
    """block_size=3 with rank 5 and a budget of 10 products returned 3 triplets silently."""
    g = torch.Generator().manual_seed(0)
    A = torch.randn(60, 40, generator=g, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="fewer than rank=5"):
        res = randomized_svd(A, 5, block_size=3, oversample=0, power_iters=0, seed=0)
    assert res.singular_values.shape == (3,)
    res = randomized_svd(A, 5, block_size=5, oversample=0, power_iters=0, seed=0)
    assert res.singular_values.shape == (5,) and res.left_vectors.shape == (60, 5)


def test_block_krylov_svd_uses_its_last_products() -> None:
    """30 singular values in [1.5, 5] over a floor of 0.01, rank 64 in one block step: the
    square part of the bidiagonal alone gave a top value of 2.43 (A on the start block) where
    HMT's svd(Q^T A) with the same 128 products gives 5.0; training_dimension counted 17 of
    30 above 1."""
    from estimators import training_dimension

    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(400, 400, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(400, 400, generator=g, dtype=torch.float64))
    s = torch.cat([torch.linspace(5, 1.5, 30), torch.full((370,), 0.01)]).double()
    A = (U * s) @ V.T
    res = randomized_svd(A, 64, oversample=0, power_iters=0, seed=0)
    Om = torch.randn(400, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    Q, _ = torch.linalg.qr(A @ Om)
    hmt = torch.linalg.svdvals(Q.T @ A)
    assert res.num_matvecs == 128
    assert float(res.singular_values[0]) > 0.999 * float(hmt[0]) > 4.99
    assert int((res.singular_values > 1).sum()) == 30
    dim = training_dimension(A + torch.eye(400, dtype=torch.float64), 1.0, method="krylov", seed=0)
    assert dim.rank == 30
