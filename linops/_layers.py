"""The steps of a chain (:mod:`linops._chain`).

Affine, elementwise, flatten, convolution and pooling steps, each holding what its products
need (weights, their positions in the parameter space, geometry), with the convolution's and
pooling's linear maps and adjoints.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn import grad as nn_grad

from linops._activations import Derivs

__all__ = [
    "Affine", "AvgPool", "Conv", "Flatten", "MaxPool", "Pointwise", "Pool", "Step",
    "forward_multiplier",
]  # fmt: skip

Tensor = torch.Tensor


def forward_multiplier(mod: nn.Module) -> float:
    """Return ``c`` of a layer computing ``c W x + b``: its ``multiplier`` attribute.

    Only a subclass with a forward of its own can apply one; ``nn.Linear`` and ``nn.Conv2d``
    themselves (or subclasses keeping their forward) ignore any such attribute, so for them it
    is 1 (a plain ``nn.Linear`` given a ``multiplier`` attribute was scaled by the chain
    route: a Hessian 2.4 away from autograd's when a zero weight hid it from the forward check).
    """
    if type(mod).forward in (nn.Linear.forward, nn.Conv2d.forward):
        return 1.0
    return float(getattr(mod, "multiplier", 1.0))


@dataclass
class Affine:
    weight: Tensor  # (out, in)
    bias: Tensor | None
    scale: float
    w_index: int | None  # position of the weight in the ParamSpace, None if not differentiated
    b_index: int | None


@dataclass
class Pointwise:
    derivs: Derivs | None  # None: multiplication by ``scale``
    scale: float = 1.0


class Flatten:
    pass


@dataclass
class Conv:
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
        """Return the gradient w.r.t. a weight of ``shape`` of ``<g, w * x>``."""
        return nn_grad.conv2d_weight(
            x, shape, g, self.stride, self.padding, self.dilation
        ).contiguous()

    def unfold(self, x: Tensor) -> Tensor:
        """Return the patches of ``x``, ``(n, in kh kw, h w)``: ``w * x`` is ``w.view(out, -1) @`` them."""
        kernel = self.weight.shape[2:]
        return F.unfold(x, kernel, self.dilation, self.padding, self.stride)

    def input_grad(self, shape: Sequence[int], w: Tensor, g: Tensor) -> Tensor:
        """Return the gradient w.r.t. an input of ``shape`` of ``<g, w * x>`` (transposed convolution).

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
        return nn_grad.conv2d_input(
            shape, w, g, self.stride, self.padding, self.dilation
        ).contiguous()


@dataclass
class MaxPool:
    """Max pooling; linear once the primal pass's argmax indices are held fixed."""

    module: nn.MaxPool2d

    def primal(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Return the pooled ``x`` and the indices kept for the products."""
        m = self.module
        return F.max_pool2d(
            x, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode, return_indices=True
        )

    def tangent(self, dx: Tensor, idx: Tensor) -> Tensor:
        """``dx[..., c, idx]`` of ``(n, K, C, H, W)`` at the indices ``(n, C, h, w)``."""
        lead = dx.shape[:-3]
        return dx.flatten(-2).gather(-1, _pool_index(idx, lead)).view(*lead, *idx.shape[1:])

    def adjoint(self, g: Tensor, idx: Tensor, shape: torch.Size) -> Tensor:
        """Return the transpose of :meth:`tangent`: ``g`` added into zeros of ``(n, [K,] *shape[1:])``."""
        lead = g.shape[:-3]
        out = g.new_zeros((*lead, shape[1], shape[2] * shape[3]))
        out.scatter_add_(-1, _pool_index(idx, lead), g.flatten(-2))
        return out.view(*lead, *shape[1:])


@dataclass
class AvgPool:
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
        """Return the transpose applied to ``g`` ``(n, [K,] C, h, w)``, for inputs of ``shape``."""
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


Pool = MaxPool | AvgPool


def _pair(v: int | Sequence[int]) -> list[int]:
    return [v, v] if isinstance(v, int) else list(v)


def _pool_index(idx: Tensor, lead: torch.Size) -> Tensor:
    """Pooling indices ``(n, C, h, w)`` expanded to ``(*lead, C, h w)`` (``lead`` starts with n)."""
    view = (idx.shape[0], *[1] * (len(lead) - 1), idx.shape[1], -1)
    return idx.reshape(view).expand(*lead, idx.shape[1], idx[0, 0].numel())


Step = Affine | Conv | Pool | Pointwise | Flatten
