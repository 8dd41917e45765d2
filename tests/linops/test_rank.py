"""Numerical, effective and stable rank against closed forms and numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from linops import aslinearoperator
from linops.rank import effective_rank, numerical_rank, stable_rank


def matrix_with_singular_values(s: np.ndarray, m: int = 60, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    U, _ = np.linalg.qr(rng.standard_normal((m, s.size)))
    V, _ = np.linalg.qr(rng.standard_normal((s.size, s.size)))
    return (U * s) @ V.T


def test_numerical_rank_matches_numpy() -> None:
    s = 0.5 ** np.arange(40)
    A = matrix_with_singular_values(s)
    assert numerical_rank(A) == np.linalg.matrix_rank(A)
    assert numerical_rank(s, rtol=1e-6) == int(np.sum(s > 1e-6))
    assert numerical_rank(torch.from_numpy(A), rtol=1e-3) == int(np.sum(s > 1e-3))


def test_numerical_rank_of_operator_without_knowing_it() -> None:
    s = np.r_[np.linspace(3, 1, 17), 1e-9 * np.ones(23)]
    op = aslinearoperator(matrix_with_singular_values(s))
    assert numerical_rank(op, rtol=1e-6) == 17


def test_effective_and_stable_rank_closed_forms() -> None:
    assert effective_rank(np.ones(7)) == pytest.approx(7.0)
    p = np.array([3.0, 1.0]) / 4
    assert effective_rank([3.0, 1.0]) == pytest.approx(np.exp(-(p * np.log(p)).sum()))
    assert stable_rank([2.0, 1.0, 1.0]) == pytest.approx(1.5)
    A = matrix_with_singular_values(np.array([2.0, 1.0, 1.0]))
    assert stable_rank(A) == pytest.approx(1.5)
    assert stable_rank(aslinearoperator(A), num_matvecs=2000) == pytest.approx(1.5, rel=0.1)


def test_bad_input_raises() -> None:
    with pytest.raises(ValueError, match="non-negative singular values"):
        effective_rank([-1.0, 2.0])
    with pytest.raises(ValueError, match="all zeros"):
        effective_rank([0.0, 0.0])
    with pytest.raises(ValueError, match="all zeros"):
        stable_rank(np.zeros(3))
    with pytest.raises(ValueError, match="rtol: expected a number"):
        numerical_rank([1.0, 0.5], rtol=2.0)
    with pytest.raises(ValueError, match="expected singular values"):
        numerical_rank(np.ones((2, 2, 2)))
    assert numerical_rank(np.zeros(3)) == 0


def test_float32_numpy_default_rtol_comes_from_the_input_dtype() -> None:
    """Issue 16: a float32 numpy array of rank 60 was counted as 800 (the default tolerance
    was taken after conversion to float64), a float32 torch tensor as 60."""
    rng = np.random.default_rng(0)
    A = (rng.standard_normal((1000, 60)) @ rng.standard_normal((60, 800))).astype(np.float32)
    assert np.linalg.matrix_rank(A) == 60
    assert numerical_rank(A) == 60
    assert numerical_rank(torch.from_numpy(A)) == 60
    s32 = np.linalg.svd(A, compute_uv=False)  # float32 singular values: same rule
    assert s32.dtype == np.float32 and numerical_rank(s32) == 60
    assert numerical_rank(A.astype(np.float64)) > 60  # float64 entries: float64 tolerance


def test_float32_operator_rank_and_an_unreachable_rtol() -> None:
    """A float32 operator: the default ``sqrt(eps)`` counts 60; an ``rtol`` of 1e-9 cannot be
    resolved in float32 and is refused with the reachable value, instead of a count of noise."""
    rng = np.random.default_rng(1)
    A = (rng.standard_normal((300, 60)) @ rng.standard_normal((60, 200))).astype(np.float32)
    op = aslinearoperator(torch.from_numpy(A))
    assert numerical_rank(op) == 60
    with pytest.raises(ValueError, match="rtol: expected at least about"):
        numerical_rank(op, rtol=1e-9)
