"""NTK / per-layer Gram matrices, their drift and RD (seed 002) against dense float64 references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.func import functional_call, jacrev

from estimators.kernel import (
    GramDrift,
    gram_drift,
    gram_extremes,
    gram_operator,
    layer_parameter_names,
    relative_distance,
)
from trainers import RelativeDistance
from trainers.backprop import BackpropTrainer
from trainers.models import MLP

F64 = torch.float64


def _net(width: int = 12, seed: int = 0, param: str = "standard") -> MLP:
    g = torch.Generator().manual_seed(seed)
    return MLP(3, 1, (width,), activation="tanh", parameterization=param, seed=g).double()


def _X(n: int = 6, seed: int = 1) -> torch.Tensor:
    X = torch.randn(n, 3, dtype=F64, generator=torch.Generator().manual_seed(seed))
    return X / X.norm(dim=1, keepdim=True)


def _dense_jac(net: MLP, X: torch.Tensor, values: dict | None = None) -> dict:
    p = {k: v.detach() for k, v in net.named_parameters()}
    p.update(values or {})
    J = jacrev(lambda q: functional_call(net, q, (X,)))(p)
    return {k: v.reshape(len(X), -1) for k, v in J.items()}


def test_layer_grams_and_ntk_match_dense() -> None:
    net, X = _net(), _X()
    J = _dense_jac(net, X)
    names = layer_parameter_names(net)
    assert names == ["layers.0.weight", "layers.2.weight"]
    for layer, name in [(0, names[0]), (-1, names[1]), (names[1], names[1])]:
        G = gram_operator(net, X, layer=layer).to_dense()
        torch.testing.assert_close(G, J[name] @ J[name].T)
    K = gram_operator(net, X).to_dense()
    torch.testing.assert_close(K, sum(j @ j.T for j in J.values()))


def test_lambda_min_of_ntk_matches_dense_eigvalsh() -> None:
    net, X = _net(64), _X(8)
    K = gram_operator(net, X)
    w = np.linalg.eigvalsh(K.to_dense().numpy())
    spec = gram_extremes(K, rtol=1e-12)
    assert spec.lambda_min == pytest.approx(w[0], rel=1e-8)
    assert spec.lambda_max == pytest.approx(w[-1], rel=1e-10)
    assert spec.lambda_min > 0 and spec.num_matvecs > 0
    dense = gram_extremes(K, method="dense")
    assert dense.lambda_min == pytest.approx(w[0], rel=1e-10)


def test_gram_drift_matches_dense() -> None:
    net, X = _net(), _X()
    p0 = {k: v.detach().clone() for k, v in net.named_parameters()}
    g = torch.Generator().manual_seed(3)
    pt = {k: v + 0.1 * torch.randn(v.shape, dtype=F64, generator=g) for k, v in p0.items()}
    J0, Jt = _dense_jac(net, X, p0), _dense_jac(net, X, pt)
    K0 = sum(j @ j.T for j in J0.values())
    Kt = sum(j @ j.T for j in Jt.values())
    ref = float(torch.linalg.matrix_norm(Kt - K0, 2) / torch.linalg.matrix_norm(K0, 2))
    assert gram_drift(net, X, pt, rtol=1e-12) == pytest.approx(ref, rel=1e-8)
    assert gram_drift(net, X, pt, method="dense") == pytest.approx(ref, rel=1e-10)
    name = "layers.0.weight"
    G0, Gt = J0[name] @ J0[name].T, Jt[name] @ Jt[name].T
    ref_l = float(torch.linalg.matrix_norm(Gt - G0, 2) / torch.linalg.matrix_norm(G0, 2))
    assert gram_drift(net, X, pt, p0, layer=0, method="dense") == pytest.approx(ref_l, rel=1e-10)
    assert gram_drift(net, X, p0, method="dense") == 0.0


def test_relative_distance_and_callbacks() -> None:
    net, X = _net(16), _X(12)
    y = torch.randn(12, 1, dtype=F64, generator=torch.Generator().manual_seed(0))
    t = BackpropTrainer(net, torch.nn.functional.mse_loss, lr=0.2)
    gd = GramDrift(X[:5], every=3, layers=True)
    t.fit(X, y, epochs=6, progress=False, callbacks=[gd, RelativeDistance(every=3)])
    rd = relative_distance(t.values, t.initial_values)
    for n, v in rd.per_layer.items():
        assert t.history.metrics[f"RD/{n}"][-1] == pytest.approx(v)
        w0 = t.initial_values[n]
        assert v == pytest.approx(float((t.values[n] - w0).norm() / w0.norm()))
    assert set(gd.records[-1][1]) == {"gram_drift", *(f"gram_drift/{n}" for n in rd.per_layer)}
    assert len(t.history.metrics["gram_drift"]) == 2


def _train_ntk(width: int) -> tuple[float, float]:
    net, X = _net(width, seed=1, param="ntk"), _X(10, seed=2)
    y = torch.sin(3 * X[:, :1])
    t = BackpropTrainer(net, torch.nn.functional.mse_loss, lr=0.3)
    t.fit(X, y, epochs=100, progress=False)
    rd = max(relative_distance(t.values, t.initial_values).per_layer.values())
    return rd, gram_drift(net, X, t.values, t.initial_values, method="dense")


def test_rd_and_gram_drift_shrink_with_width_in_ntk_parameterization() -> None:
    (rd_s, g_s), (rd_l, g_l) = _train_ntk(16), _train_ntk(1024)
    slope_rd = math.log(rd_l / rd_s) / math.log(1024 / 16)
    slope_g = math.log(g_l / g_s) / math.log(1024 / 16)
    assert slope_rd < -0.2 and slope_g < -0.2  # theory: RD ~ m^(-1/2)


def test_errors() -> None:
    net, X = _net(), _X()
    with pytest.raises(ValueError, match="layer: expected an integer in"):
        gram_operator(net, X, layer=5)
    with pytest.raises(TypeError, match="layer: expected an int, a name"):
        gram_operator(net, X, layer=1.5)
    with pytest.raises(TypeError, match="params: expected a mapping"):
        gram_operator(net, X, values=[1])
    with pytest.raises(ValueError, match="are not parameters of the model"):
        gram_operator(net, X, values={"nope": torch.zeros(1)})
    with pytest.raises(ValueError, match="method: expected 'lanczos' or 'dense'"):
        gram_extremes(torch.eye(2), method="x")
    with pytest.raises(ValueError, match="method: expected 'lanczos' or 'dense'"):
        gram_drift(net, X, {}, method="x")
    with pytest.raises(ValueError, match="names: expected parameters present in both"):
        relative_distance({}, {"a.weight": torch.ones(1)})
    with pytest.raises(ValueError, match="every: expected a positive integer"):
        GramDrift(X, every=0)
