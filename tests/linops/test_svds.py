"""Golub-Kahan thick-restart SVD against dense float64 references (numpy svd)."""

from __future__ import annotations

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
    res = svds(A, 4, which, tol=1e-10, seed=0)
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
    res = svds(A, 3, tol=1e-5, seed=0)
    assert isinstance(res.singular_values, torch.Tensor) and res.left_vectors.shape == (80, 3)
    np.testing.assert_allclose(res.singular_values.numpy(), np.linspace(5, 0.1, 50)[:3], atol=1e-4)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10**6), m=st.integers(20, 40), n=st.integers(20, 40))
def test_svds_of_transpose_agrees(seed: int, m: int, n: int) -> None:
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((m, n))
    a, b = svds(A, 3, seed=0, tol=1e-10), svds(A.T, 3, seed=1, tol=1e-10)
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
