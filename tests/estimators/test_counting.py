"""Deflated SLQ counts of singular values above a threshold, against known spectra."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from estimators.counting import singular_value_count
from linops import TorchLinearOperator

F64 = torch.float64


def with_spectrum(s: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A dense square matrix U diag(s) W^T with random orthogonal U, W."""
    g = torch.Generator().manual_seed(seed)
    n = s.numel()
    U = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))[0]
    W = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))[0]
    return U @ torch.diag(s.to(F64)) @ W.T


class Counted(TorchLinearOperator):
    """A dense matrix that counts the vectors it is applied to."""

    def __init__(self, A: torch.Tensor) -> None:
        super().__init__(tuple(A.shape), dtype=A.dtype, device=A.device)
        self.A, self.products = A, 0

    def _matmat_torch(self, X: torch.Tensor) -> torch.Tensor:
        self.products += X.shape[1]
        return self.A @ X

    def _rmatmat_torch(self, Y: torch.Tensor) -> torch.Tensor:
        self.products += Y.shape[1]
        return self.A.T @ Y


def test_gapped_spectrum_is_counted_exactly() -> None:
    """With a gap at the threshold every value above it is deflated and the rest has none."""
    s = torch.cat([torch.linspace(3.0, 10.0, 30), torch.linspace(0.01, 0.5, 370)])
    A = Counted(with_spectrum(s))
    res = singular_value_count(A, 1.0, 400, block_size=16, steps=20, seed=1)
    assert res.count == pytest.approx(30, abs=1e-9)
    assert res.deflated == 30
    assert res.stderr == pytest.approx(0.0, abs=1e-9)
    assert A.products == res.num_products <= 400


def test_gapless_spectrum_within_a_few_standard_errors() -> None:
    """A continuum through the threshold (as for seed 004's J - I): unbiased within its error."""
    n = 400
    s = torch.logspace(1, -3, n, dtype=F64)  # 10 down to 1e-3, no gap anywhere: 100 above 1
    true = int((s > 1.0).sum())
    A = Counted(with_spectrum(s, seed=2))
    counts = []
    for seed in range(6):
        A.products = 0
        res = singular_value_count(A, 1.0, n, block_size=16, steps=20, seed=seed)
        assert A.products == res.num_products <= n
        assert 0 < res.deflated < true
        assert abs(res.count - true) <= 0.1 * true
        counts.append(res.count)
    assert abs(sum(counts) / len(counts) - true) <= 0.04 * true  # no systematic bias


def test_counts_a_rectangular_operator() -> None:
    g = torch.Generator().manual_seed(3)
    Q1 = torch.linalg.qr(torch.randn(300, 120, generator=g, dtype=F64))[0]
    Q2 = torch.linalg.qr(torch.randn(120, 120, generator=g, dtype=F64))[0]
    s = torch.cat([torch.full((10,), 5.0, dtype=F64), torch.full((110,), 0.1, dtype=F64)])
    res = singular_value_count(Q1 @ torch.diag(s) @ Q2.T, 1.0, 200, block_size=12, steps=15)
    assert res.count == pytest.approx(10, abs=1e-6)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10**6), above=st.integers(1, 20), tau=st.floats(0.5, 2.0))
def test_deflation_never_counts_a_value_below_the_threshold(seed, above, tau):
    """Ritz values never exceed the singular values they approximate, so ``deflated <= true``;
    the stochastic rest is within a few of its theoretical standard deviations."""
    g = torch.Generator().manual_seed(seed)
    n = 120
    hi = tau * (1.5 + torch.rand(above, generator=g, dtype=F64))
    lo = tau * 0.6 * torch.rand(n - above, generator=g, dtype=F64)
    A = Counted(with_spectrum(torch.cat([hi, lo]), seed=seed))
    res = singular_value_count(A, tau, 100, block_size=8, steps=10, seed=seed)
    assert A.products == res.num_products <= 100
    assert res.count == pytest.approx(res.deflated + res.rest)
    assert res.deflated <= above
    # Hutchinson on a rank-r projector with Rademacher probes: variance at most 2 r per probe
    r = above - res.deflated
    assert abs(res.count - above) <= 4 * math.sqrt(2 * r / res.probes) + 0.5
    assert math.isfinite(res.stderr)


def test_bad_arguments() -> None:
    A = torch.eye(10, dtype=F64)
    with pytest.raises(ValueError, match="threshold"):
        singular_value_count(A, 0.0, 100)
    with pytest.raises(ValueError, match="max_products"):
        singular_value_count(A, 1.0, 5, block_size=4)
    with pytest.raises(ValueError, match="deflation_share"):
        singular_value_count(A, 1.0, 100, deflation_share=1.0)
