r"""Hand-derived products for chains of affine, convolution, pooling and elementwise steps.

A model that is a chain :math:`x_0 \to x_1 \to \dots \to x_T = f` of steps

* affine: :math:`x_{t+1} = c\, x_t W^\top + b` (``nn.Linear``; ``c`` is a layer's
  ``multiplier`` attribute, 1 by default);
* elementwise: :math:`x_{t+1} = \phi(x_t)` (ReLU, LeakyReLU, Tanh, Sigmoid, GELU, SiLU,
  Softplus, Identity, a scalar multiple, Dropout in eval mode);
* ``Flatten`` of everything but the sample dimension;
* convolution: :math:`x_{t+1} = W \star x_t + b` (``nn.Conv2d``, zero padding, one group);
* max pooling: :math:`x_{t+1} = x_t[\iota]`, the entries at the argmax positions
  :math:`\iota` of the primal pass (``nn.MaxPool2d``); average pooling, a fixed linear map
  (``nn.AvgPool2d``),

has its Jacobian and Hessian products written out directly, with the primal quantities of one
batch (inputs of every step, :math:`\phi'`, :math:`\phi''`, back-propagated errors) computed
once and kept. For a tangent :math:`(\dot W, \dot b)` of the parameters (:math:`\dot x_0 = 0`):

.. math::

    \text{JVP:}\quad & \dot x_{t+1} = c(\dot x_t W^\top + x_t \dot W^\top) + \dot b, \qquad
        \dot x_{t+1} = \phi'(x_t) \odot \dot x_t \\
    \text{VJP:}\quad & \bar g_W = c\, \bar x_{t+1}^\top x_t, \quad
        \bar g_b = \textstyle\sum_n \bar x_{t+1}, \quad \bar x_t = c\, \bar x_{t+1} W, \qquad
        \bar x_t = \phi'(x_t) \odot \bar x_{t+1} \\
    \text{HVP:}\quad & \dot e_T = \nabla^2_f \ell\, \dot x_T, \quad
        \dot g_W = c(\dot e_{t+1}^\top x_t + e_{t+1}^\top \dot x_t), \quad
        \dot e_t = c(\dot e_{t+1} W + e_{t+1} \dot W), \\
        & \dot e_t = \phi'(x_t) \odot \dot e_{t+1} + \phi''(x_t) \odot \dot x_t \odot e_{t+1}

with :math:`e_t = \partial \ell / \partial x_t` the errors of the primal backward pass. A
convolution is linear in ``W`` and in ``x`` like an affine step, so the same formulas hold with
:math:`x \dot W^\top` read as :math:`\dot W \star x`, :math:`\bar x W` as the transposed
convolution of :math:`\bar x` with ``W`` and :math:`\bar x^\top x` as the weight gradient of
the convolution. Pooling is linear (max pooling with the primal's argmax indices held fixed:
a gather forward, a scatter-add backward) and, like ReLU, has no second-order term. The loss
enters only through :math:`e_T` and the output-Hessian product :math:`\nabla^2_f \ell\, u`
(:class:`linops._loss.OutputLoss`: closed forms for cross-entropy and MSE, autograd on the
``(n, d)`` outputs for any other loss). Every product over ``K`` vectors is a handful of matrix
products on ``(n, K, width)`` tensors, with none of autograd's per-node cost:
on this project's 2-core CPU that is what separates a 10k-parameter MLP's products from
curvlinops' by more than 3x (``bench/operators.py``). Convolutions take the ``K`` input
tangents as one convolution over ``n K`` images, and the ``K`` weight tangents as one product
with the primal input's patches, unfolded once per batch (:func:`_conv_forward`).

A chain is recognised in an ``nn.Sequential`` (nested ones included) or in a model that
declares ``linops_chain()``, returning its steps in order (modules and Python floats for scalar
multiples; :class:`trainers.models.MLP` does). It is used only after its forward pass has
reproduced the model's outputs on the batch; otherwise the operators fall back to autograd.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from linops._autodiff import LossFn
from linops._loss import OutputLoss
from linops.params import ParamSpace

__all__ = ["Chain", "ChainGradientGraph", "ChainOutputGraph", "recognise_chain"]

Tensor = torch.Tensor
Derivs = Callable[[Tensor], tuple[Tensor, Tensor, Tensor]]  # x -> (phi, phi', phi'')


# ------------------------------------------------------------------ elementwise functions
def _relu(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    d = (x > 0).to(x.dtype)  # autograd's convention: phi'(0) = 0
    return x * d, d, torch.zeros_like(x)


def _leaky(slope: float) -> Derivs:
    def f(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        d = torch.where(x > 0, 1.0, torch.full_like(x, slope))  # the slope in x's precision
        return x * d, d, torch.zeros_like(x)

    f.piecewise_linear = True  # type: ignore[attr-defined]
    return f


def _tanh(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    t = torch.tanh(x)
    d = 1.0 - t * t
    return t, d, -2.0 * t * d


def _sigmoid(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    s = torch.sigmoid(x)
    d = s * (1.0 - s)
    return s, d, d * (1.0 - 2.0 * s)


def _gelu(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    pdf = torch.exp(-0.5 * x * x) * (1.0 / math.sqrt(2.0 * math.pi))
    cdf = 0.5 * (1.0 + torch.erf(x * (1.0 / math.sqrt(2.0))))
    return x * cdf, cdf + x * pdf, pdf * (2.0 - x * x)


def _silu(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    s = torch.sigmoid(x)
    d = s * (1.0 - s)
    return x * s, s + x * d, d * (2.0 + x * (1.0 - 2.0 * s))


def _softplus(beta: float, threshold: float) -> Derivs:
    def f(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        linear = beta * x > threshold  # torch's softplus is the identity there
        s = torch.sigmoid(beta * x)
        y = torch.where(linear, x, nn.functional.softplus(x, beta=beta, threshold=threshold))
        d = torch.where(linear, 1.0, s)
        d2 = torch.where(linear, 0.0, beta * s * (1.0 - s))
        return y, d, d2

    return f


def _elementwise(mod: nn.Module) -> Derivs | None:
    """``x -> (phi(x), phi'(x), phi''(x))`` of a supported elementwise module, else None."""
    kind = type(mod)
    if kind in (nn.Identity, nn.Dropout, nn.AlphaDropout):  # dropout: eval mode is checked
        return None if mod.training and kind is not nn.Identity else _identity
    table: dict[type, Derivs] = {
        nn.ReLU: _relu,
        nn.Tanh: _tanh,
        nn.Sigmoid: _sigmoid,
        nn.SiLU: _silu,
    }
    if kind in table:
        return table[kind]
    if kind is nn.GELU and mod.approximate == "none":
        return _gelu
    if kind is nn.LeakyReLU:
        return _leaky(float(mod.negative_slope))
    if kind is nn.Softplus:
        return _softplus(float(mod.beta), float(mod.threshold))
    return None


def _identity(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return x, torch.ones_like(x), torch.zeros_like(x)


# phi'' = 0: the chain keeps no phi'' for these and skips their second-order term
_relu.piecewise_linear = True  # type: ignore[attr-defined]
_identity.piecewise_linear = True  # type: ignore[attr-defined]


# ------------------------------------------------------------------ the chain
@dataclass
class _Affine:
    weight: Tensor  # (out, in)
    bias: Tensor | None
    scale: float
    w_index: int | None  # position of the weight in the ParamSpace, None if not differentiated
    b_index: int | None


@dataclass
class _Pointwise:
    derivs: Derivs | None  # None: multiplication by ``scale``
    scale: float = 1.0


class _Flatten:
    pass


@dataclass
class _Conv:
    """A 2-d convolution; its products with ``K`` tangents or cotangents at once."""

    weight: Tensor  # (out, in, kh, kw)
    bias: Tensor | None
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    w_index: int | None
    b_index: int | None

    def __call__(self, x: Tensor, w: Tensor, bias: Tensor | None = None) -> Tensor:
        # contiguous: a channels-last input or weight gives a channels-last output, which the
        # (n, K, out, h, w) views of the products cannot take
        return F.conv2d(x, w, bias, self.stride, self.padding, self.dilation).contiguous()

    def weight_grad(self, x: Tensor, shape: Sequence[int], g: Tensor) -> Tensor:
        """The gradient w.r.t. a weight of ``shape`` of ``<g, w * x>``."""
        return nn.grad.conv2d_weight(
            x, shape, g, self.stride, self.padding, self.dilation
        ).contiguous()

    def unfold(self, x: Tensor) -> Tensor:
        """The patches of ``x``, ``(n, in kh kw, h w)``: ``w * x`` is ``w.view(out, -1) @`` them."""
        kernel = self.weight.shape[2:]
        return F.unfold(x, kernel, self.dilation, self.padding, self.stride)

    def input_grad(self, shape: Sequence[int], w: Tensor, g: Tensor) -> Tensor:
        """The gradient w.r.t. an input of ``shape`` of ``<g, w * x>`` (transposed convolution).

        With stride one it is the convolution of ``g`` with the flipped, transposed kernel and
        padding ``d (k - 1) - p``, which oneDNN's forward convolution computes faster than its
        backward-data one: on ``bench/operators.py``'s CNN (8 -> 16 channels, 3x3, 4x4 images)
        0.81 against 1.39 ms for 1600 images and 18.7 against 21.3 ms for 12800.
        """
        kernel = w.shape[2:]
        pad = [d * (k - 1) - p for d, k, p in zip(self.dilation, kernel, self.padding, strict=True)]
        if all(s == 1 for s in self.stride) and min(pad) >= 0:
            flipped = w.flip(2, 3).transpose(0, 1)
            return F.conv2d(g, flipped, None, 1, pad, self.dilation).contiguous()
        return nn.grad.conv2d_input(
            shape, w, g, self.stride, self.padding, self.dilation
        ).contiguous()


@dataclass
class _MaxPool:
    """Max pooling; linear once the primal pass's argmax indices are held fixed."""

    module: nn.MaxPool2d

    def primal(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The pooled ``x`` and the indices kept for the products."""
        m = self.module
        return F.max_pool2d(
            x, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode, return_indices=True
        )

    def tangent(self, dx: Tensor, idx: Tensor) -> Tensor:
        """``dx[..., c, idx]`` of ``(n, K, C, H, W)`` at the indices ``(n, C, h, w)``."""
        lead = dx.shape[:-3]
        return dx.flatten(-2).gather(-1, _pool_index(idx, lead)).view(*lead, *idx.shape[1:])

    def adjoint(self, g: Tensor, idx: Tensor, shape: torch.Size) -> Tensor:
        """The transpose of :meth:`tangent`: ``g`` added into zeros of ``(n, [K,] *shape[1:])``."""
        lead = g.shape[:-3]
        out = g.new_zeros((*lead, shape[1], shape[2] * shape[3]))
        out.scatter_add_(-1, _pool_index(idx, lead), g.flatten(-2))
        return out.view(*lead, *shape[1:])


@dataclass
class _AvgPool:
    """Average pooling; linear, so its tangent map is itself and its adjoint torch's backward."""

    module: nn.AvgPool2d

    def primal(self, x: Tensor) -> tuple[Tensor, None]:
        return self.tangent(x, None), None

    def tangent(self, x: Tensor, _: None) -> Tensor:
        """Pooling of ``(n, C, H, W)`` or ``(n, K, C, H, W)`` (the K folded into the batch)."""
        m = self.module
        lead = x.shape[:-3]
        y = F.avg_pool2d(
            x.reshape(-1, *x.shape[-3:]),
            m.kernel_size,
            m.stride,
            m.padding,
            m.ceil_mode,
            m.count_include_pad,
            m.divisor_override,
        )
        return y.view(*lead, *y.shape[1:])

    def adjoint(self, g: Tensor, _: None, shape: torch.Size) -> Tensor:
        """The transpose applied to ``g`` ``(n, [K,] C, h, w)``, for inputs of ``shape``."""
        m = self.module
        lead = g.shape[:-3]
        flat = g.reshape(-1, *g.shape[-3:])
        like = g.new_empty(1).expand(flat.shape[0], *shape[1:])  # only its shape is read
        out = torch.ops.aten.avg_pool2d_backward(
            flat,
            like,
            _pair(m.kernel_size),
            _pair(m.stride if m.stride is not None else m.kernel_size),
            _pair(m.padding),
            m.ceil_mode,
            m.count_include_pad,
            m.divisor_override,
        )
        return out.view(*lead, *shape[1:])


_Pool = _MaxPool | _AvgPool


def _pair(v: int | Sequence[int]) -> list[int]:
    return [v, v] if isinstance(v, int) else list(v)


def _pool_index(idx: Tensor, lead: torch.Size) -> Tensor:
    """Pooling indices ``(n, C, h, w)`` expanded to ``(*lead, C, h w)`` (``lead`` starts with n)."""
    view = (idx.shape[0], *[1] * (len(lead) - 1), idx.shape[1], -1)
    return idx.reshape(view).expand(*lead, idx.shape[1], idx[0, 0].numel())


Step = _Affine | _Conv | _Pool | _Pointwise | _Flatten


def recognise_chain(model: nn.Module) -> list[nn.Module | float] | None:
    """The steps of ``model`` if it provably is a chain of supported modules, else None.

    Matching outputs are not proof: a forward that detaches, a hook or a parametrization can
    leave the values alone and change the derivatives. So every module must run torch's own
    forward (an ``nn.Sequential`` whose class does not override ``forward``, layers of exactly
    the supported classes), without hooks (module or global) or parametrizations, and without
    submodules the chain would not visit. A model declaring ``linops_chain()`` vouches for its
    own forward and may use ``nn.Linear`` subclasses computing ``c x W^T + b`` (``c`` their
    ``multiplier``); its steps are otherwise held to the same rules.
    """
    if _has_hooks(model):
        return None
    declared = getattr(model, "linops_chain", None)
    items = list(declared()) if callable(declared) else [model]
    flat: list[nn.Module | float] = []
    while items:
        item = items.pop(0)
        if isinstance(item, nn.Sequential):
            if type(item).forward is not nn.Sequential.forward:
                return None
            items = list(item) + items
            continue
        if isinstance(item, float | int) and not isinstance(item, bool):
            flat.append(float(item))
        elif isinstance(item, nn.Module) and (
            _has_hooks(item) or parametrize.is_parametrized(item)
        ):
            return None
        elif (
            type(item) is nn.Linear
            or (callable(declared) and isinstance(item, nn.Linear))  # e.g. a multiplier
            or _is_flatten(item)
            or _is_conv(item)
            or _is_pool(item)
            or _elementwise(item) is not None
        ):
            flat.append(item)
        else:
            return None
    return flat if any(isinstance(m, nn.Linear | nn.Conv2d) for m in flat) else None


_HOOKS = ("forward_hooks", "forward_pre_hooks", "backward_hooks", "backward_pre_hooks")


def _has_hooks(model: nn.Module) -> bool:
    """Whether a forward or backward hook of a module in ``model``, or a global one, is set."""
    from torch.nn.modules import module as torch_module

    if any(getattr(torch_module, f"_global_{h}", None) for h in _HOOKS):
        return True
    return any(getattr(m, f"_{h}", None) for m in model.modules() for h in _HOOKS)


def _is_flatten(mod: object) -> bool:
    return type(mod) is nn.Flatten and mod.start_dim == 1 and mod.end_dim == -1


def _is_conv(mod: object) -> bool:
    return (
        type(mod) is nn.Conv2d
        and mod.groups == 1
        and mod.padding_mode == "zeros"
        and not isinstance(mod.padding, str)  # "same" may pad unevenly
    )


def _is_pool(mod: object) -> bool:
    return (type(mod) is nn.MaxPool2d and not mod.return_indices) or type(mod) is nn.AvgPool2d


class Chain:
    """A recognised chain bound to a :class:`ParamSpace` (its values, dtype and device).

    Raises
    ------
    ValueError
        If a parameter of the space is not a weight or bias of the chain's affine steps.
    """

    def __init__(self, space: ParamSpace, items: Sequence[nn.Module | float]) -> None:
        names = {id(p): n for n, p in space.model.named_parameters()}
        index = {n: i for i, n in enumerate(space.names)}
        values = list(space.values().values())
        dtype, device = space.dtype, space.device
        self.space = space
        self.steps: list[Step] = []
        covered: set[int] = set()

        def bind(p: Tensor | None) -> tuple[Tensor | None, int | None]:
            if p is None:
                return None, None
            i = index.get(names.get(id(p), ""))
            if i is not None:
                covered.add(i)
                return values[i], i
            return p.detach().to(dtype=dtype, device=device), None

        for item in items:
            if isinstance(item, float):
                if item != 1.0:  # multiplying by one is no step
                    self.steps.append(_Pointwise(None, item))
            elif isinstance(item, nn.Linear):
                W, wi = bind(item.weight)
                b, bi = bind(item.bias)
                scale = float(getattr(item, "multiplier", 1.0))
                self.steps.append(_Affine(W, b, scale, wi, bi))  # type: ignore[arg-type]
            elif isinstance(item, nn.Conv2d):
                W, wi = bind(item.weight)
                b, bi = bind(item.bias)
                geometry = (item.stride, item.padding, item.dilation)
                self.steps.append(_Conv(W, b, *geometry, wi, bi))  # type: ignore[arg-type]
            elif isinstance(item, nn.MaxPool2d):
                self.steps.append(_MaxPool(item))
            elif isinstance(item, nn.AvgPool2d):
                self.steps.append(_AvgPool(item))
            elif _is_flatten(item):
                self.steps.append(_Flatten())
            else:
                self.steps.append(_Pointwise(_elementwise(item)))
        if covered != set(range(len(space.names))):
            missing = [space.names[i] for i in range(len(space.names)) if i not in covered]
            raise ValueError(f"params: {missing} are not weights or biases of the chain")
        # tangents are zero before the first differentiated step: nothing is computed there
        self.first = min(
            t
            for t, s in enumerate(self.steps)
            if isinstance(s, _Affine | _Conv) and (s.w_index is not None or s.b_index is not None)
        )

    def with_values(self, values: Sequence[Tensor]) -> Chain:
        """The same chain at other values of the space's parameters (``space.names`` order).

        The steps are copied with the differentiated weights and biases replaced; nothing is
        recognised or verified again (the values must have the space's shapes and dtype).
        """
        new = copy.copy(self)
        new.steps = [
            dataclasses.replace(
                s,
                weight=values[s.w_index] if s.w_index is not None else s.weight,
                bias=values[s.b_index] if s.b_index is not None else s.bias,
            )
            if isinstance(s, _Affine | _Conv)
            else s
            for s in self.steps
        ]
        return new

    @classmethod
    def of(cls, space: ParamSpace) -> Chain | None:
        """The chain of ``space.model``, or None if it is not one or misses some parameter."""
        items = recognise_chain(space.model)
        if items is None:
            return None
        try:
            return cls(space, items)
        except ValueError:
            return None

    def forward(self, x: Tensor) -> tuple[list[Tensor], list[tuple[Tensor, Tensor | None] | None]]:
        """Inputs of every step and the output (``xs``, length T + 1), and ``(phi', phi'')``.

        The second list holds ``(phi', phi'')`` of elementwise steps, the argmax indices of
        pooling steps and None for the others.
        """
        xs, derivs = [x], []
        for s in self.steps:
            x = xs[-1]
            if isinstance(s, _Affine):
                if x.dim() != 2:
                    raise _NotAChain
                y = x @ s.weight.T
                if s.scale != 1.0:
                    y = s.scale * y
                xs.append(y + s.bias if s.bias is not None else y)
                derivs.append(None)
            elif isinstance(s, _Conv | _Pool) and x.dim() != 4:
                raise _NotAChain
            elif isinstance(s, _Conv):
                xs.append(s(x, s.weight, s.bias))
                derivs.append(None)
            elif isinstance(s, _Pool):
                y, aux = s.primal(x)
                xs.append(y)
                derivs.append(aux)
            elif isinstance(s, _Flatten):
                xs.append(x.reshape(x.shape[0], -1))
                derivs.append(None)
            elif s.derivs is None:
                xs.append(s.scale * x)
                derivs.append(None)
            else:
                y, d1, d2 = s.derivs(x)
                xs.append(y)
                derivs.append((d1, None if getattr(s.derivs, "piecewise_linear", False) else d2))
        return xs, derivs


class _NotAChain(Exception):
    """The chain's forward pass does not apply to this input (e.g. a 3-d input of a Linear)."""


def _forward_checked(chain: Chain, x: Tensor) -> tuple[list[Tensor], list, torch.Size]:
    """The chain's forward pass, verified against the model's own outputs on ``x``.

    Returns the step inputs and output, the ``(phi', phi'')`` pairs and the model's per-sample
    output shape (the chain's output is flattened to ``(n, d)``).
    """
    try:
        xs, derivs = chain.forward(x)
    except (_NotAChain, RuntimeError) as err:
        raise ChainMismatch(str(err)) from None
    space = chain.space
    with torch.no_grad():
        ref = space.functional_call(space.values(), x)
    f = xs[-1]
    if ref.shape[0] != f.shape[0] or ref.reshape(ref.shape[0], -1).shape != f.shape:
        raise ChainMismatch(f"outputs of shape {tuple(f.shape)}, model gives {tuple(ref.shape)}")
    tol = math.sqrt(torch.finfo(f.dtype).eps) * (1.0 + float(ref.abs().max()))
    err = float((f - ref.reshape(f.shape)).abs().max())
    if not err <= tol:
        raise ChainMismatch(f"outputs differ from the model's by {err:.3g} (tolerance {tol:.3g})")
    return xs, derivs, ref.shape[1:]


class ChainMismatch(Exception):
    """The recognised chain does not reproduce the model (the operator falls back to autograd)."""


# ------------------------------------------------------------------ products
# Tangents and cotangents of step values are laid out ``(n, K, width)``: sample, vector,
# feature. Then every product of a layer with K vectors is one 2-d matrix product, e.g.
# ``x (n, in) @ [dW_1^T ... dW_K^T] (in, K out)`` and ``dx (n K, in) @ W^T``.
class _Tangent:
    """The K parameter tangents of one product, with the layouts the matrix products take."""

    def __init__(self, tangents: Sequence[Tensor], batched: bool) -> None:
        # columns of a row-major (m, K) block are strided; one copy up front makes every
        # later read of a tangent contiguous (and the forward weight layout a view)
        self.T = [t.contiguous() for t in tangents] if batched else [t[None] for t in tangents]
        self.K = self.T[0].shape[0]
        self._fwd: dict[int, Tensor] = {}
        self._bwd: dict[int, Tensor] = {}

    def forward_weight(self, i: int) -> Tensor:
        """``(in, K out)``: the K transposed weight tangents side by side."""
        if i not in self._fwd:
            K, out, inp = self.T[i].shape
            self._fwd[i] = self.T[i].permute(2, 0, 1).reshape(inp, K * out)
        return self._fwd[i]

    def backward_weight(self, i: int) -> Tensor:
        """``(out, K in)``: the K weight tangents side by side."""
        if i not in self._bwd:
            K, out, inp = self.T[i].shape
            self._bwd[i] = self.T[i].transpose(0, 1).reshape(out, K * inp)
        return self._bwd[i]


def _tangents_forward(
    chain: Chain,
    xs: list[Tensor],
    derivs: list,
    tan: _Tangent,
    patches: dict[int, Tensor | None],
    keep: bool = False,
) -> list[Tensor | None]:
    """``dx_t`` of every step input and of the output (``None`` where zero), ``(n, K, width)``.

    Elementwise steps scale their (freshly computed) input tangent in place, which spares a
    tensor of ``n K width`` per step, unless ``keep`` asks for the inputs of the steps with a
    second-order term (the HVP's backward sweep reads them); those entries then hold the
    step's output instead. ``patches`` caches the unfolded inputs of convolutions (see
    :func:`_conv_forward`) across products.
    """
    K = tan.K
    dxs: list[Tensor | None] = [None] * len(xs)
    for t in range(chain.first, len(chain.steps)):
        s, x, dx = chain.steps[t], xs[t], dxs[t]
        n = x.shape[0]
        if isinstance(s, _Affine):
            out, inp = s.weight.shape
            y = None
            if s.w_index is not None:
                y = (x @ tan.forward_weight(s.w_index)).view(n, K, out)
            if dx is not None:
                if y is None:
                    y = (dx.reshape(n * K, inp) @ s.weight.T).view(n, K, out)
                else:
                    y.view(n * K, out).addmm_(dx.reshape(n * K, inp), s.weight.T)
            if y is not None and s.scale != 1.0:
                y.mul_(s.scale)
            if s.b_index is not None:
                db = tan.T[s.b_index]
                y = db.expand(n, K, out).contiguous() if y is None else y.add_(db)
            dxs[t + 1] = y
        elif isinstance(s, _Conv):
            dxs[t + 1] = _conv_forward(s, x, dx, tan, xs[t + 1].shape, patches, t)
        elif dx is None:
            continue
        elif isinstance(s, _Pool):
            dxs[t + 1] = s.tangent(dx, derivs[t])
        elif isinstance(s, _Flatten):
            dxs[t + 1] = dx.reshape(n, K, -1)
        elif s.derivs is None:
            dxs[t + 1] = dx.mul_(s.scale)
        elif keep and derivs[t][1] is not None:
            dxs[t + 1] = dx * derivs[t][0].unsqueeze(1)
        else:
            dxs[t + 1] = dx.mul_(derivs[t][0].unsqueeze(1))
    return dxs


#: largest unfolded input (entries) a convolution keeps for its batched weight tangents
_MAX_PATCHES = 2**24


def _conv_forward(
    s: _Conv,
    x: Tensor,
    dx: Tensor | None,
    tan: _Tangent,
    out_shape: torch.Size,
    patches: dict[int, Tensor | None],
    t: int,
) -> Tensor | None:
    """``dW * x + W * dx + db`` for the K tangents, ``(n, K, out, h, w)``.

    The K weight tangents are one convolution with K times the output channels. With K > 1
    it is computed as ``[dW_1; ...; dW_K] @ patches(x)`` instead, from the primal input's
    patches unfolded once and kept in ``patches[t]`` (when they have at most ``_MAX_PATCHES``
    entries). oneDNN's convolution of few input channels into many output channels was the
    slow part: on the first layer of ``bench/operators.py``'s CNN (1600 digits, 1 -> 8
    channels, K = 8) it took 3.2 ms per vector against 0.32 ms for the patches' product, and
    10.6 / 2.5 / 4.7 against 5.3 / 1.0 / 2.2 ms on 512 inputs of layers 1 -> 6 (5x5, 32x32),
    3 -> 8 (3x3, 16x16), 6 -> 16 (5x5, 14x14). A whole 32-vector product of that CNN took from
    5% more to 14% less time with the patches here only (H, GGN, J; two interleaved rounds),
    and 17-42% less with them here and in :func:`_conv_backward`'s weight cotangents, against
    none (H, GGN, J, J^T; ten alternating rounds).
    """
    n, K, shape = x.shape[0], tan.K, (x.shape[0], tan.K, *out_shape[1:])
    y = None
    if s.w_index is not None:
        w = tan.T[s.w_index]
        unfolded = _patches(s, x, out_shape, patches, t) if K > 1 else None
        if unfolded is not None:
            y = torch.matmul(w.reshape(K * w.shape[1], -1), unfolded).view(shape)
        else:
            y = s(x, w.reshape(-1, *w.shape[2:])).view(shape)
    if dx is not None:  # the K input tangents as one convolution over n K images
        z = s(dx.reshape(n * K, *dx.shape[2:]), s.weight).view(shape)
        y = z if y is None else y.add_(z)
    if s.b_index is not None:
        db = tan.T[s.b_index].view(1, K, -1, 1, 1)
        y = db.expand(shape).contiguous() if y is None else y.add_(db)
    return y


def _patches(
    s: _Conv,
    x: Tensor,
    out_shape: torch.Size,
    cache: dict[int, Tensor | None],
    t: int,
    weight_grad: bool = False,
) -> Tensor | None:
    """``s.unfold(x)``, made once per batch, or None if it would be too large; for the weight
    cotangents (``weight_grad``) also None when a patch is longer than an output channel, as
    the product's ``(n, K out, in kh kw)`` result would then outgrow ``g``."""
    if weight_grad and s.weight[0].numel() > out_shape[2] * out_shape[3]:
        return None
    if t not in cache:
        size = x.shape[0] * s.weight[0].numel() * out_shape[2] * out_shape[3]
        cache[t] = s.unfold(x) if size <= _MAX_PATCHES else None
    return cache[t]


def _conv_backward(
    s: _Conv,
    x: Tensor,
    g: Tensor,
    out: list[Tensor | None],
    second: tuple[Tensor | None, Tensor, _Tangent] | None,
    need_input: bool,
    unfolded: Tensor | None = None,
) -> Tensor | None:
    """Accumulate the parameter cotangents of ``g`` ``(n, K, out, h, w)``; return ``x``'s.

    With ``second = (dx, e, tangent)`` the terms of the gradient's tangent that involve the
    primal error ``e`` of the step's output are added (as ``es[t + 1]`` in :func:`_backward`).
    With ``unfolded``, the patches of ``x`` (:meth:`_Conv.unfold`), the K weight cotangents are
    ``sum_n g_n patches_n^T``, a batched product that beat oneDNN's weight gradient from few
    input channels (:func:`_patches` says when it is used).
    """
    n, K = g.shape[0], g.shape[1]
    o, c, *kernel = s.weight.shape
    dx, e, tan = second if second is not None else (None, None, None)
    if s.w_index is not None:
        if unfolded is not None:
            gw = torch.matmul(g.reshape(n, K * o, -1), unfolded.transpose(1, 2)).sum(0)
        else:
            gw = s.weight_grad(x, (K * o, c, *kernel), g.reshape(n, K * o, *g.shape[3:]))
        gw = gw.view(K, o, c, *kernel)
        if dx is not None:  # e (*) dx_k, all k as one weight gradient with K c input channels
            h = s.weight_grad(dx.reshape(n, K * c, *dx.shape[3:]), (o, K * c, *kernel), e)
            gw.add_(h.view(o, K, c, *kernel).transpose(0, 1))
        _add(out, s.w_index, gw)
    if s.b_index is not None:
        # over pixels, then samples: 4-6x faster than one reduction over dims (0, 3, 4)
        _add(out, s.b_index, g.flatten(3).sum(3).sum(0))
    if not need_input:
        return None
    gx = s.input_grad((n * K, *x.shape[1:]), s.weight, g.reshape(n * K, o, *g.shape[3:]))
    gx = gx.view(n, K, *x.shape[1:])
    if tan is not None and s.w_index is not None:  # e (*)^T dW_k, all k as one
        w = tan.T[s.w_index].transpose(0, 1).reshape(o, K * c, *kernel)
        gx.view(n, K * c, *x.shape[2:]).add_(s.input_grad((n, K * c, *x.shape[2:]), w, e))
    return gx


def _backward(
    chain: Chain,
    xs: list[Tensor],
    derivs: list,
    cot: Tensor,
    patches: dict[int, Tensor | None],
    second: tuple[list[Tensor | None], list[Tensor], list[Tensor | None], _Tangent] | None = None,
) -> list[Tensor]:
    r"""Parameter cotangents ``(K, *shape)`` of output cotangents ``cot`` ``(n, K, d)``.

    With ``second = (dxs, es, d2es, tangent)`` (forward tangents, primal errors
    :math:`e_{t+1}`, :math:`\phi''(x_t) \odot e_{t+1}` and the parameter tangents) this is
    the tangent of the gradient, the HVP's backward sweep, and ``cot`` is :math:`\dot e_T`.
    ``patches`` is the cache of :func:`_conv_forward`.
    """
    n, K = cot.shape[0], cot.shape[1]
    space = chain.space
    out: list[Tensor | None] = [None] * len(space.names)
    dxs, es, d2es, tan = second if second is not None else (None, None, None, None)
    g = cot
    owned = False  # whether g may be scaled in place: not while it is (a view of) the caller's
    for t in range(len(chain.steps) - 1, chain.first - 1, -1):
        s, x = chain.steps[t], xs[t]
        dx = dxs[t] if dxs is not None else None
        if isinstance(s, _Affine):
            o, inp = s.weight.shape
            if s.w_index is not None:
                gw = (g.reshape(n, K * o).T @ x).view(K, o, inp)
                if dx is not None:
                    gw.add_((es[t + 1].T @ dx.reshape(n, K * inp)).view(o, K, inp).transpose(0, 1))
                if s.scale != 1.0:
                    gw.mul_(s.scale)
                _add(out, s.w_index, gw)
            if s.b_index is not None:
                _add(out, s.b_index, g.sum(0))
            if t == chain.first:
                break
            gx = (g.reshape(n * K, o) @ s.weight).view(n, K, inp)
            if tan is not None and s.w_index is not None:
                gx.view(n, K * inp).addmm_(es[t + 1], tan.backward_weight(s.w_index))
            g = gx if s.scale == 1.0 else gx.mul_(s.scale)
        elif isinstance(s, _Conv):
            conv_second = (dx, es[t + 1], tan) if tan is not None else None
            unfolded = _patches(s, x, xs[t + 1].shape, patches, t, True) if K > 1 else None
            gx = _conv_backward(s, x, g, out, conv_second, t != chain.first, unfolded)
            if gx is None:
                break
            g = gx
        elif isinstance(s, _Pool):
            g = s.adjoint(g, derivs[t], x.shape)
        elif isinstance(s, _Flatten):
            g = g.reshape(n, K, *x.shape[1:])
        elif s.derivs is None:
            g = g.mul_(s.scale) if owned else s.scale * g
        else:
            d1 = derivs[t][0].unsqueeze(1)
            g = g.mul_(d1) if owned else g * d1
            if dx is not None and d2es[t] is not None:
                g.addcmul_(d2es[t].unsqueeze(1), dx)
        owned = owned or not isinstance(s, _Flatten)  # every other step makes a new g
    return [
        o.view(K, *shape) if o is not None else cot.new_zeros((K, *shape))
        for o, shape in zip(out, space.shapes, strict=True)
    ]


def _add(out: list[Tensor | None], i: int, g: Tensor) -> None:
    """Accumulate (a layer that appears twice in the chain shares its parameters)."""
    out[i] = g if out[i] is None else out[i] + g


def _unbatch(res: list[Tensor], batched: bool) -> list[Tensor]:
    return res if batched else [r[0] for r in res]


class ChainOutputGraph:
    """``J v`` and ``J^T y`` of one batch through a chain; the interface of ``OutputGraph``."""

    def __init__(self, chain: Chain, x: Tensor, output_index: int | None) -> None:
        self.chain, self.output_index = chain, output_index
        self.xs, self.derivs, self.model_shape = _forward_checked(chain, x)
        out = self.xs[-1]
        self.out = out if output_index is None else out[:, output_index : output_index + 1]
        self.patches: dict[int, Tensor | None] = {}

    def jvp(self, tangents: Sequence[Tensor], batched: bool) -> Tensor:
        """``(K, n, d)`` (batched) or ``(n, d)`` outputs' tangents."""
        tan = _Tangent(tangents, batched)
        y = _tangents_forward(self.chain, self.xs, self.derivs, tan, self.patches)[-1]
        if y is None:
            y = tan.T[0].new_zeros((self.xs[-1].shape[0], tan.K, self.xs[-1].shape[1]))
        if self.output_index is not None:
            y = y[..., self.output_index : self.output_index + 1]
        return y.transpose(0, 1) if batched else y[:, 0]

    def vjp(self, cotangent: Tensor, batched: bool) -> list[Tensor]:
        """Parameter-shaped ``J^T y`` of ``(K, n, d)`` (batched) or ``(n, d)`` cotangents."""
        cot = cotangent.transpose(0, 1) if batched else cotangent.unsqueeze(1)
        if self.output_index is not None:
            full = cot.new_zeros((cot.shape[0], cot.shape[1], self.xs[-1].shape[1]))
            full[..., self.output_index] = cot[..., 0]
            cot = full
        res = _backward(self.chain, self.xs, self.derivs, cot.contiguous(), self.patches)
        return _unbatch(res, batched)


class ChainGradientGraph:
    """``H v`` of ``loss(f(theta; x), y)`` on one batch through a chain (as ``GradientGraph``).

    With ``model_shape`` (the model's per-sample output shape, known from an earlier verified
    batch) the chain's forward pass is trusted and not checked against the model's.
    """

    def __init__(
        self,
        chain: Chain,
        loss_fn: LossFn,
        x: Tensor,
        y: Tensor | None,
        model_shape: torch.Size | None = None,
    ) -> None:
        self.chain = chain
        if model_shape is None:
            self.xs, self.derivs, model_shape = _forward_checked(chain, x)
        else:
            self.xs, self.derivs = chain.forward(x)
        self.model_shape = model_shape
        f = self.xs[-1]
        self.loss = OutputLoss(f, loss_fn, y, model_shape)
        e = self.loss.grad
        T = len(chain.steps)
        es: list[Tensor] = [e] * (T + 1)  # es[t] = dloss / dx_t
        d2es: list[Tensor | None] = [None] * T  # phi''(x_t) * es[t + 1] of elementwise steps
        for t in range(T - 1, chain.first, -1):
            s = chain.steps[t]
            if isinstance(s, _Affine):
                e = e @ s.weight if s.scale == 1.0 else s.scale * (e @ s.weight)
            elif isinstance(s, _Conv):
                e = s.input_grad(self.xs[t].shape, s.weight, e)
            elif isinstance(s, _Pool):
                e = s.adjoint(e, self.derivs[t], self.xs[t].shape)
            elif isinstance(s, _Flatten):
                e = e.reshape(self.xs[t].shape)
            elif s.derivs is None:
                e = s.scale * e
            else:
                d1, d2 = self.derivs[t]
                d2es[t] = d2 * e if d2 is not None else None
                e = d1 * e
            es[t] = e
        self.es, self.d2es = es, d2es
        self.patches: dict[int, Tensor | None] = {}

    def gradient(self) -> list[Tensor]:
        """The parameter-shaped gradient of the loss on the batch (one backward sweep)."""
        e = self.loss.grad
        res = _backward(self.chain, self.xs, self.derivs, e.unsqueeze(1), self.patches)
        return _unbatch(res, False)

    def hvp(self, tangents: Sequence[Tensor], batched: bool) -> list[Tensor]:
        """Parameter-shaped ``H v`` of parameter-shaped tangents (leading batch dim if ``batched``)."""
        tan = _Tangent(tangents, batched)
        dxs = _tangents_forward(self.chain, self.xs, self.derivs, tan, self.patches, keep=True)
        df = dxs[-1]
        if df is None:
            de = tan.T[0].new_zeros((self.xs[-1].shape[0], tan.K, self.xs[-1].shape[1]))
        else:
            de = self.loss.hvp_sample_major(df)
        second = (dxs, self.es, self.d2es, tan)
        res = _backward(self.chain, self.xs, self.derivs, de, self.patches, second)
        return _unbatch(res, batched)
