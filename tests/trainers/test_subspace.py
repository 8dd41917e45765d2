"""SubspaceTrainer (seed 004 section 3.6): theta0 + P z training against independent references."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from trainers import BackpropTrainer
from trainers.functional import SGD, CosineLR, DataSchedule, TrainingRun
from trainers.models import MLP
from trainers.subspace import SubspaceTrainer, subspace_basis

F64 = torch.float64
CE = torch.nn.functional.cross_entropy


def _case(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    model = MLP(3, 3, widths=(4,), activation="tanh", seed=g).double()
    X, y = torch.randn(12, 3, generator=g, dtype=F64), torch.randint(0, 3, (12,), generator=g)
    return model, X, y


def test_full_basis_matches_backprop_and_functional_run() -> None:
    model, X, y = _case()
    m = sum(p.numel() for p in model.parameters())
    t = SubspaceTrainer(model, CE, torch.eye(m, dtype=F64), lr=0.1, momentum=0.9)
    t.fit(X, y, epochs=3, batch_size=4, shuffle=False, progress=False)
    ref = BackpropTrainer(model, CE, lr=0.1, momentum=0.9)
    ref.fit(X, y, epochs=3, batch_size=4, shuffle=False, progress=False)
    torch.testing.assert_close(
        t.theta(), torch.cat([p.reshape(-1) for p in ref.values.values()]), atol=1e-12, rtol=1e-12
    )
    # with a cosine schedule it matches the functional run of the same schedule
    sched = CosineLR(0.1, total_steps=9)
    t2 = SubspaceTrainer(model, CE, torch.eye(m, dtype=F64), lr=sched, momentum=0.9)
    t2.fit(X, y, epochs=3, batch_size=4, shuffle=False, progress=False)
    run = TrainingRun(model, "cross_entropy", DataSchedule(X, y, 4, epochs=3), SGD(0.9), sched)
    torch.testing.assert_close(t2.theta(), run.final(run.initial_values()), atol=1e-12, rtol=1e-12)


def test_restricted_gradient_and_trajectory_stay_in_subspace() -> None:
    model, X, y = _case(1)
    m = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(2)
    P = torch.linalg.qr(torch.randn(m, 5, generator=g, dtype=F64))[0]
    theta0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    t = SubspaceTrainer(model, CE, P, lr=0.05)
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]

    def loss_z(z: torch.Tensor) -> torch.Tensor:
        w = theta0 + P @ z
        parts = torch.split(w, [s.numel() for s in shapes])
        return CE(
            functional_call(
                model, {n: q.view(s) for n, q, s in zip(names, parts, shapes, strict=True)}, (X,)
            ),
            y,
        )

    z = torch.randn(5, generator=g, dtype=F64)
    t.values["z"].copy_(z)
    _, d = t.direction(X, y)
    torch.testing.assert_close(d["z"], torch.func.grad(loss_z)(z), atol=1e-12, rtol=1e-12)
    t.values["z"].zero_()
    before = t.evaluate(X, y)["loss"]
    t.fit(X, y, epochs=5, batch_size=6, progress=False)
    delta = t.theta() - theta0
    torch.testing.assert_close(P @ (P.T @ delta), delta, atol=1e-12, rtol=1e-12)
    assert t.evaluate(X, y)["loss"] < before


def test_subspace_basis_kinds() -> None:
    s = torch.tensor([50.0, 3.0, 1.0 + 1e-6, 1.0 - 1e-4, 0.5, 0.1], dtype=F64)
    V = torch.eye(6, dtype=F64)
    pick = lambda kind, k: subspace_basis(kind, k, sigma=s, vectors=V).argmax(0).tolist()  # noqa: E731
    assert pick("bulk", 2) == [2, 3]
    assert pick("chaotic", 2) == [0, 1]
    assert pick("stable", 2) == [5, 4]
    assert pick("complement", 2) == [0, 1]
    R = subspace_basis("random", 3, dim=6, seed=1)
    torch.testing.assert_close(R.T @ R, torch.eye(3, dtype=F64), atol=1e-12, rtol=0)


def test_errors() -> None:
    model, X, y = _case()
    with pytest.raises(ValueError, match=r"basis: expected a tensor of shape \(31, n\)"):
        SubspaceTrainer(model, CE, torch.eye(5, dtype=F64))
    with pytest.raises(ValueError, match=r"theta0: expected a tensor of shape \(31,\)"):
        SubspaceTrainer(model, CE, torch.eye(31, dtype=F64), theta0=torch.zeros(3))
    with pytest.raises(ValueError, match="kind: expected one of"):
        subspace_basis("middle", 2)
    with pytest.raises(ValueError, match="dim: expected the ambient dimension"):
        subspace_basis("random", 2)
    with pytest.raises(ValueError, match="sigma, vectors: expected the singular values"):
        subspace_basis("bulk", 2)
    with pytest.raises(ValueError, match="vectors: expected 3 columns"):
        subspace_basis("bulk", 2, sigma=torch.ones(3), vectors=torch.eye(4))
    with pytest.raises(ValueError, match=r"k: expected an integer in \[1, 3\]"):
        subspace_basis("bulk", 4, sigma=torch.ones(3), vectors=torch.eye(3))
