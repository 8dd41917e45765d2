r"""Forward-gradient training: the optimizer steps along a guessed gradient.

The training of "How to Guess a Gradient" (Singhal et al., arXiv:2312.04709; "the paper"
below).

At every step a guesser of :mod:`estimators.guesses` produces :math:`\hat g \approx \nabla L`
from forward-mode directional derivatives only, and any torch optimizer (the paper uses AdamW,
appendix A.1) takes it as the gradient. History, callbacks and the progress bar are those of
:class:`trainers.Trainer`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from estimators.guess_quality import guess_cosine, true_gradient
from estimators.guesses import GradientGuesser, Guess, make_guesser
from estimators.seeding import Seed, make_generator
from linops import Params
from trainers._base import Direction, LossFn, Trainer

__all__ = ["ForwardGradientTrainer", "GuessCosine"]


class ForwardGradientTrainer(Trainer):
    r"""Train with a guessed gradient :math:`\hat g` from a :class:`~estimators.GradientGuesser`.

    Parameters
    ----------
    model, loss_fn
        As for :class:`trainers.Trainer`.
    guesser
        A guesser instance, or a name of :data:`estimators.GUESSERS` (built with defaults).
    optimizer
        ``"sgd"``, ``"adam"``, ``"adamw"`` or a factory (see :func:`trainers.make_optimizer`).
    params
        Which parameters to train.
    seed
        Randomness of the guesses: one ``torch.Generator`` made from it draws every guess.
    **optimizer_kw
        Passed to the optimizer (``lr``, ``weight_decay``, ...).

    Attributes
    ----------
    last_guess
        The :class:`~estimators.Guess` of the latest step.
    last_batch
        ``(x, y, values)`` at which it was made (parameter values before the step), for
        callbacks such as :class:`GuessCosine`.

    Raises
    ------
    TypeError
        If ``guesser`` is neither a guesser nor a name.

    Examples
    --------
    >>> import torch
    >>> from trainers.models import MLP
    >>> X, y = torch.randn(64, 4, generator=torch.Generator().manual_seed(0)), torch.arange(64) % 3
    >>> net = MLP(4, 3, 16, seed=torch.Generator().manual_seed(0))
    >>> t = ForwardGradientTrainer(net, torch.nn.functional.cross_entropy, guesser="w_transpose",
    ...                            optimizer="adam", lr=1e-2)
    >>> h = t.fit(X, y, epochs=30, batch_size=32, progress=False)
    >>> h.metrics["train_loss"][-1] < h.metrics["train_loss"][0]
    True
    """

    def __init__(
        self,
        model: torch.nn.Module,
        loss_fn: LossFn,
        *,
        guesser: GradientGuesser | str,
        optimizer: str | Callable[..., torch.optim.Optimizer] = "sgd",
        params: Params | None = None,
        seed: Seed = 0,
        **optimizer_kw: Any,  # forwarded to the optimizer (see Trainer)
    ) -> None:
        if isinstance(guesser, str):
            guesser = make_guesser(guesser)
        if not isinstance(guesser, GradientGuesser):
            raise TypeError(
                f"guesser: expected a GradientGuesser or a guesser name, got {type(guesser).__name__}"
            )
        super().__init__(model, loss_fn, optimizer=optimizer, params=params, **optimizer_kw)
        self.guesser = guesser
        self._generator = make_generator(seed, self.space.device)
        self.last_guess: Guess | None = None
        self.last_batch: tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]] | None = None

    def direction(self, x: torch.Tensor, y: torch.Tensor) -> Direction:
        """Batch loss and the guessed gradient (no backward pass through the network)."""
        guess = self.guesser(self.space, self.values, x, y, self.loss_fn, seed=self._generator)
        self.last_guess = guess
        self.last_batch = (x, y, {n: p.detach().clone() for n, p in self.values.items()})
        return Direction(float(guess.loss), guess.grads)


class GuessCosine:
    r"""Callback: cosine of the latest guess to the true (backprop) gradient, whole model.

    Logs ``cosine`` (and, with ``per_layer=True``, ``cosine/<layer>``) every ``every`` steps;
    the true gradient is computed at the parameters the guess was made at. Measurement only:
    training never sees the true gradient.
    """

    def __init__(self, every: int = 1, *, per_layer: bool = False) -> None:
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every: expected a positive integer, got {every!r}")
        self.every, self.per_layer = every, per_layer

    def __call__(self, trainer: Trainer, step: int) -> dict[str, float] | None:
        """Cosines of the latest guess at steps divisible by ``every`` (else ``None``).

        Raises
        ------
        TypeError
            If ``trainer`` is not a :class:`ForwardGradientTrainer`.
        """
        if not isinstance(trainer, ForwardGradientTrainer):
            raise TypeError(
                f"trainer: expected a ForwardGradientTrainer, got {type(trainer).__name__}"
            )
        if step % self.every or trainer.last_guess is None or trainer.last_batch is None:
            return None
        x, y, values = trainer.last_batch
        _, grad = true_gradient(trainer.space, values, x, y, trainer.loss_fn)
        cos = guess_cosine(trainer.last_guess.grads, grad)
        out = {"cosine": cos.whole_model}
        if self.per_layer:
            out.update({f"cosine/{k}": v for k, v in cos.per_layer.items()})
        return out
