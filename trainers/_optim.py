r"""Functional optimizers with hand-derived tangent (JVP) and cotangent (VJP) maps.

One optimizer step is :math:`(\theta_{t+1}, s_{t+1}) = U_t(\theta_t, s_t, g_t)` with
:math:`g_t = \nabla L_t(\theta_t)` the mini-batch gradient and :math:`s_t` the optimizer state
(momentum buffer, Adam moments). :math:`U_t` acts elementwise, so its derivatives are cheap; the
only expensive part of differentiating a step is the derivative of the gradient, the Hessian
:math:`H_t = \nabla^2 L_t(\theta_t)`, which is symmetric. Hence ("Understanding Gradient Descent through the Training Jacobian", section 2)

.. math::

    \dot g = H_t \dot\theta, \qquad (\dot\theta', \dot s') = \partial U_t\,(\dot\theta, \dot s, \dot g)

in forward mode and, in reverse mode, :math:`(\bar\theta, \bar s, \bar g) = \partial U_t^\top
(\bar\theta', \bar s')` followed by :math:`\bar\theta \mathrel{+}= H_t \bar g`.

Primal tensors have shape ``(m,)``; tangents and cotangents are batched, ``(K, m)``. The update
formulas are PyTorch's (``torch.optim.SGD``, ``Adam``, ``AdamW``) so that a functional run matches
an object-style one step for step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

__all__ = ["SGD", "Adam", "AdamW", "FunctionalOptimizer"]

Tensor = torch.Tensor
State = tuple[Tensor, ...]
HVP = Callable[[list[Tensor], list[Tensor] | None, float], list[Tensor]]


class FunctionalOptimizer:
    """Base class: ``init``, ``update`` and its ``tangent`` and ``cotangent`` maps."""

    #: number of state vectors (each of the parameter's shape)
    num_states: int = 0

    def init(self, theta: Tensor) -> State:
        """Return the initial state for parameters ``theta`` (zeros, independent of ``theta``)."""
        return tuple(torch.zeros_like(theta) for _ in range(self.num_states))

    def update(
        self, t: int, lr: float, theta: Tensor, state: State, g: Tensor
    ) -> tuple[Tensor, State]:
        """One step: ``(theta_{t+1}, s_{t+1})`` from ``theta_t``, ``s_t`` and the gradient ``g_t``."""
        raise NotImplementedError

    def tangent(
        self,
        t: int,
        lr: float,
        theta: Tensor,
        state: State,
        g: Tensor,
        dtheta: Tensor,
        dstate: State,
        dg: Tensor,
    ) -> tuple[Tensor, State]:
        """Push batched tangents ``(K, m)`` through the step; ``dg`` is ``H_t dtheta``."""
        raise NotImplementedError

    def cotangent(
        self,
        t: int,
        lr: float,
        theta: Tensor,
        state: State,
        g: Tensor,
        btheta: Tensor,
        bstate: State,
    ) -> tuple[Tensor, State, Tensor]:
        """Pull batched cotangents back: ``(btheta_t, bstate_t, bg_t)``; caller adds ``H_t bg``."""
        raise NotImplementedError

    def describe(self) -> str:
        """Return a short stable description (used in checkpoint fingerprints)."""
        return repr(self)

    # batched passes over parameter blocks, used by TrainingRun.jvp / vjp
    def tangent_step(
        self,
        t: int,
        lr: float,
        theta: list[Tensor],
        state: list[State],
        g: list[Tensor],
        dtheta: list[Tensor],
        dstate: list[State],
        hvp: HVP,
    ) -> tuple[list[Tensor], list[State]]:
        """:meth:`tangent` over parameter blocks; ``hvp(V, out, beta)`` gives ``beta out + H V``.

        Subclasses may update ``dtheta`` and ``dstate`` in place (the caller owns them).
        """
        dg = hvp(dtheta, None, 0.0)
        res = [
            self.tangent(t, lr, *args)
            for args in zip(theta, state, g, dtheta, dstate, dg, strict=True)
        ]
        return [r[0] for r in res], [r[1] for r in res]

    def cotangent_step(
        self,
        t: int,
        lr: float,
        theta: list[Tensor],
        state: list[State],
        g: list[Tensor],
        btheta: list[Tensor],
        bstate: list[State],
        hvp: HVP,
    ) -> tuple[list[Tensor], list[State]]:
        """:meth:`cotangent` over parameter blocks, then ``btheta += H bg``."""
        res = [
            self.cotangent(t, lr, *args)
            for args in zip(theta, state, g, btheta, bstate, strict=True)
        ]
        bth = [r[0].contiguous() for r in res]
        hvp([r[2].contiguous() for r in res], bth, 1.0)
        return bth, [r[1] for r in res]


class SGD(FunctionalOptimizer):
    r"""SGD with optional (Nesterov) momentum and L2 weight decay, as ``torch.optim.SGD``.

    .. math::

        g^e = g + \lambda\theta,\quad b' = \mu b + g^e,\quad
        \theta' = \theta - \eta\,(g^e + \mu b' \text{ if Nesterov else } b')

    (without momentum, :math:`\theta' = \theta - \eta g^e`). The step is linear in
    :math:`(\theta, b, g)`, so its tangent and cotangent maps are the step itself and its
    transpose.

    Parameters
    ----------
    momentum
        :math:`\mu \in [0, 1)`.
    nesterov
        Nesterov momentum (requires ``momentum > 0``).
    weight_decay
        :math:`\lambda \ge 0`.
    """

    def __init__(
        self, momentum: float = 0.0, *, nesterov: bool = False, weight_decay: float = 0.0
    ) -> None:
        self.momentum = _check_unit(momentum, "momentum")
        self.weight_decay = _check_nonneg(weight_decay, "weight_decay")
        if nesterov and self.momentum == 0.0:
            raise ValueError(
                "nesterov: expected momentum > 0 with Nesterov momentum, got momentum=0"
            )
        self.nesterov = bool(nesterov)
        self.num_states = 1 if self.momentum > 0 else 0

    def _step(self, lr: float, theta: Tensor, state: State, g: Tensor) -> tuple[Tensor, State]:
        # the step is linear: used for primals and tangents alike
        ge = g + self.weight_decay * theta if self.weight_decay else g
        if not self.num_states:
            return theta - lr * ge, ()
        buf = self.momentum * state[0] + ge
        step = ge + self.momentum * buf if self.nesterov else buf
        return theta - lr * step, (buf,)

    def update(
        self, t: int, lr: float, theta: Tensor, state: State, g: Tensor
    ) -> tuple[Tensor, State]:
        """As :meth:`FunctionalOptimizer.update`."""
        return self._step(lr, theta, state, g)

    def tangent(self, t, lr, theta, state, g, dtheta, dstate, dg):
        """As :meth:`FunctionalOptimizer.tangent`."""
        return self._step(lr, dtheta, dstate, dg)

    def tangent_step(self, t, lr, theta, state, g, dtheta, dstate, hvp):
        """As :meth:`FunctionalOptimizer.tangent_step`."""
        mu, wd = self.momentum, self.weight_decay
        if self.num_states and not self.nesterov:
            # b' = mu b + H dtheta + wd dtheta (accumulated in place), dtheta' = dtheta - lr b'
            buf = [s[0] for s in dstate]
            hvp(dtheta, buf, mu)
            for b, d in zip(buf, dtheta, strict=True):
                if wd:
                    b.add_(d, alpha=wd)
                d.add_(b, alpha=-lr)
            return dtheta, dstate
        dg = hvp(dtheta, None, 0.0)
        for i, (d, gd) in enumerate(zip(dtheta, dg, strict=True)):
            if wd:
                gd.add_(d, alpha=wd)
            if self.num_states:
                dstate[i][0].mul_(mu).add_(gd)
                d.add_(dstate[i][0], alpha=-lr * mu)
            d.add_(gd, alpha=-lr)
        return dtheta, dstate

    def cotangent(self, t, lr, theta, state, g, btheta, bstate):
        """As :meth:`FunctionalOptimizer.cotangent`."""
        bstep = -lr * btheta
        if self.num_states:
            mu = self.momentum
            bbuf = bstate[0] + (mu * bstep if self.nesterov else bstep)
            bge = bbuf + bstep if self.nesterov else bbuf
            new_state: State = (mu * bbuf,)
        else:
            bge, new_state = bstep, ()
        bth = btheta + self.weight_decay * bge if self.weight_decay else btheta
        return bth, new_state, bge

    def __repr__(self) -> str:
        return (
            f"SGD(momentum={self.momentum!r}, nesterov={self.nesterov}, "
            f"weight_decay={self.weight_decay!r})"
        )


class Adam(FunctionalOptimizer):
    r"""Adam (Kingma & Ba 2015) with L2 weight decay, as ``torch.optim.Adam``.

    At step :math:`k = t + 1`, with :math:`g^e = g + \lambda\theta`,

    .. math::

        m' = \beta_1 m + (1 - \beta_1) g^e,\quad v' = \beta_2 v + (1 - \beta_2) (g^e)^2,\quad
        \theta' = a\,\theta - \frac{\eta}{1 - \beta_1^k}\,
        \frac{m'}{\sqrt{v' / (1 - \beta_2^k)} + \epsilon}

    with :math:`a = 1` (``AdamW`` decouples the decay: :math:`a = 1 - \eta\lambda` and
    :math:`g^e = g`). Where :math:`v' = 0` the derivative of the square root is taken as 0.
    """

    num_states = 2
    decoupled = False

    def __init__(
        self,
        betas: Sequence[float] = (0.9, 0.999),
        eps: float = 1e-8,
        *,
        weight_decay: float = 0.0,
    ) -> None:
        if len(betas) != 2:
            raise ValueError(f"betas: expected two numbers, got {betas!r}")
        self.beta1 = _check_unit(betas[0], "betas[0]")
        self.beta2 = _check_unit(betas[1], "betas[1]")
        self.eps = _check_nonneg(eps, "eps")
        self.weight_decay = _check_nonneg(weight_decay, "weight_decay")

    def _coeffs(self, t: int, lr: float) -> tuple[float, float, float]:
        k = t + 1
        c = lr / (1.0 - self.beta1**k)
        sbc2 = math.sqrt(1.0 - self.beta2**k)
        a = 1.0 - lr * self.weight_decay if self.decoupled else 1.0
        return c, sbc2, a

    def _geff(self, theta: Tensor, g: Tensor) -> Tensor:
        return g + self.weight_decay * theta if self.weight_decay and not self.decoupled else g

    def _moments(self, t, lr, theta, state, g):
        ge = self._geff(theta, g)
        m = self.beta1 * state[0] + (1.0 - self.beta1) * ge
        v = self.beta2 * state[1] + (1.0 - self.beta2) * ge * ge
        c, sbc2, a = self._coeffs(t, lr)
        sq = v.sqrt()
        D = sq / sbc2 + self.eps
        # d s / d v' with s = sqrt(v') / sqrt(bc2), zero where v' = 0
        dsdv = torch.where(sq > 0, 0.5 / (sq.clamp_min(torch.finfo(sq.dtype).tiny) * sbc2), 0.0)
        return ge, m, v, D, dsdv, c, a

    def update(
        self, t: int, lr: float, theta: Tensor, state: State, g: Tensor
    ) -> tuple[Tensor, State]:
        """As :meth:`FunctionalOptimizer.update`."""
        ge = self._geff(theta, g)
        m = self.beta1 * state[0] + (1.0 - self.beta1) * ge
        v = self.beta2 * state[1] + (1.0 - self.beta2) * ge * ge
        c, sbc2, a = self._coeffs(t, lr)
        D = v.sqrt() / sbc2 + self.eps
        return a * theta - c * m / D, (m, v)

    def tangent(self, t, lr, theta, state, g, dtheta, dstate, dg):
        """As :meth:`FunctionalOptimizer.tangent`."""
        ge, m, _, D, dsdv, c, a = self._moments(t, lr, theta, state, g)
        dge = dg + self.weight_decay * dtheta if self.weight_decay and not self.decoupled else dg
        dm = self.beta1 * dstate[0] + (1.0 - self.beta1) * dge
        dv = self.beta2 * dstate[1] + (2.0 * (1.0 - self.beta2)) * ge * dge
        dth = a * dtheta - c * (dm / D - (m * dsdv / (D * D)) * dv)
        return dth, (dm, dv)

    def cotangent(self, t, lr, theta, state, g, btheta, bstate):
        """As :meth:`FunctionalOptimizer.cotangent`."""
        ge, m, _, D, dsdv, c, a = self._moments(t, lr, theta, state, g)
        bm = bstate[0] - (c / D) * btheta
        bv = bstate[1] + (c * m * dsdv / (D * D)) * btheta
        bge = (1.0 - self.beta1) * bm + (2.0 * (1.0 - self.beta2)) * ge * bv
        bth = a * btheta
        if self.weight_decay and not self.decoupled:
            bth = bth + self.weight_decay * bge
        return bth, (self.beta1 * bm, self.beta2 * bv), bge

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(betas=({self.beta1!r}, {self.beta2!r}), eps={self.eps!r}, "
            f"weight_decay={self.weight_decay!r})"
        )


class AdamW(Adam):
    r"""Adam with decoupled weight decay (Loshchilov & Hutter 2019), as ``torch.optim.AdamW``.

    :math:`\theta' = (1 - \eta\lambda)\theta - \frac{\eta}{1 - \beta_1^k} \frac{m'}{\sqrt{\hat v'} + \epsilon}`
    (see :class:`Adam`). The default ``weight_decay`` is PyTorch's, 0.01.
    """

    decoupled = True

    def __init__(
        self,
        betas: Sequence[float] = (0.9, 0.999),
        eps: float = 1e-8,
        *,
        weight_decay: float = 0.01,
    ) -> None:
        super().__init__(betas, eps, weight_decay=weight_decay)


def _check_unit(x: float, name: str) -> float:
    if isinstance(x, bool) or not isinstance(x, int | float) or not 0.0 <= x < 1.0:
        raise ValueError(f"{name}: expected a number in [0, 1), got {x!r}")
    return float(x)


def _check_nonneg(x: float, name: str) -> float:
    if isinstance(x, bool) or not isinstance(x, int | float) or not (math.isfinite(x) and x >= 0):
        raise ValueError(f"{name}: expected a finite non-negative number, got {x!r}")
    return float(x)
