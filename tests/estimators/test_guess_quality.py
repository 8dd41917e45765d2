"""Quality measures of seed 003 guesses, against dense / backprop references (float64)."""

from __future__ import annotations

import math

import pytest
import torch

import linops
from estimators.guess_bias import GuessCovarianceOperator, GuessNoiseOperator, guess_bias
from estimators.guess_quality import (
    activation_gradient_overlap,
    cosine_saturation,
    guess_cosine,
    one_step_effectiveness,
    true_gradient,
)
from estimators.guesses import ActivationPerturbation, DirectionalDescent, WTranspose
from trainers.models import MLP

F = torch.nn.functional


def _setup(n=8, widths=(6, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    net = MLP(4, 3, widths, seed=g).double()
    x = torch.randn(n, 4, dtype=torch.float64, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return net, x, y


def test_guess_cosine_per_layer_and_whole():
    g = {
        "a.weight": torch.tensor([[1.0, 0.0]]),
        "a.bias": torch.tensor([1.0]),
        "b.weight": torch.tensor([2.0]),
    }
    h = {
        "a.weight": torch.tensor([[1.0, 1.0]]),
        "a.bias": torch.tensor([0.0]),
        "b.weight": torch.tensor([-1.0]),
    }
    cos = guess_cosine(h, g)
    assert cos.per_layer["a"] == pytest.approx(1 / (math.sqrt(2) * math.sqrt(2)))
    assert cos.per_layer["b"] == pytest.approx(-1.0)
    assert cos.whole_model == pytest.approx((1 - 2) / (math.sqrt(3) * math.sqrt(6)))
    with pytest.raises(ValueError, match="guess: expected the parameters"):
        guess_cosine({"a.weight": g["a.weight"]}, g)
    with pytest.raises(ValueError, match=r"guess\['b.weight'\]: expected shape"):
        guess_cosine({**h, "b.weight": torch.ones(2)}, g)


def test_one_step_effectiveness_of_the_gradient_is_one():
    net, x, y = _setup()
    _, grad = true_gradient(net, None, x, y, F.cross_entropy)
    assert one_step_effectiveness(net, None, x, y, F.cross_entropy, grad).effectiveness == 1.0
    neg = {n: -g for n, g in grad.items()}
    res = one_step_effectiveness(net, None, x, y, F.cross_entropy, neg, grad=grad)
    assert res.effectiveness == 0.0 and res.step_size_guess == 0.0
    with pytest.raises(ValueError, match="step_sizes: expected positive"):
        one_step_effectiveness(net, None, x, y, F.cross_entropy, grad, step_sizes=[0.1, -1.0])


def test_cosine_saturation_unbiased_versus_biased():
    net, x, y = _setup(n=4)
    gen = torch.Generator().manual_seed(0)
    counts = [4, 64, 1024, 4096]
    ap = cosine_saturation(
        ActivationPerturbation(), net, None, x, y, F.cross_entropy, counts=counts, seed=gen
    )
    wt = cosine_saturation(WTranspose(), net, None, x, y, F.cross_entropy, counts=counts, seed=gen)
    assert ap.cosine[-1] > 0.99  # unbiased: 1 - cos ~ N / (2K)
    assert wt.cosine[-1] < 0.98  # biased: saturates below 1
    dd = cosine_saturation(
        DirectionalDescent(), net, None, x, y, F.cross_entropy, counts=[1, 2, 3], seed=gen
    )
    assert len(dd.cosine) == 3
    with pytest.raises(ValueError, match="counts: expected increasing"):
        cosine_saturation(WTranspose(), net, None, x, y, F.cross_entropy, counts=[4, 2])


def test_covariance_operator_is_d_wt_w_d():
    net, x, _ = _setup()
    A = GuessNoiseOperator(net, None, x[:1], 0, method="w_transpose")
    lin = net.linear_layers()
    W1 = lin[1].weight.detach()
    D = torch.diag((lin[0](x[:1]).detach()[0] > 0).double())
    torch.testing.assert_close(A.to_dense(), D @ W1.T)
    torch.testing.assert_close(A.H.to_dense(), (D @ W1.T).T)
    C = GuessCovarianceOperator(A)
    torch.testing.assert_close(C.to_dense(), D @ W1.T @ W1 @ D)
    # downstream also masks with the next layer's ReLU: D0 W1^T D1
    Ad = GuessNoiseOperator(net, None, x[:1], 0, method="downstream")
    D1 = torch.diag((lin[1](torch.relu(lin[0](x[:1]))).detach()[0] > 0).double())
    torch.testing.assert_close(Ad.to_dense(), D @ W1.T @ D1)
    torch.testing.assert_close(Ad.H.to_dense(), (D @ W1.T @ D1).T)


def test_guess_bias_matches_dense_and_monte_carlo():
    net, x, y = _setup()
    x1, y1 = x[:1], y[:1]
    C = GuessCovarianceOperator(GuessNoiseOperator(net, None, x1, 0, method="w_transpose"))
    # true gradient at s_0 for this example, by backprop
    s0 = net.linear_layers()[0](x1).detach().requires_grad_(True)
    rest = torch.nn.Sequential(*list(net.layers)[1:])
    (g,) = torch.autograd.grad(F.cross_entropy(rest(s0), y1), s0)
    res = guess_bias(C, g[0])
    Cd = C.to_dense()
    torch.testing.assert_close(res.expected, Cd @ g[0])
    torch.testing.assert_close(res.bias, Cd @ g[0] - g[0])
    # the guesser's mean pre-activation update over K independent guesses converges to Cov g
    K = 20000
    guess = WTranspose()(
        net,
        None,
        x1.repeat(K, 1),
        y1.repeat(K),
        F.cross_entropy,
        seed=1,
    )
    mean = (guess.jvps[0][:, None] * guess.tangents[0]).sum(0)  # (1/K) sum_k (g.eps_k) eps_k
    sd = (
        float(torch.linalg.norm(Cd, 2))
        * float(g.norm())
        * math.sqrt(3.0 * Cd.trace() / torch.linalg.norm(Cd, 2) / K)
    )
    assert float((mean - res.expected).norm()) < 4 * sd
    # activation perturbation is unbiased: Cov = I
    Ci = GuessCovarianceOperator(
        GuessNoiseOperator(net, None, x1, 0, method="activation_perturbation")
    )
    assert guess_bias(Ci, g[0]).relative_bias == pytest.approx(0.0, abs=1e-14)
    with pytest.raises(ValueError, match="gradient: expected a vector of length 6"):
        guess_bias(C, torch.ones(5, dtype=torch.float64))


def test_noise_operator_errors():
    net, x, _ = _setup()
    with pytest.raises(ValueError, match="method: expected one of"):
        GuessNoiseOperator(net, None, x[:1], 0, method="mixing")
    with pytest.raises(ValueError, match="x: expected one example"):
        GuessNoiseOperator(net, None, x, 0)
    with pytest.raises(ValueError, match=r"layer: expected an integer in \[0, 1\]"):
        GuessNoiseOperator(net, None, x[:1], 2)
    with pytest.raises(TypeError, match="model: expected"):
        GuessNoiseOperator("net", None, x[:1], 0)


@pytest.mark.skipif(
    not hasattr(linops, "principal_angles"), reason="linops.principal_angles not yet available"
)
def test_activation_gradient_overlap():
    net, x, y = _setup(n=32, widths=(6, 5))
    res = activation_gradient_overlap(
        net,
        None,
        x,
        y,
        F.cross_entropy,
        1,
        ks=(1, 3, 6),
        seed=0,
    )
    assert res.cosine_activation[-1] == pytest.approx(1.0)  # k = n: the whole space
    assert res.cosine_random[-1] == pytest.approx(1.0)
    assert all(0.0 <= c <= 1.0 + 1e-12 for c in res.principal_angle_cosines)
    with pytest.raises(ValueError, match=r"layer: expected an integer in \[1, 2\]"):
        activation_gradient_overlap(net, None, x, y, F.cross_entropy, 0)
    with pytest.raises(ValueError, match=r"ks: expected integers in \[1, 6\]"):
        activation_gradient_overlap(net, None, x, y, F.cross_entropy, 1, ks=(7,))


def test_activation_gradient_overlap_on_a_residual_block() -> None:
    """h = relu(l0 x); h2 = h + relu(l1 h): the reference gradient at l1's input followed the
    path through l1 only, and the cosines were 20-40% off those of the total dL/dh."""
    import torch.nn.functional as F
    from torch import nn

    class Res(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l0, self.l1, self.l2 = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 3)
            self.tap: object = None

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.l0(x))
            if self.tap is not None:
                h = self.tap(h)  # type: ignore[operator]
            return self.l2(h + torch.relu(self.l1(h)))

    torch.manual_seed(0)
    x, y = torch.randn(20, 4, dtype=torch.float64), torch.randint(0, 3, (20,))
    res = Res().double()
    ks = (1, 2, 4)
    got = activation_gradient_overlap(res, None, x, y, F.cross_entropy, 1, ks=ks, seed=0)
    store: dict[str, torch.Tensor] = {}

    def tap(h: torch.Tensor) -> torch.Tensor:
        store["h"] = h.detach().requires_grad_(True)
        return store["h"]

    res.tap = tap
    (G,) = torch.autograd.grad(F.cross_entropy(res(x), y), store["h"])
    act = store["h"].detach()
    U = torch.linalg.svd((act - act.mean(0)).T, full_matrices=False).U
    Gn = G / G.norm(dim=1, keepdim=True)
    want = [float((Gn @ U[:, :k]).norm(dim=1).mean()) for k in ks]
    assert got.cosine_activation == pytest.approx(want, rel=1e-10)


def test_activation_gradient_overlap_takes_batch_statistics() -> None:
    """Its reference is exact backprop of the batch loss, so BatchNorm in training mode is
    fine there (only per-example guessers refuse it)."""
    import torch.nn.functional as F
    from torch import nn

    torch.manual_seed(0)
    cnn = nn.Sequential(
        nn.Conv2d(1, 2, 3),
        nn.BatchNorm2d(2, affine=False),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(2 * 4 * 4, 3),
    ).double()
    x, y = torch.randn(6, 1, 6, 6, dtype=torch.float64), torch.randint(0, 3, (6,))
    got = activation_gradient_overlap(cnn, None, x, y, F.cross_entropy, 1, ks=(1, 2), seed=0)
    assert all(0 <= c <= 1 + 1e-12 for c in got.cosine_activation)
