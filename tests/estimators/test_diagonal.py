"""XDiag and the Frobenius-norm estimator against dense float64 references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from estimators.diagonal import frobenius_norm, xdiag
from tests.estimators.probes import rademacher

F64 = torch.float64


def _low_rank(n: int, r: int, seed: int, symmetric: bool = True) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    U = torch.randn(n, r, generator=g, dtype=F64)
    if symmetric:
        return U @ torch.diag(torch.rand(r, generator=g, dtype=F64) + 0.5) @ U.T
    return U @ torch.randn(r, n, generator=g, dtype=F64)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("r", [1, 5, 18])
def test_exact_on_rank_r_with_2_r_plus_1_products(r: int, symmetric: bool) -> None:
    """The paper's count: exact once every leave-one-out basis (s - 1 = m/2 - 1 probes) spans
    the range, i.e. m = 2(r + 1); with m = 2r it is not."""
    A = _low_rank(80, r, seed=r, symmetric=symmetric)
    d = torch.diagonal(A)
    est = xdiag(A, 2 * (r + 1), seed=0)
    assert est.num_matvecs == 2 * (r + 1)
    assert float((est.estimate - d).abs().max()) < 1e-10 * float(d.abs().max())
    assert float(est.stderr.max()) < 1e-8 * float(d.abs().max())
    if r > 1:
        short = xdiag(A, 2 * r, seed=0)
        assert float((short.estimate - d).abs().max()) > 1e-3 * float(d.abs().max())


def test_matches_the_leave_one_out_definition() -> None:
    """Every leave-one-out basis computed by its own QR (no downdating formula)."""
    n, s, seed = 40, 6, 3
    g = torch.Generator().manual_seed(11)
    A = torch.randn(n, n, generator=g, dtype=F64)
    W = rademacher(n, s, torch.Generator().manual_seed(seed), F64)
    Y = A @ W
    terms = []
    for i in range(s):
        Qi = torch.linalg.qr(torch.cat([Y[:, :i], Y[:, i + 1 :]], dim=1))[0]
        P = Qi @ Qi.T
        terms.append(torch.diagonal(P @ A) + W[:, i] * ((A - P @ A) @ W[:, i]))
    ref = torch.stack(terms, 1)
    est = xdiag(A, 2 * s, seed=seed)
    assert torch.allclose(est.estimate, ref.mean(1), rtol=1e-10, atol=1e-10)
    assert torch.allclose(est.stderr, ref.std(1) / s**0.5, rtol=1e-8, atol=1e-10)


def test_unbiased_and_improving_on_a_full_rank_matrix() -> None:
    g = torch.Generator().manual_seed(5)
    Q, _ = torch.linalg.qr(torch.randn(60, 60, generator=g, dtype=F64))
    A = (Q * torch.logspace(0, -3, 60, dtype=F64)) @ Q.T
    d = torch.diagonal(A)
    errs = {}
    for m in (10, 40, 100):
        ests = torch.stack([xdiag(A, m, seed=s).estimate for s in range(30)])
        errs[m] = float(((ests - d) ** 2).sum(1).mean().sqrt() / d.norm())
        bias = (ests.mean(0) - d).abs().max()
        assert float(bias) < 4 * float(ests.std(0).max()) / 30**0.5 + 1e-12
    assert errs[100] < errs[40] < errs[10]
    assert isinstance(xdiag(A.numpy(), 10, seed=0).estimate, np.ndarray)


def test_frobenius_norm() -> None:
    D = torch.diag(torch.tensor([3.0, -4.0, 12.0], dtype=F64))
    assert frobenius_norm(D, 6, seed=1).estimate == pytest.approx(13.0, rel=1e-14)
    g = torch.Generator().manual_seed(2)
    A = torch.randn(30, 50, generator=g, dtype=F64)  # rectangular
    exact = float(torch.linalg.matrix_norm(A))
    z = []
    for s in range(100):
        est = frobenius_norm(A, 20, seed=s)
        assert est.num_matvecs == 20
        z.append(abs(est.estimate - exact) / est.stderr)
    z = np.array(z)
    assert (z <= 2).mean() >= 0.85 and (z <= 3).mean() >= 0.97 and (z <= 1).mean() <= 0.9


def test_errors() -> None:
    A = torch.eye(10, dtype=F64)
    with pytest.raises(ValueError, match="num_matvecs: expected an even number"):
        xdiag(A, 7)
    with pytest.raises(ValueError, match="num_matvecs: expected an integer >= 4 and <= 20"):
        xdiag(A, 22)
    with pytest.raises(ValueError, match="num_matvecs: expected an integer >= 4"):
        xdiag(A, 2)
    with pytest.raises(ValueError, match="A: expected a square operator"):
        xdiag(torch.zeros(3, 4, dtype=F64), 4)
    with pytest.raises(ValueError, match="num_matvecs: expected an integer >= 2"):
        frobenius_norm(A, 1)


def _complex_low_rank(n: int, r: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    U = torch.randn(n, r, generator=g, dtype=torch.complex128)
    V = torch.randn(n, r, generator=g, dtype=torch.complex128)
    return U @ V.mH


def test_complex_operators_get_real_rademacher_probes_and_exact_answers() -> None:
    """A complex operator's Rademacher probes are +-1 (``torch.sign`` of a complex Gaussian
    raised): the diagonal of a complex diagonal matrix is exact, Diag++ and XDiag are exact
    on a complex rank-3 matrix, and the Frobenius norm of a multiple of a unitary matrix is
    exact, as for real ones."""
    from estimators import diagonal

    g = torch.Generator().manual_seed(0)
    D = torch.diag(torch.randn(20, generator=g, dtype=torch.complex128))
    est = diagonal(D, 10, method="hutchinson", seed=1)
    torch.testing.assert_close(est.estimate, torch.diagonal(D), rtol=1e-14, atol=1e-14)
    A = _complex_low_rank(20, 3, seed=2)
    torch.testing.assert_close(
        diagonal(A, 12, seed=3).estimate, torch.diagonal(A), rtol=1e-10, atol=1e-10
    )
    torch.testing.assert_close(xdiag(A, 8, seed=3).estimate, torch.diagonal(A), rtol=1e-10,
                               atol=1e-10)  # fmt: skip
    Q, _ = torch.linalg.qr(torch.randn(20, 20, generator=g, dtype=torch.complex128))
    fro = frobenius_norm((2 - 1j) * Q, 6, seed=4)
    assert fro.estimate == pytest.approx(abs(2 - 1j) * 20**0.5, rel=1e-13)


@pytest.mark.parametrize("name", ["hutchinson_trace", "hutchpp_trace", "xtrace"])
def test_trace_estimators_refuse_complex_operators(name: str) -> None:
    """They return real numbers: a complex non-Hermitian A's trace lost its imaginary part
    (Gaussian probes), and Rademacher probes raised torch's own error."""
    import estimators

    A = _complex_low_rank(12, 3, seed=0)
    with pytest.raises(ValueError, match="expected a real operator, got a complex one"):
        getattr(estimators, name)(A, 12, seed=0)
