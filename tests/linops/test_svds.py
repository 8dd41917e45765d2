"""Golub-Kahan thick-restart SVD against dense float64 references (numpy svd)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from linops.svds import SVDSNoConvergence, svds


def rect_matrix(m: int, n: int, s: np.ndarray, seed: int = 0) -> np.ndarray:
    """``U diag(s) V^T`` with Haar-random orthonormal ``U`` (m x r) and ``V`` (n x r)."""
    rng = np.random.default_rng(seed)
    U, _ = np.linalg.qr(rng.standard_normal((m, s.size)))
    V, _ = np.linalg.qr(rng.standard_normal((n, s.size)))
    return (U * s) @ V.T


@pytest.mark.parametrize("shape", [(90, 60), (60, 90), (70, 70)])
@pytest.mark.parametrize("which", ["LM", "SM"])
def test_singular_triplets_match_dense_reference(shape: tuple[int, int], which: str) -> None:
    m, n = shape
    s = np.r_[20.0, 20.0, 19.0, np.linspace(10, 1, min(m, n) - 3)]
    A = rect_matrix(m, n, s)
    ref = np.linalg.svd(A, compute_uv=False)
    res = svds(A, 4, which, rtol=1e-10, seed=0)
    expect = ref[:4] if which == "LM" else ref[-4:]
    np.testing.assert_allclose(res.singular_values, expect, rtol=0, atol=1e-10 * ref[0])
    U, V, sv = res.left_vectors, res.right_vectors, res.singular_values
    assert np.linalg.norm(A @ V - U * sv, axis=0).max() <= 1e-9 * ref[0]
    assert np.linalg.norm(A.T @ U - V * sv, axis=0).max() <= 1e-9 * ref[0]
    np.testing.assert_allclose(U.T @ U, np.eye(4), atol=1e-12)
    np.testing.assert_allclose(V.T @ V, np.eye(4), atol=1e-12)
    assert res.converged


def test_low_rank_operator_with_zero_singular_values() -> None:
    A = rect_matrix(50, 40, np.array([3.0, 2.0, 1.0]))
    res = svds(A, 3, seed=0)
    np.testing.assert_allclose(res.singular_values, [3.0, 2.0, 1.0], atol=1e-12)


def test_float32_torch() -> None:
    A = torch.from_numpy(rect_matrix(80, 50, np.linspace(5, 0.1, 50))).float()
    res = svds(A, 3, rtol=1e-5, seed=0)
    assert isinstance(res.singular_values, torch.Tensor) and res.left_vectors.shape == (80, 3)
    np.testing.assert_allclose(res.singular_values.numpy(), np.linspace(5, 0.1, 50)[:3], atol=1e-4)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10**6), m=st.integers(20, 40), n=st.integers(20, 40))
def test_svds_of_transpose_agrees(seed: int, m: int, n: int) -> None:
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((m, n))
    a, b = svds(A, 3, seed=0, rtol=1e-10), svds(A.T, 3, seed=1, rtol=1e-10)
    np.testing.assert_allclose(a.singular_values, b.singular_values, rtol=1e-9)
    np.testing.assert_allclose(a.singular_values, np.linalg.svd(A, compute_uv=False)[:3], rtol=1e-9)


def test_no_convergence_carries_partial_result() -> None:
    A = rect_matrix(200, 150, np.linspace(10, 1, 150))
    with pytest.raises(SVDSNoConvergence, match=r"1 restarts .*\d/5 converged") as info:
        svds(A, 5, "SM", maxiter=1, ncv=10, seed=0)
    assert info.value.result.singular_values.shape == (5,)


def test_bad_input_raises() -> None:
    A = np.ones((6, 4))
    with pytest.raises(ValueError, match="k: expected an integer >= 1 and <= 4, got 5"):
        svds(A, 5)
    with pytest.raises(ValueError, match="which: expected one of"):
        svds(A, 2, "LA")
    with pytest.raises(ValueError, match="nonzero start vector"):
        svds(A, 2, v0=np.zeros(4))
    with pytest.raises(FloatingPointError, match="NaN or inf"):
        svds(np.full((6, 4), np.nan), 2, seed=0)


# ---- issue 16: no silently wrong answer (each fails on the code before the fix) ----

REPEATED = np.r_[[3.0] * 3, [2.0] * 4, np.linspace(1.5, 0.1, 53)]


def _true_residuals(A: np.ndarray, res) -> np.ndarray:
    """``sqrt(||A v - s u||^2 + ||A^T u - s v||^2)`` in float64 with the dense matrix."""
    A = A.astype(np.float64)
    U, V = (np.asarray(x, np.float64) for x in (res.left_vectors, res.right_vectors))
    s = np.asarray(res.singular_values, np.float64)
    return np.hypot(np.linalg.norm(A @ V - U * s, axis=0), np.linalg.norm(A.T @ U - V * s, axis=0))


@pytest.mark.parametrize("shape", [(100, 60), (60, 100)])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_repeated_singular_values_every_copy(shape: tuple[int, int], dtype: type) -> None:
    """Singular values 3 (x3) and 2 (x4), k=7, block_size=1: all seven copies, not
    3,3,3,2,2,2,1.5 flagged converged (in float32 and at tol=1e-12 in float64)."""
    A = rect_matrix(*shape, REPEATED).astype(dtype)
    ref = np.linalg.svd(A.astype(np.float64), compute_uv=False)[:7]
    tol = 1e-12 if dtype == np.float64 else None
    for seed in range(3):
        res = svds(A, 7, rtol=tol, seed=seed)
        assert res.converged
        np.testing.assert_allclose(res.singular_values, ref, atol=1e-10 if tol else 1e-4)
        assert _true_residuals(A, res).max() <= (1e-10 if tol else 1e-3) * 3
        for X in (res.left_vectors, res.right_vectors):
            X = np.asarray(X, np.float64)
            np.testing.assert_allclose(X.T @ X, np.eye(7), atol=1e-10 if tol else 1e-4)


def test_repeated_singular_values_without_room_raise() -> None:
    with pytest.raises(SVDSNoConvergence, match="repeated values.*raise ncv"):
        svds(rect_matrix(100, 60, REPEATED), 7, ncv=8, seed=0)


def test_float32_tolerance_below_reach_raises_early() -> None:
    """float32 at tol=1e-9: raises naming the reachable tolerance, after a few times the
    products of a reachable tolerance, with the true residuals in the partial result."""
    A = rect_matrix(120, 80, np.linspace(5, 0.1, 80)).astype(np.float32)
    reachable = svds(A, 3, rtol=1e-5, seed=0)
    assert reachable.converged
    with pytest.raises(SVDSNoConvergence, match=r"below what torch.float32 reaches") as info:
        svds(A, 3, rtol=1e-9, seed=0)
    partial = info.value.result
    assert not partial.converged
    assert partial.num_matvecs <= 3 * reachable.num_matvecs
    assert np.all(partial.residuals >= 0.5 * _true_residuals(A, partial))


def test_reported_residuals_are_true_residuals() -> None:
    A = rect_matrix(120, 80, np.linspace(5, 0.1, 80)).astype(np.float32)
    res = svds(A, 3, rtol=1e-5, seed=0)
    true = _true_residuals(A, res)
    assert res.converged and true.max() <= 1e-5 * 5
    assert np.all(res.residuals >= 0.5 * true)


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_an_exact_breakdown_is_not_taken_for_the_wanted_values(k: int) -> None:
    """Singular values 5, 5 and 1 (58 times): the start vector sees one direction of each, so
    the bidiagonalisation closes after 2 steps and returned [5, 1] as the 2 largest,
    converged. The complement is searched once after a breakdown."""
    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(90, 60, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(60, 60, generator=g, dtype=torch.float64))
    s = torch.ones(60, dtype=torch.float64)
    s[:2] = 5.0
    A = (U * s) @ V.T
    for M in (A, A.T):
        r = svds(M, k, seed=1)
        assert r.converged
        np.testing.assert_allclose(r.singular_values.numpy(), [5, 5, 1, 1][:k], atol=1e-10)


def test_a_null_space_at_the_small_end_is_said_to_hide_copies() -> None:
    """300 x 120 of rank 100, k = 25 'SM': one 0 and 24 values in [1e-3, 5e-3] came back
    converged where 20 zeros come first; no search runs for svds, so a warning says so."""
    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(300, 100, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(120, 100, generator=g, dtype=torch.float64))
    A = (U * torch.logspace(0, -3, 100, dtype=torch.float64)) @ V.T
    with pytest.warns(RuntimeWarning, match="further copies of 0 may be missing"):
        svds(A, 25, "SM", seed=0)
    full = torch.diag(torch.linspace(1, 2, 30, dtype=torch.float64))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        svds(full, 3, "SM", seed=0)  # no zero: no warning
