r"""XDiag diagonal estimation and a Frobenius-norm estimator.

* **XDiag** (Epperly, Tropp & Webber 2024, Section 2.4 / Algorithm "XDiag"): the exchangeable
  version of Diag++. With :math:`s = m/2` Rademacher probes :math:`\Omega`, :math:`Y = A\Omega
  = QR` and :math:`Z = A^H Q`, each probe :math:`\omega_i` is left out in turn: the basis
  :math:`Q_i` of the other :math:`s - 1` columns of :math:`Y` (a rank-one downdate,
  :math:`Q_iQ_i^H = Q(I - s_is_i^H)Q^H` with :math:`s_i` the normalised :math:`i`-th column
  of :math:`R^{-H}`) gives :math:`\operatorname{diag}(Q_iQ_i^HA)` exactly and
  :math:`\omega_i` estimates the rest by Hutchinson:

  .. math:: \hat d = \frac1s \sum_{i=1}^s \Big[\operatorname{diag}(Q_iQ_i^HA) + \omega_i
     \odot (I - Q_iQ_i^H)A\omega_i\Big].

  It uses :math:`m = 2s` products and is exact when :math:`\operatorname{rank}A \le s - 1`,
  i.e. with :math:`m = 2(r + 1)` products for rank :math:`r` (every :math:`Q_i` then spans
  the range of :math:`A`).
* **Frobenius norm**: :math:`\|A\|_F^2 = \operatorname{tr}(A^HA) = \mathbb E\|A\omega\|^2`
  for Rademacher :math:`\omega` (Hutchinson), with the delta method for :math:`\|A\|_F`.

References
----------
.. [1] E. N. Epperly, J. A. Tropp and R. J. Webber, "XTrace: making the most of every sample in
   stochastic trace estimation", SIAM J. Matrix Anal. Appl. 45(1), 2024. arXiv:2301.07825
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from estimators._budget import check_sketch, grouped_probes, probe_group, rademacher_probes
from estimators.trace import DiagonalEstimate, _column_sums
from linops import OperatorLike
from linops import blocks as kr

__all__ = ["NormEstimate", "frobenius_norm", "xdiag"]


class NormEstimate(NamedTuple):
    """``estimate`` of the norm, its ``stderr``, and the ``num_matvecs`` used."""

    estimate: float
    stderr: float
    num_matvecs: int


def _lift_diagonal(R: torch.Tensor) -> torch.Tensor:
    """Return ``R`` with diagonal entries below ``s eps max|r_ii|`` lifted to that floor.

    This is the QR of a sketch perturbed at rounding level, invertible when ``A`` has rank
    below ``s``.
    """
    d = torch.linalg.diagonal(R)
    floor = max(R.shape[1] * torch.finfo(d.abs().dtype).eps * float(d.abs().max()), 1e-300)
    lifted = torch.where(d.abs() < floor, torch.full_like(d, floor), d)
    return R - torch.diag(d) + torch.diag(lifted)


def xdiag(
    A: OperatorLike,
    num_matvecs: int = 100,
    *,
    seed: int | torch.Generator | None = None,
    memory_budget: int | None = None,
) -> DiagonalEstimate:
    r"""Estimate :math:`\operatorname{diag}(A)` by XDiag (module docstring).

    Parameters
    ----------
    A
        Square operator (products with ``A`` and ``A^H``; the same for a symmetric one).
    num_matvecs
        Even budget :math:`m \ge 4`: :math:`m/2` products with ``A``, :math:`m/2` with
        ``A^H``. Exact for rank :math:`\le m/2 - 1`.
    seed
        Seed of the Rademacher probes.
    memory_budget
        Bytes its sketch may take (about ``3.5 m`` vectors of ``n`` at once; default a
        fraction of the device's free memory); a sketch beyond it is refused.

    Returns
    -------
    DiagonalEstimate
        ``stderr`` per entry: the spread of the :math:`s` leave-one-out terms over
        :math:`\sqrt s` (they share probes, so it is a rough guide, zero when exact).

    Raises
    ------
    ValueError
        For a non-square operator, or an odd or too small budget, or one above ``2n``.

    Examples
    --------
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> U = torch.randn(30, 3, generator=g, dtype=torch.float64)
    >>> A = U @ U.T  # rank 3: exact with 2 (3 + 1) = 8 products
    >>> est = xdiag(A, 8, seed=0)
    >>> bool(torch.allclose(est.estimate, torch.diagonal(A), rtol=1e-8, atol=1e-10))
    True
    """
    op, kind = kr.prepare(A)
    n = op.shape[0]
    if op.shape[0] != op.shape[1]:
        raise ValueError(f"A: expected a square operator, got shape {op.shape}")
    m = kr.check_int(num_matvecs, "num_matvecs", 4, 2 * n)
    if m % 2:
        raise ValueError(f"num_matvecs: expected an even number (half A, half A^H), got {m}")
    s = m // 2
    check_sketch(op, 7 * s, memory_budget, "xdiag", "lower num_matvecs or use diagonal()")
    gen = kr.make_generator(seed, op.device)
    W = rademacher_probes(op, op.shape[0], s, gen)
    Y = op._apply(W)
    kr.check_products(Y, s)
    Q, R = torch.linalg.qr(Y)
    Z = op._apply(Q, adjoint=True)
    kr.check_products(Z, m)
    S = torch.linalg.inv(_lift_diagonal(R)).mH
    S = S / kr.column_norms(S)
    QS, ZS = Q @ S, Z @ S
    base = (Q * Z.conj()).sum(dim=1)  # diag(Q Q^H A)
    QY = Q.mH @ Y
    c = (S.conj() * QY).sum(dim=0)  # s_i^H Q^H y_i
    resid = Y - Q @ QY + QS * c  # (I - Q_i Q_i^H) A w_i, column i
    terms = base[:, None] - QS * ZS.conj() + W * resid
    est = terms.mean(dim=1)
    se = terms.std(dim=1) / math.sqrt(s) if s > 1 else torch.full_like(est.real, math.nan)
    return DiagonalEstimate(kr.to_output(est, kind), kr.to_output(se, kind), m)


def frobenius_norm(
    A: OperatorLike,
    num_matvecs: int = 100,
    *,
    seed: int | torch.Generator | None = None,
    memory_budget: int | None = None,
) -> NormEstimate:
    r"""Estimate :math:`\|A\|_F` from products :math:`A\omega` with Rademacher :math:`\omega`.

    :math:`\widehat{\|A\|_F^2} = \frac1N\sum_j\|A\omega_j\|^2` is unbiased; the estimate is its
    square root, with standard error :math:`\mathrm{se}(\widehat{\|A\|_F^2}) / (2\|A\|_F)`
    (delta method). Rectangular ``A`` is fine (``N`` products with ``n``-vectors). The probes
    go in groups of the operator's vectors per pass within ``memory_budget`` (bytes, default
    a fraction of the device's free memory).

    Raises
    ------
    ValueError
        For a budget below 2.

    Examples
    --------
    >>> import torch
    >>> A = torch.diag(torch.tensor([3.0, -4.0], dtype=torch.float64))
    >>> frobenius_norm(A, 4, seed=0).estimate  # exact for a diagonal A (Rademacher)
    5.0
    """
    op, _ = kr.prepare(A)
    N = kr.check_int(num_matvecs, "num_matvecs", 2)
    gen = kr.make_generator(seed, op.device)
    parts: list[torch.Tensor] = []
    while (done := sum(p.numel() for p in parts)) < N:
        W = grouped_probes(op, op.shape[1], probe_group(op, N - done, memory_budget, 2), gen)
        AW = op._apply(W)
        kr.check_products(AW, done + W.shape[1])
        parts.append(_column_sums(AW.abs() ** 2).double())
    sq = torch.cat(parts)
    est = math.sqrt(max(float(sq.mean()), 0.0))
    se_sq = float(sq.std()) / math.sqrt(N)
    return NormEstimate(est, se_sq / (2 * est) if est > 0 else 0.0, N)
