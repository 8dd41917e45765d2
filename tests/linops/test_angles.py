"""Principal angles against constructed subspaces with known angles and scipy."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from linops.angles import principal_angles, subspace_similarity, subspace_similarity_curve


def pair_with_angles(angles: np.ndarray, n: int = 40, seed: int = 0) -> tuple[np.ndarray, ...]:
    """Orthonormal U, V (n x p) whose principal angles are exactly ``angles``."""
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((n, 2 * angles.size)))
    U, W = Q[:, : angles.size], Q[:, angles.size :]
    return U, U * np.cos(angles) + W * np.sin(angles)


def test_tiny_angles_in_mixed_sets() -> None:
    angles = np.array([1e-12, 1e-10, 1e-8, 0.3, 1.2, np.pi / 2])
    U, V = pair_with_angles(angles)
    got = principal_angles(U, V)
    np.testing.assert_allclose(got, angles, rtol=1e-6, atol=1e-15)
    # scipy 1.17 loses the tiny ones in such mixed sets; the large ones agree
    np.testing.assert_allclose(np.sort(scipy.linalg.subspace_angles(U, V))[3:], got[3:], atol=1e-12)


def test_agrees_with_scipy_on_generic_subspaces() -> None:
    rng = np.random.default_rng(1)
    U, V = rng.standard_normal((30, 4)), rng.standard_normal((30, 6))
    np.testing.assert_allclose(
        principal_angles(U, V), np.sort(scipy.linalg.subspace_angles(U, V)), atol=1e-12
    )


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10**6), n=st.integers(6, 30), p=st.integers(1, 3))
def test_self_zero_and_complement_right_angle(seed: int, n: int, p: int) -> None:
    rng = np.random.default_rng(seed)
    X = torch.from_numpy(rng.standard_normal((n, p)))
    Q = torch.linalg.qr(X, mode="complete")[0]
    assert float(principal_angles(X, X @ torch.randn(p, p, dtype=X.dtype)).max()) <= 1e-7
    comp = principal_angles(X, Q[:, p:])
    np.testing.assert_allclose(comp.numpy(), np.pi / 2, atol=1e-12)
    assert subspace_similarity(X, Q[:, p:]) == pytest.approx(0.0, abs=1e-12)


def test_similarity_and_output_types() -> None:
    U = np.eye(5)[:, :2]
    V = np.eye(5)[:, 1:3]
    assert isinstance(principal_angles(U, V), np.ndarray)
    assert subspace_similarity(U, V) == pytest.approx(0.5)
    assert isinstance(principal_angles(torch.from_numpy(U), V), torch.Tensor)


def test_bad_input_raises() -> None:
    with pytest.raises(ValueError, match="same number of rows"):
        principal_angles(np.eye(4)[:, :2], np.eye(5)[:, :2])
    with pytest.raises(ValueError, match="rank-deficient"):
        principal_angles(np.ones((4, 2)), np.eye(4)[:, :1])
    with pytest.raises(ValueError, match="expected a 2-d basis"):
        principal_angles(np.ones(4), np.eye(4))
    with pytest.raises(ValueError, match="NaN"):
        principal_angles(np.full((4, 1), np.nan), np.eye(4))


def test_similarity_is_mean_cosine_of_known_angles() -> None:
    angles = np.array([1e-9, 0.2, 0.7, 1.1, np.pi / 2])
    U, V = pair_with_angles(angles, seed=3)
    assert subspace_similarity(U, V) == pytest.approx(np.cos(angles).mean(), abs=1e-14)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10**6), n=st.integers(5, 25), K=st.integers(1, 5))
def test_similarity_curve_equals_separate_calls(seed: int, n: int, K: int) -> None:
    """Leading-column similarities from one QR and one product equal independent calls."""
    rng = np.random.default_rng(seed)
    A, B = rng.standard_normal((n, K + 1)), rng.standard_normal((n, K + 2))
    ks = list(range(1, K + 1))
    want = [float(np.cos(principal_angles(A[:, :k], B[:, :k])).mean()) for k in ks]
    np.testing.assert_allclose(subspace_similarity_curve(A, B, ks, precise=True), want, atol=1e-12)
    np.testing.assert_allclose(subspace_similarity_curve(A, B, ks), want, atol=1e-7)


def test_similarity_curve_on_constructed_nested_bases() -> None:
    """Leading k columns of U and V: V_i = cos(a_i) U_i + sin(a_i) W_i, so the k-th mean is known."""
    angles = np.array([0.0, 0.4, 1.0, np.pi / 2])
    U, V = pair_with_angles(angles, seed=5)
    want = [np.cos(angles[:k]).mean() for k in (1, 2, 3, 4)]
    np.testing.assert_allclose(subspace_similarity_curve(U, V, [1, 2, 3, 4]), want, atol=1e-7)
    got = subspace_similarity_curve(U, V, [1, 2, 3, 4], precise=True)
    np.testing.assert_allclose(got, want, atol=1e-14)
    with pytest.raises(ValueError, match="max"):
        subspace_similarity_curve(U, V, [5])
    with pytest.raises(ValueError, match="ks"):
        subspace_similarity_curve(U, V, [0, 2])
