"""The ordinary backpropagation baseline: same models, data, optimizers and history as the rest."""

from __future__ import annotations

import torch

from trainers._base import Direction, Trainer

__all__ = ["BackpropTrainer"]


class BackpropTrainer(Trainer):
    """Gradient of the batch loss by reverse-mode autodiff, handed to the optimizer.

    Examples
    --------
    >>> import torch
    >>> from trainers.models import MLP
    >>> torch.manual_seed(0) and None
    >>> X, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    >>> t = BackpropTrainer(MLP(4, 3, 16), torch.nn.functional.cross_entropy, lr=0.5)
    >>> h = t.fit(X, y, epochs=20, progress=False)
    >>> h.loss[-1] < h.loss[0]
    True
    """

    def direction(self, x: torch.Tensor, y: torch.Tensor) -> Direction:
        """Batch loss and its exact gradient by backprop."""
        leaves = {n: p.detach().requires_grad_(True) for n, p in self.values.items()}
        loss = self.loss_fn(self.forward(x, leaves), y)
        grads = torch.autograd.grad(loss, list(leaves.values()))
        return Direction(float(loss.detach()), dict(zip(leaves, grads, strict=True)))
