r"""The dimension of training: :math:`\operatorname{rank}(J - I)` of a training Jacobian.

Section 2 of "Understanding Gradient Descent through the Training Jacobian" (an anonymous
submission under double-blind review, no arXiv id given; "the paper" below): the number of
singular values of :math:`J - I` above a threshold, dense (:func:`training_dimension_dense`)
or matrix-free from a budget of products with :math:`J` (:func:`training_dimension`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from estimators.counting import singular_value_count
from estimators.seeding import Seed
from estimators.spectrum import square
from linops import OperatorLike
from linops.base import IdentityOperator, TorchLinearOperator, aslinearoperator
from linops.randomized import randomized_svd, range_finder

__all__ = ["DimensionResult", "training_dimension", "training_dimension_dense"]

Tensor = torch.Tensor


class DimensionResult(NamedTuple):
    r"""Estimated :math:`\operatorname{rank}(J - I)` and what it cost.

    ``rank``: the estimate; ``num_matvecs``: products with :math:`J` (forward plus reverse
    passes through training); ``basis_size``: columns of the range-finder basis;
    ``error_estimate``: its bound on :math:`\|(I - QQ^\top)(J - I)\|`; ``singular_values``: the
    singular values of :math:`J - I` seen on the basis (descending).
    """

    rank: int
    num_matvecs: int
    basis_size: int
    error_estimate: float
    singular_values: Tensor


def training_dimension_dense(J: Tensor, threshold: float) -> int:
    r"""Dense count :math:`\#\{i : \sigma_i(J - I) > \text{threshold}\}` (the paper's section 2)."""
    J = square(J, "J").to(torch.float64)
    s = torch.linalg.svdvals(J - torch.eye(J.shape[0], dtype=J.dtype))
    return int((s > threshold).sum())


def training_dimension(
    op: OperatorLike,
    threshold: float | Sequence[float],
    *,
    num_matvecs: int | None = None,
    method: str = "krylov",
    block_size: int | None = None,
    seed: Seed = 0,
) -> DimensionResult:
    r"""Matrix-free :math:`\operatorname{rank}(J - I)` at an absolute threshold (the paper's section 2).

    :math:`\#\{i : \sigma_i(J - I) > \tau\}` is counted on a projection of :math:`A = J - I`
    built from at most ``num_matvecs`` products with :math:`J` (forward and reverse passes
    through training together); :math:`J` is never formed.

    * ``method="krylov"`` (default): randomized block Krylov SVD (:func:`linops.randomized_svd`,
      block Golub-Kahan, Musco & Musco 2015), the singular values of the projected
      bidiagonal matrix are counted: a deterministic lower bound, exact once the basis captures
      every direction above :math:`\tau` (a gap, or an exactly low-rank :math:`J - I`);
    * ``method="deflated"``: Krylov-deflated stochastic Lanczos quadrature
      (:func:`estimators.counting.singular_value_count`): the Ritz values above :math:`\tau`
      of a block Krylov basis are counted and the rest is estimated by SLQ on the
      Schur complement of :math:`(J - I)^\top (J - I)` on that basis's complement (an exact
      split), with a standard error (``error_estimate``); for spectra without a gap at
      thresholds on the scale of the spectrum (the paper's); a threshold far below the
      quadrature's resolution (say :math:`\tau^2 < 10^{-6} \|A\|^2`) is counted too high;
    * ``method="range_finder"``: the adaptive randomized range finder
      (:func:`linops.range_finder`, Halko, Martinsson & Tropp 2011, Algorithm 4.2) grows
      :math:`Q` until its bound on :math:`\|(I - QQ^\top)A\|` is below :math:`\tau` or half the
      budget is used, then the singular values of :math:`Q^\top A` (one reverse pass per column)
      are counted.

    Parameters
    ----------
    op
        The training Jacobian as an operator (``linops.TrainingJacobianOperator``) or any
        square operator / dense matrix.
    threshold
        Absolute threshold :math:`\tau` (or several; the rank is reported for the first and the
        singular values for all).
    num_matvecs
        Budget of products with :math:`J` (default ``m // 2``, half of a dense computation).
    method
        ``"deflated"``, ``"krylov"`` or ``"range_finder"``.
    block_size
        Vectors per block (default 16 for ``"deflated"``, 64 otherwise).
    seed
        Randomness of the Gaussian test vectors.

    Returns
    -------
    DimensionResult
        With ``"deflated"``: ``rank`` is the rounded estimate, ``basis_size`` the columns of
        the Krylov basis, ``error_estimate`` the standard error of the count and
        ``singular_values`` the Ritz values; the rank is for the first threshold (call
        :func:`estimators.counting.singular_value_count` on ``op - I`` for all of them from
        one run).

    Notes
    -----
    Projection methods count exactly once every direction with :math:`\sigma_i > \tau` is
    captured, which needs a gap in the spectrum of :math:`J - I` near :math:`\tau`. On the paper's
    MLP the singular values of :math:`J - I` below 1 are spread over many decades without a gap
    (about 1200 per decade): with ``m / 2`` products ``"krylov"`` resolves thresholds at or above
    2 and undercounts at 1 by 7%, where ``"deflated"`` is unbiased with a standard error of about
    0.5% (``bench/training_jacobian.py``, ``examples/training_jacobian.md``).
    """
    A = _shifted(op)
    m = A.shape[0]
    taus = (
        [float(threshold)] if isinstance(threshold, int | float) else [float(t) for t in threshold]
    )
    budget = m // 2 if num_matvecs is None else int(num_matvecs)
    if budget < 2:
        raise ValueError(f"num_matvecs: expected at least 2, got {num_matvecs!r}")
    if method not in ("deflated", "krylov", "range_finder"):
        raise ValueError(f"method: expected 'deflated', 'krylov' or 'range_finder', got {method!r}")
    products0 = getattr(op, "num_matvecs", None)
    if block_size is None:
        block_size = 16 if method == "deflated" else 64
    if method == "deflated":
        c = singular_value_count(A, taus[0], budget, block_size=block_size, seed=seed)
        # op.num_matvecs exists where products0 is not None (mypy cannot see it through getattr)
        used = c.num_matvecs if products0 is None else op.num_matvecs - products0  # type: ignore[union-attr]
        count, se = float(c.counts[0]), float(c.stderrs[0])
        return DimensionResult(round(count), int(used), c.basis_size, se, c.ritz_values)
    if method == "krylov":
        k = min(budget // 2, m)
        b = min(block_size, k)
        k = b * (k // b)  # the space the budget's blocks hold
        res = randomized_svd(A, k, oversample=0, power_iters=0, block_size=b, seed=seed)
        s, size, err, used = torch.as_tensor(res.singular_values), k, float("nan"), res.num_matvecs
    else:
        rf = range_finder(
            A, atol=taus[0], block_size=block_size, max_rank=min(budget // 2, m), seed=seed
        )
        Q = torch.as_tensor(rf.basis).to(A.torch_dtype)
        s = torch.linalg.svdvals(A._apply(Q, adjoint=True).T.to(torch.float64))
        size, err, used = Q.shape[1], float(rf.error_estimate), rf.num_matvecs + Q.shape[1]
    if products0 is not None:
        used = op.num_matvecs - products0  # type: ignore[union-attr]  # (as above)
    s = s.to(torch.float64)
    return DimensionResult(int((s > taus[0]).sum()), int(used), size, err, s)


def _shifted(op: OperatorLike) -> TorchLinearOperator:
    """``op - I`` as an operator (``op`` square)."""
    A = aslinearoperator(op)
    if A.shape[0] != A.shape[1]:
        raise ValueError(f"op: expected a square operator, got shape {A.shape}")
    return A - IdentityOperator(A.shape[0], dtype=A.torch_dtype, device=A.device)
