r"""The singular spectrum of a training Jacobian: regions, bulk order, left/right cosines.

"Understanding Gradient Descent through the Training Jacobian" (an anonymous submission under
double-blind review, no arXiv id given; "the paper" below) studies a training run
:math:`\theta_T = f(\theta_0)` through its training Jacobian
:math:`J = U \operatorname{diag}(\sigma) V^\top` (:class:`linops.TrainingJacobianOperator`).
Its section 3.1: the singular spectrum splits into a *chaotic* region (:math:`\sigma \gg 1`), a
*bulk* (:math:`|\sigma - 1|` tiny) and a *stable* region (:math:`\sigma < 1`); in the bulk the
left and right singular vectors nearly coincide (:func:`left_right_cosine`).

The perturbation experiments of its sections 3.2-3.5 are in :mod:`estimators.perturbation`, the
dimension of training, :math:`\operatorname{rank}(J - I)`, in :mod:`estimators.dimension`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from estimators.seeding import Seed
from linops import ArrayLike, OperatorLike
from linops.svds import SVDSResult, svds

__all__ = [
    "RegionCounts",
    "RegionRow",
    "TrainingJacobianSVD",
    "bulk_order",
    "left_right_cosine",
    "region_table",
    "spectral_regions",
    "svd_training_jacobian",
    "top_singular_values",
]

Tensor = torch.Tensor


class TrainingJacobianSVD(NamedTuple):
    r"""Dense SVD :math:`J = U \operatorname{diag}(\sigma) V^\top` and the pairs' cosines.

    :math:`\sigma` descending, and the cosine :math:`u_i^\top v_i` of each pair.
    """

    singular_values: Tensor
    left_vectors: Tensor
    right_vectors: Tensor
    cosine: Tensor


def svd_training_jacobian(J: Tensor) -> TrainingJacobianSVD:
    r"""Full SVD of a dense training Jacobian, in float64 (the paper's section 3.1).

    Parameters
    ----------
    J
        Dense ``(m, m)`` training Jacobian (e.g. ``TrainingJacobianOperator.to_dense()``).

    Returns
    -------
    TrainingJacobianSVD
        Singular values descending, ``U`` and ``V`` with singular vectors as columns, and
        :math:`\cos_i = u_i^\top v_i` (the sign of a pair is fixed jointly, so it is meaningful).

    Raises
    ------
    ValueError
        If ``J`` is not a square 2-d tensor or array.

    Examples
    --------
    >>> import torch
    >>> res = svd_training_jacobian(torch.diag(torch.tensor([3.0, 1.0, 0.5])))
    >>> res.singular_values.tolist(), res.cosine.tolist()
    ([3.0, 1.0, 0.5], [1.0, 1.0, 1.0])
    """
    J = square(J, "J").to(torch.float64)
    U, s, Vh = torch.linalg.svd(J)
    V = Vh.T
    return TrainingJacobianSVD(s, U, V, left_right_cosine(U, V))


def left_right_cosine(U: Tensor, V: Tensor) -> Tensor:
    r"""Cosine :math:`u_i^\top v_i / (\|u_i\| \|v_i\|)` of corresponding singular vectors (figure 1b)."""
    U, V = torch.as_tensor(U), torch.as_tensor(V)
    if U.shape != V.shape or U.ndim != 2:
        raise ValueError(
            f"U, V: expected two matrices of the same shape, got {tuple(U.shape)} and {tuple(V.shape)}"
        )
    return (U * V).sum(0) / (U.norm(dim=0) * V.norm(dim=0)).clamp_min(torch.finfo(U.dtype).tiny)


class RegionCounts(NamedTuple):
    """Numbers of singular values in each region and the thresholds that define them."""

    chaotic: int
    bulk: int
    stable: int
    other: int
    chaotic_threshold: float
    bulk_tol: float
    stable_threshold: float


def spectral_regions(
    sigma: ArrayLike,
    *,
    chaotic_threshold: float = 1.1,
    bulk_tol: float = 1e-3,
    stable_threshold: float = 0.9,
) -> RegionCounts:
    r"""Split a training-Jacobian spectrum into chaotic, bulk and stable regions (section 3.1).

    chaotic: :math:`\sigma > \text{chaotic\_threshold}`; bulk:
    :math:`|\sigma - 1| \le \text{bulk\_tol}`; stable: :math:`\sigma < \text{stable\_threshold}`;
    the rest is ``other`` (between the regions).

    Raises
    ------
    ValueError
        If the thresholds are not ordered
        ``stable_threshold <= 1 - bulk_tol <= 1 + bulk_tol <= chaotic_threshold``.

    Examples
    --------
    >>> spectral_regions([50.0, 1.5, 1.0 + 1e-5, 1.0, 0.999999, 0.95, 0.2])[:4]
    (2, 3, 1, 1)
    """
    s = as_1d(sigma)
    if not (
        0 <= bulk_tol and stable_threshold <= 1 - bulk_tol and 1 + bulk_tol <= chaotic_threshold
    ):
        raise ValueError(
            "thresholds: expected stable_threshold <= 1 - bulk_tol <= 1 + bulk_tol <= "
            f"chaotic_threshold, got {stable_threshold}, {bulk_tol}, {chaotic_threshold}"
        )
    chaotic = int((s > chaotic_threshold).sum())
    bulk = int(((s - 1).abs() <= bulk_tol).sum())
    stable = int((s < stable_threshold).sum())
    return RegionCounts(
        chaotic,
        bulk,
        stable,
        len(s) - chaotic - bulk - stable,
        chaotic_threshold,
        bulk_tol,
        stable_threshold,
    )


class RegionRow(NamedTuple):
    r"""Region counts at one threshold :math:`\tau` (a row of :func:`region_table`)."""

    threshold: float
    chaotic: int
    bulk: int
    stable: int


def region_table(
    sigma: ArrayLike, thresholds: Sequence[float] = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5)
) -> list[RegionRow]:
    r"""Count the regions at several thresholds :math:`\tau` (one row per :math:`\tau`).

    Chaotic :math:`\sigma > 1 + \tau`, bulk :math:`|\sigma - 1| \le \tau`, stable
    :math:`\sigma < 1 - \tau`.

    Examples
    --------
    >>> region_table([3.0, 1.0, 0.5], thresholds=[0.1])
    [RegionRow(threshold=0.1, chaotic=1, bulk=1, stable=1)]
    """
    s = as_1d(sigma)
    return [
        RegionRow(
            float(t),
            int((s > 1 + t).sum()),
            int(((s - 1).abs() <= t).sum()),
            int((s < 1 - t).sum()),
        )
        for t in thresholds
    ]


def bulk_order(sigma: ArrayLike) -> Tensor:
    r"""Return indices sorting the singular values by :math:`|\sigma_i - 1|` ascending.

    ("bulk at k" = the first k.)
    """
    return torch.argsort((as_1d(sigma) - 1).abs(), stable=True)


def top_singular_values(
    op: OperatorLike,
    k: int,
    *,
    seed: Seed = 0,
    **kw: Any,  # forwarded to linops.svds as they are
) -> SVDSResult:
    """Top-``k`` singular triplets of a training Jacobian matrix-free (:func:`linops.svds`).

    Each Golub-Kahan step costs one forward (JVP) and one reverse (VJP) pass through training.
    ``op`` is any operator :func:`linops.svds` takes; ``**kw`` are passed to it.

    Returns
    -------
    linops.SVDSResult
    """
    return svds(op, k, seed=seed, **kw)


def as_1d(sigma: ArrayLike) -> Tensor:
    s = torch.as_tensor(np.asarray(sigma) if not isinstance(sigma, Tensor) else sigma).to(
        torch.float64
    )
    if s.ndim != 1:
        raise ValueError(
            f"sigma: expected a 1-d array of singular values, got shape {tuple(s.shape)}"
        )
    return s


def square(J: ArrayLike, name: str) -> Tensor:
    J = torch.as_tensor(J)
    if J.ndim != 2 or J.shape[0] != J.shape[1]:
        raise ValueError(f"{name}: expected a square matrix, got shape {tuple(J.shape)}")
    return J
