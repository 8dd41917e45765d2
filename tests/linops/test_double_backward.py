"""The kernels of graphs differentiated twice (:mod:`linops._double_backward`).

Batch norm in eval mode as its affine map and convolutions as three autograd Functions that
are each other's derivatives, against torch's own kernels and against finite differences
(``gradcheck``, ``gradgradcheck``); whole operators on such models are checked by the zoo
(``tests/linops/test_zoo.py``: ``resnet-batchnorm-eval``, ``mlp-batchnorm1d-eval``,
``conv-geometry``, ``conv1d-mish``, ``group-norm-cnn``).
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import linops
from linops._defects import KNOWN_DEFECTS, ComposedKernels
from linops._double_backward import affine_batch_norm, batch_norm, covered
from tests.linops.zoo import BY_NAME


def _graph_nodes(tensors: list[torch.Tensor]) -> set[str]:
    """The names of the autograd nodes the tensors' graph runs."""
    names: set[str] = set()
    stack = [t.grad_fn for t in tensors if t.grad_fn is not None]
    seen: set[int] = set()
    while stack:
        fn = stack.pop()
        if fn is None or id(fn) in seen:
            continue
        seen.add(id(fn))
        names.add(type(fn).__name__)
        stack.extend(f for f, _ in fn.next_functions)
    return names


def test_eval_batch_norm_is_its_affine_map_in_hessian_graphs_only() -> None:
    """A Hessian's graph runs no native batch norm in eval mode; other graphs, training mode,
    and the model itself keep torch's kernel (the products are checked by the zoo)."""
    assert any("batch_norm" in d.name for d in KNOWN_DEFECTS)
    model, X, y, loss = BY_NAME["resnet-batchnorm-eval"].build()
    stats = {k: v.clone() for k, v in model.state_dict().items()}
    H = linops.HessianOperator(model, loss, (X, y))
    H @ torch.ones(H.shape[1], dtype=torch.float64)
    nodes = _graph_nodes(H._graph_cache[0].grads)
    assert "NativeBatchNormBackward0" not in nodes and "MulBackward0" in nodes
    J = linops.JacobianOperator(model, X)
    J.T @ torch.ones(J.shape[0], dtype=torch.float64)
    assert "NativeBatchNormBackward0" in _graph_nodes([J._graph_cache[0].out])
    G = linops.GGNOperator(model, loss, (X, y))
    G @ torch.ones(G.shape[1], dtype=torch.float64)
    assert "NativeBatchNormBackward0" in _graph_nodes([G._graph_cache[0][0].out])
    assert all(torch.equal(v, stats[k]) for k, v in model.state_dict().items())
    assert "NativeBatchNormBackward0" in _graph_nodes([model(X)])  # the model: torch's own
    model.train()  # the batch's statistics: torch's kernel, in the Hessian's graph too
    Ht = linops.HessianOperator(model, loss, (X, y), allow_train_mode=True)
    Ht @ torch.ones(Ht.shape[1], dtype=torch.float64)
    assert "NativeBatchNormBackward0" in _graph_nodes(Ht._graph_cache[0].grads)


@pytest.mark.parametrize("shape", [(5, 3), (5, 3, 4), (2, 3, 4, 4), (2, 3, 2, 2, 2)])
@pytest.mark.parametrize("params", ["weight-and-bias", "weight", "bias", "none"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_affine_batch_norm_equals_torchs_inference_kernel(
    shape: tuple[int, ...], params: str, dtype: torch.dtype
) -> None:
    g = torch.Generator().manual_seed(len(shape))
    x = (3 * torch.randn(shape, generator=g) + 2).to(dtype)
    mean, var = torch.randn(3, generator=g).to(dtype), (torch.rand(3, generator=g) + 0.1).to(dtype)
    w = torch.randn(3, generator=g).to(dtype) if params in ("weight-and-bias", "weight") else None
    b = torch.randn(3, generator=g).to(dtype) if params in ("weight-and-bias", "bias") else None
    assert affine_batch_norm(x, mean, var, w, b, False, 0.1, 1e-3)
    ref = F.batch_norm(x, mean, var, w, b, False, 0.1, 1e-3)
    out = batch_norm(x, mean, var, w, b, False, 0.1, 1e-3)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    eps = torch.finfo(dtype).eps
    assert float((out - ref).abs().max()) <= 8 * eps * float(ref.abs().max())


def test_batch_norm_calls_the_affine_map_does_not_cover_are_left_to_torch() -> None:
    from linops._defects import ComposedKernels

    x, stat = torch.randn(4, 3), torch.ones(3)
    assert affine_batch_norm(x, stat, stat, stat, stat, training=False)
    assert not affine_batch_norm(x, stat, stat, stat, stat, training=True)  # batch statistics
    assert not affine_batch_norm(x, None, None, stat, stat, False)  # no running statistics
    assert not affine_batch_norm(x, stat.double(), stat.double())  # would promote
    assert not affine_batch_norm(x.double(), stat, stat)
    assert not affine_batch_norm(x, stat, stat, torch.ones(4))  # torch raises: it should
    assert not affine_batch_norm(x[0], stat, stat)  # one dimension
    assert not affine_batch_norm(torch.ones(4, 3, dtype=torch.int64), stat, stat)
    # through the mode: a call it does not cover raises torch's own error, the others run
    with ComposedKernels(compose=False, twice=True), pytest.raises(RuntimeError):
        F.batch_norm(x, stat, stat, torch.ones(4), None, False)
    with ComposedKernels(compose=False, twice=True):
        out = F.batch_norm(x, stat, stat, None, None, True)  # training: batch statistics
    assert torch.allclose(out, F.batch_norm(x, None, None, None, None, True))


#: (dims, input shape, weight shape, keyword arguments of F.conv{dims}d)
GEOMETRIES: list[tuple[int, tuple[int, ...], tuple[int, ...], dict[str, Any]]] = [
    (2, (2, 3, 6, 5), (4, 3, 3, 3), {"padding": 1}),
    (2, (2, 4, 7, 7), (4, 2, 3, 2), {"stride": 2, "padding": (1, 0), "groups": 2}),
    (2, (1, 2, 9, 8), (3, 2, 3, 3), {"dilation": 2, "padding": 2, "stride": (1, 2)}),
    (1, (3, 2, 11), (4, 2, 3), {"stride": 2, "padding": 1}),
    (3, (1, 2, 5, 4, 4), (2, 2, 2, 3, 2), {"padding": (1, 0, 1), "dilation": (1, 1, 2)}),
]


def _conv_args(case: int, bias: bool) -> tuple[int, torch.Tensor, torch.Tensor, Any, dict]:
    dims, xs, ws, kw = GEOMETRIES[case]
    g = torch.Generator().manual_seed(case)
    x = torch.randn(xs, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(ws, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(ws[0], generator=g, dtype=torch.float64, requires_grad=True) if bias else None
    return dims, x, W, b, kw


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("case", range(len(GEOMETRIES)))
def test_convolution_equals_torchs_and_its_first_two_derivatives_finite_differences(
    case: int, bias: bool
) -> None:
    dims, x, W, b, kw = _conv_args(case, bias)
    torch_conv = (F.conv1d, F.conv2d, F.conv3d)[dims - 1]
    assert covered(torch_conv, (x, W, b), kw) is not None
    out = covered(torch_conv, (x, W, b), kw)(x, W, b, **kw)
    assert torch.allclose(out, torch_conv(x, W, b, **kw), rtol=1e-13, atol=1e-13)
    inputs = (x, W) if b is None else (x, W, b)

    def f(*t: torch.Tensor) -> torch.Tensor:
        return (
            torch.tanh(covered(torch_conv, t, kw)(*t, **kw)) ** 2
        )  # curved: live second derivatives

    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)


@pytest.mark.parametrize("case", range(len(GEOMETRIES)))
def test_convolution_hessian_products_equal_torchs_double_backward(case: int) -> None:
    """``H v`` of a curved function of (x, W, b) through both kernels, in float64."""
    dims, x, W, b, kw = _conv_args(case, True)
    torch_conv = (F.conv1d, F.conv2d, F.conv3d)[dims - 1]
    inputs = (x, W, b)
    g = torch.Generator().manual_seed(10 + case)
    vs = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in inputs]
    weights = torch.randn(torch_conv(*inputs, **kw).shape, generator=g, dtype=torch.float64)

    def hvp(conv: Any) -> list[torch.Tensor]:
        loss = (torch.sin(conv(*inputs, **kw)) * weights).sum()
        grads = torch.autograd.grad(loss, inputs, create_graph=True)
        return list(torch.autograd.grad(grads, inputs, grad_outputs=vs))

    ours = hvp(lambda *t, **k: covered(torch_conv, t, k)(*t, **k))
    ref = hvp(torch_conv)
    for a, r in zip(ours, ref, strict=True):
        assert torch.allclose(a, r, rtol=1e-12, atol=1e-12)
        assert float(r.abs().max()) > 1e-3  # a product that can fail


def test_convolution_calls_it_does_not_cover_are_left_to_torch() -> None:
    x, W = torch.randn(2, 3, 6, 6), torch.randn(4, 3, 3, 3)
    assert covered(F.conv2d, (x, W), {}) is not None
    assert covered(F.conv2d, (x, W), {"padding": "same"}) is None  # string padding
    assert covered(F.conv2d, (x[0], W), {}) is None  # unbatched
    assert covered(F.conv2d, (x.double(), W), {}) is None  # torch raises
    assert covered(F.conv2d, (x, W, torch.ones(3)), {}) is None  # a bias of another size
    assert covered(F.conv2d, (x, W), {"stride": True}) is None
    assert covered(F.conv1d, (x, W), {}) is None  # a 2-d weight for conv1d
    assert covered(F.conv_transpose2d, (x, W.transpose(0, 1)), {}) is None
    assert covered(F.linear, (x, W), {}) is None
    with ComposedKernels(compose=False, twice=True):  # torch's own result and error
        same = F.conv2d(x, W, padding="same")
        with pytest.raises(RuntimeError):
            F.conv2d(x.double(), W)
    assert torch.equal(same, F.conv2d(x, W, padding="same"))


def test_a_cnn_hessian_runs_the_convolution_functions_and_stays_one_vector_per_pass() -> None:
    """The graph is still known to be convolutional: no probe of a batched pass, no warning."""
    model, X, y, loss = BY_NAME["conv-geometry"].build()
    H = linops.HessianOperator(model, loss, (X, y))
    V = torch.randn(H.shape[1], 3, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        HV = H @ V
    assert H.route.endswith("one vector per pass")
    nodes = _graph_nodes(H._graph_cache[0].grads)
    assert {"ConvolutionTwiceBackward", "ConvolutionInputGradBackward"} <= nodes
    assert "ConvolutionBackward0" not in nodes
    for j in range(3):
        assert torch.allclose(HV[:, j : j + 1], H @ V[:, j : j + 1], rtol=1e-13, atol=1e-15)
    J = linops.JacobianOperator(model, X)
    J.T @ torch.ones(J.shape[0], dtype=torch.float64)
    jnodes = _graph_nodes([J._graph_cache[0].out])
    assert "ConvolutionBackward0" in jnodes and "ConvolutionTwiceBackward" not in jnodes


def test_a_streamed_cnn_hessian_probes_its_batched_pass_without_a_warning() -> None:
    """Streamed, the first block product probes the batched pass under vmap (the graph's
    kernels are not known yet): the Functions' backward runs plain kernels there."""
    model, X, y, loss = BY_NAME["conv-geometry"].build()
    data = [(X[:2], y[:2]), (X[2:], y[2:])]
    cached = linops.HessianOperator(model, loss, data)
    streamed = linops.HessianOperator(model, loss, data, cache=False)
    V = torch.randn(cached.shape[1], 3, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = streamed @ V
    assert streamed.route.endswith("one vector per pass")
    assert torch.equal(out, cached @ V)


def test_calls_below_the_default_size_keep_torchs_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.undo()  # the tests' setting (every size) off: the library's own threshold
    from linops import _double_backward

    n = _double_backward.MIN_ELEMENTS["convolution"]
    W = torch.randn(2, 2, 3, 3)
    assert covered(F.conv2d, (torch.randn(n // 32, 2, 4, 4), W), {}) is not None
    assert covered(F.conv2d, (torch.randn(n // 32 - 1, 2, 4, 4), W), {}) is None
    m = _double_backward.MIN_ELEMENTS["batch_norm"]
    stat = torch.ones(2)
    assert covered(F.batch_norm, (torch.randn(m // 2, 2), stat, stat), {}) is not None
    assert covered(F.batch_norm, (torch.randn(m // 2 - 1, 2), stat, stat), {}) is None


def test_a_checkpointed_block_keeps_torchs_kernels_and_is_exact() -> None:
    """Non-reentrant checkpointing recomputes the block outside the operators' mode, with
    torch's kernels: the first pass must save what they save (it raised CheckpointError)."""
    from torch.utils.checkpoint import checkpoint

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c0 = nn.Conv2d(3, 4, 3, padding=1)
            self.block = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Tanh())
            self.fc = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = torch.tanh(self.c0(x))
            x = checkpoint(self.block, x, use_reentrant=False)
            return self.fc(x.mean((2, 3)))

    torch.manual_seed(0)
    model = Net().double().eval()
    model.block[1].running_var.uniform_(0.5, 2.0)
    X, y = torch.randn(4, 3, 8, 8, dtype=torch.float64), torch.randint(0, 3, (4,))
    H = linops.HessianOperator(model, nn.CrossEntropyLoss(), (X, y))
    v = torch.randn(H.shape[1], dtype=torch.float64)
    params = list(model.parameters())
    grads = torch.autograd.grad(nn.CrossEntropyLoss()(model(X), y), params, create_graph=True)
    vs = [
        a.view_as(p)
        for a, p in zip(torch.split(v, [p.numel() for p in params]), params, strict=True)
    ]
    ref = torch.cat([h.reshape(-1) for h in torch.autograd.grad(grads, params, vs)])
    assert torch.allclose(H @ v, ref, rtol=1e-12, atol=1e-14)
    assert "ConvolutionTwiceBackward" in _graph_nodes(H._graph_cache[0].grads)  # c0, outside


class _VmappedEnsemble(nn.Module):
    """Convolutions of stacked weights under ``torch.vmap`` (torch's model-ensembling recipe)."""

    def __init__(self) -> None:
        super().__init__()
        self.W = nn.Parameter(torch.randn(2, 3, 2, 3, 3) * 0.4)
        self.c = nn.Conv2d(2, 2, 1)
        self.bn = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.c(x))
        h = torch.vmap(lambda w: self.bn(F.conv2d(x, w, padding=1)))(self.W)
        return self.fc(torch.tanh(h).mean((0, 3, 4)))


class _FuncJvp(nn.Module):
    """A directional derivative by ``torch.func.jvp`` through a convolution, in the forward."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(2, 3, 3, padding=1)
        self.fc = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, t = torch.func.jvp(lambda z: torch.tanh(self.c(z)), (x,), (torch.ones_like(x),))
        return self.fc((y + 0.5 * t).mean((2, 3)))


class _DualNumbers(nn.Module):
    """The same with ``torch.autograd.forward_ad``'s dual tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch.autograd.forward_ad as fwad

        with fwad.dual_level():
            out = torch.tanh(self.bn(self.c(fwad.make_dual(x, torch.ones_like(x)))))
            primal, tangent = fwad.unpack_dual(out)
        return self.fc((primal + 0.5 * tangent).mean((2, 3)))


@pytest.mark.parametrize("make", [_VmappedEnsemble, _FuncJvp, _DualNumbers])
def test_convolutions_under_a_transform_in_the_forward_keep_torchs_kernels(
    make: type[nn.Module], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Functions have no vmap or jvp rule: a model whose forward runs a convolution inside
    ``torch.vmap``, ``torch.func.jvp`` or a forward-AD level raised at every Hessian product.
    Those calls are torch's; the products equal those with torch's kernels everywhere."""
    from linops import _double_backward

    torch.manual_seed(0)
    model = make().double().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 2.0)
    X, y = torch.randn(3, 2, 6, 6, dtype=torch.float64), torch.tensor([0, 1, 2])
    H = linops.HessianOperator(model, nn.CrossEntropyLoss(), (X, y))
    V = torch.randn(H.shape[1], 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    got, block = H @ V[:, 0], H @ V
    monkeypatch.setattr(
        _double_backward, "MIN_ELEMENTS", dict.fromkeys(["batch_norm", "convolution"], 2**62)
    )
    ref = linops.HessianOperator(model, nn.CrossEntropyLoss(), (X, y)) @ V
    assert torch.allclose(got, ref[:, 0], rtol=1e-12, atol=1e-14)
    assert torch.allclose(block, ref, rtol=1e-12, atol=1e-14)
    assert float(ref.norm()) > 0.1


def test_convolutions_and_batch_norm_under_autocast_keep_torchs_kernels(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``aten.convolution``, which the Functions call, is not autocast (``F.conv2d`` is): under
    ``torch.autocast`` in a forward they computed in float32 where the model computes in
    bfloat16 (products 50% apart). Those calls are torch's: the same products bit for bit."""
    from linops import _double_backward

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
            self.c2, self.fc = nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                h = torch.tanh(self.c2(torch.tanh(self.bn(self.c1(x)))))
            return self.fc(h.float().mean((2, 3)))

    torch.manual_seed(0)
    model = Net().eval()
    model.bn.running_var.uniform_(0.5, 2.0)
    X, y = torch.randn(8, 3, 12, 12), torch.randint(0, 3, (8,))
    v = torch.randn(sum(p.numel() for p in model.parameters()))
    got = linops.HessianOperator(model, nn.CrossEntropyLoss(), (X, y)) @ v
    big = dict.fromkeys(["batch_norm", "convolution"], 2**62)
    monkeypatch.setattr(_double_backward, "MIN_ELEMENTS", big)
    assert torch.equal(got, linops.HessianOperator(model, nn.CrossEntropyLoss(), (X, y)) @ v)


def test_a_compiled_model_traces_without_a_warning_from_the_kernels_mode() -> None:
    """Dynamo cannot trace the C function that reads the saved-tensor hooks: the modes that
    ask for them warned (a UserWarning per call of a compiled model's first pass)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Tanh(), nn.Flatten(), nn.Linear(64, 3)
    ).eval()
    compiled = torch.compile(model, backend="eager")
    X, y = torch.randn(4, 3, 4, 4), torch.randint(0, 3, (4,))
    v = torch.randn(sum(p.numel() for p in model.parameters()))
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = linops.HessianOperator(compiled, nn.CrossEntropyLoss(), (X, y)) @ v
    finally:
        torch._dynamo.reset()
    assert not [w for w in caught if "saved_tensors" in str(w.message)]
    ref = linops.HessianOperator(model, nn.CrossEntropyLoss(), (X, y)) @ v
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("case", range(len(GEOMETRIES)))
def test_the_input_gradient_reads_only_the_inputs_shape(case: int, channels_last: bool) -> None:
    """``_dgrad``'s one-element stand-in gives the bits and strides of the real input's."""
    from linops._double_backward import _backward, _dgrad, _geometry

    dims, x, W, _, kw = _conv_args(case, False)
    g = _geometry(
        dims, kw.get("stride", 1), kw.get("padding", 0), kw.get("dilation", 1), kw.get("groups", 1)
    )
    assert g is not None
    x, W = x.detach(), W.detach()
    grad = torch.randn(_conv_out(dims, x, W, kw), dtype=x.dtype)
    if channels_last and dims == 2:
        grad = grad.contiguous(memory_format=torch.channels_last)
        W = W.contiguous(memory_format=torch.channels_last)
    want = _backward(grad, x, W, g, [True, False])[0]
    got = _dgrad(grad, W, x.shape, g)
    assert torch.equal(got, want) and got.stride() == want.stride()


def _conv_out(dims: int, x: torch.Tensor, W: torch.Tensor, kw: dict) -> torch.Size:
    return (F.conv1d, F.conv2d, F.conv3d)[dims - 1](x, W, **kw).shape
