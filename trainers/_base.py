"""The interface every object-style trainer shares: ``fit``, a history, callbacks, a progress bar.

A trainer holds its parameters as a ``dict[str, Tensor]`` of leaf tensors (copies of the model's,
the model itself is never mutated) and calls the model through
:meth:`linops.ParamSpace.functional_call`. Subclasses implement one method,
:meth:`Trainer.direction`, which returns the loss on a batch and the update direction (the
gradient, or an estimate of it); the base class hands the direction to a torch optimizer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import torch
from tqdm.auto import tqdm

from estimators.kernel import relative_distance
from estimators.seeding import Seed, make_generator
from linops import Params
from linops.params import ParamSpace

__all__ = ["Callback", "Direction", "History", "RelativeDistance", "Trainer", "make_optimizer"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Direction(NamedTuple):
    """What :meth:`Trainer.direction` returns (fields as :class:`estimators.Guess`'s).

    Attributes
    ----------
    loss
        The batch loss before the step.
    grads
        The update direction by parameter name: the gradient, or an estimate of it.
    """

    loss: float
    grads: dict[str, torch.Tensor]


@dataclass
class History:
    """What a run recorded: one entry per optimizer step, plus per-epoch evaluations."""

    step: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    epoch: list[int] = field(default_factory=list)
    metrics: dict[str, list[float]] = field(default_factory=dict)

    def log(self, **values: float) -> None:
        """Append metric values (a metric's list grows by one per call that names it)."""
        for k, v in values.items():
            self.metrics.setdefault(k, []).append(float(v))

    def as_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        return {"step": self.step, "loss": self.loss, "epoch": self.epoch, **self.metrics}


class Callback(Protocol):
    """Called after every optimizer step; may return metrics to log (or ``None``)."""

    def __call__(self, trainer: Trainer, step: int) -> Mapping[str, float] | None:
        """Metrics to log after step ``step`` (or ``None``)."""
        ...


class RelativeDistance:
    r"""Callback: per-layer relative distance :math:`RD(W^{[l]}(t)) = \|W(t) - W(0)\|_F / \|W(0)\|_F`.

    The RD of "Demystifying Lazy Training of Neural Networks from a Macroscopic Viewpoint"
    (arXiv:2404.04859), computed by :func:`estimators.relative_distance` and logged as
    ``RD/<name>``.

    Parameters
    ----------
    every
        Log every ``every`` steps (always at step 0 of the callback's first call).
    names
        Parameter names to track (default: every parameter whose name ends in ``weight``).
    """

    def __init__(self, every: int = 1, names: Iterable[str] | None = None) -> None:
        self.every, self.names = every, names
        self.initial: dict[str, torch.Tensor] | None = None

    def __call__(self, trainer: Trainer, step: int) -> dict[str, float] | None:
        """``RD/<name>`` of each tracked weight at steps divisible by ``every``."""
        initial = self.initial
        if initial is None:
            names = self.names or [n for n in trainer.values if n.endswith("weight")]
            initial = self.initial = {n: trainer.initial_values[n].clone() for n in names}
        if step % self.every:
            return None
        rd = relative_distance(trainer.values, initial, list(initial))
        return {f"RD/{n}": v for n, v in rd.per_layer.items()}


def make_optimizer(
    values: Iterable[torch.Tensor],
    optimizer: str | Callable[..., torch.optim.Optimizer],
    **kw: Any,  # the optimizer's own options, forwarded as they are (a factory's are open)
) -> torch.optim.Optimizer:
    """Make a torch optimizer of the leaf tensors ``values``, by name or from a factory.

    ``optimizer`` is ``"sgd"``, ``"adam"``, ``"adamw"`` or a factory ``f(tensors, **kw)``; ``kw``
    are its options (``lr``, ...).

    Returns
    -------
    torch.optim.Optimizer

    Raises
    ------
    ValueError
        For an unknown optimizer name.
    """
    tensors = list(values)
    if callable(optimizer):
        return optimizer(tensors, **kw)
    table = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
    if optimizer not in table:
        raise ValueError(
            f"optimizer: expected one of {sorted(table)} or a factory, got {optimizer!r}"
        )
    return table[optimizer](tensors, **kw)


class Trainer:
    """Base of the object-style trainers (backprop, linearized, low-rank, forward-gradient, subspace).

    Parameters
    ----------
    model
        The network; its parameters are copied, never modified.
    loss_fn
        ``loss_fn(outputs, targets) -> scalar`` with a mean or sum reduction.
    optimizer
        ``"sgd"``, ``"adam"``, ``"adamw"`` or a factory ``f(params, **optimizer_kw)``.
    params
        Which parameters to train (see :class:`linops.ParamSpace`); others stay fixed.
    **optimizer_kw
        Passed to the optimizer (``lr``, ``momentum``, ``weight_decay``, ...).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        loss_fn: LossFn,
        *,
        optimizer: str | Callable[..., torch.optim.Optimizer] = "sgd",
        params: Params | None = None,
        **optimizer_kw: Any,  # forwarded to make_optimizer
    ) -> None:
        self.model, self.loss_fn = model, loss_fn
        self.space = ParamSpace(model, params)
        self.values = {n: v.detach().clone() for n, v in self.space.values().items()}
        self.initial_values = {n: v.clone() for n, v in self.values.items()}
        optimizer_kw.setdefault("lr", 0.1)
        self.optimizer = make_optimizer(self.values.values(), optimizer, **optimizer_kw)
        self.history = History()
        self.steps_done = 0

    # --------------------------------------------------------------- what subclasses implement
    def direction(self, x: torch.Tensor, y: torch.Tensor) -> Direction:
        """Loss on the batch and the update direction (the gradient or an estimate of it)."""
        raise NotImplementedError

    # --------------------------------------------------------------- shared machinery
    def forward(
        self, x: torch.Tensor, values: Mapping[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Model outputs at the trainer's (or the given) parameters."""
        return self.space.functional_call(values if values is not None else self.values, x)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """One optimizer step on a batch; returns the batch loss before the step."""
        loss, direction = self.direction(x, y)
        for n, p in self.values.items():
            p.grad = direction[n]
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps_done += 1
        return float(loss)

    @torch.no_grad()
    def evaluate(
        self, X: torch.Tensor, y: torch.Tensor, batch_size: int = 1024
    ) -> dict[str, float]:
        """Mean loss and (for integer targets) accuracy on a dataset."""
        losses, correct, n = 0.0, 0, len(X)
        for i in range(0, n, batch_size):
            out = self.forward(X[i : i + batch_size])
            losses += float(self.loss_fn(out, y[i : i + batch_size])) * len(out)
            if not y.is_floating_point():
                correct += int((out.argmax(-1) == y[i : i + batch_size]).sum())
        result = {"loss": losses / n}
        if not y.is_floating_point():
            result["accuracy"] = correct / n
        return result

    def fit(
        self,
        X: torch.Tensor,
        y: torch.Tensor,
        *,
        epochs: int = 1,
        batch_size: int | None = None,
        shuffle: bool = True,
        seed: Seed = 0,
        validation: tuple[torch.Tensor, torch.Tensor] | None = None,
        callbacks: Iterable[Callback] = (),
        progress: bool = True,
    ) -> History:
        """Train for ``epochs`` passes over ``(X, y)``; returns (and keeps) the history.

        Per step the history records the batch loss and whatever the callbacks return; per
        epoch it records ``train_loss``/``train_accuracy`` and, with ``validation``,
        ``test_loss``/``test_accuracy``. A non-finite loss stops training with a
        ``FloatingPointError``.
        """
        if len(X) != len(y) or len(X) == 0:
            raise ValueError(f"X, y: expected equal non-zero lengths, got {len(X)} and {len(y)}")
        bs = batch_size or len(X)
        g = make_generator(seed)
        callbacks = list(callbacks)
        steps = epochs * math.ceil(len(X) / bs)
        bar = tqdm(total=steps, disable=not progress, desc=type(self).__name__, leave=False)
        for epoch in range(epochs):
            order = torch.randperm(len(X), generator=g) if shuffle else torch.arange(len(X))
            for i in range(0, len(X), bs):
                idx = order[i : i + bs]
                loss = self.step(X[idx], y[idx])
                if not math.isfinite(loss):
                    bar.close()
                    raise FloatingPointError(f"loss became {loss} at step {self.steps_done}")
                self.history.step.append(self.steps_done)
                self.history.loss.append(loss)
                for cb in callbacks:
                    self.history.log(**(cb(self, self.steps_done) or {}))
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4g}")
            self._log_epoch(epoch, X, y, validation)
        bar.close()
        return self.history

    def _log_epoch(
        self,
        epoch: int,
        X: torch.Tensor,
        y: torch.Tensor,
        validation: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> None:
        self.history.epoch.append(epoch + 1)
        self.history.log(**{f"train_{k}": v for k, v in self.evaluate(X, y).items()})
        if validation is not None:
            self.history.log(**{f"test_{k}": v for k, v in self.evaluate(*validation).items()})
