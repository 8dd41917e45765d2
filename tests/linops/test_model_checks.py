"""Models, losses and parameters whose operator would be wrong are refused when it is made.

Each case gave a silent wrong number before (found by an audit against dense float64
references): the refusal says what is unsupported and what to do.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from linops import EmpiricalFisherOperator, GGNOperator, HessianOperator, JacobianOperator

F64 = torch.float64


def _tokens() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 6, (9, 3), generator=g), torch.randn(9, 2, generator=g, dtype=F64)


class _Bag(nn.Module):
    def __init__(self, emb: nn.Module) -> None:
        super().__init__()
        self.emb, self.head = emb, nn.Linear(4, 2).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.emb(x)
        return self.head(e.mean(dim=1) if e.dim() == 3 else e)


@pytest.mark.parametrize(
    "emb",
    [
        lambda: nn.Embedding(6, 4, scale_grad_by_freq=True),
        lambda: nn.EmbeddingBag(6, 4, scale_grad_by_freq=True),
    ],
)
def test_scale_grad_by_freq_is_refused(emb: object) -> None:
    """The flag divides each row's gradient by its count in the batch: the Hessian came out
    37% off and not symmetric, J^T 19% off (not J's adjoint)."""
    model = _Bag(emb().double())  # type: ignore[operator]
    X, y = _tokens()
    for cls in (HessianOperator, GGNOperator):
        with pytest.raises(ValueError, match="scale_grad_by_freq=True"):
            cls(model, nn.MSELoss(), (X, y))
    with pytest.raises(ValueError, match="scale_grad_by_freq=True"):
        JacobianOperator(model, X)
    model.emb.scale_grad_by_freq = False  # the fix the message names: the same forward pass
    assert HessianOperator(model, nn.MSELoss(), (X, y)).shape[0] == 6 * 4 + 4 * 2 + 2


def test_embedding_max_norm_is_refused_and_weights_untouched() -> None:
    """max_norm renormalised the looked-up rows in place: the user's weights changed by up
    to 1.25 and the Hessian was 80% off the one at the given weights."""
    model = _Bag(nn.Embedding(6, 4, max_norm=0.5).double())
    before = model.emb.weight.detach().clone()
    X, y = _tokens()
    with pytest.raises(ValueError, match="max_norm=0.5"):
        HessianOperator(model, nn.MSELoss(), (X, y))
    assert torch.equal(model.emb.weight.detach(), before)


def test_batch_norm_without_running_statistics_is_refused_in_eval_mode() -> None:
    """BatchNorm1d(track_running_stats=False) normalises by each batch's statistics in eval
    mode too: over batches of 5 the Hessian was off by 5.5 relative (top eigenvalue 19.94
    against 1.41 over the whole data)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False), nn.Tanh(), nn.Linear(4, 2)
    ).double()
    model.eval()
    X, y = torch.randn(12, 3, dtype=F64), torch.randn(12, 2, dtype=F64)
    with pytest.raises(ValueError, match="without running statistics"):
        HessianOperator(model, nn.MSELoss(), (X, y), batch_size=5)
    # one batch, on request: the Hessian of that batch's function
    H = HessianOperator(model, nn.MSELoss(), (X, y), allow_train_mode=True)
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]

    def loss(theta: torch.Tensor) -> torch.Tensor:
        parts, i = {}, 0
        for n, s in zip(names, shapes, strict=True):
            parts[n] = theta[i : i + s.numel()].reshape(s)
            i += s.numel()
        return nn.functional.mse_loss(torch.func.functional_call(model, parts, (X,)), y)

    dense = torch.autograd.functional.hessian(loss, flat)
    torch.testing.assert_close(H @ torch.eye(len(flat), dtype=F64), dense, rtol=1e-10, atol=1e-12)
    model.train()  # training mode: refused as before
    with pytest.raises(ValueError, match="is in training mode"):
        HessianOperator(model, nn.MSELoss(), (X, y))


def test_complex_parameters_are_refused() -> None:
    """A complex weight gave a complex 'Hessian' that was neither complex-linear nor Hermitian
    (xtrace 0.521 against a true 1.053)."""

    class Complex(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(3, 2, dtype=torch.complex128))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (x.to(self.w.dtype) @ self.w).abs()

    X, y = torch.randn(5, 3, dtype=F64), torch.randn(5, 2, dtype=F64)
    with pytest.raises(ValueError, match="expected real parameters"):
        HessianOperator(Complex(), nn.MSELoss(), (X, y))


def test_a_custom_loss_objects_reduction_attribute_is_not_trusted() -> None:
    """A masked MSE module with reduction = 'mean' (over its valid entries) was weighted as a
    mean over samples: over batches of 5 its Hessian was 40% off. Now refused over several
    batches unless reduction= says how it reduces."""

    class MaskedMSE(nn.Module):
        reduction = "mean"

        def forward(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            mask = y != 0
            return ((out - y) ** 2)[mask].sum() / mask.sum()

    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    X, y = torch.randn(10, 3, dtype=F64), torch.randn(10, 2, dtype=F64)
    with pytest.raises(ValueError, match="its own reduction='mean' does not say"):
        HessianOperator(model, MaskedMSE(), (X, y), batch_size=5) @ torch.ones(8, dtype=F64)
    HessianOperator(model, MaskedMSE(), (X, y)) @ torch.ones(8, dtype=F64)  # one batch: fine


def test_targets_that_broadcast_against_the_outputs_are_refused() -> None:
    """Outputs (N, 1) and targets (N,): torch's MSE broadcasts to N x N and only warns; the
    operator over batches of 5 was 14% off the intended Hessian and 54% off the broadcast
    one."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1).double()
    X, y = torch.randn(10, 3, dtype=F64), torch.randn(10, dtype=F64)
    for loss in (nn.MSELoss(), nn.L1Loss(), nn.SmoothL1Loss(), nn.HuberLoss()):
        with pytest.raises(ValueError, match="broadcast against outputs of shape"):
            HessianOperator(model, loss, (X, y), batch_size=5) @ torch.ones(4, dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        HessianOperator(model, nn.MSELoss(), (X, y[:, None]), batch_size=5) @ torch.ones(
            4, dtype=F64
        )


def test_half_precision_is_refused_with_what_to_do() -> None:
    model = nn.Linear(3, 2).bfloat16()
    X, y = torch.randn(4, 3).bfloat16(), torch.randn(4, 2).bfloat16()
    with pytest.raises(TypeError, match="half-precision operators are not supported"):
        HessianOperator(model, nn.MSELoss(), (X, y))


def test_what_the_checks_let_through() -> None:
    """No false alarms: a BatchNorm with running buffers whose flag was switched off (torch's
    eval forward uses the buffers), embeddings whose weight is frozen or not selected, and a
    loss penalising the outputs against a constant (torch warns of that broadcast)."""
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(4)
    model = nn.Sequential(nn.Linear(3, 4), bn, nn.Tanh(), nn.Linear(4, 2)).double().eval()
    X, y = torch.randn(12, 3, dtype=F64), torch.randn(12, 2, dtype=F64)
    G = GGNOperator(model, nn.MSELoss(), (X, y), batch_size=5) @ torch.eye(34, dtype=F64)
    bn.track_running_stats = False
    G2 = GGNOperator(model, nn.MSELoss(), (X, y), batch_size=5) @ torch.eye(34, dtype=F64)
    torch.testing.assert_close(G2, G, rtol=0, atol=0)
    bn.train()  # inside a model in eval mode: batch statistics again, refused
    with pytest.raises(ValueError, match="in training mode or, for BatchNorm"):
        GGNOperator(model, nn.MSELoss(), (X, y), batch_size=5)
    model = _Bag(nn.Embedding(6, 4, scale_grad_by_freq=True, max_norm=100.0).double())
    Xt, yt = _tokens()
    H = HessianOperator(model, nn.MSELoss(), (Xt, yt), params=["head.weight", "head.bias"])
    assert H.shape == (10, 10)
    model.emb.weight.requires_grad_(False)
    assert HessianOperator(model, nn.MSELoss(), (Xt, yt)).shape == (10, 10)

    def penalised(o: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return nn.functional.mse_loss(o, t) + 0.1 * nn.functional.mse_loss(o, torch.zeros(()))

    lin = nn.Linear(3, 2).double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        H = HessianOperator(lin, penalised, (X, y), reduction="mean", batch_size=5)
        H @ torch.ones(8, dtype=F64)


def test_a_subclass_of_torchs_loss_base_is_not_read_as_an_element_mean() -> None:
    """A masked MSE written as a subclass of nn.modules.loss._Loss (reduction='mean' over its
    valid entries) was taken for torch's element mean: 11.9% off over 3 batches."""

    class MaskedMSE(nn.modules.loss._Loss):
        def forward(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            mask = y != 0
            return ((out - y) ** 2)[mask].sum() / mask.sum()

    model = nn.Linear(3, 2).double()
    X, y = torch.randn(10, 3, dtype=F64), torch.randn(10, 2, dtype=F64)
    with pytest.raises(ValueError, match="is not one of torch.s losses"):
        HessianOperator(model, MaskedMSE(), (X, y), batch_size=5) @ torch.ones(8, dtype=F64)


def test_subclasses_of_torchs_losses_that_keep_its_forward() -> None:
    """A subclass of nn.MSELoss changing only __init__ was refused as 'not one of torch's
    losses' (and with reduction='mean' its EF came out 3x too small); one whose own forward
    reshapes (N, 1) outputs to (N,) targets was refused as broadcasting."""

    class MyMSE(nn.MSELoss):
        def __init__(self) -> None:
            super().__init__(reduction="mean")

    class Squeezed(nn.MSELoss):
        def forward(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return super().forward(out.squeeze(-1), y)

    torch.manual_seed(0)
    lin = nn.Linear(3, 2).double()
    X, y = torch.randn(7, 3, dtype=F64), torch.randn(7, 2, dtype=F64)
    eye = torch.eye(8, dtype=F64)
    for op in (GGNOperator, EmpiricalFisherOperator):
        want = op(lin, nn.MSELoss(), (X, y), batch_size=4) @ eye
        torch.testing.assert_close(op(lin, MyMSE(), (X, y), batch_size=4) @ eye, want)
    one = nn.Linear(3, 1).double()
    H = HessianOperator(one, Squeezed(), (X, y[:, 0]), reduction="mean", batch_size=4) @ torch.eye(
        4, dtype=F64
    )
    ref = HessianOperator(one, nn.MSELoss(), (X, y[:, :1]), batch_size=4) @ torch.eye(4, dtype=F64)
    torch.testing.assert_close(H, ref)


def test_the_models_own_loss_as_output() -> None:
    """output= selecting a model's own (0-d) loss: the GGN and the Jacobian raised a bare
    IndexError, and so did the Hessian over several batches with reduction='mean'."""

    class WithLoss(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            out = self.lin(x)
            return {"loss": out.pow(2).mean(), "logits": out}

    torch.manual_seed(0)
    m = WithLoss().double()
    X, y = torch.randn(6, 3, dtype=F64), torch.randn(6, dtype=F64)
    own = lambda o: o["loss"]  # noqa: E731
    ones = torch.ones(8, dtype=F64)
    with pytest.raises(ValueError, match="got a 0-d tensor"):
        GGNOperator(m, lambda o, t: o, (X, y), output=own) @ ones
    with pytest.raises(ValueError, match="got a 0-d tensor"):
        JacobianOperator(m, X, output=own) @ ones
    with pytest.raises(ValueError, match="but they are 0-d"):
        HessianOperator(
            m, lambda o, t: o, (X, y), output=own, batch_size=3, reduction="mean"
        ) @ ones
    H = HessianOperator(
        m, lambda o, t: o, (X, y), output=own, batch_size=3, reduction=lambda o, t: len(t)
    )
    ref = HessianOperator(m.lin, nn.MSELoss(), (X, torch.zeros(6, 2, dtype=F64)))
    torch.testing.assert_close(H @ ones, ref @ ones)


@pytest.mark.parametrize("route", ["auto", "autograd"])
def test_parameters_changed_in_place_after_the_graphs_were_cached(route: str) -> None:
    """An optimizer-like p.mul_(1.5) after a product: cached graphs held the old values while
    the chain route (and forward-mode products) read the live ones, and the products were
    0.16-0.32 off both Jacobians (J v and J^T u not even adjoint). Now refused until
    clear_cache(), after which they are the new Jacobian's."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    X = torch.randn(5, 3, dtype=F64)
    J = JacobianOperator(net, X, route=route)
    V = torch.randn(J.shape[1], 3, dtype=F64)
    J @ V
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(1.5)
    with pytest.raises(RuntimeError, match="changed in place since the operator was made"):
        J @ V
    J.clear_cache()
    torch.testing.assert_close(J @ V, JacobianOperator(net, X) @ V, rtol=1e-12, atol=1e-14)


def test_a_forward_pass_that_updates_a_buffer_is_not_an_in_place_change() -> None:
    """A step counter the forward pass increments: buffers are not version-checked, and what
    the operator's own passes change is its own."""

    class Counter(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 2)
            self.register_buffer("calls", torch.zeros((), dtype=torch.long))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            return self.lin(x)

    torch.manual_seed(0)
    model = Counter().double().eval()
    X, y = torch.randn(8, 3, dtype=F64), torch.randn(8, 2, dtype=F64)
    v = torch.ones(8, dtype=F64)
    for cache in (None, False):
        H = HessianOperator(model, nn.MSELoss(), (X, y), cache=cache)
        torch.testing.assert_close(H @ v, H @ v)


def test_values_given_or_converted_are_not_the_live_models() -> None:
    """An operator at given parameter values (params= a dict of clones) or converted by .to()
    computes with its own copies: training the live model must not refuse it (the first
    version of the in-place check watched the live model's parameters)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    X, y = torch.randn(6, 3, dtype=F64), torch.randn(6, 2, dtype=F64)
    ckpt = {n: p.detach().clone() for n, p in net.named_parameters()}
    G = GGNOperator(net, nn.MSELoss(), (X, y), params=ckpt)
    net32 = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    G64 = GGNOperator(net32, nn.MSELoss(), (X.float(), y.float())).to(torch.float64)
    v = torch.ones(G.shape[1], dtype=F64)
    before, before64 = G @ v, G64 @ v
    for model in (net, net32):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        out = model(X.to(next(model.parameters()).dtype))
        out.pow(2).sum().backward()
        opt.step()
    torch.testing.assert_close(G @ v, before, rtol=0, atol=0)
    torch.testing.assert_close(G64 @ v, before64, rtol=0, atol=0)
