"""BackpropTrainer and the shared trainer interface, against dense float64 references."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call, grad

from trainers import BackpropTrainer, RelativeDistance, make_optimizer
from trainers.models import MLP

F64 = torch.float64


def _case(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    model = MLP(4, 3, 16, activation="tanh", seed=g).double()
    X = torch.randn(20, 4, generator=g, dtype=F64)
    y = torch.randint(0, 3, (20,), generator=g)
    return model, X, y


def test_direction_is_the_loss_gradient() -> None:
    model, X, y = _case()
    t = BackpropTrainer(model, torch.nn.functional.cross_entropy)
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(functional_call(model, p, (X,)), y)

    value, direction = t.direction(X, y)
    expected = grad(loss)(params)
    assert value == pytest.approx(float(loss(params)), rel=1e-12)
    for n in expected:
        torch.testing.assert_close(direction[n], expected[n])


def test_full_batch_sgd_trajectory_and_history() -> None:
    model, X, y = _case(seed=1)
    lr = 0.2
    t = BackpropTrainer(model, torch.nn.functional.cross_entropy, lr=lr)
    hist = t.fit(
        X, y, epochs=3, validation=(X, y), callbacks=[RelativeDistance(every=1)], progress=False
    )
    w = {n: p.detach().clone() for n, p in model.named_parameters()}
    for _ in range(3):
        g = grad(lambda p: torch.nn.functional.cross_entropy(functional_call(model, p, (X,)), y))(w)
        w = {n: w[n] - lr * g[n] for n in w}
    for n in w:
        torch.testing.assert_close(t.values[n], w[n])
    assert hist.step == [1, 2, 3] and hist.epoch == [1, 2, 3]
    assert set(hist.metrics) >= {"train_loss", "train_accuracy", "test_accuracy"}
    assert len(hist.metrics["RD/layers.0.weight"]) == 3
    assert set(hist.as_dict()) >= {"step", "loss", "epoch", "test_loss"}
    for n, p in model.named_parameters():  # the model itself is never modified
        torch.testing.assert_close(p.detach(), t.initial_values[n])


def test_errors() -> None:
    model, X, y = _case()
    with pytest.raises(ValueError, match="optimizer: expected one of"):
        make_optimizer([torch.zeros(1, requires_grad=True)], "lbfgs")
    t = BackpropTrainer(model, torch.nn.functional.cross_entropy)
    with pytest.raises(ValueError, match="X, y: expected equal non-zero lengths"):
        t.fit(X, y[:-1], progress=False)
    bad = BackpropTrainer(model, lambda out, target: out.sum() * float("nan"))
    with pytest.raises(FloatingPointError, match="loss became nan at step 1"):
        bad.fit(X, y, epochs=3, progress=False)
