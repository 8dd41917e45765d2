"""SLQ log-determinant / trace functions and Gauss / Gauss-Radau bounds against dense float64."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from estimators.functions import (
    logdet,
    logdet_bounds,
    quadratic_form_bounds,
    trace_function,
)
from linops import GGNOperator
from tests.estimators.probes import rademacher

F64 = torch.float64


def _sym(n: int, eigenvalues: torch.Tensor, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    return (Q * eigenvalues) @ Q.T


MATRICES = {
    "logspaced": lambda: _sym(60, torch.logspace(0, -3, 60, dtype=F64)),
    "uniform": lambda: _sym(50, torch.linspace(0.5, 4.0, 50, dtype=F64), seed=1),
    "cluster": lambda: _sym(
        40, torch.cat([torch.full((30,), 1e-2), torch.rand(10) * 5 + 1]).double(), seed=2
    ),
}


def _exact_logdet(A: torch.Tensor, lam: float) -> float:
    return float(torch.linalg.slogdet(A + lam * torch.eye(A.shape[0], dtype=F64))[1])


@pytest.mark.parametrize("name", list(MATRICES))
def test_logdet_within_three_stderr_and_coverage(name: str) -> None:
    A, lam = MATRICES[name](), 1e-3
    exact = _exact_logdet(A, lam)
    z = []
    for seed in range(100):  # at a true 99.3% within 3 stderr, 40 seeds failed 3% of the time
        est = logdet(A, damping=lam, num_probes=20, num_steps=25, seed=seed)
        z.append(abs(est.estimate - exact) / est.stderr)
        assert est.num_matvecs == 20 * 25 + 3
    z = np.array(z)
    assert z[0] <= 3.0 and (z <= 3).mean() >= 0.97  # every seed but at most one
    assert 0.85 <= (z <= 2).mean()  # +-2 stderr: about 95% when the stderr is right
    assert (z <= 1).mean() <= 0.9  # and not grossly conservative (about 68%)


def test_trace_function_matches_dense_and_reuses_nodes() -> None:
    A = MATRICES["uniform"]()
    L = torch.linalg.eigvalsh(A)
    est = trace_function(A, torch.exp, num_probes=200, num_steps=20, seed=0)
    assert abs(est.estimate - float(torch.exp(L).sum())) <= 3 * est.stderr
    assert math.isnan(est.lower) and math.isnan(est.upper)  # no bounds for a general f
    # tr(A) (a polynomial of degree 1: the quadrature is exact, only probe noise remains)
    tr = trace_function(A, lambda x: x, num_probes=30, num_steps=5, seed=1)
    assert abs(tr.estimate - float(L.sum())) <= 3 * tr.stderr
    # the stored nodes and weights give tr g(A) for another g without new products
    lg = logdet(A, num_probes=30, num_steps=20, seed=3)
    sq = trace_function(A, torch.sqrt, num_probes=30, num_steps=20, seed=3)
    again = A.shape[0] * float((lg.weights * torch.sqrt(lg.nodes)).sum(1).mean())
    assert abs(again - sq.estimate) < 1e-10 * abs(sq.estimate)
    assert torch.allclose(lg.weights.sum(1), torch.ones(30, dtype=F64))


def test_slq_bounds_bracket_the_probes_exact_quadratic_forms() -> None:
    A, lam = MATRICES["logspaced"](), 1e-3
    n, N, seed = A.shape[0], 12, 5
    Z = rademacher(n, N, torch.Generator().manual_seed(seed), F64)
    L, V = torch.linalg.eigh(A + lam * torch.eye(n, dtype=F64))
    exact_probes = float(((V.T @ Z) ** 2 * torch.log(L)[:, None]).sum(0).mean())
    for m in (2, 5, 10, 30):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            est = logdet(A, damping=lam, num_probes=N, num_steps=m, seed=seed)
        assert est.lower <= exact_probes <= est.upper
        assert est.lower <= est.estimate <= est.upper + 1e-9 * abs(est.upper)
        # 2 and 5 steps are 15 and 3.5 standard errors from the exact -199.9: said so
        unconverged = [w for w in caught if "has not converged" in str(w.message)]
        assert len(unconverged) == (m <= 5), (m, est.estimate, est.stderr)


def test_an_unconverged_quadrature_of_a_singular_operator_is_said_so() -> None:
    """PSD, rank 60 of 200, the nonzero spectrum over four decades: the log-determinant is
    -inf, but 30 Lanczos steps do not isolate the null space (smallest node 3e-6) and the
    positive-definiteness check passes: logdet gave -2018 +- 37 without a word (a model's
    GGN with more parameters than outputs, 387 of 435 eigenvalues zero, gave -7527 +- 120)."""
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(200, 200, generator=g, dtype=F64))
    d = torch.zeros(200, dtype=F64)
    d[:60] = torch.logspace(-4, 0, 60, dtype=F64)
    A = (Q * d) @ Q.T
    with pytest.warns(RuntimeWarning, match="not converged in 30 steps.*may be singular"):
        logdet(A, num_probes=10, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        est = logdet(A, damping=1.0, num_probes=10, seed=0)  # converged: no warning
    exact = float(torch.linalg.slogdet(A + torch.eye(200, dtype=F64))[1])
    assert abs(est.estimate - exact) < 3 * est.stderr


def test_slq_bounds_hold_where_gauss_and_radau_meet_in_float32() -> None:
    """Without rounding slack the bracket closed to a point that excluded the probes' exact
    value by 2.4e-7 relative in float32 (and had lower > upper by 1e-14 in float64)."""
    A, lam = MATRICES["logspaced"](), 1e-2
    n, N, seed = A.shape[0], 6, 3
    for dtype in (torch.float32, F64):
        est = trace_function(
            A.to(dtype), "inverse", damping=lam, num_probes=N, num_steps=n, seed=seed
        )
        Z = rademacher(n, N, torch.Generator().manual_seed(seed), dtype)
        L, V = torch.linalg.eigh(A + lam * torch.eye(n, dtype=F64))
        exact = float(((V.T @ Z.double()) ** 2 / L[:, None]).sum(0).mean())
        assert est.lower <= exact <= est.upper and est.lower <= est.upper


@pytest.mark.parametrize("name", list(MATRICES))
def test_quadratic_form_bounds_contain_the_exact_values(name: str) -> None:
    A, lam = MATRICES[name](), 1e-2
    n = A.shape[0]
    b = torch.randn(n, 5, generator=torch.Generator().manual_seed(7), dtype=F64)
    L, V = torch.linalg.eigh(A + lam * torch.eye(n, dtype=F64))
    coef = (V.T @ b) ** 2
    exact = {"inverse": (coef / L[:, None]).sum(0), "log": (coef * torch.log(L)[:, None]).sum(0)}
    for f in ("inverse", "log"):
        widths = []
        for m in (1, 2, 4, 8, 16, 32):
            bd = quadratic_form_bounds(A, b, f, damping=lam, num_steps=m)
            slack = 1e-12 * exact[f].abs()
            assert bool(((bd.lower <= exact[f] + slack) & (exact[f] <= bd.upper + slack)).all())
            widths.append(float((bd.upper - bd.lower).max()))
        assert widths[-1] < 1e-3 * widths[0]  # the bracket closes as m grows
    # with m = n the rules are exact (Lanczos spans the whole space)
    bd = quadratic_form_bounds(A, b[:, 0], "inverse", damping=lam, num_steps=n)
    assert abs(float(bd.gauss[0]) - float(exact["inverse"][0])) < 1e-8 * float(exact["inverse"][0])


@pytest.mark.parametrize("m", [1, 3, 8])
def test_logdet_bounds_certify(m: int) -> None:
    for name in MATRICES:
        A, lam = MATRICES[name](), 1e-3
        exact = _exact_logdet(A, lam)
        bd = logdet_bounds(A, damping=lam, num_steps=m, block=16)
        assert bd.lower <= exact <= bd.upper
        assert bd.num_matvecs == A.shape[0] * m + 3 * math.ceil(A.shape[0] / 16)
    # a looser lower spectrum bound keeps them valid (and wider)
    A = MATRICES["uniform"]()
    tight = logdet_bounds(A, num_steps=2, spectrum_lower=0.5)
    loose = logdet_bounds(A, num_steps=2, spectrum_lower=0.1)
    assert loose.lower <= tight.lower <= _exact_logdet(A, 0.0) <= tight.upper


def test_logdet_of_a_damped_ggn() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    X, y = torch.randn(30, 5, dtype=F64), torch.randint(0, 3, (30,))
    G = GGNOperator(model, nn.CrossEntropyLoss(), (X, y))
    lam = 1e-2
    exact = _exact_logdet(G.to_dense(), lam)
    est = logdet(G, damping=lam, num_probes=30, num_steps=30, seed=0)
    assert abs(est.estimate - exact) <= 3 * est.stderr
    assert logdet_bounds(G, damping=lam, num_steps=6).lower <= exact


def test_errors() -> None:
    A = MATRICES["uniform"]()
    with pytest.raises(ValueError, match="f: expected one of"):
        trace_function(A, "sqrt")
    with pytest.raises(TypeError, match="f: expected 'log', 'inverse' or a callable"):
        trace_function(A, 3)
    with pytest.raises(ValueError, match="f: expected a function defined on the spectrum"):
        logdet(A - 2 * torch.eye(50, dtype=F64), num_probes=3, seed=0)
    # a singular PSD matrix: tr(A^{-1}) was a finite -2.9e18, log det a finite number
    Q = torch.linalg.qr(torch.randn(50, 50, generator=torch.Generator().manual_seed(0), dtype=F64))[
        0
    ]
    singular = (Q[:, :12] * torch.linspace(0.1, 1, 12, dtype=F64)) @ Q[:, :12].T
    for f in ("inverse", "log"):
        with pytest.raises(ValueError, match=f"'{f}' needs it positive definite"):
            trace_function(singular, f, num_probes=3, seed=0)
    assert trace_function(singular, "inverse", damping=1e-3, num_probes=3, seed=0).estimate > 0
    with pytest.raises(ValueError, match="A: expected a square"):
        logdet(torch.zeros(3, 4, dtype=F64))
    with pytest.raises(ValueError, match="A: expected a symmetric"):
        logdet(torch.triu(A))
    with pytest.raises(ValueError, match="damping: expected a number >= 0"):
        logdet(A, damping=-1.0)
    with pytest.raises(ValueError, match="num_steps: expected an integer >= 1 and <= 50"):
        logdet(A, num_steps=51)
    for b in (
        torch.ones(51, dtype=F64),
        torch.ones(50, 2, 1, dtype=F64),
    ):  # was torch's reshape error
        with pytest.raises(ValueError, match=r"b: expected shape \(50,\) or \(50, k\)"):
            quadratic_form_bounds(A, b, "inverse", damping=1.0)
    with pytest.raises(ValueError, match="spectrum_lower: expected a positive lower bound"):
        quadratic_form_bounds(A, torch.ones(50, dtype=F64))
    with pytest.raises(ValueError, match="f: expected 'inverse' or 'log'"):
        quadratic_form_bounds(A, torch.ones(50, dtype=F64), torch.exp, damping=1.0)
    with pytest.raises(ValueError, match="b: expected nonzero columns"):
        quadratic_form_bounds(A, torch.zeros(50, dtype=F64), damping=1.0)


def test_products_counted_without_a_probe_for_declared_symmetric_operators() -> None:
    """A GGN (symmetric by construction) pays no symmetry probe: the count is the steps'."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = torch.randn(10, 4, dtype=F64), torch.randint(0, 3, (10,))
    G = GGNOperator(model, nn.CrossEntropyLoss(), (x, y))
    est = logdet(G, damping=1e-2, num_probes=3, num_steps=5, seed=0)
    assert est.num_matvecs == 3 * 5
    dense = G @ torch.eye(G.shape[0], dtype=F64)
    assert logdet(dense, damping=1e-2, num_probes=3, num_steps=5, seed=0).num_matvecs == 18


def test_bounds_hold_when_gauss_and_radau_coincide() -> None:
    """Six distinct eigenvalues: after 6 steps Gauss and Radau agree to rounding and the
    bracket, without slack for that rounding, missed log det by 4.2e-12."""
    g = torch.Generator().manual_seed(0)
    n = 80
    ev = np.r_[np.linspace(10, 50, 5), 1e-2 * np.ones(n - 5)]
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    A = (Q * torch.as_tensor(ev)) @ Q.T
    exact = float(np.log(ev + 1e-3).sum())
    for steps in (6, 10):
        bd = logdet_bounds(A, damping=1e-3, num_steps=steps, spectrum_lower=0.99e-3)
        assert bd.lower <= exact <= bd.upper
        assert bd.upper - bd.lower < 1e-6 * abs(exact)  # still a certificate worth having


def test_no_convergence_warning_where_the_quadrature_is_exact() -> None:
    """A diagonal operator's Rademacher probes all give one value (standard error 0 or
    rounding): the m/2-to-m drift warned on estimates exact to 1e-15, and logdet's docstring
    example divided by a zero standard error."""
    for hi in (3.0, 10.0):
        A = torch.diag(torch.linspace(1, hi, 50, dtype=F64))
        exact = {"log": float(torch.log(torch.diagonal(A)).sum())}
        exact["inverse"] = float((1 / torch.diagonal(A)).sum())
        for f, want in exact.items():
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                est = trace_function(A, f, num_probes=10, num_steps=30, seed=0)
            assert abs(est.estimate - want) < 1e-12 * abs(want)
    # at 20 steps the condition-10 inverse is 3.9e-11 off with a zero standard error: said so
    with pytest.warns(RuntimeWarning, match="its error is about"):
        trace_function(A, "inverse", num_probes=10, num_steps=20, seed=0)


def test_no_convergence_warning_once_the_steps_span_the_space() -> None:
    """With ``num_steps = n`` the Gauss rule is exact; the m/2-to-m drift warned of an error
    of 8.7 (15 standard errors) at n = 2 and of 2.8e13 standard errors on a diagonal 3 x 3."""
    for n in (2, 3, 8):
        A = _sym(n, torch.logspace(-2, 2, n, dtype=F64))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            est = logdet(A, num_probes=30, seed=0)
        assert math.isfinite(est.estimate) and est.num_matvecs >= 30 * n
    A = torch.diag(torch.tensor([1.0, 2.0, 4.0], dtype=F64))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        est = logdet(A, num_probes=5, seed=0)
    assert abs(est.estimate - math.log(8.0)) < 1e-12


def _indefinite() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    eigs = torch.cat([torch.tensor([-0.5]), torch.linspace(0.1, 10, 49)]).double()
    b = torch.randn(50, generator=torch.Generator().manual_seed(2), dtype=F64)
    return _sym(50, eigs), eigs, b


def test_bounds_refuse_a_lower_end_above_a_gauss_node() -> None:
    """An indefinite A made positive definite by the damping (a damped Hessian): the default
    lower end a = damping is no lower bound, and the 'certified' bounds crossed and missed the
    exact value ([16.2500, 15.0405] around 16.2514; log-determinant [80.149, 79.980] around
    79.919). Refused now when a Gauss node lies below a; with a true a they hold."""
    A, eigs, b = _indefinite()
    lam = 1.0
    with pytest.raises(ValueError, match="a Gauss node lies at"):
        quadratic_form_bounds(A, b, "inverse", damping=lam, num_steps=10)
    with pytest.raises(ValueError, match="a Gauss node lies at"):
        logdet_bounds(A, damping=lam, num_steps=5)
    with pytest.raises(ValueError, match="spectrum_lower: expected a lower bound"):
        logdet(A, damping=lam, num_probes=5, num_steps=10, spectrum_lower=0.8, seed=0)
    with pytest.warns(RuntimeWarning, match="lower and upper are nan"):
        est = logdet(A, damping=lam, num_probes=10, num_steps=10, seed=0)
    assert math.isnan(est.lower) and math.isnan(est.upper) and math.isfinite(est.estimate)
    a = float(eigs.min()) + lam  # a true lower bound: the bounds hold
    M = A + lam * torch.eye(50, dtype=F64)
    for m in (5, 10, 20):
        bd = quadratic_form_bounds(A, b, "inverse", damping=lam, num_steps=m, spectrum_lower=a)
        exact = float(b @ torch.linalg.solve(M, b))
        assert float(bd.lower[0]) <= exact <= float(bd.upper[0])
    bd = logdet_bounds(A, damping=lam, num_steps=5, spectrum_lower=np.float32(a))
    assert bd.lower <= float(torch.log(eigs + lam).sum()) <= bd.upper


def test_bounds_default_steps_fit_small_operators() -> None:
    """The defaults (20 and 10 steps) were refused for n < 20 and n < 10, 1 x 1 included."""
    for n in (1, 2, 5):
        eigs = torch.linspace(1, 3, n, dtype=F64)
        A = _sym(n, eigs)
        b = torch.ones(n, dtype=F64)
        bd = quadratic_form_bounds(A, b, "inverse", spectrum_lower=1.0)
        exact = float(b @ torch.linalg.solve(A, b))
        assert float(bd.lower[0]) <= exact <= float(bd.upper[0])
        bd = logdet_bounds(A, spectrum_lower=1.0)
        assert bd.lower <= float(torch.log(eigs).sum()) <= bd.upper
