r"""The bias of a pre-activation guesser: its noise map, covariance and expected update.

Section 5 of "How to Guess a Gradient" (U. Singhal, B. Cheung, K. Chandra, J. Ragan-Kelley,
J. B. Tenenbaum, T. A. Poggio and S. X. Yu; no arXiv id in the research document; "the paper"
below): a guess :math:`y = A\xi` of one layer's pre-activation gradient, :math:`\xi \sim
N(0, I)`, has expected update :math:`E[\hat g] = \mathrm{Cov}(y) \nabla L` and bias
:math:`(\mathrm{Cov}(y) - I)\nabla L` (eqs. (14)-(16)). :class:`GuessNoiseOperator` is
:math:`A`, :class:`GuessCovarianceOperator` is :math:`A A^\top` and :func:`guess_bias` the
expected update and its bias, as toolkit operators.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import nn

from estimators._guess_layers import find_layers, record_pass
from estimators.guess_quality import as_space, cosine
from linops.base import IdentityOperator, TorchLinearOperator
from linops.params import ParamSpace

__all__ = ["BiasAnalysis", "GuessCovarianceOperator", "GuessNoiseOperator", "guess_bias"]


class GuessNoiseOperator(TorchLinearOperator):
    r"""The linear map :math:`A` from noise to one example's pre-activation guess (section 5).

    The guess of layer :math:`l` is :math:`y = A \xi` with :math:`\xi \sim N(0, I)`:

    * ``"activation_perturbation"``: :math:`A = I`;
    * ``"w_transpose"``: :math:`A = D_l\, c\, W_{l+1}^\top` (:math:`\xi` at :math:`s_{l+1}`);
    * ``"downstream"``: :math:`A = D_l\, c\, W_{l+1}^\top D_{l+1}` (:math:`\xi` at :math:`x_{l+2}`).

    Products with :math:`A` are local vector-Jacobian products; products with :math:`A^\top`
    are their transposes by double backward. Shape ``(n_l, n_noise)``.

    Parameters
    ----------
    model
        Network or parameter space.
    values
        Parameter values (``None``: the model's).
    x
        One example, shape ``(1, ...)``.
    layer
        Index of the layer (execution order of its Linear / Conv2d layers); must not be the
        last one for ``"w_transpose"`` / ``"downstream"``.
    method
        One of the three above.

    Raises
    ------
    ValueError
        For an unknown method, a batch of more than one example or a layer out of range.
    """

    METHODS = ("activation_perturbation", "w_transpose", "downstream")

    def __init__(
        self,
        model: nn.Module | ParamSpace,
        values: Mapping[str, torch.Tensor] | None,
        x: torch.Tensor,
        layer: int,
        *,
        method: str = "w_transpose",
    ) -> None:
        if method not in self.METHODS:
            raise ValueError(f"method: expected one of {self.METHODS}, got {method!r}")
        if x.shape[0] != 1:
            raise ValueError(f"x: expected one example (a batch of 1), got {x.shape[0]}")
        space = as_space(model)
        values = space.values() if values is None else values
        layers = find_layers(space, x)
        last = len(layers) - 1 if method == "activation_perturbation" else len(layers) - 2
        if not (isinstance(layer, int) and 0 <= layer <= last):
            raise ValueError(f"layer: expected an integer in [0, {last}], got {layer!r}")
        self.rec = record_pass(space, values, x, layers)
        self.layer, self.method = layer, method
        self._down = method == "downstream" and layer + 2 < len(layers)
        if method == "activation_perturbation":
            self._start = self.rec.leaves[layer]
        elif self._down:
            self._start = self.rec.inputs[layer + 2]
        else:
            self._start = self.rec.raw[layer + 1]
        target = self.rec.leaves[layer]
        super().__init__(
            (target[0].numel(), self._start[0].numel()), dtype=target.dtype, device=target.device
        )

    def _pull(self, v: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
        """Apply ``A v``: local vector-Jacobian products from the noise position back to ``s_l``."""
        i, rec = self.layer, self.rec
        if self.method == "activation_perturbation":
            return v
        steps = [(self._start, rec.leaves[i + 1])] if self._down else []
        steps.append((rec.raw[i + 1], rec.leaves[i]))
        for out, inp in steps:
            (v,) = torch.autograd.grad(out, inp, v, retain_graph=True, create_graph=create_graph)
        return v

    def _matmat_torch(self, X: torch.Tensor) -> torch.Tensor:
        shape = self._start.shape
        cols = [self._pull(X[:, j].reshape(shape)).reshape(-1) for j in range(X.shape[1])]
        return torch.stack(cols, dim=1) if cols else X.new_zeros(self.shape[0], 0)

    def _rmatmat_torch(self, Y: torch.Tensor) -> torch.Tensor:
        if self.method == "activation_perturbation":
            return Y
        u = torch.zeros(self._start.shape, dtype=Y.dtype, device=Y.device, requires_grad=True)
        with torch.enable_grad():
            out = self._pull(u, create_graph=True)
        cols = []
        for j in range(Y.shape[1]):
            (g,) = torch.autograd.grad(out, u, Y[:, j].reshape(out.shape), retain_graph=True)
            cols.append(g.reshape(-1))
        return torch.stack(cols, dim=1) if cols else Y.new_zeros(self.shape[1], 0)


class GuessCovarianceOperator(TorchLinearOperator):
    r""":math:`\mathrm{Cov}(y) = A A^\top` for a guess :math:`y = A\xi`, :math:`\xi \sim N(0, I)`.

    The paper's eq. (14): :math:`E[\hat g] = E[y y^\top] \nabla L = \mathrm{Cov}(y) \nabla L`; for
    :math:`W^\top`, :math:`\mathrm{Cov}(y) = D W^\top W D` (section 5). Symmetric positive
    semi-definite, so Lanczos and the spectral routines of :mod:`linops` apply.
    """

    is_symmetric = True

    def __init__(self, noise: TorchLinearOperator) -> None:
        super().__init__(
            (noise.shape[0], noise.shape[0]), dtype=noise.torch_dtype, device=noise.device
        )
        self.noise = noise

    def _matmat_torch(self, X: torch.Tensor) -> torch.Tensor:
        return self.noise._apply(self.noise._apply(X, True))


class BiasAnalysis(NamedTuple):
    r"""Section 5 for one layer and example: :math:`E[\hat g_s]`, its bias, and summaries."""

    gradient: torch.Tensor
    expected: torch.Tensor
    bias: torch.Tensor
    cosine_expected: float
    relative_bias: float


def guess_bias(cov: TorchLinearOperator, gradient: torch.Tensor) -> BiasAnalysis:
    r"""Return the expected guess and bias of eq. (15).

    Expected guess :math:`\mathrm{Cov}(y) g` and bias :math:`(\mathrm{Cov}(y) - I) g`.

    Parameters
    ----------
    cov
        :math:`\mathrm{Cov}(y)` as an operator (e.g. :class:`GuessCovarianceOperator`).
    gradient
        The true gradient :math:`g` in the guess space (flat, length ``cov.shape[0]``).

    Returns
    -------
    BiasAnalysis
        With ``cosine_expected`` the cosine of :math:`E[\hat g]` to :math:`g` and
        ``relative_bias`` :math:`\|(\mathrm{Cov} - I) g\| / \|g\|`.

    Raises
    ------
    ValueError
        If ``gradient`` is not a vector of length ``cov.shape[0]``.
    """
    g = gradient.reshape(-1) if gradient.ndim > 1 and gradient.shape[0] == 1 else gradient
    if g.ndim != 1 or g.shape[0] != cov.shape[0]:
        raise ValueError(
            f"gradient: expected a vector of length {cov.shape[0]}, got shape {tuple(gradient.shape)}"
        )
    g = g.to(cov.torch_dtype)
    expected = cov @ g
    bias = (cov - IdentityOperator(cov.shape[0], dtype=cov.torch_dtype, device=cov.device)) @ g
    gn = float(g.norm())
    return BiasAnalysis(
        g, expected, bias, cosine(expected, g), float(bias.norm()) / gn if gn else 0.0
    )
