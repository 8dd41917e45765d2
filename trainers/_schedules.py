r"""Learning-rate schedules for the functional trainers: pure functions of the step index.

A schedule maps the step index :math:`t = 0, 1, \dots, T - 1` (the update that produces
:math:`\theta_{t+1}` from :math:`\theta_t`) to a learning rate :math:`\eta_t`. Schedules hold no
state, so a training run through them stays a pure function of the initial parameters ("Understanding Gradient Descent through the Training Jacobian",
section 2) and can be differentiated forward and backward.
"""

from __future__ import annotations

import math

__all__ = ["ConstantLR", "CosineLR", "Schedule", "WarmupLR", "as_schedule"]


class Schedule:
    """Base class: ``schedule(t) -> learning rate`` at step ``t``."""

    def __call__(self, t: int) -> float:
        """Return the learning rate of step ``t`` (0-based)."""
        raise NotImplementedError

    def describe(self) -> str:
        """Return a short stable description (used in checkpoint fingerprints)."""
        return repr(self)


class ConstantLR(Schedule):
    r""":math:`\eta_t = \eta`.

    Examples
    --------
    >>> ConstantLR(0.1)(7)
    0.1
    """

    def __init__(self, lr: float) -> None:
        self.lr = _check_lr(lr, "lr")

    def __call__(self, t: int) -> float:
        """Return the learning rate of step ``t`` (0-based)."""
        return self.lr

    def __repr__(self) -> str:
        return f"ConstantLR(lr={self.lr!r})"


class CosineLR(Schedule):
    r"""Cosine decay, :math:`\eta_t = \eta_{\min} + (\eta - \eta_{\min})\,\tfrac12(1 + \cos(\pi t / T))`.

    Matches ``torch.optim.lr_scheduler.CosineAnnealingLR`` (``T_max = total_steps``) and optax's
    ``cosine_decay_schedule``; that paper trains with cosine decay from 0.1 over all 625 steps.

    Parameters
    ----------
    lr
        Initial learning rate :math:`\eta`.
    total_steps
        Decay horizon :math:`T`; steps past it stay at :math:`\eta_{\min}`.
    final_lr
        :math:`\eta_{\min}`.

    Examples
    --------
    >>> s = CosineLR(0.1, total_steps=10)
    >>> s(0), round(s(5), 12), s(10)
    (0.1, 0.05, 0.0)
    """

    def __init__(self, lr: float, total_steps: int, final_lr: float = 0.0) -> None:
        self.lr = _check_lr(lr, "lr")
        self.final_lr = _check_lr(final_lr, "final_lr")
        if not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"total_steps: expected a positive integer, got {total_steps!r}")
        self.total_steps = total_steps

    def __call__(self, t: int) -> float:
        """Return the learning rate of step ``t`` (0-based)."""
        frac = min(t, self.total_steps) / self.total_steps
        return self.final_lr + (self.lr - self.final_lr) * 0.5 * (1.0 + math.cos(math.pi * frac))

    def __repr__(self) -> str:
        return (
            f"CosineLR(lr={self.lr!r}, total_steps={self.total_steps}, final_lr={self.final_lr!r})"
        )


class WarmupLR(Schedule):
    r"""Linear warmup for ``warmup_steps`` steps, then ``base`` (shifted to start after it).

    .. math::

        \eta_t = \begin{cases} \eta^{\text{base}}_0\,(t + 1) / W & t < W \\
        \eta^{\text{base}}_{t - W} & t \ge W \end{cases}

    Examples
    --------
    >>> s = WarmupLR(ConstantLR(0.2), warmup_steps=4)
    >>> [round(s(t), 12) for t in range(6)]
    [0.05, 0.1, 0.15, 0.2, 0.2, 0.2]
    """

    def __init__(self, base: Schedule | float, warmup_steps: int) -> None:
        self.base = as_schedule(base)
        if not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps: expected a non-negative integer, got {warmup_steps!r}")
        self.warmup_steps = warmup_steps

    def __call__(self, t: int) -> float:
        """Return the learning rate of step ``t`` (0-based)."""
        if t < self.warmup_steps:
            return self.base(0) * (t + 1) / self.warmup_steps
        return self.base(t - self.warmup_steps)

    def __repr__(self) -> str:
        return f"WarmupLR(base={self.base!r}, warmup_steps={self.warmup_steps})"


def as_schedule(lr: Schedule | float) -> Schedule:
    """Make a :class:`Schedule` from a schedule (returned as is) or a number (constant)."""
    if isinstance(lr, Schedule):
        return lr
    if isinstance(lr, int | float) and not isinstance(lr, bool):
        return ConstantLR(float(lr))
    raise TypeError(f"lr: expected a float or a Schedule, got {type(lr).__name__}")


def _check_lr(lr: float, name: str) -> float:
    if isinstance(lr, bool) or not isinstance(lr, int | float) or not math.isfinite(lr) or lr < 0:
        raise ValueError(f"{name}: expected a finite non-negative number, got {lr!r}")
    return float(lr)
