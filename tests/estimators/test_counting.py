"""Krylov-deflated SLQ counts of singular values above a threshold, against known spectra."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from estimators.counting import (
    _block_krylov,
    _coupling,
    _deflated_normal,
    _ramp,
    singular_value_count,
)
from linops import TorchLinearOperator
from linops import _krylov as kr
from linops.testing import with_singular_values

F64 = torch.float64


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
    """With a gap at the threshold the basis holds every value above it and the rest has none."""
    s = torch.cat([torch.linspace(3.0, 10.0, 30), torch.linspace(0.01, 0.5, 370)])
    A = Counted(with_singular_values(s))
    res = singular_value_count(A, 1.0, 400, block_size=16, seed=1)
    assert float(res.counts[0]) == pytest.approx(30, abs=1e-9)
    assert float(res.krylov_counts[0]) == pytest.approx(30, abs=1e-9)
    assert 0.0 <= float(res.stderrs[0]) < 1.0  # the quadrature bound, small with a gap
    assert A.products == res.num_matvecs_total == res.num_matvecs <= 400


def test_full_basis_counts_exactly_whatever_the_smoothing() -> None:
    """When the Krylov basis spans the space nothing is left to the quadrature: the count is
    the number of Ritz values (the singular values) above each threshold."""
    s = torch.linspace(0.05, 2.0, 40, dtype=F64) + 0.013  # no value on a threshold
    A = with_singular_values(s, seed=4)
    for h in (0.0, 0.1, 0.3):
        res = singular_value_count(A, [0.5, 1.0, 1.5], 200, block_size=8, smoothing=h, seed=0)
        assert res.basis_size == 40
        want = torch.tensor([int((s > t).sum()) for t in (0.5, 1.0, 1.5)], dtype=F64)
        torch.testing.assert_close(res.counts, want, atol=1e-9, rtol=0)
        torch.testing.assert_close(res.krylov_counts, want, atol=0, rtol=0)
        torch.testing.assert_close(res.ritz_values, s.flip(0), atol=1e-10, rtol=0)


def test_ramp_is_a_step_or_a_linear_ramp() -> None:
    s = torch.tensor([0.5, 0.9, 0.95, 1.0, 1.05, 1.1, 2.0], dtype=F64)
    tau = torch.tensor([1.0], dtype=F64)
    assert _ramp(s, tau, 0.0)[0].tolist() == [0, 0, 0, 0, 1, 1, 1]
    torch.testing.assert_close(
        _ramp(s, tau, 0.1)[0], torch.tensor([0, 0, 0.25, 0.5, 0.75, 1, 1], dtype=F64)
    )


@settings(max_examples=12, deadline=None)
@given(
    seed=st.integers(0, 10**6),
    b=st.integers(1, 8),
    iters=st.integers(1, 8),
    tau=st.floats(0.2, 1.5),
)
def test_krylov_split_with_schur_complement_is_exact(seed, b, iters, tau) -> None:
    """The identity the estimator rests on (Haynsworth inertia additivity): for the block
    Krylov basis Q of A^T A, ``#{ritz > tau} + #{eig(S_tau) > tau^2}`` equals
    ``#{sigma > tau}`` however far the Ritz values are from converged; without the Schur
    correction it is off by at most ``b`` (and here often is)."""
    g = torch.Generator().manual_seed(seed)
    n = 90
    s = 2.0 * torch.rand(n, generator=g, dtype=F64)
    A = with_singular_values(s, seed=seed)
    op, _ = kr.prepare(A)
    AQ, Q, MQ = _block_krylov(op, b, iters, kr.make_generator(seed, op.device))
    theta, W = torch.linalg.eigh(AQ.T @ AQ)
    assume_clear = (theta - tau**2).abs().min() > 1e-3 * tau**2  # the floor leaves it alone
    C = (MQ - Q @ (Q.T @ MQ)) @ W
    S = (_deflated_normal(op, Q) - _coupling(C, theta, tau**2)) @ torch.eye(n, dtype=F64)
    mu = torch.linalg.eigvalsh((S + S.T) / 2)
    ritz = int((theta > tau**2).sum())
    true = int((s > tau).sum())
    if assume_clear:
        assert ritz + int((mu > tau**2).sum()) == true
    mu_b = torch.linalg.eigvalsh(_deflated_normal(op, Q) @ torch.eye(n, dtype=F64))
    assert abs(ritz + int((mu_b > tau**2).sum()) - true) <= b
    torch.testing.assert_close(Q.T @ Q, torch.eye(b * iters, dtype=F64), atol=1e-10, rtol=0)
    torch.testing.assert_close(MQ, A.T @ (A @ Q), atol=1e-10, rtol=0)


def test_gapless_spectrum_is_unbiased_and_within_its_errors() -> None:
    """A continuum through the thresholds (as for seed 004's J - I): every run within a few
    standard errors plus the block size, and no systematic bias over runs."""
    n = 400
    s = torch.logspace(1, -3, n, dtype=F64)  # 10 down to 1e-3, no gap: 100 above 1, 157 above 0.3
    taus = [1.0, 0.3]
    true = torch.tensor([int((s > t).sum()) for t in taus], dtype=F64)
    A = Counted(with_singular_values(s, seed=2))
    counts = []
    for seed in range(6):
        A.products = 0
        res = singular_value_count(A, taus, n, block_size=8, seed=seed)
        assert A.products == res.num_matvecs_total and res.num_matvecs <= n
        assert bool((res.krylov_counts < true).all())  # no gap: the basis alone undercounts
        assert bool(((res.counts - true).abs() <= 2 * res.stderrs).all())
        counts.append(res.counts)
    mean = torch.stack(counts).mean(dim=0)
    assert bool(((mean - true).abs() <= 0.04 * true).all())  # the ramp's quadrature: +2%


def test_one_run_shares_the_basis_between_thresholds() -> None:
    A = Counted(with_singular_values(torch.logspace(0.5, -2, 200, dtype=F64), seed=5))
    both = singular_value_count(A, [1.0, 0.2], 160, block_size=8, seed=3)
    assert A.products == both.num_matvecs_total
    assert both.num_matvecs_total - both.num_matvecs == 2 * both.probes * both.steps
    assert both.num_matvecs <= 160
    one = singular_value_count(A, 1.0, 160, block_size=8, seed=3)  # same basis, same probes
    torch.testing.assert_close(one.counts[0], both.counts[0], atol=1e-9, rtol=0)
    other = singular_value_count(A, 0.2, 160, block_size=8, seed=3)
    assert float(other.krylov_counts[0]) == float(both.krylov_counts[1])
    assert both.thresholds.tolist() == [1.0, 0.2]


def test_counts_a_rectangular_operator() -> None:
    g = torch.Generator().manual_seed(3)
    Q1 = torch.linalg.qr(torch.randn(300, 120, generator=g, dtype=F64))[0]
    Q2 = torch.linalg.qr(torch.randn(120, 120, generator=g, dtype=F64))[0]
    s = torch.cat([torch.full((10,), 5.0, dtype=F64), torch.full((110,), 0.1, dtype=F64)])
    res = singular_value_count(Q1 @ torch.diag(s) @ Q2.T, 1.0, 200, block_size=12)
    assert float(res.counts[0]) == pytest.approx(10, abs=1e-6)


def test_bad_arguments() -> None:
    A = torch.eye(10, dtype=F64)
    for bad in (0.0, [1.0, -1.0], [], float("nan")):
        with pytest.raises(ValueError, match="threshold"):
            singular_value_count(A, bad, 100)
    with pytest.raises(ValueError, match="num_matvecs"):
        singular_value_count(A, 1.0, 5, block_size=4)
    with pytest.raises(ValueError, match="deflation_share"):
        singular_value_count(A, 1.0, 100, deflation_share=1.0)
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match="smoothing"):
            singular_value_count(A, 1.0, 100, smoothing=bad)


def _matrix(m: int, n: int, s: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """``U diag(s) V^T`` with orthonormal ``U`` (m x n) and ``V`` (n x n)."""
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(m, n, generator=g, dtype=F64))[0]
    V = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))[0]
    return U @ torch.diag(s.to(F64)) @ V.T


def test_issue16_linear_spectrum_count_within_dimension_and_errors() -> None:
    """Issue 16: singular values linear from 3 to 0.01 (2500 x 1000), threshold 0.1, 1200
    products gave 1060-1223 against 969, more than the dimension, with stderrs of 27-42."""
    s = torch.linspace(3.0, 0.01, 1000, dtype=F64)
    A = _matrix(2500, 1000, s)
    true = int((s > 0.1).sum())
    assert true == 969
    for seed in range(3):
        res = singular_value_count(A, 0.1, 1200, seed=seed)
        c, se = float(res.counts[0]), float(res.stderrs[0])
        assert 0.0 <= c <= 1000.0
        assert abs(c - true) <= 2 * se
        assert abs(c - true) <= 0.05 * true


@pytest.mark.parametrize(
    ("name", "m", "s", "tau", "budget"),
    [
        ("linear", 500, torch.linspace(3.0, 0.01, 200, dtype=F64), 0.1, 240),
        ("log", 300, torch.logspace(1, -3, 300, dtype=F64), 0.3, 300),
    ],
)
def test_stderr_interval_covers_the_truth_in_a_seed_study(name, m, s, tau, budget) -> None:
    """+-2 stderrs cover the dense count in >= 90% of 60 seeds, and no count leaves
    [0, min(m, n)] (before: 73% and 65% coverage, counts up to 207 of 200)."""
    A = _matrix(m, s.numel(), s)
    true = int((s > tau).sum())
    covered, n = 0, s.numel()
    for seed in range(60):
        res = singular_value_count(A, tau, budget, block_size=8, seed=seed)
        c, se = float(res.counts[0]), float(res.stderrs[0])
        assert 0.0 <= c <= n
        covered += abs(c - true) <= 2 * se
    assert covered / 60 >= 0.9


def test_counts_never_leave_zero_to_dimension_for_wide_operators() -> None:
    """A wide operator has at most ``min(m, n)`` nonzero singular values."""
    g = torch.Generator().manual_seed(0)
    A = torch.randn(30, 200, generator=g, dtype=F64)
    s = torch.linalg.svdvals(A)
    res = singular_value_count(A, [0.5 * float(s.min()), float(s.median())], 120, block_size=4)
    assert bool((res.counts <= 30).all()) and bool((res.counts >= 0).all())
    true = torch.tensor([30.0, float((s > s.median()).sum())], dtype=F64)
    assert bool(((res.counts - true).abs() <= 2 * res.stderrs + 1e-9).all())
