r"""The chain route's loss derivatives at any parameter point: a public interface for trainers.

Models that are chains of affine, convolution, pooling and elementwise steps (see
:mod:`linops._chain`: ``nn.Sequential`` MLPs and CNNs, or a model declaring
``linops_chain()``) have their gradients and Hessian-vector products written out by hand in
linops. :class:`ChainLoss` gives a training loop (:mod:`trainers.functional`) those products
for :math:`L(\theta) = \ell(f(\theta; X), y)` at a new :math:`\theta` every step, through the
same engine and activation table as :class:`linops.HessianOperator`'s chain route, so the
toolkit has one hand-derived HVP.

The chain is recognised once and its forward pass verified against the model's outputs on the
first batch; later batches trust it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from linops._chain import Chain, ChainGradientGraph, ChainMismatch
from linops.params import ParamSpace

__all__ = ["ChainLoss", "ChainLossAt", "ChainMismatch"]

Tensor = torch.Tensor
LossFn = Callable[[Tensor, Tensor], Tensor]


class ChainLossAt:
    """The loss of one batch at one parameter point: gradient and batched HVPs.

    Made by :meth:`ChainLoss.at`; holds the batch's primal pass (inputs of every step, the
    activations' derivatives and the back-propagated errors).
    """

    def __init__(self, graph: ChainGradientGraph) -> None:
        self._graph = graph

    def gradient(self) -> list[Tensor]:
        r""":math:`\nabla_\theta L`, one tensor per parameter (the space's order and shapes)."""
        return self._graph.gradient()

    def hvp(self, tangents: Sequence[Tensor]) -> list[Tensor]:
        """:math:`H v_k` for ``K`` tangents at once, each tensor ``(K, *shape)``.

        ``tangents`` are parameter-shaped with a leading batch dimension ``K``; the products
        have the same layout.
        """
        return self._graph.hvp(tangents, True)


class ChainLoss:
    """Gradient and batched Hessian-vector products of ``loss_fn(model(X), y)`` for a chain.

    Parameters
    ----------
    space
        A :class:`linops.ParamSpace` of a chain model (its values are not used: the point is
        given to :meth:`at`).
    loss_fn
        ``loss_fn(outputs, targets) -> scalar``; cross-entropy and MSE have closed forms, any
        other loss goes through autograd on the outputs.

    Raises
    ------
    ValueError
        If the model is not a recognised chain, or a parameter of the space is not a weight or
        bias of its affine / convolution steps.

    Examples
    --------
    >>> import torch
    >>> from linops import ParamSpace
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    >>> space = ParamSpace(net.double())
    >>> ChainLoss.supports(space)
    True
    >>> at = ChainLoss(space, torch.nn.functional.mse_loss).at(
    ...     space.flat_values(), torch.ones(5, 3, dtype=torch.float64), torch.zeros(5, 2).double()
    ... )
    >>> [g.shape for g in at.gradient()] == [p.shape for p in space.values().values()]
    True
    """

    def __init__(self, space: ParamSpace, loss_fn: LossFn) -> None:
        chain = Chain.of(space)
        if chain is None:
            raise ValueError(
                "space: expected a chain of nn.Linear, nn.Conv2d, pooling and elementwise "
                f"modules with all its parameters weights or biases, got {type(space.model).__name__}"
            )
        self.space, self.loss_fn, self._chain = space, loss_fn, chain
        self._model_shape: torch.Size | None = None

    @staticmethod
    def supports(space: ParamSpace) -> bool:
        """Whether ``space`` is a chain model whose parameters the chain route covers."""
        return Chain.of(space) is not None

    def at(self, theta: Tensor, X: Tensor, y: Tensor) -> ChainLossAt:
        """Return the loss on the batch ``(X, y)`` at the flat parameters ``theta``.

        Raises
        ------
        linops.chain.ChainMismatch
            On the first batch, if the chain's forward pass does not reproduce the model's.
        """
        values = self.space.unflatten(theta)
        if self._model_shape is None:  # first batch: verify against the model at theta
            chain = Chain.of(ParamSpace(self.space.model, values, output=self.space.output))
            if chain is None:
                raise ChainMismatch("the model at theta is not the chain recognised before")
        else:
            chain = self._chain.with_values(list(values.values()))
        graph = ChainGradientGraph(chain, self.loss_fn, X, y, self._model_shape)
        self._model_shape = graph.model_shape
        return ChainLossAt(graph)
