r"""Elementwise activations of the chain route with their first and second derivatives.

:func:`elementwise` maps a supported module (ReLU, LeakyReLU, Tanh, Sigmoid, GELU, SiLU,
Softplus, Identity, Dropout in eval mode) to ``x -> (phi(x), phi'(x), phi''(x))``; functions
whose :math:`\phi'' = 0` carry ``piecewise_linear = True``, so the chain keeps no
:math:`\phi''` for them and skips their second-order term (:mod:`linops._chain`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import cast

import torch
from torch import nn

__all__ = ["Derivs", "elementwise"]

Tensor = torch.Tensor
Derivs = Callable[[Tensor], tuple[Tensor, Tensor, Tensor]]  # x -> (phi, phi', phi'')


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


def elementwise(mod: nn.Module) -> Derivs | None:
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
        return _leaky(float(cast(nn.LeakyReLU, mod).negative_slope))
    if kind is nn.Softplus:
        softplus = cast(nn.Softplus, mod)
        return _softplus(float(softplus.beta), float(softplus.threshold))
    return None


def _identity(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return x, torch.ones_like(x), torch.zeros_like(x)


# phi'' = 0: the chain keeps no phi'' for these and skips their second-order term
_relu.piecewise_linear = True  # type: ignore[attr-defined]
_identity.piecewise_linear = True  # type: ignore[attr-defined]
