r"""How a loss reduces over samples, so a loss over batches is the loss over the whole dataset.

A loss with a mean reduction divides a sum over its entries by a normaliser :math:`W_b` that
depends on the batch: the number of samples, of entries (a sequence loss on ``(N, C, T)``
logits), of targets not ignored (``ignore_index``) or their total class weight (a weighted
cross-entropy). The loss of the concatenated data is then

.. math::

    L = \frac{\sum_b W_b L_b}{\sum_b W_b},

so batch :math:`b` is weighted :math:`W_b / \sum_{b'} W_{b'}`, not :math:`n_b / N`. This module
gives :math:`W_b` for torch's losses (modules, functionals and ``functools.partial`` of
functionals), and refuses a plain function over several batches unless the user says how it
reduces (``reduction="mean" | "sum"`` or a callable ``(outputs, targets) -> W_b``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Reduction", "check_reduction", "loss_reduction"]

Tensor = torch.Tensor
Normaliser = Callable[[Tensor, Tensor | None], float]

#: torch's functional losses, all with a mean reduction by default
_FUNCTIONALS: dict[Any, str] = {
    F.cross_entropy: "cross_entropy",
    F.nll_loss: "cross_entropy",
    F.kl_div: "kl_div",
    F.mse_loss: "elementwise",
    F.l1_loss: "elementwise",
    F.huber_loss: "elementwise",
    F.smooth_l1_loss: "elementwise",
    F.binary_cross_entropy: "elementwise",
    F.binary_cross_entropy_with_logits: "elementwise",
    F.soft_margin_loss: "elementwise",
    F.poisson_nll_loss: "elementwise",
}


class Reduction:
    """``kind`` (``"mean"`` or ``"sum"``) and the per-batch normaliser :math:`W_b` of a mean."""

    def __init__(self, kind: str, normaliser: Normaliser | None = None) -> None:
        self.kind = kind
        self.normaliser = normaliser

    def weights(self, batches: list[tuple[Tensor, Tensor]], total: float | None = None) -> list:
        r"""Each batch's weight in the dataset loss, from its ``(outputs, targets)``.

        ``total``: :math:`\sum_b W_b` over all ranks when the data is sharded (default: over
        ``batches``).
        """
        return self.weights_of(self.normalisers(batches), total)

    def normalisers(self, batches: Iterable[tuple[Tensor, Tensor | None]]) -> list[float]:
        r"""Each batch's :math:`W_b` (1 for a sum), from ``(outputs, targets)`` drawn one at a time.

        ``batches`` may be a generator: nothing of a batch is kept but its number, so a
        streamed dataset's outputs are never all in memory.
        """
        if self.kind == "sum" or self.normaliser is None:
            return [1.0 for _ in batches]
        return [float(self.normaliser(out, y)) for out, y in batches]

    def weights_of(self, w: list[float], total: float | None = None) -> list[float]:
        r"""Each batch's weight :math:`W_b / \sum W` from the normalisers ``w`` (sum: all 1)."""
        if self.kind == "sum" or self.normaliser is None:
            return [1.0] * len(w)
        total = sum(w) if total is None else total
        if not total > 0:
            raise ValueError(
                "reduction: the loss's normalisers sum to "
                f"{total} over the data (every target ignored, or zero class weights?)"
            )
        return [wi / total for wi in w]


def check_reduction(reduction: object) -> None:
    """Validate the operators' ``reduction`` argument."""
    if reduction is None or callable(reduction) or reduction in ("mean", "sum"):
        return
    raise ValueError(
        "reduction: expected 'mean', 'sum', None (read from the loss) or a callable "
        f"(outputs, targets) -> the batch's normaliser, got {reduction!r}"
    )


def loss_reduction(loss_fn: Any, reduction: Any, *, several_batches: bool) -> Reduction:
    """Return the reduction of ``loss_fn``: given by the user, else read from torch's loss.

    Raises
    ------
    ValueError
        For a loss without a reduction (``"none"``), or a plain function over several batches
        (or ranks) without ``reduction``.
    """
    if callable(reduction):
        return Reduction("mean", lambda out, y: float(reduction(out, y)))
    family, kind, options = _describe(loss_fn)
    if reduction is not None:
        kind = reduction
    if kind is None:
        if several_batches:
            declared = getattr(loss_fn, "reduction", None)
            raise ValueError(
                f"reduction: loss_fn {_name(loss_fn)} is not one of torch's losses"
                + (
                    f" (its own reduction={declared!r} does not say over what it averages)"
                    if isinstance(declared, str)
                    else ""
                )
                + ", so how it reduces "
                "over a dataset of several batches is unknown; pass reduction='mean' (a mean "
                "over samples), reduction='sum', or a callable (outputs, targets) -> the "
                "batch's normaliser (e.g. its number of non-ignored targets)"
            )
        return Reduction("mean", lambda out, y: 1.0)  # one batch: its weight is 1 either way
    if kind == "none":
        raise ValueError(
            f"loss_fn: {_name(loss_fn)} has reduction='none', so it returns a tensor; expected "
            "a scalar loss (reduction 'mean' or 'sum'): a loss without a reduction does not "
            "define a Hessian"
        )
    if kind == "sum":
        return Reduction("sum")
    if kind == "batchmean":
        return Reduction("mean", lambda out, y: float(out.shape[0]))
    if kind != "mean":
        raise ValueError(f"loss_fn: unsupported reduction {kind!r} of {_name(loss_fn)}")
    if family == "cross_entropy":
        return Reduction("mean", functools.partial(_cross_entropy_normaliser, **options))
    if family == "elementwise" or family == "kl_div":
        return Reduction("mean", lambda out, y: float(out.numel()))
    # a plain function declared as a mean by the user: a mean over samples
    return Reduction("mean", _samples)


def _samples(out: Tensor, y: Tensor | None) -> float:
    """Return a batch's number of samples: the outputs' first dimension."""
    if out.dim() == 0:
        raise ValueError(
            "reduction: 'mean' weights each batch by its number of samples, the first "
            "dimension of the outputs, but they are 0-d (the model's own loss as output?); "
            "pass reduction= a callable (outputs, targets) -> the batch's normaliser (e.g. "
            "lambda out, y: (y != -100).sum() for a language model's tokens)"
        )
    return float(out.shape[0])


def torch_forward(loss_fn: object) -> bool:
    """Whether a loss module computes torch's own ``forward``.

    A subclass may change only ``__init__``; one with its own ``forward`` is a user's loss.
    """
    forward = getattr(type(loss_fn), "forward", None)
    return getattr(forward, "__module__", "").startswith("torch.")


def _describe(loss_fn: object) -> tuple[str | None, str | None, dict[str, Any]]:
    """``(family, reduction, options)`` of torch's losses; ``(None, None, {})`` otherwise."""
    if isinstance(loss_fn, nn.Module) and not torch_forward(loss_fn):
        return None, None, {}  # its own forward: what its `reduction` averages over is unknown
    if isinstance(loss_fn, nn.CrossEntropyLoss | nn.NLLLoss):
        return (
            "cross_entropy",
            loss_fn.reduction,
            {"weight": loss_fn.weight, "ignore_index": loss_fn.ignore_index},
        )
    if isinstance(loss_fn, nn.KLDivLoss):
        return "kl_div", loss_fn.reduction, {}
    if isinstance(loss_fn, nn.modules.loss._Loss):
        return "elementwise", loss_fn.reduction, {}
    func, kw = loss_fn, {}
    if isinstance(loss_fn, functools.partial) and not loss_fn.args:
        func, kw = loss_fn.func, dict(loss_fn.keywords)
    family = _FUNCTIONALS.get(func)
    if family is None:
        # a user's loss object's own `reduction` attribute is not read (nor that of a
        # subclass of torch's _Loss with its own forward): its "mean" may be over samples,
        # elements or valid entries (a masked MSE's weighted batches 40% off)
        return None, None, {}
    options = (
        {"weight": kw.get("weight"), "ignore_index": kw.get("ignore_index", -100)}
        if family == "cross_entropy"
        else {}
    )
    return family, kw.get("reduction", "mean"), options


def _cross_entropy_normaliser(
    out: Tensor, y: Tensor, *, weight: Tensor | None, ignore_index: int
) -> float:
    r"""Cross-entropy's mean divides by the class weights of the targets not ignored.

    Class-index targets: :math:`W_b = \sum_{i: y_i \neq \text{ignore}} w_{y_i}` (a count without
    weights). Probability targets: the number of positions ``N * d_1 * ...``.
    """
    if y.is_floating_point():
        return float(out.numel() // out.shape[1]) if out.dim() > 1 else 1.0
    valid = y != ignore_index
    if weight is None:
        return float(valid.sum())
    return float(weight.to(out.device)[y[valid]].sum())


def _name(loss_fn: object) -> str:
    return getattr(loss_fn, "__qualname__", None) or type(loss_fn).__name__
