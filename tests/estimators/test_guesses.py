"""Gradient guessers of seed 003 checked against their definitions (float64, backprop references)."""

from __future__ import annotations

import math

import pytest
import scipy.linalg
import torch
from torch import nn

from estimators.guesses import (
    GUESSERS,
    ActivationMixing,
    ActivationPerturbation,
    DirectionalDescent,
    Downstream,
    MatchedCosine,
    SelfSharpening,
    WTranspose,
    make_guesser,
)
from linops.params import ParamSpace
from trainers.models import MLP, SmallCNN

F = torch.nn.functional
PREACT = [
    "activation_perturbation",
    "activation_mixing",
    "w_transpose",
    "downstream",
    "self_sharpening",
]


def _mlp(widths=(6, 5), activation="relu", d_in=4, d_out=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return MLP(d_in, d_out, widths, activation=activation, seed=g).double()


def _batch(n=7, d_in=4, d_out=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d_in, generator=g, dtype=torch.float64), torch.randint(
        0, d_out, (n,), generator=g
    )


def _reference(model, x, y, loss_fn):
    """Backprop: parameter gradient and per-layer pre-activation gradients dL/ds_l (via hooks)."""
    outs = []
    layers = [m for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d)]

    def hook(m, a, out):
        out.retain_grad()
        outs.append(out)

    hs = [m.register_forward_hook(hook) for m in layers]
    model.zero_grad()
    loss = loss_fn(model(x), y)
    loss.backward()
    for h in hs:
        h.remove()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return grads, [o.grad.detach() for o in outs]


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("name", PREACT)
@pytest.mark.parametrize("jvp_mode", ["per_layer", "all"])
@pytest.mark.parametrize("backend", ["forward_ad", "func"])
def test_preactivation_jvp_is_dot_of_guess_and_true_gradient(name, jvp_mode, backend):
    model = _mlp()
    x, y = _batch()
    _grads, ds = _reference(model, x, y, F.cross_entropy)
    guess = make_guesser(name, jvp_mode=jvp_mode, backend=backend)(
        model, None, x, y, F.cross_entropy, seed=_gen()
    )
    dots = [
        None if t is None else (d * t).flatten(1).sum(1)
        for d, t in zip(ds, guess.tangents, strict=True)
    ]
    for i, dot in enumerate(dots):
        if dot is None:
            continue
        expected = dot if jvp_mode == "per_layer" else sum(d for d in dots if d is not None)
        torch.testing.assert_close(guess.jvps[i], expected, rtol=0, atol=1e-10)
    # the weight update is the outer product of eq. (3): sum_b d_b eps_b x_b^T
    lin = model.linear_layers()
    h = x
    for i, layer in enumerate(lin):
        if guess.tangents[i] is not None:
            cot = guess.jvps[i][:, None] * guess.tangents[i]
        else:  # self-sharpening's exact last layer
            cot = ds[i]
        name_w = f"layers.{2 * i}.weight"
        torch.testing.assert_close(
            guess.grads[name_w], layer.multiplier * cot.T @ h, rtol=0, atol=1e-12
        )
        torch.testing.assert_close(
            guess.grads[f"layers.{2 * i}.bias"], cot.sum(0), rtol=0, atol=1e-12
        )
        h = torch.relu(layer(h)).detach()


def test_self_sharpening_last_layer_is_exact():
    model = _mlp()
    x, y = _batch()
    grads, _ = _reference(model, x, y, F.cross_entropy)
    guess = SelfSharpening()(model, None, x, y, F.cross_entropy, seed=_gen())
    torch.testing.assert_close(
        guess.grads["layers.4.weight"], grads["layers.4.weight"], atol=1e-12, rtol=0
    )
    assert guess.tangents[-1] is None and bool((guess.jvps[-1] == 0).all())
    # uniform U[0,1) noise at the downstream post-activation: eps = D W^T D xi with xi >= 0
    assert all(t is not None for t in guess.tangents[:-1])


def test_kappa_output_scale_in_exact_error():
    model = MLP(4, 3, (5,), kappa=3.0, seed=_gen(2)).double()
    x, y = _batch()
    grads, _ = _reference(model, x, y, F.cross_entropy)
    guess = SelfSharpening()(model, None, x, y, F.cross_entropy, seed=_gen())
    torch.testing.assert_close(
        guess.grads["layers.2.weight"], grads["layers.2.weight"], atol=1e-12, rtol=0
    )


@pytest.mark.parametrize("backend", ["forward_ad", "func"])
def test_directional_descent_jvp_is_dot_with_true_gradient(backend):
    model = _mlp()
    x, y = _batch()
    grads, _ = _reference(model, x, y, F.cross_entropy)
    guess = DirectionalDescent(backend=backend)(model, None, x, y, F.cross_entropy, seed=_gen())
    dot = sum((grads[n] * guess.tangents[n]).sum() for n in grads)
    torch.testing.assert_close(guess.jvps[0], dot, rtol=0, atol=1e-10)
    for n in grads:
        torch.testing.assert_close(guess.grads[n], dot * guess.tangents[n], rtol=0, atol=1e-12)


def test_matched_cosine_has_the_requested_cosine():
    model = _mlp()
    x, y = _batch()
    grads, _ = _reference(model, x, y, F.cross_entropy)
    guess = MatchedCosine(0.2)(model, None, x, y, F.cross_entropy, seed=_gen())
    space = ParamSpace(model)
    g, gh, v = (space.flatten(d) for d in (grads, guess.grads, guess.tangents))
    torch.testing.assert_close(gh @ g / (gh.norm() * g.norm()), torch.tensor(0.2, dtype=g.dtype))
    torch.testing.assert_close(guess.jvps[0], g @ v, rtol=0, atol=1e-10)
    torch.testing.assert_close(v.norm(), torch.tensor(1.0, dtype=g.dtype))


def test_backends_agree():
    model = _mlp()
    x, y = _batch()
    a = WTranspose(backend="forward_ad")(model, None, x, y, F.cross_entropy, seed=_gen(3))
    b = WTranspose(backend="func")(model, None, x, y, F.cross_entropy, seed=_gen(3))
    for n in a.grads:
        torch.testing.assert_close(a.grads[n], b.grads[n], rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------- subspaces
def _max_angle(A, B):
    return float(scipy.linalg.subspace_angles(A.numpy(), B.numpy()).max())


@pytest.mark.parametrize("guesser", [WTranspose(), Downstream()])
def test_linear_network_guesses_lie_in_range_of_next_weight_transpose(guesser):
    """Seed 003 eq. (6): for a linear network the guess for layer l lies in range(W_{l+1}^T)."""
    model = _mlp(widths=(6, 2, 6), activation="identity", d_in=5)
    x, y = _batch(n=16, d_in=5)
    guess = guesser(model, None, x, y, F.cross_entropy, seed=_gen())
    W1 = model.linear_layers()[1].weight.detach()  # 2 x 6: range(W1^T) has dimension 2
    eps0 = guess.tangents[0]  # (16, 6)
    assert torch.linalg.matrix_rank(eps0) == 2
    assert _max_angle(eps0.T, W1.T) < 1e-6
    # the weight update of layer 0 has its column space in range(W1^T) as well
    G0 = guess.grads["layers.0.weight"]  # 6 x 5
    U = torch.linalg.svd(G0).U[:, :2]
    assert _max_angle(U, W1.T) < 1e-6


def test_linear_network_two_layer_downstream_lies_in_product_range():
    model = _mlp(widths=(6, 6, 2, 6), activation="identity", d_in=5)
    x, y = _batch(n=16, d_in=5)
    guess = Downstream(depth=2)(model, None, x, y, F.cross_entropy, seed=_gen())
    lin = model.linear_layers()
    M = (lin[2].weight @ lin[1].weight).detach().T  # 6 x 2
    assert _max_angle(guess.tangents[0].T, M) < 1e-6


# ----------------------------------------------------------------------------- bias tests
def test_directional_descent_is_unbiased_at_the_sqrt_rate():
    """E||mean_K - g||^2 = (N + 1) ||g||^2 / K for v ~ N(0, I)."""
    model = _mlp(widths=(4,), d_in=3, d_out=2)
    x, y = _batch(n=5, d_in=3, d_out=2)
    grads, _ = _reference(model, x, y, F.cross_entropy)
    space = ParamSpace(model)
    g = space.flatten(grads)
    N = space.dim
    ratios = []
    for K in (256, 1024, 4096):
        est = DirectionalDescent(normalize=False, num_guesses=K)(
            model, None, x, y, F.cross_entropy, seed=_gen(K)
        )
        err2 = float((space.flatten(est.grads) - g).norm() ** 2)
        ratios.append(err2 * K / ((N + 1) * float(g.norm() ** 2)))
    # each normalized squared error is a mean-one variable with relative sd ~ sqrt(2/N)
    assert all(0.4 < r < 1.8 for r in ratios), ratios


def test_directional_descent_paper_scale_is_gradient_over_n():
    model = _mlp(widths=(4,), d_in=3, d_out=2)
    x, y = _batch(n=5, d_in=3, d_out=2)
    grads, _ = _reference(model, x, y, F.cross_entropy)
    space = ParamSpace(model)
    g, N, K = space.flatten(grads), space.dim, 4096
    est = DirectionalDescent(num_guesses=K)(model, None, x, y, F.cross_entropy, seed=_gen(5))
    err = float((N * space.flatten(est.grads) - g).norm())
    assert err < 4 * math.sqrt((N + 1) / K) * float(g.norm())


def test_activation_perturbation_is_unbiased():
    """K replicated copies of one batch average K independent guesses (mean loss)."""
    model = _mlp()
    x, y = _batch(n=2)
    grads, _ = _reference(model, x, y, F.cross_entropy)
    space = ParamSpace(model)
    g = space.flatten(grads)
    K = 4000
    xs, ys = x.repeat(K, 1), y.repeat(K)
    est = ActivationPerturbation()(model, None, xs, ys, F.cross_entropy, seed=_gen(1))
    rel = float((space.flatten(est.grads) - g).norm() / g.norm())
    assert rel < 5 * math.sqrt(20 / K)


# ----------------------------------------------------------------------------- conv nets
@pytest.mark.parametrize(
    "name", ["activation_perturbation", "w_transpose", "downstream", "activation_mixing"]
)
def test_conv_net_jvps(name):
    model = SmallCNN(channels=(2, 3), image_size=8).double()
    g = _gen(4)
    x = torch.randn(3, 1, 8, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (3,), generator=g)
    _grads, ds = _reference(model, x, y, F.cross_entropy)
    guess = make_guesser(name)(model, None, x, y, F.cross_entropy, seed=_gen())
    for i, t in enumerate(guess.tangents):
        torch.testing.assert_close(guess.jvps[i], (ds[i] * t).flatten(1).sum(1), rtol=0, atol=1e-10)
    assert guess.grads["features.0.weight"].shape == (2, 1, 3, 3)


def test_activation_mixing_is_in_span_of_masked_activations():
    model = _mlp(widths=(8, 8), d_in=4)
    x, y = _batch(n=3)
    guess = ActivationMixing()(model, None, x, y, F.cross_entropy, seed=_gen())
    h = torch.relu(model.linear_layers()[0](x)).detach()  # x_1 = relu(s_0), 3 x 8
    for b in range(3):
        mask = (h[b] > 0).double()
        eps = guess.tangents[0][b]
        assert bool((eps[mask == 0] == 0).all())
        coef = torch.linalg.lstsq(h.T * mask[:, None], eps[:, None]).solution
        torch.testing.assert_close((h.T * mask[:, None]) @ coef, eps[:, None], atol=1e-10, rtol=0)
        torch.testing.assert_close(eps.norm(), torch.tensor(math.sqrt(8.0), dtype=eps.dtype))


def test_subset_of_parameters():
    model = _mlp()
    x, y = _batch()
    space = ParamSpace(model, ["layers.2.weight"])
    guess = WTranspose()(space, None, x, y, F.cross_entropy, seed=_gen())
    assert list(guess.grads) == ["layers.2.weight"]


# ----------------------------------------------------------------------------- errors
def test_errors():
    model = _mlp()
    x, y = _batch()
    with pytest.raises(ValueError, match="backend: expected"):
        WTranspose(backend="jax")
    with pytest.raises(ValueError, match="jvp_mode: expected"):
        WTranspose(jvp_mode="some")
    with pytest.raises(ValueError, match="num_guesses: expected"):
        DirectionalDescent(num_guesses=0)
    with pytest.raises(ValueError, match="cosine: expected"):
        MatchedCosine(1.5)
    with pytest.raises(ValueError, match="depth: expected"):
        Downstream(depth=0)
    with pytest.raises(ValueError, match="noise: expected"):
        Downstream(noise="cauchy")
    with pytest.raises(ValueError, match="name: expected"):
        make_guesser("backprop")
    with pytest.raises(TypeError, match="loss_fn: expected a callable"):
        WTranspose()(model, None, x, y, "ce")
    with pytest.raises(TypeError, match="model: expected"):
        WTranspose()("net", None, x, y, F.cross_entropy)
    with pytest.raises(TypeError, match="x, y: expected tensors"):
        WTranspose()(model, None, x.numpy(), y, F.cross_entropy)
    with pytest.raises(ValueError, match="x, y: expected equal non-zero lengths"):
        WTranspose()(model, None, x, y[:3], F.cross_entropy)
    with pytest.raises(ValueError, match="values: expected exactly"):
        WTranspose()(model, {"layers.0.weight": model.layers[0].weight}, x, y, F.cross_entropy)
    with pytest.raises(ValueError, match="loss_fn: expected a scalar loss"):
        WTranspose()(model, None, x, y, lambda o, t: F.cross_entropy(o, t, reduction="none"))


def test_layer_errors():
    x, _y = _batch()
    shared = nn.Linear(4, 4).double()
    net = nn.Sequential(shared, nn.ReLU(), shared)
    with pytest.raises(ValueError, match="run once per forward pass"):
        WTranspose()(net, None, x, torch.randn(7, 4, dtype=torch.float64), F.mse_loss)
    tied = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)).double()
    tied[2].weight = tied[0].weight  # one parameter, two layers: named_parameters lists it once
    with pytest.raises(ValueError, match="'2.weight' tied to '0.weight'"):
        WTranspose()(tied, None, x, torch.randn(7, 4, dtype=torch.float64), F.mse_loss)

    class NoLayer(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(4, dtype=torch.float64))

        def forward(self, x):
            return x * self.w

    with pytest.raises(ValueError, match="at least one Linear or Conv2d"):
        WTranspose()(NoLayer(), None, x, x, F.mse_loss)
    net2 = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)).double()
    with pytest.raises(ValueError, match="weight or bias of a Linear or Conv2d"):
        WTranspose()(net2, None, x, x, F.mse_loss)


def test_registry_names():
    assert set(GUESSERS) == {*PREACT, "directional_descent", "matched_cosine"}
    for name, cls in GUESSERS.items():
        assert cls.name == name


def test_guessers_that_pass_through_the_next_layer_refuse_non_chains() -> None:
    """Two parallel branches: W^T, downstream and mixing gave branch a an exactly zero guess
    (cosine 0) where its gradient has norm 0.198; ActivationPerturbation takes the model."""

    class Branches(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.head = nn.Linear(4, 5), nn.Linear(4, 5), nn.Linear(10, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], dim=1))

    torch.manual_seed(0)
    model = Branches().double()
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    ce = nn.functional.cross_entropy
    for guesser in (WTranspose(), Downstream(), ActivationMixing(), SelfSharpening()):
        with pytest.raises(ValueError, match="needs the Linear/Conv2d layers to form a chain"):
            guesser(model, None, x, y, ce, seed=0)
    g = ActivationPerturbation()(model, None, x, y, ce, seed=0)
    assert float(g.grads["a.weight"].norm()) > 0


def test_batch_statistics_and_one_parameter_are_refused() -> None:
    """BatchNorm2d in training mode: guesses 0.33-0.38 off in the mean and the probe pass
    updated the running statistics; MatchedCosine on one parameter returned NaN."""
    torch.manual_seed(0)
    cnn = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)
    ).double()
    before = cnn[1].running_mean.clone()
    x, y = torch.randn(6, 1, 6, 6, dtype=torch.float64), torch.randint(0, 3, (6,))
    with pytest.raises(ValueError, match="normalise by the batch's statistics"):
        ActivationPerturbation()(cnn, None, x, y, nn.functional.cross_entropy, seed=0)
    assert torch.equal(cnn[1].running_mean, before)
    one = nn.Linear(1, 1, bias=False).double()
    x1, y1 = torch.randn(4, 1, dtype=torch.float64), torch.randn(4, 1, dtype=torch.float64)
    mse = nn.functional.mse_loss
    with pytest.raises(ValueError, match="only cosine=1 is defined"):
        MatchedCosine(0.5)(one, None, x1, y1, mse, seed=0)
    g = MatchedCosine(1.0)(one, None, x1, y1, mse, seed=0)
    w = one.weight.detach().clone().requires_grad_(True)
    (true,) = torch.autograd.grad(mse(x1 @ w.T, y1), w)
    torch.testing.assert_close(g.grads["weight"], true)
