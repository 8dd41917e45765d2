"""Every operator on the zoo of models researchers study, against independent references.

For each model of :mod:`tests.linops.zoo` (attention of every kind, normalization layers,
recurrent nets, custom forwards, parametrizations, weight sharing, tuple/dict outputs, losses
over loaders), the Hessian, GGN, Jacobian, its transpose, the NTK and the Hessian of one output
are built densely through the operators' products and compared in float64 with the
references of :mod:`tests.linops.references` (reverse-over-reverse, no vmap). The reference
Hessian itself is checked against a central finite difference of gradients. The regression
tests of the issue's failures follow.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, TensorDataset, WeightedRandomSampler

import linops
from linops._defects import KNOWN_DEFECTS
from tests.linops.references import Reference
from tests.linops.zoo import BY_NAME, ZOO, ZooCase, _mlp

RTOL = 1e-10
OPERATORS = ("H", "GGN", "J", "JT", "NTK", "OH")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / max(float(b.norm()), 1e-300))


def _setup(case: ZooCase) -> tuple[Any, ...]:
    model, X, y, loss = case.build()
    kw = dict(case.kwargs)
    if kw.get("params") == "module:2":
        kw["params"] = model[2]
    names = (
        case.names(model)
        if case.names
        else [n for n, p in model.named_parameters() if p.requires_grad]
    )
    call = case.reference_call(model) if case.reference_call else None
    ref = Reference(model, names, X, output=kw.get("output"), call=call)
    if case.loader_batch:
        data: Any = DataLoader(TensorDataset(X, y), batch_size=case.loader_batch)
        inputs: Any = DataLoader(TensorDataset(X), batch_size=case.loader_batch)
    else:
        data, inputs = (X, y), X
    return model, X, y, loss, kw, ref, data, inputs


def _operator(name: str, case: ZooCase, route: str = "auto") -> tuple[Any, torch.Tensor]:
    model, X, y, loss, kw, ref, data, inputs = _setup(case)
    jkw = {k: v for k, v in kw.items() if k != "reduction"}
    if name == "H":
        return linops.HessianOperator(model, loss, data, route=route, **kw), ref.hessian(loss, y)
    if name == "GGN":
        return linops.GGNOperator(model, loss, data, route=route, **kw), ref.ggn(loss, y)
    if name in ("J", "JT"):
        J = linops.JacobianOperator(model, inputs, route=route, **jkw)
        D = ref.jacobian()
        return (J, D) if name == "J" else (J.T, D.T)
    if name == "NTK":
        D = ref.jacobian()
        return linops.NTKOperator(model, X, route=route, **jkw), D @ D.T
    x = X[:2]
    return linops.OutputHessianOperator(model, x, 1, route=route, **jkw), ref.output_hessian(x, 1)


@pytest.mark.parametrize("op_name", OPERATORS)
@pytest.mark.parametrize("case", ZOO, ids=[c.name for c in ZOO])
def test_zoo_operator_is_exact(case: ZooCase, op_name: str) -> None:
    op, D = _operator(op_name, case)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a block-pass fallback announces itself
        dense = op.to_dense()
    assert _rel(dense, D) < RTOL
    v = torch.randn(op.shape[1], 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert _rel(op @ v, D @ v) < RTOL  # a many-vector product, not only the dense build
    assert _rel(op @ v[:, 0], D @ v[:, 0]) < RTOL  # and a single one


@pytest.mark.parametrize("case", ZOO, ids=[c.name for c in ZOO])
def test_zoo_reference_hessian_agrees_with_finite_differences(case: ZooCase) -> None:
    if not case.finite_difference:
        pytest.skip("autograd's derivatives treat .detach() as a constant, the values do not")
    _, _, y, loss, _, ref, _, _ = _setup(case)
    H = ref.hessian(loss, y)
    assert ref.fd_hessian_error(H, loss, y) < 1e-6


@pytest.mark.parametrize("case", ZOO, ids=[c.name for c in ZOO])
def test_routes_never_disagree(case: ZooCase) -> None:
    """The chain route, where taken, gives the autograd route's products."""
    auto, _ = _operator("H", case)
    v = torch.randn(auto.shape[1], 2, dtype=torch.float64, generator=torch.Generator())
    forced, _ = _operator("H", case, route="autograd")
    assert _rel(auto @ v, forced @ v) < RTOL
    J, _ = _operator("J", case)
    Ja, _ = _operator("J", case, route="autograd")
    assert _rel(J @ v, Ja @ v) < RTOL


# ------------------------------------------------------------------ regressions of the issue
def test_transformers_take_the_math_attention_and_keep_the_users_settings() -> None:
    fast = torch.backends.mha.get_fastpath_enabled()
    op, D = _operator("H", BY_NAME["transformer-post-norm"])
    assert _rel(op.to_dense(), D) < RTOL
    assert op.route.startswith("autograd")
    assert torch.backends.mha.get_fastpath_enabled() == fast


def test_transformer_in_float32_is_close_to_float64() -> None:
    case = BY_NAME["gpt-tied-sequence-ce"]
    model, X, y, loss, _, ref, _, _ = _setup(case)
    H32 = linops.HessianOperator(model.float(), loss, (X, y))
    D = ref.hessian(loss, y)
    v = torch.randn(H32.shape[1], 4, generator=torch.Generator().manual_seed(0))
    assert (H32 @ v).dtype == torch.float32
    assert _rel((H32 @ v).double(), D @ v.double()) < 1e-4


def test_group_norm_blocks_are_batched_and_exact() -> None:
    """torch 2.13's ``is_grads_batched`` raised on GroupNorm's double backward; vmap does not."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(6, 12),
        nn.Unflatten(1, (4, 3)),
        nn.GroupNorm(2, 4),
        nn.Flatten(),
        nn.Tanh(),
        nn.Linear(12, 3),
    ).double()
    X = torch.randn(7, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (7,))
    loss = nn.CrossEntropyLoss()
    op = linops.HessianOperator(model, loss, (X, y), route="autograd")
    D = Reference(model, [n for n, _ in model.named_parameters()], X).hessian(loss, y)
    V = torch.randn(op.shape[1], 4, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _rel(op @ V, D @ V) < RTOL
    assert op.batched[False] is True and op.route == "autograd"


class _DataDependentBackward(torch.autograd.Function):
    """A user's autograd.Function whose backward branches on a value: vmap cannot batch it."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return 2 * x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return 2 * grad if bool(grad.abs().sum() >= 0) else grad


class _CustomBackward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(5, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(_DataDependentBackward.apply(torch.tanh(self.inner(x))))


def test_a_failing_batched_pass_falls_back_to_one_vector_per_pass_visibly() -> None:
    torch.manual_seed(0)
    model = _CustomBackward().double()
    X = torch.randn(6, 5, dtype=torch.float64)
    JT = linops.JacobianOperator(model, X).T
    D = Reference(model, [n for n, _ in model.named_parameters()], X).jacobian().T
    U = torch.randn(JT.shape[1], 4, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="one vector per pass"):
        out = JT @ U
    assert _rel(out, D @ U) < RTOL
    J = JT.args[0]
    assert J.batched[True] is False and J.route.endswith("one vector per pass")
    assert J.unbatched_reason[True].startswith("the batched pass failed")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        assert _rel(JT @ U, D @ U) < RTOL


def test_float32_operator_stays_batched_on_float64_blocks() -> None:
    """The batched/single agreement is judged in the precision the operator computes in."""
    model, X, y, loss = BY_NAME["residual-layernorm-mlp"].build()
    H = linops.HessianOperator(model.float(), loss, (X.float(), y))
    V = torch.randn(H.shape[1], 3, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        out = H @ V
    assert out.dtype == torch.float64 and H.batched[False] is True


@pytest.mark.parametrize(
    "name", ["sequential-subclass-detach", "linear-subclass", "forward-hook", "weight-norm"]
)
def test_models_the_chain_would_misread_take_autograd(name: str) -> None:
    op, D = _operator("J", BY_NAME[name])
    assert _rel(op.to_dense(), D) < RTOL
    assert op.route.startswith("autograd")
    with pytest.raises(ValueError, match="route: 'chain' needs"):
        _operator("J", BY_NAME[name], route="chain")[0] @ torch.ones(op.shape[1]).double()


def test_plain_sequential_still_takes_the_chain() -> None:
    op, D = _operator("H", BY_NAME["ce-class-weights-loader"])
    assert _rel(op.to_dense(), D) < RTOL
    assert op.route == "chain"


def test_weight_norm_hessian_is_exact_and_the_defect_is_listed() -> None:
    op, D = _operator("H", BY_NAME["weight-norm"])
    assert _rel(op.to_dense(), D) < RTOL
    assert any("weight_norm" in d.name for d in KNOWN_DEFECTS)
    # the model itself still computes torch's own weight norm afterwards
    model = BY_NAME["weight-norm"].build()[0]
    pieces = model[0].parametrizations.weight
    assert torch.equal(model[0].weight, torch._weight_norm(pieces.original1, pieces.original0, 0))


def test_old_style_weight_norm_hook_is_exact() -> None:
    torch.manual_seed(0)
    model = _mlp().double()
    nn.utils.weight_norm(model[2])
    X, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    names = [n for n, _ in model.named_parameters()]
    H = linops.HessianOperator(model, nn.CrossEntropyLoss(), (X, y)).to_dense()
    loss = nn.CrossEntropyLoss()
    ref = Reference(model, names, X)
    assert ref.fd_hessian_error(H, loss, y) < 1e-6
    assert _rel(H, H.T) < 1e-12


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0, math.inf])
def test_composed_cdist_and_pdist_equal_torch(p: float) -> None:
    from linops._defects import _cdist, _pdist

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 5, 3, generator=g).double(), torch.randn(2, 4, 3, generator=g).double()
    assert torch.allclose(_cdist(a, b, p), torch.cdist(a, b, p), rtol=1e-12, atol=1e-12)
    assert torch.allclose(_pdist(a[0], p), F.pdist(a[0], p), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
@pytest.mark.parametrize("layout", ["2d", "offsets", "offsets-last", "padding", "weights"])
def test_composed_embedding_bag_equals_torch(mode: str, layout: str) -> None:
    from linops._defects import _embedding_bag

    if layout == "weights" and mode != "sum":
        pytest.skip("per_sample_weights go with mode='sum' only")
    g = torch.Generator().manual_seed(1)
    W = torch.randn(9, 4, generator=g).double()
    kw: dict[str, object] = {"mode": mode}
    if layout in ("2d", "padding", "weights"):
        ids = torch.randint(0, 9, (5, 3), generator=g)
        if layout == "padding":
            ids[1] = 0  # an all-padding bag gives zeros
            kw["padding_idx"] = 0
        if layout == "weights":
            kw["per_sample_weights"] = torch.rand(5, 3, generator=g).double()
    else:
        ids = torch.randint(0, 9, (10,), generator=g)
        kw["offsets"] = torch.tensor([0, 2, 2, 7] + ([10] if layout == "offsets-last" else []))
        kw["include_last_offset"] = layout == "offsets-last"
    ref = F.embedding_bag(ids, W, **kw)  # type: ignore[arg-type]
    assert torch.allclose(_embedding_bag(ids, W, **kw), ref, rtol=1e-13, atol=1e-13)  # type: ignore[arg-type]


def test_models_calling_cdist_and_embedding_bag_are_composed_only_in_products() -> None:
    """The defect is listed, the first pass finds cdist, and the model still calls torch's."""
    assert any("cdist" in d.name for d in KNOWN_DEFECTS)
    model, X, y, loss = BY_NAME["cdist-prototypes"].build()
    op = linops.HessianOperator(model, loss, (X, y))
    assert op.space._compose is None
    op @ torch.ones(op.shape[1], dtype=torch.float64)
    assert op.space._compose is True
    plain = _mlp().double()
    op = linops.HessianOperator(plain, loss, (X, y))
    op @ torch.ones(op.shape[1], dtype=torch.float64)
    assert op.space._compose is False
    with pytest.raises(NotImplementedError, match="_cdist_backward"):  # torch's own call
        (g,) = torch.autograd.grad(model(X).sum(), model.protos, create_graph=True)
        torch.autograd.grad(g.sum(), model.protos)


def test_embedding_bag_with_max_norm_is_refused() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.EmbeddingBag(9, 4, max_norm=1.0), nn.Linear(4, 3)).double()
    ids, y = torch.randint(0, 9, (6, 3)), torch.randint(0, 3, (6,))
    op = linops.HessianOperator(model, nn.CrossEntropyLoss(), (ids, y))
    with pytest.raises(NotImplementedError, match="max_norm"):
        op @ torch.ones(op.shape[1], dtype=torch.float64)


class _SquareOnce(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x**2

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return 2 * x * g


class _OnceDifferentiable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _SquareOnce.apply(self.lin(x))


def test_once_differentiable_functions_are_refused_not_silently_zero() -> None:
    """torch's double backward through them is silently zero (never an error): refused."""
    assert any("once-differentiable" in d.name for d in KNOWN_DEFECTS)
    torch.manual_seed(0)
    model = _OnceDifferentiable().double()
    X, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    ops = {
        "HessianOperator": linops.HessianOperator(model, nn.CrossEntropyLoss(), (X, y)),
        "GGNOperator": linops.GGNOperator(model, nn.CrossEntropyLoss(), (X, y)),
        "JacobianOperator": linops.JacobianOperator(model, X),
    }
    for name, op in ops.items():
        with pytest.raises(NotImplementedError, match=f"^{name}: .*once_differentiable"):
            op @ torch.ones(op.shape[1], dtype=torch.float64)
    J = ops["JacobianOperator"]  # J^T needs first derivatives only, which are right
    JT = J.T @ torch.ones(J.shape[0], dtype=torch.float64)
    (ref,) = torch.autograd.grad(model(X).sum(), model.lin.weight)
    assert torch.allclose(torch.as_tensor(JT)[: ref.numel()], ref.reshape(-1), rtol=1e-12)


def test_a_loss_without_a_second_derivative_is_refused_by_name() -> None:
    torch.manual_seed(0)
    model = _mlp().double()
    X, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))

    def margin(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return F.multi_margin_loss(out, t, reduction="sum")

    for cls in (linops.HessianOperator, linops.GGNOperator):
        op = cls(model, margin, (X, y), reduction="sum")
        with pytest.raises(NotImplementedError, match="no derivative for multi_margin_loss"):
            op @ torch.ones(op.shape[1], dtype=torch.float64)


class _Checkpointed(nn.Module):
    def __init__(self, reentrant: bool, first: bool) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 3)
        self.reentrant, self.first = reentrant, first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch.utils.checkpoint import checkpoint

        if self.first:  # the checkpoint's input does not require grad
            h = checkpoint(lambda t: torch.tanh(self.a(t)), x, use_reentrant=self.reentrant)
            return self.b(h)
        h = torch.tanh(self.a(x))
        return checkpoint(lambda t: self.b(t), h, use_reentrant=self.reentrant)


@pytest.mark.parametrize("first", [True, False])
def test_reentrant_checkpoints_are_refused_and_the_others_exact(first: bool) -> None:
    """A reentrant checkpoint on the inputs hid its parameters: their Hessian was silently 0."""
    torch.manual_seed(0)
    X, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    model = _Checkpointed(reentrant=False, first=first).double()
    H = linops.HessianOperator(model, nn.CrossEntropyLoss(), (X, y)).to_dense()
    # the reference on the same layers without the checkpoint (whose recomputation would use
    # the model's own parameters, not the reference's perturbed ones)
    plain = nn.Sequential(model.a, nn.Tanh(), model.b)
    reference = Reference(plain, ["0.weight", "0.bias", "2.weight", "2.bias"], X)
    assert _rel(H, reference.hessian(nn.CrossEntropyLoss(), y)) < RTOL
    model.reentrant = True
    assert any("reentrant" in d.name for d in KNOWN_DEFECTS)
    with pytest.raises(NotImplementedError, match="use_reentrant=False"):
        op = linops.HessianOperator(model, nn.CrossEntropyLoss(), (X, y))
        op @ torch.ones(op.shape[1], dtype=torch.float64)


@pytest.mark.parametrize("first", [True, False])
@pytest.mark.parametrize(
    "selected", [["a.weight"], ["b.weight", "b.bias"], ["a.bias", "b.weight"]], ids=str
)
def test_non_reentrant_checkpoints_are_exact_on_a_subset_of_parameters(
    first: bool, selected: list[str]
) -> None:
    """``params=`` a subset through a non-reentrant checkpoint: H, GGN and J on that subset."""
    torch.manual_seed(0)
    X, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    model = _Checkpointed(reentrant=False, first=first).double()
    plain = nn.Sequential(model.a, nn.Tanh(), model.b)  # the same layers, no checkpoint
    names = [n.replace("a.", "0.").replace("b.", "2.") for n in selected]
    reference = Reference(plain, names, X)
    loss = nn.CrossEntropyLoss()
    H = linops.HessianOperator(model, loss, (X, y), params=selected).to_dense()
    G = linops.GGNOperator(model, loss, (X, y), params=selected).to_dense()
    J = linops.JacobianOperator(model, X, params=selected).to_dense()
    assert _rel(H, reference.hessian(loss, y)) < RTOL
    assert _rel(G, reference.ggn(loss, y)) < RTOL
    assert _rel(J, reference.jacobian()) < RTOL


class _SavedOnCpu(nn.Module):
    """The same layers with their activations saved on the CPU (saved-tensor hooks, no recompute)."""

    def __init__(self, model: _Checkpointed) -> None:
        super().__init__()
        self.a, self.b = model.a, model.b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autograd.graph.save_on_cpu():
            return self.b(torch.tanh(self.a(x)))


@pytest.mark.parametrize("first", [True, False])
def test_checkpointed_products_elsewhere_than_the_models_parameters_are_refused(
    first: bool,
) -> None:
    """A non-reentrant checkpoint recomputes its block from the module's own parameters: products
    at other values (``params=``, ``dtype=``, the output Hessian's finite differences) were
    silently wrong (99% and 56% off; found by a helper audit). Equal values stay exact."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    X, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    model = _Checkpointed(reentrant=False, first=first).double()
    loss = nn.CrossEntropyLoss()
    names = ["a.weight", "a.bias", "b.weight", "b.bias"]
    own = dict(model.named_parameters())
    other = {n: own[n].detach() + 0.3 * torch.randn(own[n].shape, generator=g) for n in names}
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    ops = {
        "H": lambda: linops.HessianOperator(model, loss, (X, y), params=other),
        "GGN": lambda: linops.GGNOperator(model, loss, (X, y), params=other),
        "J": lambda: linops.JacobianOperator(model, X, params=other),
        "OH": lambda: linops.OutputHessianOperator(model, X, 1, method="finite_difference"),
        "dtype": lambda: linops.HessianOperator(
            model.float(), loss, (X.float(), y), dtype=torch.float64
        ),
    }
    for make in ops.values():
        op = make()
        with pytest.raises(NotImplementedError, match="recomputes the checkpointed blocks"):
            op @ torch.ones(op.shape[1], dtype=torch.float64)
        model.double()
    # without grad nothing is recomputed: a forward pass elsewhere (a line search) is exact
    at_own = linops.HessianOperator(model, loss, (X, y))
    at_own @ v  # a grad-enabled pass: the checkpoint is known
    assert at_own.space._checkpointed
    with torch.no_grad():
        out = at_own.space.functional_call(other, X)
    plain_at = {n.replace("a.", "0.").replace("b.", "2."): t for n, t in other.items()}
    ref_out = torch.func.functional_call(nn.Sequential(model.a, nn.Tanh(), model.b), plain_at, X)
    assert torch.allclose(out, ref_out, rtol=1e-14, atol=1e-15)
    # equal values in other tensors: exact, as at the model's own
    same = {n: own[n].detach().clone() for n in names}
    H = linops.HessianOperator(model, loss, (X, y), params=same)
    ref = linops.HessianOperator(model, loss, (X, y))
    assert torch.allclose(H @ v, ref @ v, rtol=1e-13, atol=1e-15)
    # saved-tensor hooks that do not recompute (save_on_cpu) are not refused
    cpu = _SavedOnCpu(model)
    plain = nn.Sequential(model.a, nn.Tanh(), model.b)
    at = {n.replace("a.", "0.").replace("b.", "2."): t for n, t in other.items()}
    got = linops.HessianOperator(cpu, loss, (X, y), params=other) @ v
    assert torch.allclose(got, linops.HessianOperator(plain, loss, (X, y), params=at) @ v)


def test_loader_losses_weight_batches_by_their_share_of_the_total() -> None:
    for name in ("ce-class-weights-loader", "ce-ignore-index-loader"):
        for op_name in ("H", "GGN"):
            op, D = _operator(op_name, BY_NAME[name])
            assert _rel(op.to_dense(), D) < RTOL


def test_float32_model_with_buffers_and_frozen_layers_in_float64() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 5), nn.Linear(5, 3)
    ).eval()
    model[1].running_mean.uniform_(-1, 1)
    model[3].requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    X, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    H = linops.HessianOperator(model, nn.CrossEntropyLoss(), (X, y), dtype=torch.float64)
    reference = Reference(
        _double_copy(model), [n for n, p in model.named_parameters() if p.requires_grad], X
    )
    assert _rel(H.to_dense(), reference.hessian(nn.CrossEntropyLoss(), y)) < RTOL
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert next(model.parameters()).dtype == torch.float32  # the user's model is unchanged


def _double_copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model).double()


def test_tuple_output_without_a_selector_is_refused_clearly() -> None:
    model, X, *_ = BY_NAME["tuple-output"].build()
    with pytest.raises(
        TypeError, match=r"model: expected the forward pass to return a tensor.*output="
    ):
        linops.JacobianOperator(model, X)
    with pytest.raises(TypeError, match="output: expected the selector to return a tensor"):
        linops.JacobianOperator(model, X, output=lambda out: out[1].item())
    with pytest.raises(TypeError, match="output: expected a callable"):
        linops.JacobianOperator(model, X, output="logits")


def test_plain_function_loss_over_several_batches_needs_its_reduction() -> None:
    model, X, y, loss = BY_NAME["plain-function-loss"].build()
    loader = DataLoader(TensorDataset(X, y), batch_size=4)
    H = linops.HessianOperator(model, loss, loader)
    with pytest.raises(
        ValueError, match="reduction: loss_fn _plain_ce is not one of torch.s losses"
    ):
        H @ torch.ones(H.shape[1], dtype=torch.float64)
    one_batch = linops.HessianOperator(model, loss, (X, y))  # one batch: no ambiguity
    one_batch @ torch.ones(H.shape[1], dtype=torch.float64)
    with pytest.raises(ValueError, match="reduction: expected 'mean', 'sum', None"):
        linops.HessianOperator(model, loss, loader, reduction="avg")
    none = linops.HessianOperator(model, nn.CrossEntropyLoss(reduction="none"), loader)
    with pytest.raises(ValueError, match="reduction='none'"):
        none @ torch.ones(H.shape[1], dtype=torch.float64)


def test_a_callable_reduction_gives_each_batch_its_normaliser() -> None:
    model, X, y, _ = BY_NAME["ce-ignore-index-loader"].build()
    loader = DataLoader(TensorDataset(X, y), batch_size=3)

    def mean_over_kept(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(out, t, reduction="sum") / max(
            int((t != -100).sum()), 1
        )

    H = linops.HessianOperator(
        model, mean_over_kept, loader, reduction=lambda out, t: float((t != -100).sum())
    )
    ref = linops.HessianOperator(model, nn.CrossEntropyLoss(), (X, y))
    assert _rel(H.to_dense(), ref.to_dense()) < RTOL


@pytest.mark.parametrize(
    "sampler",
    [
        lambda ds: WeightedRandomSampler(torch.ones(len(ds)), len(ds)),
        lambda ds: RandomSampler(ds, replacement=True),
        lambda ds: RandomSampler(ds),
    ],
)
def test_samplers_that_change_between_passes_are_refused(sampler: Any) -> None:
    model, X, y, loss = BY_NAME["ce-class-weights-loader"].build()
    ds = TensorDataset(X, y)
    loader = DataLoader(ds, batch_size=4, sampler=sampler(ds))
    with pytest.raises(ValueError, match="draws a different order or resample at every pass"):
        linops.HessianOperator(model, loss, loader)
    linops.HessianOperator(model, loss, loader, allow_reshuffle=True)  # the opt-out


def test_a_custom_sampler_with_a_fixed_order_is_accepted_and_a_changing_one_refused() -> None:
    model, X, y, loss = BY_NAME["ce-class-weights-loader"].build()
    ds = TensorDataset(X, y)
    fixed = DataLoader(ds, batch_size=4, sampler=[8, 1, 2, 3, 0, 4, 5, 6, 7])
    linops.HessianOperator(model, loss, fixed)

    class Drifting(torch.utils.data.Sampler):
        def __init__(self) -> None:
            self.calls = 0

        def __iter__(self) -> Any:
            self.calls += 1
            return iter(range(self.calls % 2, 9))

        def __len__(self) -> int:
            return 9

    with pytest.raises(ValueError, match="Drifting"):
        linops.HessianOperator(model, loss, DataLoader(ds, batch_size=4, sampler=Drifting()))

    class Lengthless(torch.utils.data.Sampler):  # no __len__: compared all the same
        def __init__(self) -> None:
            self.g = torch.Generator().manual_seed(0)

        def __iter__(self) -> Any:
            return iter(torch.randperm(9, generator=self.g).tolist())

    with pytest.raises(ValueError, match="Lengthless"):
        linops.HessianOperator(model, loss, DataLoader(ds, batch_size=4, sampler=Lengthless()))


def test_params_accept_modules_and_prefixes() -> None:
    model, X, *_ = BY_NAME["layer-params-prefix"].build()
    by_module = linops.JacobianOperator(model, X, params=model[2])
    by_prefix = linops.JacobianOperator(model, X, params=["2"])
    by_names = linops.JacobianOperator(model, X, params=["2.weight", "2.bias"])
    assert by_module.space.names == by_prefix.space.names == ["2.weight", "2.bias"]
    assert torch.equal(by_module.to_dense(), by_names.to_dense())
    with pytest.raises(ValueError, match="params: '7' is neither a parameter nor a submodule"):
        linops.JacobianOperator(model, X, params=["7"])
    with pytest.raises(ValueError, match="not part of the model"):
        linops.JacobianOperator(model, X, params=nn.Linear(2, 2))


def test_every_operator_has_a_route() -> None:
    model, X, y, loss = BY_NAME["lstm"].build()
    ops = [
        linops.HessianOperator(model, loss, (X, y)),
        linops.GGNOperator(model, loss, (X, y)),
        linops.JacobianOperator(model, X),
        linops.NTKOperator(model, X),
        linops.OutputHessianOperator(model, X[:1], 0),
    ]
    for op in ops:
        op @ torch.ones(op.shape[1], dtype=torch.float64)
        assert op.route.startswith("autograd")


def test_to_float64_converts_buffers_and_data_on_a_copy() -> None:
    model, X, y, loss = BY_NAME["resnet-batchnorm-eval"].build()
    model32 = model.float()
    H32 = linops.HessianOperator(model32, loss, (X, y))
    H64 = H32.to(torch.float64)
    direct = linops.HessianOperator(model32, loss, (X, y), dtype=torch.float64)
    v = torch.randn(H32.shape[1], 3, dtype=torch.float64)
    assert torch.equal(H64 @ v, direct @ v)
    assert H32.torch_dtype == torch.float32 and next(model32.parameters()).dtype == torch.float32
    assert (H32 @ v).dtype == torch.float64  # computed in float32, returned promoted
    assert _rel(H32 @ v, H64 @ v) < 1e-4


def test_batched_passes_that_vmap_would_loop_become_plain_loops() -> None:
    op, D = _operator("H", BY_NAME["mish-mlp"])
    V = torch.randn(op.shape[1], 3, dtype=torch.float64)
    assert _rel(op @ V, D @ V) < RTOL
    assert op.batched[False] is False
    assert "mish_backward" in op.unbatched_reason[False]
    assert op.route == "autograd, one vector per pass"
    chain, Dc = _operator("H", BY_NAME["ce-class-weights-loader"])
    W = torch.randn(chain.shape[1], 3, dtype=torch.float64)
    assert _rel(chain @ W, Dc @ W) < RTOL
    assert chain.batched[False] is True and chain.route == "chain"


def test_many_vector_jacobians_take_forward_mode_on_the_autograd_route() -> None:
    op, D = _operator("J", BY_NAME["transformer-pre-norm-gelu"])
    V = torch.randn(op.shape[1], 4, dtype=torch.float64)
    assert _rel(op @ V, D @ V) < RTOL
    assert op.route == "autograd, forward mode for many vectors"
    assert _rel(op.T @ (D @ V), D.T @ (D @ V)) < RTOL  # J^T keeps the retained graph


class _Cube(torch.autograd.Function):
    """x^3 with a backward but no forward-mode rule (as many users' custom Functions)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return 3 * x**2 * g


class _CubeNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(_Cube.apply(self.a(x)))


def test_a_model_without_forward_mode_keeps_the_retained_graph() -> None:
    torch.manual_seed(0)
    model = _CubeNet().double()
    X = torch.randn(5, 4, dtype=torch.float64)
    names = [n for n, _ in model.named_parameters()]
    # the reference differentiates x^3 itself, not the custom Function
    ref = Reference(
        model,
        names,
        X,
        call=lambda p, x: (
            p["b.bias"]
            + (torch.nn.functional.linear(x, p["a.weight"], p["a.bias"]) ** 3) @ p["b.weight"].T
        ),
    )
    J = linops.JacobianOperator(model, X)
    V = torch.randn(J.shape[1], 3, dtype=torch.float64)
    assert _rel(J @ V, ref.jacobian() @ V) < RTOL
    assert "forward mode" not in J.route


def test_many_vector_ggn_takes_forward_mode_on_the_autograd_route() -> None:
    # (cross-entropy on (n, C) logits: its output-space Hessian batches; a sequence loss
    # through autograd would not, and such a GGN keeps one vector per pass)
    op, D = _operator("GGN", BY_NAME["transformer-pre-norm-gelu"])
    V = torch.randn(op.shape[1], 4, dtype=torch.float64)
    assert _rel(op @ V, D @ V) < RTOL
    assert op.route == "autograd, forward mode for many vectors"
    copy64 = op.to(torch.float64, device="cpu")
    assert copy64 is op  # same dtype and device: the operator itself
