r"""Derivatives of a loss with respect to the model outputs: gradient and Hessian products.

The GGN :math:`J^\top \nabla^2_f \ell\, J` and the chain route's Hessian products
(:mod:`linops._chain`) need, on each batch, the output gradient :math:`e = \nabla_f \ell` and
products :math:`\nabla^2_f \ell\, u` with many ``u``. For any loss they come from autograd on the
``(n, d)`` outputs (:class:`linops._autodiff.LossOutputGraph`). For the two losses met most,
cross-entropy with class-index targets and mean squared error, they have closed forms that
skip autograd's per-call cost (with :math:`p = \operatorname{softmax}(f_i)` and :math:`c` the
reduction's weight, :math:`1/n` for a mean, 1 for a sum):

.. math::

    \text{cross-entropy:}\quad e_i = c\,(p_i - \mathbb{1}_{y_i}), \qquad
        (\nabla^2 \ell\, u)_i = c\,\big(p_i \odot u_i - p_i\, (p_i^\top u_i)\big); \\
    \text{MSE:}\quad e = c'\, 2 (f - y), \qquad \nabla^2 \ell\, u = c'\, 2 u,

with :math:`c' = 1/(n d)` for a mean over all entries. The closed form is used only after its
gradient has matched autograd's on the batch, so a loss with other semantics (class weights,
label smoothing, ignored targets, probability targets) falls back to autograd.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from linops._autodiff import LossFn, LossOutputGraph

__all__ = ["OutputLoss"]

Tensor = torch.Tensor


def _kind(loss_fn: LossFn) -> tuple[str, str] | None:
    """``(family, reduction)`` of a loss with a closed form, else None."""
    if type(loss_fn) is nn.CrossEntropyLoss:
        plain = loss_fn.weight is None and loss_fn.label_smoothing == 0.0
        return ("cross_entropy", loss_fn.reduction) if plain else None
    if type(loss_fn) is nn.MSELoss:
        return "mse", loss_fn.reduction
    if loss_fn is nn.functional.cross_entropy:
        return "cross_entropy", "mean"
    if loss_fn is nn.functional.mse_loss:
        return "mse", "mean"
    return None


class OutputLoss:
    r"""Gradient and Hessian products of ``loss_fn`` at the outputs ``out`` of one batch.

    Parameters
    ----------
    out
        Flattened outputs ``(n, d)``.
    loss_fn
        ``loss_fn(outputs, y)`` with outputs of the model's shape ``(n, *model_shape)``.
    y
        Targets.
    model_shape
        Per-sample output shape of the model.

    Attributes
    ----------
    grad
        :math:`\nabla_f \ell`, ``(n, d)``.
    closed_form
        Whether products use the closed form (else autograd).
    """

    def __init__(
        self, out: Tensor, loss_fn: LossFn, y: Tensor | None, model_shape: torch.Size
    ) -> None:
        def shaped(o: Tensor, t: Tensor | None) -> Tensor:
            return loss_fn(o.reshape(o.shape[0], *model_shape), t)

        self._graph: LossOutputGraph | None = LossOutputGraph(out, shaped, y, out.shape)
        self.grad = self._autograd().g.detach()
        self.closed_form = False
        kind = _kind(loss_fn)
        if kind is None or kind[1] not in ("mean", "sum") or y is None:
            return
        family, reduction = kind
        out = out.detach()
        if family == "cross_entropy":
            if out.dim() != 2 or y.dim() != 1 or y.dtype.is_floating_point:
                return
            if y.min() < 0 or y.max() >= out.shape[1]:  # an ignore_index such as -100 or 255
                return
            n = out.shape[0]
            self._p: Tensor | None = torch.softmax(out, dim=1)
            self._scale = 1.0 / n if reduction == "mean" else 1.0
            onehot = nn.functional.one_hot(y, out.shape[1]).to(out.dtype)
            grad = self._scale * (self._p - onehot)
        else:
            if y.numel() != out.numel():
                return
            self._p = None
            self._scale = 2.0 / out.numel() if reduction == "mean" else 2.0
            grad = self._scale * (out - y.reshape(out.shape).to(out.dtype))
        tol = math.sqrt(torch.finfo(out.dtype).eps) * (1.0 + float(self.grad.abs().max()))
        if float((grad - self.grad).abs().max()) <= tol:
            self.closed_form = True
            self._graph = None  # checked: the autograd graph is not needed any more

    def hvp(self, u: Tensor, batched: bool) -> Tensor:
        r""":math:`\nabla^2_f \ell\, u` for ``u`` of shape ``(n, d)``, or ``(K, n, d)`` if batched."""
        if not self.closed_form:
            return self._autograd().hvp(u, batched)
        return self._closed(u, self._p)

    def hvp_sample_major(self, u: Tensor) -> Tensor:
        r""":math:`\nabla^2_f \ell\, u` for ``u`` laid out ``(n, K, d)`` (the chain's layout)."""
        if self.closed_form:
            return self._closed(u, None if self._p is None else self._p.unsqueeze(1))
        if u.shape[1] == 1:  # no vmap for a single vector
            return self._autograd().hvp(u[:, 0], False).unsqueeze(1)
        return self._autograd().hvp(u.transpose(0, 1), True).transpose(0, 1).contiguous()

    def _autograd(self) -> LossOutputGraph:
        """Return the retained autograd graph (kept exactly when the closed form does not apply)."""
        if self._graph is None:
            raise RuntimeError("OutputLoss: the closed form was verified, no graph is kept")
        return self._graph

    def _closed(self, u: Tensor, p: Tensor | None) -> Tensor:
        """Return the closed form, with ``p`` the softmax broadcast to ``u``'s layout (None: MSE)."""
        if p is None:
            return self._scale * u
        pu = (u * p).sum(-1, keepdim=True)
        return (u - pu).mul_(p).mul_(self._scale)
