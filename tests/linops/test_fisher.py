"""EmpiricalFisherOperator and FisherOperator against independent float64 references.

The references are built here with ``torch.func`` on one sample at a time: per-sample
parameter gradients of the per-sample (sum-reduced) loss for the empirical Fisher, and
``J_n^T (d^2 l / df^2) J_n`` with the output Hessian by ``torch.func.hessian`` for the exact
Fisher, scaled by ``c = 1`` (sum), ``1/N`` (cross-entropy mean) or ``1/(N C)`` (MSE / BCE
mean). curvlinops 3.0.1 is compared where it is installed (it is not a dependency).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

from linops import EmpiricalFisherOperator, FisherOperator, GGNOperator
from trainers.models import SmallCNN

C = 3
N = 10
LOSSES = {"ce": nn.CrossEntropyLoss, "mse": nn.MSELoss, "bce": nn.BCEWithLogitsLoss}


def _model(kind: str) -> nn.Module:
    torch.manual_seed(1)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, C)).double()
    return SmallCNN(1, C, channels=(2, 2), image_size=4).double()


def _data(kind: str, loss: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    shape = (N, 4) if kind == "mlp" else (N, 1, 4, 4)
    X = torch.randn(*shape, generator=g, dtype=torch.float64)
    if loss == "ce":
        y = torch.randint(0, C, (N,), generator=g)
    elif loss == "mse":
        y = torch.randn(N, C, generator=g, dtype=torch.float64)
    else:
        y = torch.randint(0, 2, (N, C), generator=g).double()
    return X, y


def _batches(X: torch.Tensor, y: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(X[:4], y[:4]), (X[4:], y[4:])]  # two batches of unequal size


class _Ref:
    """Flat-parameter per-sample functions of a model (float64, one sample at a time)."""

    def __init__(self, model: nn.Module, loss: str, reduction: str) -> None:
        self.model, self.loss, self.reduction = model, loss, reduction
        self.names = [n for n, _ in model.named_parameters()]
        self.shapes = [p.shape for _, p in model.named_parameters()]
        self.theta = torch.cat([p.detach().reshape(-1) for _, p in model.named_parameters()])

    def _params(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        out, i = {}, 0
        for n, s in zip(self.names, self.shapes, strict=True):
            k = math.prod(s)
            out[n] = theta[i : i + k].reshape(s)
            i += k
        return out

    def f(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.model, self._params(theta), (x[None],))[0]

    def ell(self, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-sample loss, summed over the sample's outputs."""
        fn = LOSSES[self.loss](reduction="sum")
        return fn(f[None], y[None])

    def scale(self) -> float:
        if self.reduction == "sum":
            return 1.0
        return 1.0 / N if self.loss == "ce" else 1.0 / (N * C)

    def empirical_fisher(self, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        grads = [
            torch.func.grad(lambda t, x=x, yy=yy: self.ell(self.f(t, x), yy))(self.theta)
            for x, yy in zip(X, y, strict=True)
        ]
        G = torch.stack(grads)
        return self.scale() * G.T @ G

    def jacobian(self, x: torch.Tensor) -> torch.Tensor:
        return torch.func.jacrev(lambda t: self.f(t, x))(self.theta)

    def fisher(self, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        total = 0
        for x, yy in zip(X, y, strict=True):
            Jn, fn = self.jacobian(x), self.f(self.theta, x).detach()
            Hn = torch.func.hessian(lambda f, yy=yy: self.ell(f, yy))(fn)
            total = total + Jn.T @ Hn @ Jn
        return self.scale() * total

    def mc_fisher(self, batches: list, M: int, seed: int) -> torch.Tensor:
        """Labels drawn from the predictive distribution, batch after batch, from one seed."""
        gen = torch.Generator().manual_seed(seed)
        total = 0
        for X, _ in batches:
            out = torch.stack([self.f(self.theta, x).detach() for x in X])
            if self.loss == "mse":
                mean = torch.zeros(M, *out.shape, dtype=out.dtype)
                G = 2 * torch.normal(mean, torch.as_tensor(math.sqrt(0.5)), generator=gen)
            elif self.loss == "ce":
                p = out.softmax(1)
                lab = p.multinomial(M, replacement=True, generator=gen).T
                G = p - nn.functional.one_hot(lab, C).double()
            else:
                p = out.sigmoid().expand(M, -1, -1)
                G = p - p.bernoulli(generator=gen)
            for i, x in enumerate(X):
                JtG = self.jacobian(x).T @ G[:, i].T  # (m, M)
                total = total + JtG @ JtG.T / M
        return self.scale() * total


def _rel(A: torch.Tensor, B: torch.Tensor) -> float:
    return float((A - B).abs().max() / B.abs().max())


@pytest.mark.parametrize("route", ["chain", "autograd"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("loss", ["ce", "mse", "bce"])
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_fisher_family_matches_reference(kind: str, loss: str, reduction: str, route: str) -> None:
    model = _model(kind)
    X, y = _data(kind, loss)
    ref = _Ref(model, loss, reduction)
    fn = LOSSES[loss](reduction=reduction)
    data = _batches(X, y)
    EF = EmpiricalFisherOperator(model, fn, data, route=route)
    assert _rel(EF.to_dense(), ref.empirical_fisher(X, y)) < 1e-12
    F = FisherOperator(model, fn, data, route=route)
    exact = ref.fisher(X, y)
    assert _rel(F.to_dense(), exact) < 1e-12
    # the exact Fisher is the GGN for these three losses
    assert _rel(F.to_dense(), GGNOperator(model, fn, data, route=route).to_dense()) < 1e-12
    FM = FisherOperator(model, fn, data, route=route, mc_samples=3, seed=7)
    assert _rel(FM.to_dense(), ref.mc_fisher(data, 3, 7)) < 1e-12
    assert EF.is_symmetric and F.route.startswith(route)  # ", one vector per pass" may follow
    # exact diagonals from the per-sample output-space factors
    assert _rel(EF.diagonal(max_samples=3), torch.diagonal(ref.empirical_fisher(X, y))) < 1e-12
    assert _rel(F.diagonal(), torch.diagonal(exact)) < 1e-12
    assert _rel(FM.diagonal(), torch.diagonal(ref.mc_fisher(data, 3, 7))) < 1e-12


def test_products_of_blocks_and_vectors_agree() -> None:
    model = _model("mlp")
    X, y = _data("mlp", "ce")
    F = FisherOperator(model, nn.CrossEntropyLoss(), _batches(X, y), mc_samples=5, seed=0)
    dense = F.to_dense()
    V = torch.randn(F.shape[1], 11, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert _rel(F @ V, dense @ V) < 1e-13
    assert _rel(torch.as_tensor(F @ V[:, 0].numpy()), dense @ V[:, 0]) < 1e-13
    # a fixed draw: the same matrix product after product, and after the graphs are rebuilt
    F.clear_cache()
    assert _rel(F.to_dense(), dense) < 1e-15
    uncached = FisherOperator(
        model, nn.CrossEntropyLoss(), _batches(X, y), mc_samples=5, seed=0, cache=False
    )
    assert _rel(uncached.to_dense(), dense) < 1e-15
    assert _rel(uncached.to_dense(), dense) < 1e-15


def test_seed_forms() -> None:
    model = _model("mlp")
    X, y = _data("mlp", "ce")
    kw = {"mc_samples": 2}
    a = FisherOperator(model, nn.CrossEntropyLoss(), (X, y), seed=3, **kw).to_dense()
    b = FisherOperator(model, nn.CrossEntropyLoss(), (X, y), seed=4, **kw).to_dense()
    assert _rel(a, b) > 1e-3  # another draw
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    c = FisherOperator(model, nn.CrossEntropyLoss(), (X, y), seed=g1, **kw).to_dense()
    d = FisherOperator(model, nn.CrossEntropyLoss(), (X, y), seed=g2, **kw).to_dense()
    assert _rel(c, d) == 0.0
    e = FisherOperator(model, nn.CrossEntropyLoss(), (X, y), **kw)  # seed None: fixed draw
    assert _rel(e.to_dense(), e.to_dense()) == 0.0


def test_float32_copy() -> None:
    model = _model("mlp")
    X, y = _data("mlp", "mse")
    EF = EmpiricalFisherOperator(model, nn.MSELoss(), (X, y))
    EF32 = EF.to(torch.float32)
    assert EF32.torch_dtype == torch.float32
    assert _rel(EF32.to_dense().double(), EF.to_dense()) < 1e-5


def test_mc_fisher_error_decays_like_inverse_sqrt_samples() -> None:
    """E||F_M - F||_F^2 = E||F_1 - F||_F^2 / M (an average of M i.i.d. draws): over 24 seeds
    the mean squared error times M must stay constant, and the log-log slope of the RMS
    error must be -1/2."""
    model = _model("mlp")
    X, y = _data("mlp", "ce")
    data = (X, y)
    exact = FisherOperator(model, nn.CrossEntropyLoss(), data).to_dense()
    norm2 = float((exact**2).sum())
    Ms, mse = [1, 4, 16, 64], []
    for M in Ms:
        errs = [
            float(
                (
                    (
                        FisherOperator(
                            model, nn.CrossEntropyLoss(), data, mc_samples=M, seed=s
                        ).to_dense()
                        - exact
                    )
                    ** 2
                ).sum()
            )
            / norm2
            for s in range(24)
        ]
        mse.append(sum(errs) / len(errs))
    scaled = [m * e for m, e in zip(Ms, mse, strict=True)]
    assert max(scaled) / min(scaled) < 2.0, scaled
    logs = torch.log(torch.tensor(Ms, dtype=torch.float64))
    rms = 0.5 * torch.log(torch.tensor(mse, dtype=torch.float64))
    slope = float(
        ((logs - logs.mean()) * (rms - rms.mean())).sum() / ((logs - logs.mean()) ** 2).sum()
    )
    assert -0.62 < slope < -0.38, slope


def test_curvlinops_agreement() -> None:
    curvlinops = pytest.importorskip("curvlinops")
    for kind, loss, reduction in [
        ("mlp", "ce", "mean"),
        ("cnn", "mse", "sum"),
        ("mlp", "bce", "mean"),
    ]:
        model = _model(kind)
        X, y = _data(kind, loss)
        fn = LOSSES[loss](reduction=reduction)
        data = _batches(X, y)
        params = list(model.parameters())
        eye = torch.eye(sum(p.numel() for p in params), dtype=torch.float64)
        theirs = curvlinops.EFLinearOperator(model, fn, params, data) @ eye
        assert _rel(EmpiricalFisherOperator(model, fn, data).to_dense(), theirs) < 1e-12
        mc = curvlinops.FisherMCLinearOperator(model, fn, params, data, seed=11, mc_samples=3)
        ours = FisherOperator(model, fn, data, mc_samples=3, seed=11).to_dense()
        assert _rel(ours, mc @ eye) < 1e-12  # the same sampled labels


def test_errors() -> None:
    model = _model("mlp")
    X, y = _data("mlp", "ce")
    with pytest.raises(ValueError, match="loss_fn: expected nn.CrossEntropyLoss"):
        FisherOperator(model, nn.L1Loss(), (X, y))
    with pytest.raises(ValueError, match="loss_fn: expected nn.CrossEntropyLoss"):
        FisherOperator(model, nn.CrossEntropyLoss(label_smoothing=0.1), (X, y))
    with pytest.raises(ValueError, match="mc_samples: expected None or an integer >= 1, got 0"):
        FisherOperator(model, nn.CrossEntropyLoss(), (X, y), mc_samples=0)
    with pytest.raises(TypeError, match="seed: expected an int, a torch.Generator or None"):
        FisherOperator(model, nn.CrossEntropyLoss(), (X, y), mc_samples=1, seed=1.5)
    seq = nn.Sequential(nn.Linear(4, 6), nn.Unflatten(1, (C, 2))).double()
    yseq = torch.zeros(N, 2, dtype=torch.long)
    with pytest.raises(ValueError, match=r"expected \(N, C\) logits .* got outputs of shape"):
        FisherOperator(seq, nn.CrossEntropyLoss(), (X, yseq)).to_dense()

    def plain(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return ((out - target) ** 2).sum()

    Y = torch.zeros(N, C, dtype=torch.float64)
    with pytest.raises(ValueError, match="reduction: expected 'mean' or 'sum' for a plain loss"):
        EmpiricalFisherOperator(model, plain, (X, Y)).to_dense()
    ours = EmpiricalFisherOperator(model, plain, (X, Y), reduction="sum").to_dense()
    ref = _Ref(model, "mse", "sum").empirical_fisher(X, Y)
    assert _rel(ours, ref) < 1e-12


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_ignored_targets_leave_the_fisher(reduction: str) -> None:
    """Samples whose target is cross-entropy's ignore_index are not in the loss: the exact
    Fisher is still the GGN (it kept their blocks: 0.76 relative), the Monte-Carlo Fisher
    approaches it, the empirical Fisher is that of the kept samples."""
    model = _model("mlp")
    X, y = _data("mlp", "ce")
    y[[1, 4, 5]] = -100
    kept = y != -100
    loss = nn.CrossEntropyLoss(reduction=reduction)
    ggn = GGNOperator(model, loss, (X[kept], y[kept])).to_dense()
    assert _rel(GGNOperator(model, loss, (X, y)).to_dense(), ggn) < 1e-13
    assert _rel(FisherOperator(model, loss, (X, y)).to_dense(), ggn) < 1e-13
    mc = FisherOperator(model, loss, (X, y), mc_samples=4000, seed=0).to_dense()
    assert _rel(mc, ggn) < 0.05  # 0.76 with the ignored samples' draws
    ef = EmpiricalFisherOperator(model, loss, (X[kept], y[kept])).to_dense()
    assert _rel(EmpiricalFisherOperator(model, loss, (X, y)).to_dense(), ef) < 1e-13


def test_exact_diagonal_of_models_vmap_cannot_batch() -> None:
    """LSTM and EmbeddingBag have no vmap batching rule: diagonal() raised inside torch; it
    now takes one sample at a time there. max_samples below 1 gave zeros (-1) or a range()
    error (0)."""

    class Recurrent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn, self.head = nn.LSTM(4, 5, batch_first=True), nn.Linear(5, C)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.rnn(x)[0][:, -1])

    torch.manual_seed(0)
    bag = nn.Sequential(nn.EmbeddingBag(9, 5, mode="mean"), nn.Linear(5, C))
    cases = [
        (Recurrent().double(), torch.randn(5, 4, 4, dtype=torch.float64)),
        (bag.double(), torch.randint(0, 9, (6, 4))),
    ]
    for model, X in cases:
        y = torch.randint(0, C, (len(X),))
        for cls in (FisherOperator, EmpiricalFisherOperator):
            op = cls(model, nn.CrossEntropyLoss(), [(X[:3], y[:3]), (X[3:], y[3:])])
            assert _rel(op.diagonal(max_samples=2), op.to_dense().diagonal()) < 1e-13
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="max_samples: expected an integer >= 1"):
            FisherOperator(model, nn.CrossEntropyLoss(), (X, y)).diagonal(max_samples=bad)


def test_exact_diagonal_through_non_reentrant_checkpointing() -> None:
    """torch.func cannot differentiate saved tensor hooks: diagonal() raised torch's raw
    "don't yet support saved tensor hooks" where the products work; autograd's own
    jacobian takes over."""

    class Checkpointed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 5), nn.Linear(5, C)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            inner = torch.utils.checkpoint.checkpoint(
                lambda t: torch.tanh(self.a(t)), x, use_reentrant=False
            )
            return self.b(inner)

    torch.manual_seed(0)
    model = Checkpointed().double()
    X, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, C, (6,))
    for cls in (FisherOperator, EmpiricalFisherOperator):
        op = cls(model, nn.CrossEntropyLoss(), [(X[:4], y[:4]), (X[4:], y[4:])])
        assert _rel(op.diagonal(max_samples=3), op.to_dense().diagonal()) < 1e-13


def _dense(op: object) -> torch.Tensor:
    return op @ torch.eye(op.shape[1], dtype=torch.float64)  # type: ignore[attr-defined,operator]


@pytest.mark.parametrize("reduction", [lambda out, y: out.shape[0], "sum"])
def test_a_given_reduction_weights_the_batches_only(reduction: object) -> None:
    """reduction= for one of torch's losses sets how batches combine, not the per-sample
    scale, which is the loss's own: with MSELoss() and a callable counting samples the
    Fisher and KFAC were 3x the GGN (C = 3 outputs) and the EF a third of its reference."""
    from linops import KFACOperator

    torch.manual_seed(0)
    lin = nn.Linear(4, 3).double()
    X, y = torch.randn(9, 4, dtype=torch.float64), torch.randn(9, 3, dtype=torch.float64)
    data = [(X[:4], y[:4]), (X[4:8], y[4:8]), (X[8:], y[8:])]
    loss = nn.MSELoss()
    G = _dense(GGNOperator(lin, loss, data, reduction=reduction))
    F = _dense(FisherOperator(lin, loss, data, reduction=reduction))
    torch.testing.assert_close(F, G, rtol=1e-12, atol=1e-14)
    if callable(reduction):  # equal per-sample weights: one Linear, MSE, joint block = GGN
        K = KFACOperator(lin, loss, data, reduction=reduction, separate_weight_and_bias=False)
        torch.testing.assert_close(_dense(K), G, rtol=1e-12, atol=1e-14)
    # the empirical Fisher: sum_b w_b sum_n g_n g_n^T / W_b, g_n the sample's gradient of
    # torch's batch loss times W_b = N_b C, w_b the given weights
    ws = [len(xb) for xb, _ in data] if callable(reduction) else [1.0, 1.0, 1.0]
    total = sum(ws) if callable(reduction) else 1.0
    ref = torch.zeros_like(G)
    for (xb, yb), wb in zip(data, ws, strict=True):
        for xn, yn in zip(xb, yb, strict=True):
            lin.zero_grad()
            nn.functional.mse_loss(lin(xn[None]), yn[None], reduction="sum").backward()
            g = torch.cat([lin.weight.grad.reshape(-1), lin.bias.grad])
            ref += (wb / total) * torch.outer(g, g) / (len(xb) * 3)
    E = _dense(EmpiricalFisherOperator(lin, loss, data, reduction=reduction))
    torch.testing.assert_close(E, ref, rtol=1e-12, atol=1e-14)


def test_a_batch_whose_targets_are_all_ignored() -> None:
    """A batch of nothing but ignore_index targets (all padding) raised ZeroDivisionError in
    the Fisher, its diagonal, KFAC and EKFAC; it adds nothing, as to the GGN."""
    from linops import EKFACOperator, KFACOperator

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    X = torch.randn(7, 4, dtype=torch.float64)
    y = torch.tensor([-100, -100, -100, 2, 0, 2, 1])
    data, kept = [(X[:3], y[:3]), (X[3:], y[3:])], [(X[3:], y[3:])]
    loss = nn.CrossEntropyLoss()
    torch.testing.assert_close(
        _dense(GGNOperator(m, loss, data)), _dense(GGNOperator(m, loss, kept))
    )
    # the Monte-Carlo Fisher draws for the ignored batch too (other draws after it): finite
    assert bool(torch.isfinite(_dense(FisherOperator(m, loss, data, mc_samples=2))).all())
    for make in (
        lambda d: FisherOperator(m, loss, d),
        lambda d: KFACOperator(m, loss, d),
        lambda d: EKFACOperator(m, loss, d),
    ):
        torch.testing.assert_close(_dense(make(data)), _dense(make(kept)), rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(
        FisherOperator(m, loss, data).diagonal(), FisherOperator(m, loss, kept).diagonal()
    )
