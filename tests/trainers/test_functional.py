"""Functional training runs: semantics against torch.optim, derivatives against jacrev (seed 004)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import functional_call, grad, jacrev

from trainers import BackpropTrainer
from trainers.functional import (
    SGD,
    Adam,
    AdamW,
    ConstantLR,
    CosineLR,
    DataSchedule,
    TrainingRun,
    WarmupLR,
)
from trainers.models import MLP, SmallCNN

F64 = torch.float64
TOL = 1e-10


def _data(n: int = 12, d: int = 3, classes: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=F64), torch.randint(0, classes, (n,), generator=g)


def _model(act: str = "tanh", widths=(4,), seed: int = 1) -> MLP:
    return MLP(
        3, 3, widths=widths, activation=act, seed=torch.Generator().manual_seed(seed)
    ).double()


# ---------------------------------------------------------------- an independent reference
def _reference_run(model, X, y, order, opt: str, kw: dict, lrs: list[float]):
    """The unrolled training written out from torch.optim's documented update rules."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]

    def loss(w, xb, yb):
        parts = torch.split(w, [s.numel() for s in shapes])
        ps = {n: p.view(s) for n, p, s in zip(names, parts, shapes, strict=True)}
        return torch.nn.functional.cross_entropy(functional_call(model, ps, (xb,)), yb)

    def train(w):
        m = v = buf = torch.zeros_like(w)
        for t, (idx, lr) in enumerate(zip(order, lrs, strict=True)):
            gr = grad(loss)(w, X[idx], y[idx])
            wd = kw.get("weight_decay", 0.0)
            if opt == "sgd":
                gr = gr + wd * w
                mu = kw.get("momentum", 0.0)
                if mu:
                    buf = gr if t == 0 else mu * buf + gr
                    gr = gr + mu * buf if kw.get("nesterov") else buf
                w = w - lr * gr
            else:
                b1, b2, eps = 0.9, 0.999, 1e-8
                if opt == "adamw":
                    w = w * (1 - lr * wd)
                else:
                    gr = gr + wd * w
                m = b1 * m + (1 - b1) * gr
                v = b2 * v + (1 - b2) * gr**2
                k = t + 1
                denom = (v.sqrt() / math.sqrt(1 - b2**k)) + eps
                w = w - lr / (1 - b1**k) * m / denom
        return w

    return train


OPTIMIZERS = {
    "sgd": (SGD(), "sgd", {}),
    "momentum": (SGD(0.9), "sgd", {"momentum": 0.9}),
    "nesterov-wd": (
        SGD(0.9, nesterov=True, weight_decay=0.01),
        "sgd",
        {"momentum": 0.9, "nesterov": True, "weight_decay": 0.01},
    ),
    "adam": (Adam(weight_decay=0.01), "adam", {"weight_decay": 0.01}),
    "adamw": (AdamW(weight_decay=0.1), "adamw", {"weight_decay": 0.1}),
}
SCHEDULES = {
    "constant": ConstantLR(0.05),
    "cosine": CosineLR(0.1, total_steps=15),
    "warmup-cosine": WarmupLR(CosineLR(0.1, total_steps=10), warmup_steps=5),
}


CASES = [("chain", o, s) for o in OPTIMIZERS for s in SCHEDULES] + [
    ("func", o, s)
    for o, s in zip(
        OPTIMIZERS, ["cosine", "warmup-cosine", "constant", "cosine", "warmup-cosine"], strict=True
    )
]


@pytest.mark.parametrize(("engine", "opt", "sched"), CASES)
def test_jvp_vjp_match_jacrev_of_unrolled_training(opt: str, sched: str, engine: str) -> None:
    X, y = _data()
    model = _model("gelu")
    data = DataSchedule(X, y, 4, epochs=5, shuffle=True, seed=3)  # 15 steps
    optimizer, kind, kw = OPTIMIZERS[opt]
    schedule = SCHEDULES[sched]
    run = TrainingRun(
        model, "cross_entropy", data, optimizer, schedule, engine=engine, checkpoint_every=4
    )
    theta0 = run.initial_values()
    ref = _reference_run(model, X, y, data.indices, kind, kw, [schedule(t) for t in range(15)])
    J = jacrev(ref)(theta0)
    g = torch.Generator().manual_seed(7)
    V = torch.randn(run.dim, 3, generator=g, dtype=F64)
    torch.testing.assert_close(run.jvp(theta0, V), J @ V, atol=TOL, rtol=TOL)
    torch.testing.assert_close(run.vjp(theta0, V), J.T @ V, atol=TOL, rtol=TOL)
    torch.testing.assert_close(run.jvp(theta0, V[:, 0]), J @ V[:, 0], atol=TOL, rtol=TOL)
    torch.testing.assert_close(run(theta0), ref(theta0), atol=TOL, rtol=TOL)
    torch.testing.assert_close(run.final(theta0), ref(theta0), atol=TOL, rtol=TOL)


@pytest.mark.parametrize("opt", ["sgd", "adam", "adamw"])
def test_reference_matches_torch_optim(opt: str) -> None:
    """The reference loop above is itself checked against torch.optim (via BackpropTrainer)."""
    X, y = _data()
    model = _model()
    kw = {
        "sgd": {"momentum": 0.9, "nesterov": True, "weight_decay": 0.01},
        "adam": {"weight_decay": 0.01},
        "adamw": {"weight_decay": 0.1},
    }[opt]
    trainer = BackpropTrainer(
        model, torch.nn.functional.cross_entropy, optimizer=opt, lr=0.05, **kw
    )
    trainer.fit(X, y, epochs=3, batch_size=4, shuffle=True, seed=5, progress=False)
    data = DataSchedule(X, y, 4, epochs=3, shuffle=True, seed=5)
    ref = _reference_run(model, X, y, data.indices, opt, kw, [0.05] * data.num_steps)
    theta0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    final = torch.cat([p.reshape(-1) for p in trainer.values.values()])
    torch.testing.assert_close(ref(theta0), final, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("act", ["tanh", "relu", "sigmoid", "silu", "identity"])
def test_mlp_engine_activations_and_depth(act: str) -> None:
    X, y = _data(seed=2)
    model = _model(act, widths=(5, 4), seed=3)
    run = TrainingRun(
        model, "cross_entropy", DataSchedule(X, y, 6, epochs=3), SGD(0.5), 0.1, engine="chain"
    )
    assert run.engine.name == "chain"
    theta0 = run.initial_values()
    J = jacrev(run)(theta0)
    V = torch.randn(run.dim, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(run.jvp(theta0, V), J @ V, atol=TOL, rtol=TOL)
    torch.testing.assert_close(run.vjp(theta0, V), J.T @ V, atol=TOL, rtol=TOL)


def test_mse_scaled_mlp_and_no_bias() -> None:
    g = torch.Generator().manual_seed(0)
    X, Y = torch.randn(10, 3, generator=g, dtype=F64), torch.randn(10, 2, generator=g, dtype=F64)
    model = MLP(
        3,
        2,
        widths=(4,),
        activation="tanh",
        parameterization="ntk",
        kappa=0.5,
        bias=False,
        seed=g,
    ).double()
    run = TrainingRun(model, "mse", DataSchedule(X, Y, 5, epochs=4), Adam(), CosineLR(0.05, 8))
    assert run.engine.name == "chain"
    theta0 = run.initial_values()
    J = jacrev(run)(theta0)
    V = torch.randn(run.dim, 2, generator=g, dtype=F64)
    torch.testing.assert_close(run.jvp(theta0, V), J @ V, atol=TOL, rtol=TOL)
    torch.testing.assert_close(run.vjp(theta0, V), J.T @ V, atol=TOL, rtol=TOL)


def test_generic_engine_on_cnn_with_checkpointed_segments() -> None:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = SmallCNN(1, 3, channels=(2, 2), image_size=8, act="tanh").double()
    X, y = torch.randn(8, 1, 8, 8, generator=g, dtype=F64), torch.randint(0, 3, (8,), generator=g)
    run = TrainingRun(
        model,
        "cross_entropy",
        DataSchedule(X, y, 4, epochs=5),
        SGD(0.9, nesterov=True),
        0.05,
        checkpoint_every=3,
        engine="func",
    )
    assert run.engine.name == "func"
    theta0 = run.initial_values()
    J = jacrev(run)(theta0)
    V = torch.randn(run.dim, 2, generator=g, dtype=F64)
    torch.testing.assert_close(run.jvp(theta0, V), J @ V, atol=TOL, rtol=TOL)
    torch.testing.assert_close(run.vjp(theta0, V), J.T @ V, atol=TOL, rtol=TOL)
    assert len(run.trajectory(theta0).checkpoints) == 4  # 10 steps, every 3: sqrt-style memory


def test_trajectory_memory_bound_selects_sqrt_checkpoints() -> None:
    X, y = _data()
    run = TrainingRun(
        _model(), "cross_entropy", DataSchedule(X, y, 1, epochs=3), SGD(), 0.1, memory_limit_bytes=1
    )
    traj = run.trajectory(run.initial_values())
    assert traj.every == math.ceil(math.sqrt(36)) and traj._stored is None


def test_parameter_subset_and_data_order() -> None:
    X, y = _data()
    model = _model()
    run = TrainingRun(
        model,
        "cross_entropy",
        DataSchedule(X, y, 4, epochs=2),
        SGD(0.9),
        0.1,
        params=["layers.2.weight"],
    )
    assert run.engine.name == "chain" and run.dim == 12  # a subset of the chain's parameters
    theta0 = run.initial_values()
    J = jacrev(run)(theta0)
    V = torch.eye(run.dim, dtype=F64)[:, :3]
    torch.testing.assert_close(run.jvp(theta0, V), J @ V, atol=TOL, rtol=TOL)
    # fixed order without shuffling, reshuffled by seed otherwise (as Trainer.fit)
    assert torch.equal(torch.cat(DataSchedule(X, y, 5).indices), torch.arange(12))
    gen = torch.Generator().manual_seed(4)
    first = torch.randperm(12, generator=gen)
    assert torch.equal(DataSchedule(X, y, 12, shuffle=True, seed=4).indices[0], first)
    assert DataSchedule(X, y, 5, drop_last=True).num_steps == 2


def test_schedules() -> None:
    c = CosineLR(0.1, total_steps=4, final_lr=0.02)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(
        torch.optim.SGD([torch.zeros(1)], lr=0.1), T_max=4, eta_min=0.02
    )
    for t in range(4):
        assert c(t) == pytest.approx(sched.get_last_lr()[0], rel=1e-12)
        sched.optimizer.step()
        sched.step()
    assert c(10) == pytest.approx(0.02)
    w = WarmupLR(0.3, warmup_steps=3)
    assert [round(w(t), 12) for t in range(5)] == [0.1, 0.2, 0.3, 0.3, 0.3]
    assert WarmupLR(0.3, warmup_steps=0)(0) == 0.3


def test_errors() -> None:
    X, y = _data()
    model = _model()
    data = DataSchedule(X, y, 4)
    with pytest.raises(ValueError, match="lr: expected a finite non-negative"):
        ConstantLR(-1.0)
    with pytest.raises(ValueError, match="total_steps: expected a positive integer"):
        CosineLR(0.1, total_steps=0)
    with pytest.raises(ValueError, match="final_lr: expected"):
        CosineLR(0.1, 5, final_lr=float("nan"))
    with pytest.raises(ValueError, match="warmup_steps: expected a non-negative integer"):
        WarmupLR(0.1, warmup_steps=-1)
    with pytest.raises(TypeError, match="lr: expected a float or a Schedule"):
        TrainingRun(model, "cross_entropy", data, SGD(), "fast")
    with pytest.raises(ValueError, match=r"momentum: expected a number in \[0, 1\)"):
        SGD(1.5)
    with pytest.raises(ValueError, match="nesterov: expected momentum > 0"):
        SGD(nesterov=True)
    with pytest.raises(ValueError, match="weight_decay: expected a finite non-negative"):
        AdamW(weight_decay=-0.1)
    with pytest.raises(ValueError, match="betas: expected two numbers"):
        Adam(betas=(0.9,))
    with pytest.raises(ValueError, match="eps: expected"):
        Adam(eps=-1.0)
    with pytest.raises(TypeError, match="X, y: expected torch tensors"):
        DataSchedule(X.numpy(), y, 4)
    with pytest.raises(ValueError, match="X, y: expected equal non-zero lengths"):
        DataSchedule(X[:3], y, 4)
    with pytest.raises(ValueError, match="batch_size: expected a positive integer"):
        DataSchedule(X, y, 0)
    with pytest.raises(ValueError, match="epochs: expected a positive integer"):
        DataSchedule(X, y, 4, epochs=0)
    with pytest.raises(ValueError, match="drop_last leaves no step"):
        DataSchedule(X, y, 20, drop_last=True)
    with pytest.raises(TypeError, match="data: expected a DataSchedule"):
        TrainingRun(model, "cross_entropy", (X, y), SGD())
    with pytest.raises(TypeError, match="optimizer: expected a functional optimizer"):
        TrainingRun(model, "cross_entropy", data, torch.optim.SGD)
    with pytest.raises(ValueError, match="checkpoint_every: expected a positive integer"):
        TrainingRun(model, "cross_entropy", data, SGD(), checkpoint_every=0)
    with pytest.raises(ValueError, match="loss: expected one of"):
        TrainingRun(model, "hinge", data, SGD())
    with pytest.raises(TypeError, match="loss: expected a loss name or a callable"):
        TrainingRun(model, 3, data, SGD())
    with pytest.raises(ValueError, match="engine: expected 'auto', 'chain' or 'func'"):
        TrainingRun(model, "cross_entropy", data, SGD(), engine="jax")

    class Custom(torch.nn.Module):  # a forward of its own: not provably a chain
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(X.shape[1], 3).double()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x)

    with pytest.raises(ValueError, match="engine: expected a chain of nn.Linear"):
        TrainingRun(Custom(), "cross_entropy", data, SGD(), engine="chain")
    run = TrainingRun(model, "cross_entropy", data, SGD())
    with pytest.raises(ValueError, match=r"theta0: expected a tensor of shape \(31,\)"):
        run(torch.zeros(5, dtype=F64))
    with pytest.raises(TypeError, match="theta0: expected a floating dtype"):
        run.final(torch.zeros(31, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"V: expected a tensor of shape \(31,\) or \(31, K\)"):
        run.jvp(run.initial_values(), torch.zeros(4, 2, dtype=F64))


def test_the_trajectory_follows_in_place_changes_of_untrained_parameters() -> None:
    """params= the last layer only; the first layer's weight doubled in place afterwards: the
    cached trajectory (keyed on theta0 alone) was reused, 0.17 off jacrev of the run."""
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(8, 3, generator=g, dtype=torch.float64), torch.arange(8) % 2
    net = torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)
    ).double()
    run = TrainingRun(
        net, "cross_entropy", DataSchedule(X, y, 4, epochs=1), SGD(0.9), 0.1,
        params=["2.weight", "2.bias"],
    )  # fmt: skip
    theta0 = run.initial_values()
    V = torch.randn(run.dim, 2, generator=g, dtype=torch.float64)
    run.jvp(theta0, V)
    with torch.no_grad():
        net[0].weight.mul_(2.0)
    torch.testing.assert_close(run.jvp(theta0, V), jacrev(run)(theta0) @ V, rtol=1e-10, atol=1e-12)


def test_a_random_forward_pass_is_refused() -> None:
    """Dropout in training mode made run.final() differ between calls by 0.15."""
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Dropout(0.5), torch.nn.Linear(4, 2))
    X, y = torch.randn(8, 3), torch.arange(8) % 2
    with pytest.raises(ValueError, match="contains \\['Dropout'\\] in training mode"):
        TrainingRun(net, "cross_entropy", DataSchedule(X, y, 4, epochs=1), SGD(0.9), 0.1)
    TrainingRun(net.eval(), "cross_entropy", DataSchedule(X, y, 4, epochs=1), SGD(0.9), 0.1)
    # deterministic in training mode: BatchNorm's batch statistics, dropout with p = 0
    bn = torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Dropout(0.0), torch.nn.Linear(4, 2)
    ).double()
    Xd = X.double()
    run = TrainingRun(bn.train(), "cross_entropy", DataSchedule(Xd, y, 4, epochs=1), SGD(0.9), 0.1)
    theta0 = run.initial_values()
    torch.testing.assert_close(run.final(theta0), run.final(theta0), rtol=0, atol=0)
