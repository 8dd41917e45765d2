"""LowRankJacobianTrainer (seed 000 Algorithm 1) against dense float64 references."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import functional_call, jacrev

from trainers import LinearizedTrainer, LowRankJacobianTrainer
from trainers.lowrank import lowrank_factors
from trainers.models import MLP

F64 = torch.float64
mse = torch.nn.functional.mse_loss


def _case(seed: int = 0, n: int = 10, d_in: int = 3, d_out: int = 2, width: int = 8):
    g = torch.Generator().manual_seed(seed)
    model = MLP(d_in, d_out, width, activation="tanh", seed=g).double()
    X = torch.randn(n, d_in, generator=g, dtype=F64)
    Y = torch.randn(n, d_out, generator=g, dtype=F64)
    return model, X, Y


def _dense_jacobian(model: torch.nn.Module, X: torch.Tensor) -> torch.Tensor:
    """``(n d, m)`` Jacobian by jacrev on the concatenated data (independent of linops)."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    w0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def f(w: torch.Tensor) -> torch.Tensor:
        parts = torch.split(w, [s.numel() for s in shapes])
        ps = {n: p.view(s) for n, p, s in zip(names, parts, shapes, strict=True)}
        return functional_call(model, ps, (X,)).reshape(-1)

    return jacrev(f)(w0).detach()


def _num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("projection", ["parameter", "sample"])
@pytest.mark.parametrize("per_unit", [True, False])
def test_full_rank_equals_exact_linearized_trajectory(projection: str, per_unit: bool) -> None:
    model, X, Y = _case()
    m, n = _num_params(model), len(X)
    kw = {"lr": 0.3}
    lowrank = LowRankJacobianTrainer(
        model,
        mse,
        X,
        rank=2 * n,
        reference_size=m,
        per_unit=per_unit,
        projection=projection,
        outputs="linearized",
        **kw,
    )
    exact = LinearizedTrainer(model, mse, **kw)
    for _ in range(8):
        loss_l, d_l = lowrank.direction(X, Y)
        loss_e, d_e = exact.direction(X, Y)
        assert loss_l == pytest.approx(loss_e, rel=1e-10, abs=1e-14)
        for name in d_e:
            torch.testing.assert_close(d_l[name], d_e[name], rtol=1e-10, atol=1e-10)
        for t, d in ((lowrank, d_l), (exact, d_e)):
            for name, p in t.values.items():
                p.grad = d[name]
            t.optimizer.step()


def test_full_rank_forward_outputs_use_the_initial_jacobian() -> None:
    model, X, Y = _case(seed=1)
    J = _dense_jacobian(model, X)
    t = LowRankJacobianTrainer(model, mse, X, rank=40, reference_size=_num_params(model), lr=0.5)
    t.fit(X, Y, epochs=3, progress=False)
    out = functional_call(model, t.values, (X,))
    a = 2 * (out - Y) / out.numel()
    _, g, _ = t.approximate_gradient(torch.arange(len(X)), Y)
    torch.testing.assert_close(g, J.T @ a.reshape(-1), rtol=1e-10, atol=1e-12)


@settings(deadline=None, max_examples=12)
@given(
    seed=st.integers(0, 1000),
    rank=st.integers(1, 6),
    strategy=st.sampled_from(["random", "magnitude", "gradient", "leverage"]),
    per_unit=st.booleans(),
    center=st.booleans(),
)
def test_parameter_projection_error_is_orthogonal_to_stored_subspace(
    seed: int, rank: int, strategy: str, per_unit: bool, center: bool
) -> None:
    model, X, Y = _case(seed=seed)
    J = _dense_jacobian(model, X)
    t = LowRankJacobianTrainer(
        model, mse, X, rank=rank, strategy=strategy, per_unit=per_unit, center=center, seed=seed
    )
    t.preprocess()
    idx = torch.randperm(len(X), generator=torch.Generator().manual_seed(seed))[:4]
    loss, g_hat, out = t.approximate_gradient(idx, Y[idx])
    a = torch.zeros(len(X), 2, dtype=F64)
    a[idx] = 2 * (out - Y[idx]) / out.numel()
    g = J.T @ a.reshape(-1)
    P = J.T @ t.factors.V  # the stored subspace, rebuilt densely
    Q = torch.linalg.svd(P, full_matrices=False).U
    Q = Q[:, : t.factors.B.shape[1]]
    scale = float(P.norm() * g.norm()) + 1e-300
    assert float((P.T @ (g - g_hat)).norm()) <= 1e-9 * scale  # error orthogonal to span P
    torch.testing.assert_close(g_hat, Q @ (Q.T @ g), rtol=1e-8, atol=1e-10 * float(g.norm()))


@settings(deadline=None, max_examples=10)
@given(seed=st.integers(0, 1000), rank=st.integers(1, 6), per_unit=st.booleans())
def test_sample_projection_is_gradient_of_projected_residual(
    seed: int, rank: int, per_unit: bool
) -> None:
    model, X, Y = _case(seed=seed)
    J = _dense_jacobian(model, X)
    t = LowRankJacobianTrainer(
        model, mse, X, rank=rank, per_unit=per_unit, projection="sample", seed=seed
    )
    t.preprocess()
    V = t.factors.V
    blocks = [V] if not per_unit else [V[j::2] for j in range(2)]
    for b in blocks:  # per-unit bases are orthonormal
        b = b[:, b.abs().sum(0) > 0]
        torch.testing.assert_close(b.T @ b, torch.eye(b.shape[1], dtype=F64))
    idx = torch.arange(len(X))
    _, g_hat, out = t.approximate_gradient(idx, Y)
    a = (2 * (out - Y) / out.numel()).reshape(-1)
    torch.testing.assert_close(g_hat, J.T @ (V @ (V.T @ a)), rtol=1e-10, atol=1e-12)


def test_stored_linearization_matches_dense_taylor_model() -> None:
    model, X, Y = _case(seed=2)
    J = _dense_jacobian(model, X)
    f0 = model(X).detach()
    t = LowRankJacobianTrainer(model, mse, X, rank=3, outputs="linearized", lr=0.5)
    t.fit(X, Y, epochs=4, batch_size=5, progress=False)
    w = torch.cat([p.reshape(-1) for p in t.values.values()])
    w0 = torch.cat([p.reshape(-1) for p in t.initial_values.values()])
    expected = f0 + (J @ (w - w0)).reshape(f0.shape)  # SGD keeps w - w0 in span(P): exact
    torch.testing.assert_close(t.stored_outputs(torch.arange(len(X))), expected)


def test_refresh_every_and_on_drift() -> None:
    model, X, Y = _case(seed=3)
    t = LowRankJacobianTrainer(model, mse, X, rank=2, refresh_every=3, lr=0.5)
    t.fit(X, Y, epochs=7, progress=False)
    assert t.refresh_steps == [0, 3, 6]
    assert len(t.seconds_preprocess) == 3
    t2 = LowRankJacobianTrainer(model, mse, X, rank=1, projection="sample", refresh_tol=1e-6)
    t2.fit(X, Y, epochs=4, progress=False)
    assert len(t2.refresh_steps) > 1 and "drift" in t2.history.metrics
    t3 = LowRankJacobianTrainer(model, mse, X, rank=2, outputs="linearized", refresh_tol=0.5)
    t3.fit(X, Y, epochs=2, progress=False)
    assert t3.history.metrics["drift"][0] == 0.0
    w = torch.cat([p.reshape(-1) for p in t.values.values()])
    t.preprocess()
    torch.testing.assert_close(t.factors.w_ref, w)


def test_explicit_indices_and_reference_size() -> None:
    model, X, _ = _case(seed=4)
    F = lowrank_factors(model, X, 2, reference_size=5, strategy=[0, 3, 7, 11, 20], per_unit=True)
    assert all(torch.equal(r, torch.tensor([0, 3, 7, 11, 20])) for r in F.reference)
    assert F.ranks == [2, 2] and F.B.shape[1] <= 4 and F.V.shape == (20, 4)


def test_errors() -> None:
    model, X, Y = _case()
    with pytest.raises(ValueError, match="rank: expected an integer >= 1"):
        LowRankJacobianTrainer(model, mse, X, rank=0)
    with pytest.raises(ValueError, match="projection: expected one of"):
        LowRankJacobianTrainer(model, mse, X, rank=2, projection="both")
    with pytest.raises(ValueError, match="outputs: expected one of"):
        LowRankJacobianTrainer(model, mse, X, rank=2, outputs="backward")
    with pytest.raises(ValueError, match="refresh_tol: expected a positive number"):
        LowRankJacobianTrainer(model, mse, X, rank=2, refresh_tol=-1.0)
    with pytest.raises(ValueError, match="refresh_every: expected an integer >= 1"):
        LowRankJacobianTrainer(model, mse, X, rank=2, refresh_every=0)
    with pytest.raises(ValueError, match="reference_size: expected an integer >= 1"):
        LowRankJacobianTrainer(model, mse, X, rank=2, reference_size=0)
    with pytest.raises(TypeError, match="X_train: expected a non-empty tensor"):
        LowRankJacobianTrainer(model, mse, X.tolist(), rank=2)
    with pytest.raises(ValueError, match="reference_size: expected >= rank"):
        lowrank_factors(model, X, 4, reference_size=2)
    t = LowRankJacobianTrainer(model, mse, X, rank=2)
    with pytest.raises(ValueError, match="x: expected inputs from the training set.*not in it"):
        t.direction(X + 1.0, Y)
    with pytest.raises(ValueError, match="x: expected inputs from the training set.*size or dtype"):
        t.direction(X.float(), Y)
