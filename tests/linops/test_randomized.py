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
    res = range_finder(A, tol=1e-8, seed=0)
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
    with pytest.raises(ValueError, match="expected exactly one of rank and tol"):
        range_finder(A)
    with pytest.raises(ValueError, match="rank: expected an integer >= 1 and <= 10, got 11"):
        randomized_svd(A, 11)
    with pytest.raises(ValueError, match="method: expected one of"):
        randomized_svd(A, 2, method="lanczos")
    with pytest.raises(ValueError, match="tol: expected a positive"):
        range_finder(A, tol=-1.0)
    with pytest.raises(ValueError, match="expected a square"):
        randomized_eigh(np.ones((4, 3)), 2)
