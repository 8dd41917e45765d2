r"""Exact training of the linearized model (NTK / lazy dynamics), with JVPs and VJPs.

"Leveraging Low Rank Structure in the Lazy Regime" (an anonymous ICLR 2025 submission, no arXiv
id given; "the paper" below), equation 4, replaces the network by its first-order Taylor expansion at the
initial parameters :math:`w_0`,

.. math::

    f_{\text{lin}}(w; x) = f(w_0; x) + J_0(x)\,(w - w_0), \qquad
    J_0(x) = \nabla_w f(w; x)\big|_{w_0},

and trains it with the loss of equation 1. Its gradient on a batch :math:`S` is equation 5,

.. math::

    \nabla_w \ell(w; S) = J_0(x_S)^\top a_t, \qquad
    a_t = \frac{\partial \ell}{\partial f}\Big|_{f = f_{\text{lin}}(w_t; x_S)},

so one step costs one JVP (the outputs :math:`J_0 (w - w_0)`) and one VJP (the update
:math:`J_0^\top a_t`), both at the fixed point :math:`w_0`: no Jacobian is ever formed. In
function space, full-batch gradient descent with step size :math:`\eta` is the NTK dynamics
:math:`f_{t+1} = f_t - \eta\, K_0 a_t` with :math:`K_0 = J_0 J_0^\top` (the paper's eq. 2).
This is the exact reference that the low-rank trainer (:mod:`trainers.lowrank`) approximates.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch

from linops import Params
from linops.jacobian import JacobianOperator
from trainers._base import Direction, History, LossFn, Trainer

__all__ = ["LinearizedTrainer"]


class _Linearization(NamedTuple):
    """The Jacobian at :math:`w_0` on one batch and the outputs there."""

    J: JacobianOperator
    f0: torch.Tensor


class LinearizedTrainer(Trainer):
    r"""Gradient descent on the linearization :math:`f(w_0) + J_0 (w - w_0)` of the model.

    Parameters
    ----------
    model
        The network; the linearization point :math:`w_0` is its current parameters.
    loss_fn
        ``loss_fn(outputs, targets) -> scalar`` (mean or sum reduction).
    optimizer, params, **optimizer_kw
        As for every :class:`trainers.Trainer`.
    evaluate_linearized
        If true (default) :meth:`forward` (hence :meth:`evaluate` and the history's
        train/test metrics) is the linearized model, the model this trainer trains; if false it
        is the network itself at the trained parameters.
    cache_graph
        Keep the Jacobian operator at :math:`w_0` of the last batch (its retained autodiff
        graph and outputs) and reuse it when the next batch has the same inputs (full-batch
        training): each step is then two backward passes through a retained graph instead of
        two forward and three backward passes.

    Notes
    -----
    One step on a batch :math:`S` with :math:`\delta = w_t - w_0`:

    1. outputs :math:`f_S = f(w_0; x_S) + J_0 \delta` (a JVP at :math:`w_0`);
    2. :math:`a_t = \partial \ell / \partial f_S` (autodiff through the loss only);
    3. direction :math:`J_0^\top a_t` (a VJP at :math:`w_0`), handed to the optimizer.

    JVP and VJP are products with a :class:`linops.JacobianOperator` at :math:`w_0` on the
    batch (``route="autograd"``: they replay one retained graph of :math:`f(w_0; x_S)`, the JVP
    by the double-backward trick). With ``batch_size=None`` ``fit`` does not shuffle, so the
    full batch keeps its order and its operator is built once.

    Examples
    --------
    >>> import torch
    >>> from trainers.models import MLP
    >>> g = torch.Generator().manual_seed(0)
    >>> X, y = torch.randn(32, 4, generator=g), torch.randint(0, 3, (32,), generator=g)
    >>> t = LinearizedTrainer(MLP(4, 3, 16, seed=g), torch.nn.functional.cross_entropy, lr=0.5)
    >>> h = t.fit(X, y, epochs=20, progress=False)
    >>> h.loss[-1] < h.loss[0]
    True
    """

    def __init__(
        self,
        model: torch.nn.Module,
        loss_fn: LossFn,
        *,
        optimizer: str | Callable[..., torch.optim.Optimizer] = "sgd",
        params: Params | None = None,
        evaluate_linearized: bool = True,
        cache_graph: bool = True,
        **optimizer_kw: Any,  # forwarded to the optimizer (see Trainer)
    ) -> None:
        super().__init__(model, loss_fn, optimizer=optimizer, params=params, **optimizer_kw)
        self.evaluate_linearized = bool(evaluate_linearized)
        self.cache_graph = bool(cache_graph)
        self._cached: tuple[torch.Tensor, _Linearization] | None = None

    # ----------------------------------------------------------------- linearized model
    def _linearization(self, x: torch.Tensor) -> _Linearization:
        """:math:`J_0` and :math:`f(w_0; x)` on ``x`` (reused for identical consecutive inputs)."""
        if self._cached is not None:
            x_ref, lin = self._cached
            if x_ref.shape == x.shape and torch.equal(x_ref, x):
                return lin
        J = JacobianOperator(
            self.model, x, self.initial_values, allow_train_mode=True, route="autograd"
        )
        with torch.no_grad():
            f0 = self.space.functional_call(self.initial_values, x)
        lin = _Linearization(J, f0)
        # a copy: the caller's tensor itself (a buffer refilled in place between calls) would
        # always equal itself, and the linearization of its old values would be reused
        self._cached = (x.detach().clone(), lin) if self.cache_graph else None
        return lin

    def _delta(self) -> torch.Tensor:
        return self.space.flatten(
            [self.values[n].detach() - self.initial_values[n] for n in self.space.names]
        )

    def linearized_outputs(self, x: torch.Tensor) -> torch.Tensor:
        r"""Evaluate the linearized model :math:`f(w_0; x) + J_0(x)(w_t - w_0)` (shape of ``f``)."""
        return self._outputs(self._linearization(x))

    def _outputs(self, lin: _Linearization) -> torch.Tensor:
        return lin.f0 + (lin.J @ self._delta()).reshape(lin.f0.shape)

    def forward(
        self, x: torch.Tensor, values: Mapping[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Linearized outputs (or the network's, see ``evaluate_linearized`` / ``values``)."""
        if values is not None or not self.evaluate_linearized:
            return super().forward(x, values)
        return self.linearized_outputs(x)

    # ----------------------------------------------------------------- the trainer interface
    def direction(self, x: torch.Tensor, y: torch.Tensor) -> Direction:
        r"""Loss of the linearized model on the batch and its exact gradient :math:`J_0^\top a`."""
        lin = self._linearization(x)
        out = self._outputs(lin).requires_grad_(True)
        with torch.enable_grad():
            loss = self.loss_fn(out, y)
            (a,) = torch.autograd.grad(loss, out)
        grads = self.space.unflatten(lin.J.H @ a.reshape(-1))
        return Direction(float(loss.detach()), dict(grads))

    def fit(
        self,
        X: torch.Tensor,
        y: torch.Tensor,
        *,
        batch_size: int | None = None,
        shuffle: bool = True,
        **kwargs: Any,  # Trainer.fit's options, forwarded
    ) -> History:
        """As :meth:`Trainer.fit`; a full batch (``batch_size`` None or ``>= len(X)``) is not shuffled."""
        if batch_size is None or batch_size >= len(X):
            shuffle = False
        return super().fit(X, y, batch_size=batch_size, shuffle=shuffle, **kwargs)
