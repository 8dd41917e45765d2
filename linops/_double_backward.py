r"""Kernels for graphs that are differentiated twice in reverse mode (a Hessian's).

A Hessian product ``H v`` differentiates the graph of the gradient, which holds the backward
pass of every layer. torch 2.13's derivatives of two backward kernels do much more work than
the product needs, so while such a graph is built (``twice=True`` in
:func:`linops._defects.workarounds`) two functions are computed differently, with the same
values to rounding:

* **batch norm in eval mode** (running statistics) is the affine map ``x * scale + shift``
  per channel (:func:`batch_norm`), where ``native_batch_norm``'s double backward evaluates
  the training-mode formula's terms;
* **convolutions** (``conv1d``, ``conv2d``, ``conv3d``) go through three autograd Functions
  that are each other's derivatives (:class:`ConvolutionTwice`, :class:`ConvolutionInputGrad`,
  :class:`ConvolutionWeightGrad`). For ``y = conv(x, W)`` with ``<g, conv(x, W)> =
  <dgrad(g, W), x> = <wgrad(x, g), W>``:

  .. math::

     \partial_x \langle g, \mathrm{conv}(x, W)\rangle = \mathrm{dgrad}(g, W), \quad
     \partial_W = \mathrm{wgrad}(x, g),

     \partial_g \langle h, \mathrm{dgrad}(g, W)\rangle = \mathrm{conv}(h, W), \quad
     \partial_W = \mathrm{wgrad}(h, g),

     \partial_x \langle \hat W, \mathrm{wgrad}(x, g)\rangle = \mathrm{dgrad}(g, \hat W), \quad
     \partial_g = \mathrm{conv}(x, \hat W),

  each of ``dgrad`` and ``wgrad`` one call of ``aten.convolution_backward`` (torch's
  backward-data and backward-weight kernels). torch's own ``_convolution_double_backward``
  computes the weight-gradient term as a convolution of the transposed batch with a kernel as
  large as the image, after copying both operands transposed.

On the CIFAR ResNet-20 of ``bench/pyhessian.py`` (128 images, float32, 2 threads) a Hessian
product takes 0.90x torch's time with the batch norm change alone, 0.87x with the
convolutions alone and 0.80x with both (``python bench/double_backward.py``); in float64
0.81x, 0.67x and 0.61x (``--dtype float64``, 4.87 s a product with torch's kernels). Calls
below :data:`MIN_ELEMENTS` input elements keep torch's kernels,
and so do graphs under saved-tensor hooks (activation checkpointing recomputes a block with
torch's kernels and needs them to save what the first pass saved) and calls inside a
``torch.func`` transform, a forward-AD level or autocast (a model whose forward runs ``vmap``,
``jvp`` or ``torch.autocast``: the Functions have no rules for the first two, and
``aten.convolution`` is not autocast). First derivatives and
forward mode are left to torch's fused kernels, which are faster there. The model itself is
never changed.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
import torch.autograd.forward_ad as fwad
from torch.nn import functional as F

aten = torch.ops.aten

#: the fewest input elements for which a call takes this module's kernel instead of torch's,
#: per function: below, the Python of three autograd Functions (and the unfused affine map)
#: costs more than it saves. ``python bench/double_backward.py`` (a 3-layer CNN with batch
#: norm, float32, 2 threads, ``H v`` against torch's kernels in the same process, medians of
#: 15): convolutions 1.10x the time at 2,048 input elements, 1.08x at 8,192, 1.02x at 32,768
#: and 65,536, 0.94x at 262,144, 0.88x at 524,288; batch norm 1.06x at 2,048, 1.00x at
#: 8,192, 0.92-0.95x from 32,768 on (float64: convolutions 1.19x at 8,192, 0.89x at 32,768,
#: 0.75x at 262,144). The tests set both to 0.
MIN_ELEMENTS = {"batch_norm": 2**15, "convolution": 2**17}

#: a convolution's stride, padding, dilation (one entry per spatial dimension) and groups
Geometry = tuple[list[int], list[int], list[int], int]


def batch_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> torch.Tensor:
    """``F.batch_norm`` in eval mode as the affine map ``input * scale + shift`` per channel.

    ``scale = weight / sqrt(running_var + eps)`` and ``shift = bias - running_mean * scale``,
    as torch's CPU inference kernel computes it: its double backward is two elementwise
    products and a sum per channel. Only for a call :func:`affine_batch_norm` accepts (not
    training mode, which normalises by the batch's statistics and updates the running ones in
    place; not other dtypes or shapes), as :func:`covered` hands it out.
    """
    assert running_mean is not None and running_var is not None
    scale = torch.rsqrt(running_var + eps)
    if weight is not None:
        scale = weight * scale
    shift = -running_mean * scale if bias is None else bias - running_mean * scale
    shape = (1, -1) + (1,) * (input.dim() - 2)
    return input * scale.view(shape) + shift.view(shape)


def affine_batch_norm(
    input: Any,
    running_mean: Any = None,
    running_var: Any = None,
    weight: Any = None,
    bias: Any = None,
    training: Any = False,
    *_: Any,
    **__: Any,
) -> bool:
    """Whether :func:`batch_norm` computes this call of ``F.batch_norm`` (arguments as there).

    Eval mode with running statistics, on a real floating input of at least two dimensions
    and :data:`MIN_ELEMENTS` elements whose statistics, weight and bias have its dtype, device and channel count (otherwise the
    affine map would promote or broadcast differently than torch's kernel, or torch raises).
    """
    if training or not isinstance(input, torch.Tensor) or input.dim() < 2:
        return False
    if input.numel() < MIN_ELEMENTS["batch_norm"]:
        return False
    if not input.is_floating_point() or running_mean is None or running_var is None:
        return False
    return all(
        t is None or _like(t, input, (input.shape[1],))
        for t in (running_mean, running_var, weight, bias)
    )


def _like(t: Any, x: torch.Tensor, shape: Sequence[int]) -> bool:
    """Whether ``t`` is a tensor of ``shape`` with ``x``'s dtype and device."""
    return (
        isinstance(t, torch.Tensor)
        and tuple(t.shape) == tuple(shape)
        and t.dtype == x.dtype
        and t.device == x.device
    )


def _geometry(dims: int, stride: Any, padding: Any, dilation: Any, groups: Any) -> Geometry | None:
    """Return the geometry as lists of ``dims`` ints, or None if they are not plain ints."""
    out: list[list[int]] = []
    for value in (stride, padding, dilation):
        if isinstance(value, bool):
            return None
        if isinstance(value, int):
            value = [value] * dims
        if not isinstance(value, (tuple, list)) or len(value) != dims:
            return None  # a string padding ("same", "valid") among them: torch's own
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return None
        out.append(list(value))
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        return None
    return out[0], out[1], out[2], groups


def _conv(x: torch.Tensor, W: torch.Tensor, g: Geometry) -> torch.Tensor:
    stride, padding, dilation, groups = g
    return aten.convolution(x, W, None, stride, padding, dilation, False, [0] * len(stride), groups)


def _backward(
    grad: torch.Tensor, x: torch.Tensor, W: torch.Tensor, g: Geometry, mask: list[bool]
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``aten.convolution_backward``'s input and weight gradients (those ``mask`` asks for)."""
    stride, padding, dilation, groups = g
    out = aten.convolution_backward(
        grad,
        x,
        W,
        None,
        stride,
        padding,
        dilation,
        False,
        [0] * len(stride),
        groups,
        [*mask, False],
    )
    return out[0], out[1]


def _dgrad(grad: torch.Tensor, W: torch.Tensor, x_shape: torch.Size, g: Geometry) -> torch.Tensor:
    """Return the input gradient of ``conv(x, W)`` for output gradient ``grad``."""
    # the kernel reads the input's shape only: one element expanded to it stands in (the same
    # bits and strides as an input-sized tensor, for float32 and float64, contiguous and
    # channels-last gradients, 1-3 spatial dimensions), so nothing input-sized is allocated
    stand_in = grad.new_empty(()).expand(x_shape)
    return _backward(grad, stand_in, W, g, [True, False])[0]  # type: ignore[return-value]


def _wgrad(x: torch.Tensor, grad: torch.Tensor, W_shape: torch.Size, g: Geometry) -> torch.Tensor:
    """Return the weight gradient of ``conv(x, W)`` for output gradient ``grad``."""
    return _backward(grad, x, x.new_empty(W_shape), g, [False, True])[1]  # type: ignore[return-value]


class ConvolutionTwice(torch.autograd.Function):
    """``conv(x, W)``, whose backward builds :class:`ConvolutionInputGrad` and its weight twin.

    While a graph is built (``create_graph``) the backward is :class:`ConvolutionInputGrad`
    and :class:`ConvolutionWeightGrad`; otherwise torch's one fused backward kernel.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, W: torch.Tensor, g: Geometry) -> torch.Tensor:
        _save(ctx, g, x, W)
        return _conv(x, W, g)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, W = ctx.saved_tensors
        g = ctx.geometry
        if not torch.is_grad_enabled():  # nothing differentiates this: torch's fused kernel
            return (*_backward(grad, x, W, g, list(ctx.needs_input_grad[:2])), None)
        return _needed(
            ctx,
            lambda: ConvolutionInputGrad.apply(grad, W, x.shape, g),
            lambda: ConvolutionWeightGrad.apply(x, grad, W.shape, g),
        )


class ConvolutionInputGrad(torch.autograd.Function):
    """``dgrad(grad, W)``, the input gradient of a convolution, linear in each argument."""

    @staticmethod
    def forward(
        ctx: Any, grad: torch.Tensor, W: torch.Tensor, x_shape: torch.Size, g: Geometry
    ) -> torch.Tensor:
        _save(ctx, g, grad, W)
        return _dgrad(grad, W, x_shape, g)

    @staticmethod
    def backward(ctx: Any, h: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad, W = ctx.saved_tensors
        g = ctx.geometry
        conv, wgrad = _kernels(ConvolutionTwice.apply, _conv, ConvolutionWeightGrad.apply, _wgrad)
        return _needed(ctx, lambda: conv(h, W, g), lambda: wgrad(h, grad, W.shape, g))


class ConvolutionWeightGrad(torch.autograd.Function):
    """``wgrad(x, grad)``, the weight gradient of a convolution, linear in each argument."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, grad: torch.Tensor, W_shape: torch.Size, g: Geometry
    ) -> torch.Tensor:
        _save(ctx, g, x, grad)
        return _wgrad(x, grad, W_shape, g)

    @staticmethod
    def backward(ctx: Any, W_hat: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, grad = ctx.saved_tensors
        g = ctx.geometry
        dgrad, conv = _kernels(ConvolutionInputGrad.apply, _dgrad, ConvolutionTwice.apply, _conv)
        return _needed(ctx, lambda: dgrad(grad, W_hat, x.shape, g), lambda: conv(x, W_hat, g))


def _save(ctx: Any, g: Geometry, *tensors: torch.Tensor) -> None:
    ctx.save_for_backward(*tensors)
    ctx.geometry = g


def _needed(ctx: Any, *partials: Any) -> tuple[torch.Tensor | None, ...]:
    """Return the partial derivatives the inputs need (``partials``: a thunk per tensor input)."""
    need = ctx.needs_input_grad
    out = tuple(p() if n else None for p, n in zip(partials, need, strict=False))
    return out + (None,) * (len(need) - len(partials))


def _kernels(*pairs: Any) -> tuple[Any, ...]:
    """From pairs ``(Function.apply, kernel)``, the applies while a graph is built, else the kernels.

    Without a graph to build (a product's backward pass) the kernels run directly: no
    Function node, and nothing that ``torch.func.vmap`` (which a batched pass runs the
    backward under) would refuse in an autograd.Function without ``setup_context``.
    """
    start = 0 if torch.is_grad_enabled() else 1
    return tuple(pairs[start::2])


def _convolution_call(
    dims: int,
    input: Any,
    weight: Any,
    bias: Any = None,
    stride: Any = 1,
    padding: Any = 0,
    dilation: Any = 1,
    groups: Any = 1,
) -> Geometry | None:
    """Return the geometry of a ``conv{dims}d`` call :func:`covered` accepts, else None.

    A batched real floating input of at least :data:`MIN_ELEMENTS` elements with the weight's
    (and bias's) dtype and device, integer stride, padding and dilation; string paddings, unbatched inputs and the rest are left to
    torch.
    """
    if not isinstance(input, torch.Tensor) or not isinstance(weight, torch.Tensor):
        return None
    if input.dim() != dims + 2 or weight.dim() != dims + 2 or not input.is_floating_point():
        return None
    if input.numel() < MIN_ELEMENTS["convolution"]:
        return None
    if not _like(weight, input, weight.shape):
        return None
    if bias is not None and not _like(bias, input, (weight.shape[0],)):
        return None
    return _geometry(dims, stride, padding, dilation, groups)


def convolution(
    g: Geometry, input: torch.Tensor, weight: torch.Tensor, bias: Any = None, *_: Any, **__: Any
) -> torch.Tensor:
    """``F.conv{d}d`` through :class:`ConvolutionTwice`, for a call :func:`covered` accepted.

    ``g`` is the call's geometry as :func:`_convolution_call` read it; the call's own stride,
    padding, dilation and groups (positional or keyword) are then ignored here.
    """
    out = ConvolutionTwice.apply(input, weight, g)
    return out if bias is None else out + bias.view((1, -1) + (1,) * len(g[0]))


def covered(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Return what computes this call of ``func`` in a graph differentiated twice, or None.

    None inside a ``torch.func`` transform (``vmap``, ``grad``, ``jvp`` in a model's forward,
    e.g. an ensemble of stacked weights), a forward-mode AD level or autocast
    (:func:`_needs_torchs_kernels`).
    """
    dims = _CONVOLUTIONS.get(func)
    if (func is not F.batch_norm and dims is None) or _needs_torchs_kernels():
        return None  # (every torch function of a forward pass comes here: the lookup first)
    if dims is None:
        return batch_norm if affine_batch_norm(*args, **kwargs) else None
    g = _convolution_call(dims, *args, **kwargs)
    return None if g is None else functools.partial(convolution, g)


def _needs_torchs_kernels() -> bool:
    """Whether a ``torch.func`` transform, a forward-AD level (``dual_level``) or autocast is on.

    The autograd Functions have no vmap or jvp rule, and ``aten.convolution``, which they call,
    is not on autocast's lists (``F.conv2d`` is): under autocast they would compute in the
    input's precision where torch's kernels compute in the autocast dtype.
    """
    return (
        torch._C._functorch.peek_interpreter_stack() is not None
        or fwad._current_level >= 0
        or any(torch.is_autocast_enabled(kind) for kind in ("cpu", "cuda"))
    )


def has_convolution(model: torch.nn.Module) -> bool:
    """Whether ``model`` has a convolution module (not transposed)."""
    conv = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
    return any(isinstance(m, conv) for m in model.modules())


_CONVOLUTIONS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}
