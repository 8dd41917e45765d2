"""LinearizedTrainer against an independent dense implementation of the NTK dynamics."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call, jacrev

from trainers import BackpropTrainer, LinearizedTrainer
from trainers.models import MLP


def _case(seed: int = 0, n: int = 12, d_in: int = 3, d_out: int = 2, width: int = 8):
    g = torch.Generator().manual_seed(seed)
    model = MLP(d_in, d_out, width, activation="tanh", seed=g).double()
    X = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    return model, X, g


def _dense_jacobian(model: torch.nn.Module, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(f0 as (n, d), J as (n*d, m)) by jacrev on the concatenated data (independent path)."""
    names = [n for n, _ in model.named_parameters()]
    w0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    shapes = [p.shape for p in model.parameters()]

    def f(w: torch.Tensor) -> torch.Tensor:
        parts = torch.split(w, [s.numel() for s in shapes])
        ps = {n: p.view(s) for n, p, s in zip(names, parts, shapes, strict=True)}
        return functional_call(model, ps, (X,)).reshape(-1)

    return f(w0).reshape(len(X), -1).detach(), jacrev(f)(w0).detach()


def _flat(params: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([p.reshape(-1) for p in params.values()])


def test_full_batch_mse_matches_dense_ntk_dynamics() -> None:
    model, X, g = _case()
    Y = torch.randn(len(X), 2, generator=g, dtype=torch.float64)
    f0, J = _dense_jacobian(model, X)
    lr, steps = 0.3, 15
    trainer = LinearizedTrainer(model, torch.nn.functional.mse_loss, lr=lr)
    trainer.fit(X, Y, epochs=steps, progress=False)
    # dense NTK dynamics in function space: f <- f - lr K a(f), K = J J^T, a = 2 (f - Y) / (n d)
    K = J @ J.T
    f = f0.clone()
    for _ in range(steps):
        a = 2 * (f - Y) / f.numel()
        f = f - lr * (K @ a.reshape(-1)).reshape(f.shape)
    torch.testing.assert_close(trainer.forward(X), f, rtol=1e-10, atol=1e-10)
    # and in parameter space: w_T - w_0 = -lr sum_t J^T a_t
    w0 = _flat(trainer.initial_values)
    torch.testing.assert_close(f0 + (J @ (_flat(trainer.values) - w0)).reshape(f.shape), f)


def test_minibatch_cross_entropy_matches_dense_dynamics() -> None:
    model, X, g = _case(seed=1, n=10, d_out=3)
    y = torch.randint(0, 3, (len(X),), generator=g)
    f0, J = _dense_jacobian(model, X)
    lr, bs, epochs = 0.5, 4, 3
    trainer = LinearizedTrainer(model, torch.nn.functional.cross_entropy, lr=lr)
    trainer.fit(X, y, epochs=epochs, batch_size=bs, shuffle=False, progress=False)
    w0 = _flat(trainer.initial_values)
    w = w0.clone()
    Jr = J.reshape(len(X), 3, -1)
    for _ in range(epochs):
        for i in range(0, len(X), bs):
            S = slice(i, i + bs)
            out = f0[S] + torch.einsum("ndm,m->nd", Jr[S], w - w0)
            a = (torch.softmax(out, -1) - torch.nn.functional.one_hot(y[S], 3)) / out.shape[0]
            w = w - lr * torch.einsum("ndm,nd->m", Jr[S], a)
    torch.testing.assert_close(_flat(trainer.values), w, rtol=1e-10, atol=1e-12)


def test_first_step_equals_backprop_and_graph_is_reused() -> None:
    model, X, g = _case(seed=2)
    y = torch.randn(len(X), 2, generator=g, dtype=torch.float64)
    lin = LinearizedTrainer(model, torch.nn.functional.mse_loss, lr=0.1)
    bp = BackpropTrainer(model, torch.nn.functional.mse_loss, lr=0.1)
    loss_l, d_l = lin.direction(X, y)
    loss_b, d_b = bp.direction(X, y)
    assert loss_l == pytest.approx(loss_b, rel=1e-12)
    for n in d_b:
        torch.testing.assert_close(d_l[n], d_b[n])
    graph = lin._cached[1]
    lin.direction(X.clone(), y)
    assert lin._cached[1] is graph


def test_evaluate_network_instead_of_linearization() -> None:
    model, X, g = _case(seed=3)
    y = torch.randn(len(X), 2, generator=g, dtype=torch.float64)
    t = LinearizedTrainer(model, torch.nn.functional.mse_loss, lr=0.5, evaluate_linearized=False)
    t.fit(X, y, epochs=5, progress=False)
    net = functional_call(model, t.values, (X,))
    torch.testing.assert_close(t.forward(X), net)
    assert not torch.allclose(t.linearized_outputs(X), net)


def test_a_buffer_refilled_in_place_is_linearized_again() -> None:
    """The cache compared the caller's tensor with itself: a buffer refilled between calls
    reused the old values' linearization (the operator then refused its changed batch)."""
    model, X, g = _case(seed=4)
    t = LinearizedTrainer(model, torch.nn.functional.mse_loss, lr=0.1)
    y = torch.randn(len(X), 2, generator=g, dtype=torch.float64)
    t.fit(X, y, epochs=2, progress=False)
    buffer = X[:6].clone()
    t.linearized_outputs(buffer)
    new = torch.randn(6, X.shape[1], generator=g, dtype=torch.float64)
    buffer.copy_(new)
    fresh = LinearizedTrainer(model, torch.nn.functional.mse_loss, lr=0.1)
    fresh.values = {n: v.clone() for n, v in t.values.items()}
    torch.testing.assert_close(t.linearized_outputs(buffer), fresh.linearized_outputs(new))
