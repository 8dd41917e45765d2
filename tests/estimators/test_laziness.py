"""Laziness ratio and Jacobian drift (seed 000 section 3.2) against dense float64 references."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import functional_call, hessian, jacrev

from estimators.laziness import (
    JacobianDrift,
    hessian_norm,
    jacobian_drift,
    laziness_ratio,
)
from linops.params import ParamSpace
from reports import laziness_report
from trainers.backprop import BackpropTrainer
from trainers.models import MLP

F64 = torch.float64


def _net(seed: int = 0, kappa: float = 1.0, width: int = 6, param: str = "standard") -> MLP:
    g = torch.Generator().manual_seed(seed)
    return MLP(
        4, 2, (width,), activation="tanh", kappa=kappa, parameterization=param, seed=g
    ).double()


def _X(n: int = 5, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 4, dtype=F64, generator=torch.Generator().manual_seed(seed))


def test_hessian_norm_matches_dense_hessian() -> None:
    net, X = _net(), _X()
    space = ParamSpace(net)
    for i, j in [(0, 0), (3, 1)]:

        def f(th, i=i, j=j):
            return functional_call(net, space.unflatten(th), (X[i : i + 1],))[0, j]

        dense = torch.linalg.eigvalsh(hessian(f)(space.flat_values())).abs().max()
        value, nmv = hessian_norm(net, X[i], j, rtol=1e-12)
        assert abs(value - float(dense)) <= 1e-8 * float(dense)
        assert nmv >= 1


def test_exact_and_finite_difference_agree() -> None:
    net, X = _net(2), _X()
    exact = laziness_ratio(net, X, num_points=3, rtol=1e-10)
    # finite-difference products carry about 1e-9 ||H|| of noise: lanczos refuses a tighter rtol
    fd = laziness_ratio(net, X, num_points=3, method="finite_difference", rtol=1e-8)
    torch.testing.assert_close(fd.hessian_norms, exact.hessian_norms, rtol=1e-5, atol=0)
    assert abs(fd.mean / exact.mean - 1) < 1e-5


def test_gradient_norms_and_summary_statistics() -> None:
    net, X = _net(3), _X()
    res = laziness_ratio(net, X, num_points=None, output_indices=[1])
    space = ParamSpace(net)
    J = jacrev(lambda th: functional_call(net, space.unflatten(th), (X,)))(space.flat_values())
    torch.testing.assert_close(res.gradient_norms[:, 0], J[:, 1].norm(dim=1))
    assert res.points.tolist() == list(range(5)) and res.outputs == [1]
    torch.testing.assert_close(res.ratios, res.hessian_norms / res.gradient_norms**2)
    assert res.mean == pytest.approx(float(res.ratios.mean()))
    assert res.stderr == pytest.approx(res.std / 5**0.5)
    assert res.reference_norms is None and res.paper_ratio_mean is None


def test_paper_denominator_is_top_singular_value_of_centred_reference_matrix() -> None:
    net, X = _net(4), _X(8)
    m = sum(p.numel() for p in net.parameters())
    res = laziness_ratio(net, X, num_points=2, output_indices=[0], reference_size=m)
    space = ParamSpace(net)
    J = jacrev(lambda th: functional_call(net, space.unflatten(th), (X,)))(space.flat_values())
    A = J[:, 0]
    A = A - A.mean(1, keepdim=True)
    s1 = torch.linalg.matrix_norm(A, 2)
    assert float(res.reference_norms[0]) == pytest.approx(float(s1), rel=1e-10)
    assert res.paper_ratio_mean == pytest.approx(float((res.hessian_norms / s1**2).mean()))


def test_linear_model_is_exactly_lazy() -> None:
    lin = torch.nn.Linear(4, 3).double()
    res = laziness_ratio(lin, _X(), num_points=3)
    assert res.mean == 0.0 and float(res.hessian_norms.abs().max()) == 0.0
    fd = laziness_ratio(lin, _X(), num_points=2, method="finite_difference")
    assert float(fd.hessian_norms.max()) < 1e-8


@settings(max_examples=8, deadline=None)
@given(c=st.floats(0.05, 20.0), seed=st.integers(0, 1000))
def test_ratio_scales_as_one_over_output_scale(c: float, seed: int) -> None:
    X = _X(4, seed)
    base = laziness_ratio(_net(seed), X, num_points=2, rtol=1e-10)
    scaled = laziness_ratio(_net(seed, kappa=c), X, num_points=2, rtol=1e-10)
    torch.testing.assert_close(scaled.ratios * c, base.ratios, rtol=1e-6, atol=0)


def _dense_J(net: MLP, X: torch.Tensor, values: dict) -> torch.Tensor:
    space = ParamSpace(net, values)
    J = jacrev(lambda th: functional_call(net, space.unflatten(th), (X,)))(space.flat_values())
    return J.reshape(-1, space.dim)


def test_jacobian_drift_matches_dense() -> None:
    net, X = _net(5), _X(6)
    p0 = {k: v.detach().clone() for k, v in net.named_parameters()}
    g = torch.Generator().manual_seed(0)
    pt = {k: v + 0.05 * torch.randn(v.shape, dtype=F64, generator=g) for k, v in p0.items()}
    J0, Jt = _dense_J(net, X, p0), _dense_J(net, X, pt)
    spec = torch.linalg.matrix_norm(Jt - J0, 2) / torch.linalg.matrix_norm(J0, 2)
    frob = (Jt - J0).norm() / J0.norm()
    assert jacobian_drift(net, X, pt, rtol=1e-10) == pytest.approx(float(spec), rel=1e-7)
    assert jacobian_drift(net, X, pt, norm="frobenius") == pytest.approx(float(frob), rel=1e-10)
    flat = ParamSpace(net, pt).flat_values()
    assert jacobian_drift(net, X, flat, p0, norm="frobenius") == pytest.approx(float(frob))
    assert jacobian_drift(net, X, p0, norm="frobenius") == 0.0


def test_jacobian_drift_callback_logs_along_training() -> None:
    net, X = _net(6, width=16), _X(16)
    y = torch.randn(16, 2, dtype=F64, generator=torch.Generator().manual_seed(2))
    cb = JacobianDrift(X[:6], every=2)
    t = BackpropTrainer(net, torch.nn.functional.mse_loss, lr=0.1)
    t.fit(X, y, epochs=4, progress=False, callbacks=[cb])
    drifts = t.history.metrics["jacobian_drift"]
    assert len(drifts) == 2 and [s for s, _ in cb.records] == [2, 4]
    assert all(d > 0 for d in drifts)


def test_laziness_report_is_json_ready() -> None:
    rep = laziness_report(_net(7), _X(12), num_points=2, reference_sizes=(4, 16, 1000))
    json.dumps(rep)
    assert rep["reference_sizes"][-1] == rep["num_parameters"]
    assert rep["exact_rank"] == rep["reference_ranks"][-1]
    assert rep["laziness_ratio_mean"] > 0


def test_errors() -> None:
    net, X = _net(), _X()
    with pytest.raises(ValueError, match="method: expected 'exact' or 'finite_difference'"):
        laziness_ratio(net, X, method="x")
    with pytest.raises(ValueError, match="num_points: expected a positive integer"):
        laziness_ratio(net, X, num_points=0)
    with pytest.raises(ValueError, match="output_index: expected an integer in"):
        laziness_ratio(net, X, output_indices=[5])
    with pytest.raises(ValueError, match="norm: expected 'spectral' or 'frobenius'"):
        jacobian_drift(net, X, dict(net.named_parameters()), norm="x")
    with pytest.raises(ValueError, match="values_t: expected a flat vector of length"):
        jacobian_drift(net, X, torch.zeros(3, dtype=F64))
    with pytest.raises(TypeError, match="values_t: expected a mapping of tensors"):
        jacobian_drift(net, X, [1, 2])
    with pytest.raises(ValueError, match="values_t: expected values for every parameter"):
        jacobian_drift(net, X, {"layers.0.weight": net.layers[0].weight})
    with pytest.raises(ValueError, match="every: expected a positive integer"):
        JacobianDrift(X, every=0)


def test_jacobian_drift_callback_when_some_parameters_train() -> None:
    """A trainer of some parameters: the callback raised 'expected values for every
    parameter'; the drift is that of the trained parameters' Jacobian (a first fix took all
    columns, and reported 0.18 for a run training only the last layer, whose Jacobian, the
    hidden activations, never moves)."""
    net, X = _net(6, width=16), _X(16)
    y = torch.randn(16, 2, dtype=F64, generator=torch.Generator().manual_seed(2))
    names = [n for n, _ in net.named_parameters()]
    for trained in (names[:2], names[-2:]):
        start = {n: p.detach().clone() for n, p in net.named_parameters() if n in trained}
        cb = JacobianDrift(X[:6], every=2)
        seen: list[dict[str, torch.Tensor]] = []

        def snapshot(trainer: BackpropTrainer, step: int, seen: list = seen) -> None:
            if step % 2 == 0:
                seen.append({n: v.detach().clone() for n, v in trainer.values.items()})

        t = BackpropTrainer(net, torch.nn.functional.mse_loss, lr=0.1, params=trained)
        t.fit(X, y, epochs=2, progress=False, callbacks=[cb, snapshot])
        assert cb.records and len(seen) == len(cb.records)
        assert not torch.equal(seen[-1][trained[0]], start[trained[0]])
        want = jacobian_drift(
            net, X[:6], seen[-1], start, norm="frobenius", params=trained
        )  # the callback's default norm
        assert cb.records[-1][1] == pytest.approx(want, rel=1e-12, abs=1e-15)
        if trained == names[-2:]:
            assert cb.records[-1][1] == 0.0


def test_laziness_report_strategy_reaches_the_papers_ratio() -> None:
    """strategy= went to the rank curve only; the paper's ratio used the random reference."""
    net, X = _net(7), _X(12)
    got = {
        s: laziness_report(net, X, num_points=2, reference_sizes=(4, 16), strategy=s)
        for s in ("random", "magnitude")
    }
    for s, rep in got.items():
        want = laziness_ratio(
            net, X, num_points=2, output_indices=(0,), reference_size=16, reference_strategy=s,
            seed=0,
        )  # fmt: skip
        assert rep["laziness_paper_ratio_mean"] == pytest.approx(want.paper_ratio_mean, rel=1e-12)
