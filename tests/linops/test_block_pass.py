"""How a model operator computes a block of vectors: batched where torch batches, else a loop.

The block-pass choice (``op.batched``, ``op.route``, ``op.unbatched_reason``) is made once per
direction at the first many-vector product; it must never change a product beyond rounding
(float64 products against dense ``torch.func`` references, and against the same operator's
single products), and a model whose derivatives vmap would loop over (convolutions and
BatchNorm in torch 2.13) must never run the wide batched pass, not even to find that out.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch

import linops
import linops._model
from tests.linops.test_zoo import _operator, _rel
from tests.linops.zoo import BY_NAME

RTOL = 1e-10


def _recording(widths: list[int]) -> Any:
    real = linops._model.attempt_batched

    def attempt(apply: Any, X: torch.Tensor, adjoint: bool, kernels: Any = None) -> Any:
        widths.append(X.shape[1])
        return real(apply, X, adjoint, kernels)

    return attempt


@pytest.mark.parametrize("name", ["H", "JT"])
@pytest.mark.parametrize(
    ("case", "why", "probes"),
    [
        # the cached graph shows the convolution backward: not even the probe runs
        ("resnet-batchnorm-eval", "aten.convolution_backward folds the vectors", []),
        ("conv1d-mish", "aten.convolution_backward folds the vectors", []),
        ("mish-mlp", "vmap has no batching rule for aten::mish_backward", [1]),
    ],
)
def test_blocks_vmap_would_not_batch_take_one_vector_per_pass_without_the_wide_pass(
    case: str, why: str, probes: list[int], name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    op, D = _operator(name, BY_NAME[case])
    widths: list[int] = []
    monkeypatch.setattr(linops._model, "attempt_batched", _recording(widths))
    V = torch.randn(op.shape[1], 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert _rel(op @ V, D @ V) < RTOL
    J = op.args[0] if name == "JT" else op  # J^T wraps the Jacobian operator
    adjoint = name == "JT"
    assert widths == probes  # at most the one-vector probe went through vmap
    assert J.batched[adjoint] is False
    reason = J.unbatched_reason[adjoint]
    assert reason is not None and why in reason
    assert J.route.endswith("one vector per pass")
    widths.clear()
    assert _rel(op @ V, D @ V) < RTOL  # later blocks: a plain loop, no vmap at all
    assert widths == []


@pytest.mark.parametrize(
    ("case", "name"),
    [
        ("residual-layernorm-mlp", "H"),  # native_layer_norm_backward, gelu_backward
        ("residual-layernorm-mlp", "JT"),
        ("transformer-pre-norm-gelu", "H"),  # softmax backward and layer norm
        ("transformer-pre-norm-gelu", "JT"),
    ],
)
def test_blocks_through_norms_and_attention_are_batched(case: str, name: str) -> None:
    """torch.func.vmap has the batching rules torch's older ``is_grads_batched`` vmap lacks."""
    op, D = _operator(name, BY_NAME[case])
    V = torch.randn(op.shape[1], 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    assert _rel(op @ V, D @ V) < RTOL
    J = op.args[0] if name == "JT" else op
    adjoint = name == "JT"
    assert J.batched[adjoint] is True and J.unbatched_reason[adjoint] is None
    assert "one vector per pass" not in J.route


CASES = [
    "resnet-batchnorm-eval",
    "residual-layernorm-mlp",
    "transformer-pre-norm-gelu",
    "group-norm-cnn",
    "ce-class-weights-loader",
]


@pytest.mark.parametrize("op_name", ["H", "GGN", "J", "JT"])
@pytest.mark.parametrize("case", CASES)
def test_the_block_pass_choice_never_changes_a_product(case: str, op_name: str) -> None:
    op, D = _operator(op_name, BY_NAME[case])
    gen = torch.Generator().manual_seed(1)
    V = torch.randn(op.shape[1], 4, dtype=torch.float64, generator=gen)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # GroupNorm's fallback announces itself
        block = op @ V  # the first block decides the pass
        again = op @ V  # and later blocks take it
    singles = torch.stack([op @ V[:, i] for i in range(V.shape[1])], dim=1)
    assert _rel(block, D @ V) < RTOL
    assert _rel(singles, D @ V) < RTOL
    assert _rel(block, singles) < 1e-12
    assert torch.equal(block, again)


@pytest.mark.parametrize("name", ["J", "GGN"])
def test_single_products_of_a_cnn_take_forward_ad_exactly(name: str) -> None:
    op, D = _operator(name, BY_NAME["resnet-batchnorm-eval"])
    gen = torch.Generator().manual_seed(2)
    V = torch.randn(op.shape[1], 3, dtype=torch.float64, generator=gen)
    for i in range(3):  # the first single product decides, the later ones take it
        assert _rel(op @ V[:, i], D @ V[:, i]) < RTOL
    assert op.route == "autograd, forward AD for single vectors"
    assert _rel(op @ V, D @ V) < RTOL  # many vectors: their own choice
    mlp, Dm = _operator(name, BY_NAME["residual-layernorm-mlp"])  # no convolution: the graph
    assert _rel(mlp @ V[: mlp.shape[1], 0], Dm @ V[: mlp.shape[1], 0]) < RTOL
    assert "forward AD" not in mlp.route


class _Square(torch.autograd.Function):
    """x^2 with a backward but no forward-mode rule."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x**2

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return 2 * x * g


class _SquareCNN(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = torch.nn.Conv2d(1, 2, 3), torch.nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(_Square.apply(self.conv(x)).flatten(1))


def test_a_cnn_without_forward_ad_keeps_the_retained_graph_for_single_products() -> None:
    torch.manual_seed(0)
    model = _SquareCNN().double()
    X = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    J = linops.JacobianOperator(model, X)
    ref = linops.JacobianOperator(model, X, route="autograd").to_dense()
    v = torch.randn(J.shape[1], dtype=torch.float64)
    assert _rel(J @ v, ref @ v) < RTOL
    assert J.route == "autograd" and J._single_forward_mode is False
    # and the dense reference of that operator is the one torch.func gives without the Function
    p = {k: v.detach() for k, v in model.named_parameters()}
    f = lambda w, b, hw, hb: torch.nn.functional.linear(  # noqa: E731
        (torch.nn.functional.conv2d(X, w, b) ** 2).flatten(1), hw, hb
    ).reshape(-1)
    cols = torch.func.jacrev(f, argnums=(0, 1, 2, 3))(
        p["conv.weight"], p["conv.bias"], p["head.weight"], p["head.bias"]
    )
    dense = torch.cat([c.reshape(c.shape[0], -1) for c in cols], dim=1)
    assert _rel(ref, dense) < RTOL


@pytest.mark.parametrize("name", ["H", "JT"])
def test_a_loop_of_one_vector_per_pass_allocates_its_buffers_before_any_pass(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing the loop keeps is allocated after a pass: not the columns, not the product.

    A tensor made after a pass lands amid its freed temporaries in the heap and pins them
    (``linops._model._PerVector``); the first block of a convolutional graph is known to be a
    loop before its measured pass, and later blocks before their first pass.
    """
    op, D = _operator(name, BY_NAME["resnet-batchnorm-eval"])
    J = op.args[0] if name == "JT" else op
    events: list[str] = []
    real_init, real_apply = (
        linops._model._PerVector.__init__,
        linops.base.TorchLinearOperator._apply,
    )

    def init(self: Any, *args: Any) -> None:
        events.append("buffers")
        real_init(self, *args)

    def apply(self: Any, X: torch.Tensor, adjoint: bool = False) -> torch.Tensor:
        if self is J:
            events.append("pass")
        return real_apply(self, X, adjoint)

    monkeypatch.setattr(linops._model._PerVector, "__init__", init)
    monkeypatch.setattr(linops.base.TorchLinearOperator, "_apply", apply)
    V = torch.randn(op.shape[1], 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    for _ in J._graphs():  # the graph cached, as after any earlier product
        pass
    first = op @ V
    assert events == ["buffers"] + ["pass"] * 4
    assert J.cache_info().bytes_per_pass is None  # no pass measured: each takes one vector
    events.clear()
    assert torch.equal(op @ V, first)
    assert events == ["buffers"] + ["pass"] * 4
    assert _rel(first, D @ V) < RTOL


def test_a_loop_of_one_vector_per_pass_returns_the_promoted_dtype() -> None:
    """A float32 operator on float64 and complex blocks: the loop's product has their dtype."""
    op, D = _operator("H", BY_NAME["resnet-batchnorm-eval"])
    gen = torch.Generator().manual_seed(4)
    V = torch.randn(op.shape[1], 3, dtype=torch.float64, generator=gen)
    op32 = op.to(torch.float32)
    for block in (V, torch.complex(V, V.flip(1))):
        out = op32 @ block
        singles = torch.stack([op32 @ block[:, i] for i in range(3)], dim=1)
        assert out.dtype == block.dtype and torch.equal(out, singles)
        assert _rel(out, D.to(block.dtype) @ block) < 1e-5
    assert op32.route.endswith("one vector per pass")


def test_a_loop_without_a_measured_pass_still_bounds_its_blocks_by_the_budget() -> None:
    """Where no pass is measured, a vector's own size bounds the block (and probe groups)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 3, 3), torch.nn.BatchNorm2d(3), torch.nn.Tanh(), torch.nn.Flatten(),
        torch.nn.Linear(48, 3),
    ).eval().double()  # fmt: skip
    X, y = torch.randn(6, 1, 6, 6, dtype=torch.float64), torch.randint(0, 3, (6,))
    H = linops.HessianOperator(model, torch.nn.CrossEntropyLoss(), [(X, y)], memory_budget=60_000)
    n = H.shape[1]
    H @ torch.ones(n, dtype=torch.float64)  # the graph cached: the block is known to be a loop
    V = torch.randn(n, 4, dtype=torch.float64)
    assert torch.equal(H @ V, torch.stack([H @ V[:, i] for i in range(4)], dim=1))
    assert H.cache_info().bytes_per_pass is None and H.batched[False] is False
    per = H.bytes_per_vector()
    assert H.vectors_per_pass() == max(1, min(32, H.memory.free_for_passes() // per)) < 32
