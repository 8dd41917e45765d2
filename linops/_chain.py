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
with the primal input's patches, unfolded once per batch (:func:`linops._propagation._conv_forward`).

A chain is recognised in an ``nn.Sequential`` (nested ones included) or in a model that
declares ``linops_chain()``, returning its steps in order (modules and Python floats for scalar
multiples; :class:`trainers.models.MLP` does). It is used only after its forward pass has
reproduced the model's outputs on the batch; otherwise the operators fall back to autograd.

The pieces: the activation table (:mod:`linops._activations`), the steps
(:mod:`linops._layers`), the propagation of tangents and cotangents
(:mod:`linops._propagation`); this module recognises a chain, binds it to a parameter space
and adapts it to the graph interface of the operators (:class:`ChainOutputGraph`,
:class:`ChainGradientGraph`).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from linops._activations import elementwise
from linops._autodiff import LossFn
from linops._layers import (
    Affine,
    AvgPool,
    Conv,
    Flatten,
    MaxPool,
    Pointwise,
    Pool,
    Step,
    forward_multiplier,
)
from linops._loss import OutputLoss
from linops._propagation import Tangent, backward, tangents_forward, unbatch
from linops.params import ParamSpace

__all__ = ["Chain", "ChainGradientGraph", "ChainOutputGraph", "recognise_chain"]

Tensor = torch.Tensor
#: what a step's primal pass keeps for the products: ``(phi', phi'')`` of an elementwise step
#: (``phi''`` None when piecewise linear), the argmax indices of max pooling, else None
StepAux = Any


def recognise_chain(model: nn.Module) -> list[nn.Module | float] | None:
    """Return the steps of ``model`` if it provably is a chain of supported modules, else None.

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
            or (isinstance(item, nn.Module) and elementwise(item) is not None)
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
                    self.steps.append(Pointwise(None, item))
            elif isinstance(item, nn.Linear):
                W, wi = bind(item.weight)
                b, bi = bind(item.bias)
                scale = forward_multiplier(item)
                self.steps.append(Affine(W, b, scale, wi, bi))  # type: ignore[arg-type]
            elif isinstance(item, nn.Conv2d):
                W, wi = bind(item.weight)
                b, bi = bind(item.bias)
                geometry = (item.stride, item.padding, item.dilation)
                self.steps.append(Conv(W, b, *geometry, wi, bi))  # type: ignore[arg-type]
            elif isinstance(item, nn.MaxPool2d):
                self.steps.append(MaxPool(item))
            elif isinstance(item, nn.AvgPool2d):
                self.steps.append(AvgPool(item))
            elif _is_flatten(item):
                self.steps.append(Flatten())
            else:
                self.steps.append(Pointwise(elementwise(item)))
        if covered != set(range(len(space.names))):
            missing = [space.names[i] for i in range(len(space.names)) if i not in covered]
            raise ValueError(f"params: {missing} are not weights or biases of the chain")
        # tangents are zero before the first differentiated step: nothing is computed there
        self.first = min(
            t
            for t, s in enumerate(self.steps)
            if isinstance(s, Affine | Conv) and (s.w_index is not None or s.b_index is not None)
        )

    def with_values(self, values: Sequence[Tensor]) -> Chain:
        """Return the same chain at other values of the space's parameters (``space.names`` order).

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
            if isinstance(s, Affine | Conv)
            else s
            for s in self.steps
        ]
        return new

    @classmethod
    def of(cls, space: ParamSpace) -> Chain | None:
        """Return the chain of ``space.model``, or None if it is not one or misses some parameter."""
        items = recognise_chain(space.model)
        if items is None:
            return None
        try:
            return cls(space, items)
        except ValueError:
            return None

    def forward(self, x: Tensor) -> tuple[list[Tensor], list[StepAux]]:
        """Return the inputs of every step and the output (``xs``, length T + 1), and ``(phi', phi'')``.

        The second list holds ``(phi', phi'')`` of elementwise steps, the argmax indices of
        pooling steps and None for the others.
        """
        xs: list[Tensor] = [x]
        derivs: list[StepAux] = []
        for s in self.steps:
            x = xs[-1]
            if isinstance(s, Affine):
                if x.dim() != 2:
                    raise _NotAChain
                if s.scale == 1.0:  # the model's own kernel: bit for bit its pre-activations
                    xs.append(F.linear(x, s.weight, s.bias))
                else:
                    y = s.scale * (x @ s.weight.T)
                    xs.append(y + s.bias if s.bias is not None else y)
                derivs.append(None)
            elif isinstance(s, Conv | Pool) and x.dim() != 4:
                raise _NotAChain
            elif isinstance(s, Conv):
                xs.append(s(x, s.weight, s.bias))
                derivs.append(None)
            elif isinstance(s, Pool):
                y, aux = s.primal(x)
                xs.append(y)
                derivs.append(aux)
            elif isinstance(s, Flatten):
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


def _forward_checked(chain: Chain, x: Tensor) -> tuple[list[Tensor], list[StepAux], torch.Size]:
    """Return the chain's forward pass, verified against the model's own outputs on ``x``.

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
    if f.dim() != 2:  # a convolution or pooling last: the chain's products need (n, d)
        raise ChainMismatch(
            f"the chain's outputs have shape {tuple(f.shape)}; the chain route needs (n, d) "
            "outputs (end the model with nn.Flatten())"
        )
    if ref.shape[0] != f.shape[0] or ref.reshape(ref.shape[0], -1).shape != f.shape:
        raise ChainMismatch(f"outputs of shape {tuple(f.shape)}, model gives {tuple(ref.shape)}")
    tol = math.sqrt(torch.finfo(f.dtype).eps) * (1.0 + float(ref.abs().max()))
    diff = float((f - ref.reshape(f.shape)).abs().max())
    if not diff <= tol:
        raise ChainMismatch(f"outputs differ from the model's by {diff:.3g} (tolerance {tol:.3g})")
    return xs, derivs, ref.shape[1:]


class ChainMismatch(Exception):
    """The recognised chain does not reproduce the model (the operator falls back to autograd)."""


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
        tan = Tangent(tangents, batched)
        y = tangents_forward(self.chain, self.xs, self.derivs, tan, self.patches)[-1]
        if y is None:
            y = tan.raw[0].new_zeros((self.xs[-1].shape[0], tan.K, self.xs[-1].shape[1]))
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
        res = backward(self.chain, self.xs, self.derivs, cot.contiguous(), self.patches)
        return unbatch(res, batched)


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
            if isinstance(s, Affine):
                e = e @ s.weight if s.scale == 1.0 else s.scale * (e @ s.weight)
            elif isinstance(s, Conv):
                e = s.input_grad(self.xs[t].shape, s.weight, e)
            elif isinstance(s, Pool):
                e = s.adjoint(e, self.derivs[t], self.xs[t].shape)
            elif isinstance(s, Flatten):
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
        """Return the parameter-shaped gradient of the loss on the batch (one backward sweep)."""
        e = self.loss.grad
        res = backward(self.chain, self.xs, self.derivs, e.unsqueeze(1), self.patches)
        return unbatch(res, False)

    def hvp(self, tangents: Sequence[Tensor], batched: bool) -> list[Tensor]:
        """Parameter-shaped ``H v`` of parameter-shaped tangents (leading batch dim if ``batched``)."""
        tan = Tangent(tangents, batched)
        dxs = tangents_forward(self.chain, self.xs, self.derivs, tan, self.patches, keep=True)
        df = dxs[-1]
        if df is None:
            de = tan.raw[0].new_zeros((self.xs[-1].shape[0], tan.K, self.xs[-1].shape[1]))
        else:
            de = self.loss.hvp_sample_major(df)
        second = (dxs, self.es, self.d2es, tan)
        res = backward(self.chain, self.xs, self.derivs, de, self.patches, second)
        return unbatch(res, batched)
