r"""Models the research documents study: scaled MLPs, LeNet-5 and a small CNN.

The :class:`MLP` exposes the parameterizations that "Leveraging Low Rank Structure in the Lazy
Regime" (anonymous ICLR 2025 submission) and "Demystifying Lazy Training of Neural Networks
from a Macroscopic Viewpoint" (arXiv:2404.04859) vary. With input
:math:`h_0 = x`, hidden widths :math:`n_1, \dots, n_L` and fan-ins :math:`n_{l-1}`,

.. math::

    a_l = c_l W_l h_{l-1} + b_l, \qquad h_l = \phi(a_l), \qquad
    f(x) = \kappa \, (c_{L+1} W_{L+1} h_L + b_{L+1}),

with biases initialised to zero and

* ``"standard"``: :math:`W_l \sim N(0, \beta_l^2 / n_{l-1})`, :math:`c_l = 1` for every layer;
* ``"ntk"``: :math:`W_l \sim N(0, \beta_l^2)`, :math:`c_l = 1/\sqrt{n_{l-1}}` for every layer;
* ``"mean_field"``: as ``"ntk"`` except the output layer, :math:`c_{L+1} = 1/n_L`.

``"standard"`` with :math:`\beta_l = 1` is LeCun-normal initialisation (as in "Understanding Gradient Descent through the Training
Jacobian"). The output
scale :math:`\kappa` is the initial output scale of the macroscopic-viewpoint paper: the theta-lazy regime is
:math:`\lim_{m\to\infty} \log\kappa / \log m > 0` for width :math:`m`. That paper writes the
same network with per-layer scales :math:`\beta_l = m^{-\gamma_l}` and
:math:`\kappa = \prod_l \beta_l \cdot (\text{width factors})`; here :math:`\kappa` is a separate
knob so that initialisation and output scale can be varied independently.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from linops.blocks import make_generator

__all__ = ["MLP", "LeNet5", "SmallCNN", "activation"]

_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "sigmoid": nn.Sigmoid,
    "softplus": nn.Softplus,
    "silu": nn.SiLU,
    "identity": nn.Identity,
}


def activation(name: str) -> nn.Module:
    """Make an activation module by name (relu, tanh, gelu, sigmoid, softplus, silu, identity)."""
    if name not in _ACTIVATIONS:
        raise ValueError(f"activation: expected one of {sorted(_ACTIVATIONS)}, got {name!r}")
    return _ACTIVATIONS[name]()


class ScaledLinear(nn.Linear):
    """``y = c W x + b``: a linear layer with a fixed forward multiplier ``c``."""

    def __init__(self, fan_in: int, fan_out: int, *, multiplier: float, bias: bool) -> None:
        super().__init__(fan_in, fan_out, bias=bias)
        self.multiplier = multiplier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the network's outputs on a batch ``x``."""
        y = self.multiplier * (x @ self.weight.T)
        return y + self.bias if self.bias is not None else y


class MLP(nn.Module):
    r"""Fully connected network with the scalings of the papers of the module docstring.

    Parameters
    ----------
    d_in, d_out
        Input and output dimensions.
    widths
        Hidden widths ``(n_1, ..., n_L)``; an int means one hidden layer.
    activation
        Name of the activation :math:`\phi`.
    parameterization
        ``"standard"``, ``"ntk"`` or ``"mean_field"``.
    beta
        Initialisation scale :math:`\beta_l`, one float for all layers or one per layer
        (``L + 1`` values).
    kappa
        Output scale :math:`\kappa`.
    bias
        Whether layers have biases (initialised to zero).
    seed
        Seed of the initialisation (``int`` or ``torch.Generator``); ``None`` draws from torch's
        global generator, as ``nn.Linear`` does (so ``torch.manual_seed`` applies).

    Examples
    --------
    >>> net = MLP(64, 10, widths=(64,), activation="gelu")
    >>> sum(p.numel() for p in net.parameters())
    4810
    """

    def __init__(
        self,
        d_in: int,
        d_out: int,
        widths: int | Sequence[int] = (64,),
        *,
        activation: str = "relu",
        parameterization: str = "standard",
        beta: float | Sequence[float] = 1.0,
        kappa: float = 1.0,
        bias: bool = True,
        seed: int | torch.Generator | None = None,
    ) -> None:
        super().__init__()
        generator = None if seed is None else make_generator(seed, torch.device("cpu"))
        widths = (widths,) if isinstance(widths, int) else tuple(widths)
        if parameterization not in ("standard", "ntk", "mean_field"):
            raise ValueError(
                "parameterization: expected 'standard', 'ntk' or 'mean_field', "
                f"got {parameterization!r}"
            )
        dims = (d_in, *widths, d_out)
        betas = [float(beta)] * (len(dims) - 1) if isinstance(beta, int | float) else list(beta)
        if len(betas) != len(dims) - 1:
            raise ValueError(f"beta: expected {len(dims) - 1} values, got {len(betas)}")
        self.parameterization, self.kappa, self.widths = parameterization, float(kappa), widths
        layers: list[nn.Module] = []
        for i, (fan_in, fan_out) in enumerate(itertools.pairwise(dims)):
            last = i == len(dims) - 2
            mult, std = _scaling(parameterization, fan_in, betas[i], last)
            lin = ScaledLinear(fan_in, fan_out, multiplier=mult, bias=bias)
            with torch.no_grad():
                lin.weight.normal_(0.0, std, generator=generator)
                if bias:
                    lin.bias.zero_()
            layers.append(lin)
            if not last:
                layers.append(_ACTIVATIONS[_check_act(activation)]())
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the network's outputs on a batch ``x``."""
        return self.kappa * self.layers(x.flatten(1))

    def linops_chain(self) -> list[nn.Module | float]:
        """Return the forward pass as a chain of steps, for linops' hand-derived products."""
        return [nn.Flatten(), *self.layers, self.kappa]

    def linear_layers(self) -> list[ScaledLinear]:
        """Return the linear layers in order (per-layer quantities such as RD and Gram matrices)."""
        return [m for m in self.layers if isinstance(m, ScaledLinear)]


def _check_act(name: str) -> str:
    if name not in _ACTIVATIONS:
        raise ValueError(f"activation: expected one of {sorted(_ACTIVATIONS)}, got {name!r}")
    return name


def _scaling(kind: str, fan_in: int, beta: float, last: bool) -> tuple[float, float]:
    """(forward multiplier c_l, weight std) for one layer."""
    if kind == "standard":
        return 1.0, beta / math.sqrt(fan_in)
    if kind == "mean_field" and last:
        return 1.0 / fan_in, beta
    return 1.0 / math.sqrt(fan_in), beta


class LeNet5(nn.Module):
    """LeNet-5 (LeCun et al. 1998) for ``1 x 32 x 32`` inputs: 61,706 parameters with 10 classes.

    Examples
    --------
    >>> sum(p.numel() for p in LeNet5().parameters())
    61706
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, act: str = "tanh") -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5),
            activation(act),
            nn.AvgPool2d(2),
            nn.Conv2d(6, 16, 5),
            activation(act),
            nn.AvgPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * 5 * 5, 120),
            activation(act),
            nn.Linear(120, 84),
            activation(act),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the network's outputs on a batch ``x``."""
        return self.classifier(self.features(x))

    def linops_chain(self) -> list[nn.Module | float]:
        """Return the forward pass as a chain of steps, for linops' hand-derived products."""
        return [*self.features, *self.classifier]


class SmallCNN(nn.Module):
    """Two 3x3 convolutions with ReLU and pooling, then a linear read-out.

    Parameters
    ----------
    in_channels, num_classes
        Input channels and outputs.
    channels
        Channels of the two convolutions.
    image_size
        Side of the square input (8 for digits, 32 for the benchmarks).
    act
        Activation name.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        channels: tuple[int, int] = (8, 16),
        image_size: int = 8,
        act: str = "relu",
    ) -> None:
        super().__init__()
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 3, padding=1),
            activation(act),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1),
            activation(act),
            nn.MaxPool2d(2),
        )
        side = image_size // 4
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(c2 * side * side, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the network's outputs on a batch ``x``."""
        return self.classifier(self.features(x))

    def linops_chain(self) -> list[nn.Module | float]:
        """Return the forward pass as a chain of steps, for linops' hand-derived products."""
        return [*self.features, *self.classifier]
