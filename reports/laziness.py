r"""The laziness section of ``linops report``: laziness ratio and reference-set ranks.

The quantities of "Leveraging Low Rank Structure in the Lazy Regime" (an anonymous ICLR 2025
submission; no arXiv id given), sections 3.1-3.2 and 4.1, from :mod:`estimators.laziness` and
:mod:`estimators.reference`, as one JSON-ready summary.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from estimators.jacobian_rank import exact_jacobian_rank
from estimators.laziness import laziness_ratio
from estimators.reference import rank_curve
from linops import ParamSpace

__all__ = ["laziness_report"]


def laziness_report(
    model: torch.nn.Module,
    inputs: torch.Tensor | Sequence[torch.Tensor],
    *,
    num_points: int = 4,
    output_indices: Sequence[int] | None = (0,),
    reference_sizes: Sequence[int] = (16, 64, 256),
    strategy: str = "random",
    exact_rank: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    r"""Summarise laziness and low rank of one model on one dataset (JSON-ready, ``linops report``).

    Parameters
    ----------
    model, inputs
        The network and an ``(n, ...)`` input tensor (or ``(X, y)`` pair).
    num_points, output_indices
        Points and units of the laziness ratio (exact Hessian products).
    reference_sizes
        Reference-set sizes of the rank curve (per unit ``output_indices[0]``, row-centred).
    strategy
        Reference-set strategy.
    exact_rank
        Also the numerical rank of the full centred Jacobian of that unit (dense when small,
        else matrix-free).
    seed
        Seed of every random choice.

    Returns
    -------
    dict
        Keys: ``num_parameters``, ``num_samples``, ``laziness_ratio_mean``,
        ``laziness_ratio_std``, ``hessian_norm_mean``, ``gradient_norm_mean``,
        ``laziness_paper_ratio_mean``, ``reference_sizes``, ``reference_ranks``,
        ``rank_to_model_size``, ``rank_to_reference_size``, ``exact_rank`` (or ``None``),
        ``output_index``.
    """
    X = inputs[0] if isinstance(inputs, tuple | list) else inputs
    m = ParamSpace(model).dim
    sizes = sorted({min(int(s), m) for s in reference_sizes})
    lr = laziness_ratio(
        model,
        X,
        num_points=num_points,
        output_indices=output_indices,
        reference_size=sizes[-1],
        reference_strategy=strategy,
        seed=seed,
    )
    j = lr.outputs[0]
    curve = rank_curve(model, X, sizes, strategy, output_index=j, seed=seed)
    exact = exact_jacobian_rank(model, X, output_index=j, center=True) if exact_rank else None
    return {
        "num_parameters": m,
        "num_samples": len(X),
        "output_index": j,
        "laziness_ratio_mean": lr.mean,
        "laziness_ratio_std": lr.std,
        "hessian_norm_mean": float(lr.hessian_norms.mean()),
        "gradient_norm_mean": float(lr.gradient_norms.mean()),
        "laziness_paper_ratio_mean": lr.paper_ratio_mean,
        "reference_sizes": curve.sizes,
        "reference_ranks": curve.ranks,
        "rank_to_model_size": curve.rank_to_model_size,
        "rank_to_reference_size": curve.rank_to_reference_size,
        "exact_rank": exact,
    }
