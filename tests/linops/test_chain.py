"""The chain route (hand-derived MLP and CNN products) against dense float64 references."""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call, hessian, jacrev

import linops
import linops._propagation
from linops._loss import OutputLoss
from trainers.models import MLP, LeNet5, SmallCNN, activation

RTOL = 1e-10
ACTS = ["relu", "tanh", "gelu", "sigmoid", "silu", "softplus", "identity"]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _dense(model: nn.Module, X: torch.Tensor, y: torch.Tensor, loss, names=None):
    """Dense J, H, GGN of ``model`` by torch.func (the parameters ``names``, default all)."""
    named = {n: p.detach() for n, p in model.named_parameters()}
    names = names or list(named)
    sizes = [named[n].numel() for n in names]
    theta = torch.cat([named[n].reshape(-1) for n in names])

    def f(t: torch.Tensor) -> torch.Tensor:
        parts = {n: c.view_as(named[n]) for n, c in zip(names, torch.split(t, sizes), strict=True)}
        return functional_call(model, parts, (X,))

    out = f(theta).detach()
    J = jacrev(lambda t: f(t).reshape(-1))(theta)
    H = hessian(lambda t: loss(f(t), y))(theta)
    HL = hessian(lambda o: loss(o.reshape(out.shape), y))(out.reshape(-1))
    return J, H, J.T @ HL @ J


def _operators(model, X, y, loss, route, params=None, **kw):
    return {
        "J": linops.JacobianOperator(model, X, params, route=route, **kw),
        "H": linops.HessianOperator(model, loss, (X, y), params, route=route, **kw),
        "G": linops.GGNOperator(model, loss, (X, y), params, route=route, **kw),
    }


def _check_all(model, X, y, loss, params=None, **kw) -> dict:
    J, H, G = _dense(model, X, y, loss, params)
    ops = _operators(model, X, y, loss, "chain", params, **kw)
    V = torch.randn(J.shape[1], 5, dtype=torch.float64)
    U = torch.randn(J.shape[0], 3, dtype=torch.float64)
    assert _rel(ops["J"] @ V, J @ V) < RTOL
    assert _rel(ops["J"] @ V[:, 0], J @ V[:, 0]) < RTOL
    assert _rel(ops["J"].T @ U, J.T @ U) < RTOL
    assert _rel(ops["J"].T @ U[:, 0], J.T @ U[:, 0]) < RTOL
    assert _rel(ops["H"] @ V, H @ V) < RTOL
    assert _rel(ops["H"] @ V[:, 0], H @ V[:, 0]) < RTOL
    assert _rel(ops["G"] @ V, G @ V) < RTOL
    assert _rel(ops["G"] @ V[:, 1], G @ V[:, 1]) < RTOL
    Vc = V.T.contiguous().T  # column-major: each vector's tangents read where they lie
    for name, dense in (("J", J), ("H", H), ("G", G)):
        assert _rel(ops[name] @ Vc, dense @ V) < RTOL, name
    assert all(op.route == "chain" for op in ops.values())
    return ops


def _check_against_autograd(
    model, X, y, loss, k: int, g=None, column_major: bool = False, **kw
) -> None:
    """Products of ``k`` vectors (and of one) on the chain route equal the autograd route's.

    ``column_major`` blocks keep each vector's tangents contiguous (the chain reads them where
    they lie); row-major ones are copied up front.
    """
    fast = _operators(model, X, y, loss, "chain", **kw)
    slow = _operators(model, X, y, loss, "autograd", **kw)
    V = torch.randn(fast["H"].shape[1], k, generator=g, dtype=torch.float64)
    U = torch.randn(fast["J"].shape[0], k, generator=g, dtype=torch.float64)
    if column_major:
        V, U = V.T.contiguous().T, U.T.contiguous().T
    for name in ("J", "H", "G"):
        assert _rel(fast[name] @ V, slow[name] @ V) < 1e-11, name
        assert _rel(fast[name] @ V[:, 0], slow[name] @ V[:, 0]) < 1e-11, name
    assert _rel(fast["J"].T @ U, slow["J"].T @ U) < 1e-11
    assert all(op.route == "chain" for op in fast.values())


@pytest.mark.parametrize("act", ACTS)
def test_scaled_mlp_products_match_torch_func(act: str) -> None:
    """trainers.models.MLP declares its chain (multipliers, kappa): every product is exact."""
    torch.manual_seed(0)
    model = MLP(5, 3, (7, 6), activation=act, parameterization="ntk", kappa=1.7).double().eval()
    X = torch.randn(11, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (11,))
    _check_all(model, X, y, nn.CrossEntropyLoss(), batch_size=4)


@pytest.mark.parametrize(
    "loss",
    [
        nn.MSELoss(),
        nn.MSELoss(reduction="sum"),
        nn.CrossEntropyLoss(reduction="sum"),
        nn.CrossEntropyLoss(label_smoothing=0.2),
        nn.functional.cross_entropy,
        lambda out, y: ((out - 0.1) ** 4).mean() + nn.functional.cross_entropy(out, y),
    ],
    ids=["mse", "mse-sum", "ce-sum", "ce-smoothing", "ce-functional", "custom"],
)
def test_losses_closed_form_or_autograd_give_the_same_products(loss) -> None:
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(6, 5), nn.LeakyReLU(0.1), nn.Linear(5, 3), nn.Softplus(beta=2.0)
    ).double()
    X = torch.randn(8, 2, 3, dtype=torch.float64)  # Flatten feeds the first Linear
    mse = isinstance(loss, nn.MSELoss)
    y = torch.randn(8, 3, dtype=torch.float64) if mse else torch.randint(0, 3, (8,))
    _check_all(model, X, y, loss)


def test_output_loss_uses_the_closed_form_only_when_it_is_exact() -> None:
    torch.manual_seed(2)
    out = torch.randn(6, 4, dtype=torch.float64)
    y = torch.randint(0, 4, (6,))
    shape = torch.Size([4])
    assert OutputLoss(out, nn.CrossEntropyLoss(), y, shape).closed_form
    assert OutputLoss(out, nn.functional.mse_loss, out * 0.5, shape).closed_form
    refused = [
        nn.CrossEntropyLoss(label_smoothing=0.1),
        nn.CrossEntropyLoss(weight=torch.rand(4, dtype=torch.float64)),
        lambda o, t: nn.functional.cross_entropy(o, t),
    ]
    for loss in refused:
        assert not OutputLoss(out, loss, y, shape).closed_form
    ignored = y.clone()
    ignored[0] = -100  # ignore_index: the closed form would count it
    assert not OutputLoss(out, nn.CrossEntropyLoss(), ignored, shape).closed_form
    U = torch.randn(3, 6, 4, dtype=torch.float64)
    fast = OutputLoss(out, nn.CrossEntropyLoss(), y, shape)
    slow = OutputLoss(out, lambda o, t: nn.functional.cross_entropy(o, t), y, shape)
    assert _rel(fast.grad, slow.grad) < 1e-14
    assert _rel(fast.hvp(U, True), slow.hvp(U, True)) < 1e-14
    assert _rel(fast.hvp_sample_major(U.transpose(0, 1)), slow.hvp(U, True).transpose(0, 1)) < 1e-14


@pytest.mark.parametrize("n", [7, 1])  # 1 sample: wide layers (weights written in place)
def test_parameter_subsets_and_frozen_layers(n: int) -> None:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.GELU(), nn.Linear(5, 3))
    model = model.double()
    model[0].weight.requires_grad_(False)  # frozen: not differentiated, still in the chain
    X, y = torch.randn(n, 4, dtype=torch.float64), torch.randint(0, 3, (n,))
    loss = nn.CrossEntropyLoss()
    _check_all(model, X, y, loss, params=["0.bias", "2.weight", "4.bias"])
    _check_all(model, X, y, loss, params=["4.weight"])


@pytest.mark.parametrize("n", [6, 1])  # 1 sample: wide layers (weights written in place)
def test_a_layer_used_twice_shares_its_parameters(n: int) -> None:
    torch.manual_seed(7)
    lin = nn.Linear(4, 4)
    model = nn.Sequential(lin, nn.Tanh(), lin, nn.SiLU(), nn.Linear(4, 3)).double()
    X, y = torch.randn(n, 4, dtype=torch.float64), torch.randint(0, 3, (n,))
    _check_all(model, X, y, nn.CrossEntropyLoss())
    J, H, G = _dense(model, X, y, nn.CrossEntropyLoss())
    slow = _operators(model, X, y, nn.CrossEntropyLoss(), "autograd")
    for name, D in (("J", J), ("H", H), ("G", G)):
        assert _rel(slow[name].to_dense(), D) < RTOL
    assert all(p.requires_grad for p in model.parameters())  # the model is left intact


def test_output_index_and_output_hessian_on_the_chain() -> None:
    torch.manual_seed(4)
    model = MLP(4, 3, (5,), activation="tanh").double()
    X = torch.randn(6, 4, dtype=torch.float64)
    J, _, _ = _dense(model, X, torch.zeros(6, dtype=torch.long), nn.CrossEntropyLoss())
    Jo = linops.JacobianOperator(model, X, output_index=2, route="chain")
    assert _rel(Jo.to_dense(), J[2::3]) < RTOL
    named = {n: p.detach() for n, p in model.named_parameters()}
    theta = torch.cat([p.reshape(-1) for p in named.values()])
    sizes = [p.numel() for p in named.values()]

    def f1(t: torch.Tensor) -> torch.Tensor:
        parts = {n: c.view_as(named[n]) for n, c in zip(named, torch.split(t, sizes), strict=True)}
        return functional_call(model, parts, (X[:1],))[0, 1]

    Hf = linops.OutputHessianOperator(model, X[:1], 1, route="chain")
    assert _rel(Hf.to_dense(), hessian(f1)(theta)) < RTOL
    assert Hf.route == "chain"


class _Shifted(nn.Linear):
    """A Linear whose forward is not the affine map its weights suggest."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + 1.0


def test_a_chain_that_misreads_the_model_falls_back_to_autograd() -> None:
    torch.manual_seed(5)
    model = nn.Sequential(_Shifted(4, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    X, y = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    J, H, _ = _dense(model, X, y, nn.MSELoss())
    ops = _operators(model, X, y, nn.MSELoss(), "auto")
    assert _rel(ops["J"].to_dense(), J) < RTOL
    assert _rel(ops["H"].to_dense(), H) < RTOL
    assert ops["J"].route.startswith("autograd") and ops["H"].route.startswith("autograd")
    with pytest.raises(ValueError, match="route: .chain. needs a model"):
        linops.JacobianOperator(model, X, route="chain") @ torch.ones(J.shape[1]).double()


def test_linear_on_3d_inputs_and_non_chains_use_autograd() -> None:
    torch.manual_seed(6)
    seq = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    X = torch.randn(5, 7, 3, dtype=torch.float64)  # a Linear over the last axis: not a chain
    J = linops.JacobianOperator(seq, X)
    D = jacrev(lambda W: functional_call(seq, {"0.weight": W}, (X,)).reshape(-1))(
        seq[0].weight.detach()
    ).reshape(-1, 12)
    Jw = linops.JacobianOperator(seq, X, params=["0.weight"])
    assert _rel(Jw.to_dense(), D) < RTOL
    J @ torch.ones(J.shape[1], dtype=torch.float64)
    assert J.route.startswith("autograd")
    grouped = nn.Sequential(nn.Conv2d(2, 2, 3, groups=2), nn.Flatten(), nn.Linear(8, 1)).double()
    with pytest.raises(ValueError, match="route: 'chain' needs"):
        linops.JacobianOperator(
            grouped, torch.randn(2, 2, 4, 4, dtype=torch.float64), route="chain"
        ) @ (torch.ones(sum(p.numel() for p in grouped.parameters()), dtype=torch.float64))
    with pytest.raises(ValueError, match="route: expected one of"):
        linops.JacobianOperator(seq, X, route="fast")


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10**6),
    widths=st.lists(st.integers(1, 12), min_size=1, max_size=3),
    act=st.sampled_from(ACTS),
    k=st.integers(1, 9),
    mse=st.booleans(),
    n=st.integers(1, 6),
    column_major=st.booleans(),
)
def test_chain_equals_autograd_on_random_mlps(seed, widths, act, k, mse, n, column_major) -> None:
    """Property: the hand-derived products equal autograd's, any width, depth, activation, K,
    and with few samples and wide layers (weights larger than their activations, whose K
    weight tangents are multiplied one at a time) as well as with many."""
    g = torch.Generator().manual_seed(seed)
    model = MLP(3, 2, tuple(widths), activation=act, seed=g).double()
    X = torch.randn(n, 3, generator=g, dtype=torch.float64)
    if mse:
        loss, y = nn.MSELoss(), torch.randn(n, 2, generator=g, dtype=torch.float64)
    else:
        loss, y = nn.CrossEntropyLoss(), torch.randint(0, 2, (n,), generator=g)
    _check_against_autograd(model, X, y, loss, k, g, column_major, max_vectors=4)


@pytest.mark.parametrize("k", [6, 20])  # 20: a row-major block's forward read in place too
@pytest.mark.parametrize("column_major", [False, True])
def test_wide_layers_with_few_samples_match_torch_func(column_major: bool, k: int) -> None:
    """Weights larger than their activations (24 x 24 against 3 samples): the K weight
    tangents are read where they lie in the block, column-major or row-major."""
    torch.manual_seed(0)
    model = MLP(20, 4, (24, 24), activation="tanh").double().eval()
    X = torch.randn(3, 20, dtype=torch.float64)
    y = torch.randint(0, 4, (3,))
    assert linops._propagation._weight_dominated(3, 24, 24)
    J, H, G = _dense(model, X, y, nn.CrossEntropyLoss())
    ops = _operators(model, X, y, nn.CrossEntropyLoss(), "chain")
    V = torch.randn(J.shape[1], k, dtype=torch.float64)
    if column_major:
        V = V.T.contiguous().T
    for name, dense in (("J", J), ("H", H), ("G", G)):
        assert _rel(ops[name] @ V, dense @ V) < RTOL, name
        assert ops[name].route == "chain"


@pytest.mark.parametrize("patches", [True, False])
@pytest.mark.parametrize("act", ["relu", "tanh"])
def test_cnn_products_match_torch_func(act: str, patches: bool, monkeypatch) -> None:
    """Convolutions and max pooling on the chain route: every product exact, all K, with the
    batched weight tangents through unfolded patches or (when too large) a convolution."""
    if not patches:
        monkeypatch.setattr(linops._propagation, "_MAX_PATCHES", 0)
    torch.manual_seed(11)
    model = SmallCNN(1, 3, channels=(2, 3), act=act).double().eval()
    X = torch.randn(6, 1, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 3, (6,))
    _check_all(model, X, y, nn.CrossEntropyLoss())
    _check_all(model, X, y, nn.CrossEntropyLoss(), max_vectors=2)  # several batched passes


def test_cnn_strides_padding_dilation_subsets_and_overlapping_pools() -> None:
    torch.manual_seed(12)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, stride=2, padding=2, dilation=2),
        nn.GELU(),
        nn.MaxPool2d(3, stride=1, padding=1, ceil_mode=True),  # windows overlap
        nn.Conv2d(3, 2, (2, 1), padding=(1, 0), bias=False),
        nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False, ceil_mode=True),
        nn.Softplus(),
        nn.Flatten(),
        nn.Linear(2 * 5 * 4, 2),
    ).double()
    X = torch.randn(3, 2, 7, 8, dtype=torch.float64)
    y = torch.randn(3, 2, dtype=torch.float64)
    _check_all(model, X, y, nn.MSELoss())
    for subset in (["3.weight"], ["0.bias", "7.weight"], ["0.weight"]):
        _check_all(model, X, y, nn.MSELoss(), subset)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10**6),
    channels=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    kernel=st.integers(1, 3),
    stride=st.integers(1, 2),
    padding=st.integers(0, 1),
    dilation=st.integers(1, 2),
    pool=st.sampled_from([None, (2, 2, 0), (2, 1, 1), (3, 2, 1)]),
    average=st.booleans(),
    act=st.sampled_from(ACTS),
    k=st.integers(1, 9),
)
def test_chain_equals_autograd_on_random_cnns(
    seed, channels, kernel, stride, padding, dilation, pool, average, act, k
) -> None:
    """Property: convolution and pooling products equal autograd's, any geometry and K."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    c1, c2 = channels
    steps: list[nn.Module] = [
        nn.Conv2d(2, c1, kernel, stride=stride, padding=padding, dilation=dilation),
        activation(act),
    ]
    if pool is not None:
        kind = nn.AvgPool2d if average else nn.MaxPool2d
        steps.append(kind(pool[0], stride=pool[1], padding=pool[2]))
    steps.append(nn.Conv2d(c1, c2, 2, padding=1))
    X = torch.randn(4, 2, 7, 7, generator=g, dtype=torch.float64)
    features = nn.Sequential(*steps).double()
    try:
        width = features(X).flatten(1).shape[1]
    except RuntimeError:  # the geometry leaves no output pixel
        assume(False)
    model = nn.Sequential(features, nn.Flatten(), nn.Linear(width, 2)).double()
    loss, y = nn.CrossEntropyLoss(), torch.randint(0, 2, (4,), generator=g)
    _check_against_autograd(model, X, y, loss, k, g, max_vectors=4)


@pytest.mark.parametrize("k", [1, 3])
def test_products_leave_their_inputs_intact(k: int) -> None:
    """Elementwise steps scale tangents in place; never the caller's vector (last steps here
    are a Tanh and a scalar multiple, so the cotangent meets them first)."""
    torch.manual_seed(13)
    model = MLP(3, 2, (4,), activation="tanh", kappa=0.5).double()
    ends_in_tanh = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2), nn.Tanh()).double()
    X = torch.randn(5, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (5,))
    for m in (model, ends_in_tanh):
        ops = _operators(m, X, y, nn.CrossEntropyLoss(), "chain")
        for name, op in [*ops.items(), ("JT", ops["J"].T)]:
            V = torch.randn(op.shape[1], k, dtype=torch.float64)
            before = V.clone()
            first = op @ V[:, 0] if k == 1 else op @ V
            assert torch.equal(V, before), name
            assert torch.equal(op @ V[:, 0] if k == 1 else op @ V, first), name  # no stale state


def test_channels_last_cnn_gives_the_same_products() -> None:
    """Channels-last weights and inputs (convolutions then answer channels-last) change nothing."""
    torch.manual_seed(14)
    plain = SmallCNN(3, 3, channels=(4, 3)).double()
    last = SmallCNN(3, 3, channels=(4, 3)).double().to(memory_format=torch.channels_last)
    last.load_state_dict(plain.state_dict())
    X = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 3, (4,))
    a = _operators(plain, X, y, nn.CrossEntropyLoss(), "chain")
    b = _operators(last, X.to(memory_format=torch.channels_last), y, nn.CrossEntropyLoss(), "chain")
    V = torch.randn(a["H"].shape[1], 3, dtype=torch.float64)
    U = torch.randn(a["J"].shape[0], 2, dtype=torch.float64)
    for name in ("J", "H", "G"):
        assert _rel(b[name] @ V, a[name] @ V) < 1e-13, name
        assert _rel(b[name] @ V[:, 0], a[name] @ V[:, 0]) < 1e-13, name
    assert _rel(b["J"].T @ U, a["J"].T @ U) < 1e-13


def test_lenet5_on_the_chain_route_equals_autograd() -> None:
    """LeNet-5 (5x5 convolutions, average pooling, tanh) takes the chain route, and agrees."""
    torch.manual_seed(15)
    model = LeNet5().double()
    X = torch.randn(3, 1, 32, 32, dtype=torch.float64)
    y = torch.randint(0, 10, (3,))
    _check_against_autograd(model, X, y, nn.CrossEntropyLoss(), 3)


def test_a_plain_linear_ignores_a_multiplier_attribute_as_its_forward_does() -> None:
    """nn.Linear.forward ignores a ``multiplier`` attribute; the chain applied it, unseen by the
    forward check when the layer's weight is zero (a zero-initialised read-out): H 2.4 away."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double().eval()
    with torch.no_grad():
        m[2].weight.zero_()
    m[2].multiplier = 3.0
    X, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    for cls in (linops.HessianOperator, linops.GGNOperator, linops.EmpiricalFisherOperator):
        auto = cls(m, nn.MSELoss(), (X, y))
        ref = cls(m, nn.MSELoss(), (X, y), route="autograd").to_dense()
        torch.testing.assert_close(auto.to_dense(), ref, rtol=1e-12, atol=1e-14)
        assert auto.route.startswith("chain")


def test_the_chain_takes_the_models_branch_at_a_kink() -> None:
    """The chain recomputed a Linear as x W^T + b, the model runs F.linear: a last-bit difference
    at a ReLU kink gave the other branch (Hessian 0.70 away from autograd's)."""
    g = torch.Generator().manual_seed(71)
    x = torch.randn(39, 1, dtype=torch.float64, generator=g)
    W = torch.randn(15, 1, dtype=torch.float64, generator=g)
    b = -(x[0:1] @ W.T)[0]  # sample 0 on the kink, as x W^T computes it
    m = nn.Sequential(nn.Linear(1, 15), nn.ReLU(), nn.Linear(15, 2)).double().eval()
    with torch.no_grad():
        m[0].weight.copy_(W)
        m[0].bias.copy_(b)
    X, y = x[:4], torch.tensor([0, 1, 1, 0])
    for cls in (linops.JacobianOperator, linops.GGNOperator, linops.HessianOperator):
        args = (m, X) if cls is linops.JacobianOperator else (m, nn.CrossEntropyLoss(), (X, y))
        chain, ref = cls(*args, route="chain"), cls(*args, route="autograd")
        torch.testing.assert_close(chain.to_dense(), ref.to_dense(), rtol=1e-12, atol=1e-14)


def test_a_chain_ending_in_a_convolution_is_refused_by_what_it_needs() -> None:
    """The message gave the same shape twice ('outputs of shape (2, 3, 2, 2), model gives
    (2, 3, 2, 2)'); auto takes autograd."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 3, 3)).double()
    X, y = torch.randn(2, 1, 4, 4, dtype=torch.float64), torch.randn(2, 12, dtype=torch.float64)

    def loss(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return ((out.flatten(1) - t) ** 2).sum()

    with pytest.raises(ValueError, match=r"needs \(n, d\) outputs \(end the model with nn.Flatten"):
        linops.HessianOperator(m, loss, (X, y), route="chain", reduction="sum").to_dense()
    auto = linops.HessianOperator(m, loss, (X, y), reduction="sum")
    auto.to_dense()
    assert auto.route.startswith("autograd")


@pytest.mark.parametrize("act", [nn.Tanh, nn.ReLU])
@pytest.mark.parametrize("layout", ["row-major", "column-major", "vector"])
def test_products_never_scale_the_callers_vectors(act, layout: str) -> None:
    """A bias tangent expanded over one sample is already contiguous: it was the caller's own
    vectors, which the next activation scaled in place (a one-output layer whose bias alone
    is differentiated, one sample; the second product then differed from the first)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 1), act(), nn.Linear(1, 40), nn.Tanh(), nn.Linear(40, 3))
    model = model.double()
    with torch.no_grad():
        model[0].bias.fill_(0.3)
    params = ["0.bias", "2.weight", "2.bias", "4.weight", "4.bias"]
    X, y = torch.randn(1, 6, dtype=torch.float64), torch.tensor([1])
    J, H, G = _dense(model, X, y, nn.CrossEntropyLoss(), params)
    ops = _operators(model, X, y, nn.CrossEntropyLoss(), "chain", params)
    V = torch.randn(J.shape[1], 5, dtype=torch.float64)
    if layout == "column-major":
        V = V.T.contiguous().T
    elif layout == "vector":
        V = V[:, 0].clone()
    kept = V.clone()
    for name, dense in (("J", J), ("H", H), ("G", G)):
        first, second = ops[name] @ V, ops[name] @ V
        assert torch.equal(V, kept), name
        assert torch.equal(first, second), name
        assert _rel(first, dense @ kept) < RTOL, name
