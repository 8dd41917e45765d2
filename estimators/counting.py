r"""How many singular values exceed a threshold? Krylov-deflated stochastic Lanczos quadrature.

The numerical rank :math:`N(\tau) = \#\{i : \sigma_i(A) > \tau\}` of a large operator is the
dimension of training of "Understanding Gradient Descent through the Training Jacobian" (an anonymous submission
under double-blind review, no arXiv id given; "the paper" below), section 2, for :math:`A = J - I`. A projection method
(block Krylov, range finder) counts it exactly only when a gap separates the singular values
above :math:`\tau` from those below; without one (the paper's MLP has about 1200 singular values
of :math:`J - I` per decade below 1) its Ritz values sit below the true ones and the count
comes out low. This estimator splits :math:`M = A^\top A` along a block Krylov basis, counts
one part exactly and the other stochastically:

1. **Krylov part, exactly.** A randomized block Krylov method on :math:`M` (Musco & Musco
   2015), started from a Gaussian block of ``b`` columns and run ``q`` iterations, gives an
   orthonormal basis :math:`Q` of :math:`\mathcal{K}_q(M, \Omega)`, the Ritz values
   :math:`\theta_i = \tilde\sigma_i^2 = \lambda_i(T)`, :math:`T = Q^\top M Q`, and
   :math:`MQ`, all from the products the iteration makes. In the basis :math:`[Q, Q_\perp]`

   .. math:: M - \tau^2 I = \begin{pmatrix} T - \tau^2 I & C^\top \\ C & B - \tau^2 I
             \end{pmatrix}, \qquad C = Q_\perp^\top M Q,\quad B = Q_\perp^\top M Q_\perp,

   and Haynsworth's inertia additivity (Sylvester's law applied to the block
   :math:`LDL^\top` factorisation) gives, whenever no Ritz value equals :math:`\tau^2`,

   .. math:: N(\tau) = \#\{\theta_i > \tau^2\}
             + \#\{\lambda_j(B - C (T - \tau^2 I)^{-1} C^\top) > \tau^2\},

   exactly, however far the Ritz values are from converged. The first term is the
   deterministic part; the correction :math:`C (T - \tau^2 I)^{-1} C^\top` costs no products
   (:math:`P M Q` with :math:`P = I - QQ^\top` is already known). Without it (counting Ritz
   values plus the eigenvalues of :math:`B` alone) the count can be off by up to ``b``, since
   in exact arithmetic :math:`C` has rank at most ``b``: +2 to +4 of 100 in the tests.
   A Ritz value within :math:`10^{-3}\tau^2` of :math:`\tau^2` is moved that far from it
   (keeping its side) before inverting.
2. **The rest, stochastically.** The second count,
   :math:`\operatorname{tr} \mathbb{1}(S_\tau > \tau^2)` for the Schur complement
   :math:`S_\tau = PMP - PMQ (T - \tau^2)^{-1} Q^\top M P`, is estimated by stochastic Lanczos
   quadrature (Ubaru, Chen & Saad 2017); every threshold has its own :math:`S_\tau` and its
   own quadrature, the basis and the probes are shared. Deflating the top of the spectrum
   shrinks the interval the quadrature must resolve (on the paper's MLP from :math:`[0, 21^2]`
   to about :math:`[0, 2^2]`). The probes are uniform on the unit sphere of
   :math:`\mathrm{range}(P)` (Gaussian, projected twice, normalised) and each counts
   :math:`(m - k)\,v^\top g(S_\tau) v`, :math:`k` the basis size: unbiased (for Gaussian
   :math:`z`, :math:`Pz/\|Pz\|` is uniform on that sphere), in :math:`[0, m - k]`, so a count
   is never above the dimension, and the :math:`k` zero eigenvalues of :math:`S_\tau` on
   :math:`\mathrm{range}(Q)` are not in the quadrature. With Rademacher probes of the whole
   space they were: a point mass at 0, next to a small :math:`\tau^2`, that the Gauss rule
   smeared above the threshold (2500 x 1000, :math:`\sigma` linear from 3 to 0.01,
   :math:`\tau = 0.1`, 1200 products: 930-1218 over four seeds against 969, up to 218 above
   the dimension; now 955-993 over 20 seeds).

**Smoothed step** (``smoothing`` :math:`= h`, default 0.1). The quadrature counts
:math:`g_h(\sigma) = \min(1, \max(0, (\sigma - (1-h)\tau) / (2h\tau)))`, a linear ramp across
:math:`[(1-h)\tau, (1+h)\tau]`, instead of the step :math:`\mathbb{1}(\sigma > \tau)`. The
Gauss rule of a step is off by up to the weight of the node nearest :math:`\tau^2`, and with
equally long Lanczos runs on one spectrum those nodes fall in similar places, so the error is
shared by all probes: on the paper's :math:`J - I` (three training runs, 5 seeds each, thresholds
1 and 0.5) the plain step's count was off by -0.4% to -4.4% on average, the ramp's by at most
0.84% on two of the runs. The ramp moves the count by the imbalance of the spectrum inside the
window: zero for a density linear across it, at most half the eigenvalues inside it, and +2.1%
on the third run (shuffled labels) at threshold 1, whose singular values are much denser just
below 1 than just above (``bench/rank_seeds.py``; ``examples/training_jacobian.md``). A width
tied to the quadrature's node spacing would avoid that; it is not done here.
``smoothing=0`` counts the plain step.

**Standard error with the quadrature in it.** The spread across probes is not the whole
error: the Gauss rule of a step (or a narrow ramp) is off by up to the weights of the nodes
next to :math:`\tau^2`, and that error is shared by all probes (the spread alone covered the
truth with :math:`\pm 2` standard errors in 65-97% of seeds on small gapless test matrices).
The Chebyshev-Markov-Stieltjes inequalities bound each probe's mass above :math:`\tau^2`
between the sums of the weights beyond the two nodes around it; the reported standard error
is the probes' one plus half the distance from the estimate to the far end of that
(averaged) bracket, so :math:`\pm 2` standard errors hold the bracket plus two sampling
errors. It is conservative: coverage 100% in every seed study of
``bench/estimator_coverage.py``, with mean standard errors 3-4 times the root-mean-square
error (2500 x 1000 case: 64.5 against 15.5; 500 x 200: 12.1 against 4.5).

:math:`\hat N = \min(\max(N_Q + \hat N_\perp, 0), \min(m, n))`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from estimators.density import _lanczos_batch, gauss_rules
from estimators.seeding import Seed
from linops import IdentityOperator, OperatorLike, TorchLinearOperator, aslinearoperator
from linops import blocks as kr

__all__ = ["SingularValueCount", "singular_value_count"]


class SingularValueCount(NamedTuple):
    r"""Estimated :math:`\#\{\sigma_i > \tau\}` per threshold, and its parts.

    One entry per threshold (1-d float64 tensors, in the order given): ``counts``, the estimates
    :math:`N_Q + \hat N_\perp` (within ``[0, min(m, n)]``); ``stderrs``, their standard
    errors, the probes' spread plus the quadrature bound (module docstring); ``krylov_counts``,
    :math:`N_Q`; ``rest``, :math:`\hat N_\perp`. Then ``thresholds``; ``num_matvecs``, products
    with ``A`` and ``A^T`` for one threshold (the shared basis and one quadrature);
    ``num_matvecs_total``, for all of them; ``basis_size``, columns of the Krylov basis :math:`Q`;
    ``ritz_values``, the singular values of ``A`` on it (descending); ``block_size``, ``probes``,
    ``steps`` (Lanczos steps per probe) and ``smoothing``.
    """

    counts: torch.Tensor
    stderrs: torch.Tensor
    krylov_counts: torch.Tensor
    rest: torch.Tensor
    thresholds: torch.Tensor
    num_matvecs: int
    num_matvecs_total: int
    basis_size: int
    ritz_values: torch.Tensor
    block_size: int
    probes: int
    steps: int
    smoothing: float


def singular_value_count(
    A: OperatorLike,
    threshold: float | Sequence[float],
    num_matvecs: int,
    *,
    block_size: int = 16,
    deflation_share: float = 0.55,
    steps: int = 15,
    smoothing: float = 0.1,
    seed: Seed = 0,
) -> SingularValueCount:
    r"""Estimate :math:`\#\{i : \sigma_i(A) > \tau\}` with at most ``num_matvecs`` products.

    Parameters
    ----------
    A
        A square or rectangular operator (any type :func:`linops.aslinearoperator` takes).
    threshold
        :math:`\tau > 0`, or several: one run counts at all of them.
    num_matvecs
        Products with ``A`` and ``A^T`` together per threshold. About ``deflation_share`` of them
        build the Krylov basis (``2 * block_size`` per iteration, shared by all thresholds), the
        rest pay for one quadrature per threshold (``2 * steps`` per probe, at least two
        probes).
    block_size
        Vectors per Krylov block. Smaller blocks capture more per product (on the paper's
        matrix with 2048 products, blocks of 16 against 64: 681 against 671 Ritz values above 1
        of the 788 singular values), at the cost of more, smaller batched passes.
    deflation_share
        Share of the budget for the Krylov basis, in ``(0, 1)``.
    steps
        Lanczos steps per probe (shortened if the budget is small). The deflated operator's
        spectrum is short, so few steps and many probes beat the reverse: on the paper's matrix
        37 x 15 had the smallest spread of the splits tried (16 x 35, 22 x 25, 28 x 20; measured
        before the Schur correction, with a 640-column basis).
    smoothing
        :math:`h \in [0, 1)`: count the ramp :math:`g_h` instead of the step (module docstring);
        0 counts the step.
    seed
        Randomness of the Gaussian start block and the probes.

    Returns
    -------
    SingularValueCount

    Raises
    ------
    ValueError
        If a threshold is not positive, ``smoothing`` or ``deflation_share`` is out of range, or
        the budget cannot pay for one Krylov iteration and two probes of two steps.

    Examples
    --------
    >>> import torch
    >>> s = torch.linspace(0.01, 3.0, 400, dtype=torch.float64)  # no gap: 267 above 1
    >>> res = singular_value_count(torch.diag(s), [1.0, 2.0], 400, block_size=8, seed=0)
    >>> [int((s > t).sum()) for t in (1.0, 2.0)]
    [267, 134]
    >>> res.counts.round().tolist(), res.stderrs.round().tolist()
    ([264.0, 123.0], [28.0, 18.0])
    >>> res.num_matvecs <= 400
    True
    """
    op, _ = kr.prepare(A)
    taus = torch.as_tensor(
        [threshold] if isinstance(threshold, int | float) else list(threshold), dtype=torch.float64
    ).reshape(-1)
    if taus.numel() == 0 or not bool((taus > 0).all()) or not bool(torch.isfinite(taus).all()):
        raise ValueError(f"threshold: expected positive finite numbers, got {threshold!r}")
    h = float(smoothing)
    if not 0.0 <= h < 1.0:
        raise ValueError(f"smoothing: expected a number in [0, 1), got {smoothing!r}")
    budget = kr.check_int(num_matvecs, "num_matvecs", 1)
    b = kr.check_int(block_size, "block_size", 1)
    if not 0.0 < deflation_share < 1.0:
        raise ValueError(f"deflation_share: expected a number in (0, 1), got {deflation_share!r}")
    m = op.shape[1]
    b = min(b, m)
    iters = max(1, min(int(deflation_share * budget) // (2 * b), m // b))
    rest_budget = budget - 2 * b * iters
    d = min(kr.check_int(steps, "steps", 2), rest_budget // 4, m)
    if d < 2:
        raise ValueError(
            f"num_matvecs: expected at least {2 * b + 8} for one Krylov iteration of block "
            f"{b} and two probes of two Lanczos steps, got {budget}"
        )
    probes = max(2, rest_budget // (2 * d))
    gen = kr.make_generator(seed, op.device)
    AQ, Q, MQ = _block_krylov(op, b, iters, gen)
    T = AQ.mH @ AQ  # Q^T M Q from products already made
    theta, W = torch.linalg.eigh((T + T.mH) / 2)
    C = (MQ - Q @ (Q.mH @ MQ)) @ W  # P M Q W: the coupling, in the Ritz basis
    B = _deflated_normal(op, Q)
    theta64 = theta.to("cpu", torch.float64)
    krylov_counts = (theta64[None, :] > taus[:, None] ** 2).sum(dim=1).to(torch.float64)
    dim = m - int(Q.shape[1])  # dimension of range(P), where S_tau lives
    rest = torch.zeros(taus.numel(), dtype=torch.float64)
    se = torch.zeros(taus.numel(), dtype=torch.float64)
    quad = 2 * probes * d if dim > 0 else 0
    if dim > 0:
        Z = kr.random_block(m, probes, op, gen)
        Z = Z - Q @ (Q.mH @ Z)
        Z = Z - Q @ (Q.mH @ Z)
        V0 = Z / kr.column_norms(Z)  # uniform on the sphere of range(P), unit to float32 rounding
    for i, tau in enumerate(taus.tolist()):
        if dim == 0:
            break
        S = B - _coupling(C, theta, tau**2)
        runs = _lanczos_batch(S, V0, d)
        nodes, w = gauss_rules(runs.alpha, runs.beta, runs.steps)
        g = _ramp(nodes.clamp(min=0.0).sqrt(), taus[i : i + 1], h)[:, 0]
        est = dim * (w * g).sum(dim=-1)
        lo, hi = _step_bracket(nodes, w, tau**2)
        rest[i], se[i] = _honest_mean(est, dim * lo, dim * hi)
    upper = float(min(op.shape))
    counts = (krylov_counts + rest).clamp(0.0, upper)
    return SingularValueCount(
        counts,
        se,
        krylov_counts,
        rest,
        taus,
        2 * b * iters + quad,
        2 * b * iters + quad * taus.numel(),
        int(Q.shape[1]),
        theta64.clamp(min=0.0).sqrt().flip(0),
        b,
        probes,
        d,
        h,
    )


def _step_bracket(
    nodes: torch.Tensor, w: torch.Tensor, t: float
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Per-probe bounds on the spectral mass above ``t`` from the Gauss rule alone.

    Chebyshev-Markov-Stieltjes: for a Gauss rule with nodes :math:`x_1 < \dots < x_s` and
    weights :math:`w_j` of a measure with distribution :math:`F`,
    :math:`\sum_{j<k} w_j \le F(x_k - 0) \le F(x_k + 0) \le \sum_{j\le k} w_j`; so for
    :math:`x_k \le t < x_{k+1}`, :math:`1 - F(t)` lies in
    :math:`[1 - \sum_{j \le k+1} w_j,\; 1 - \sum_{j<k} w_j]` (Karlin & Shapley 1953; used for
    SLQ by Chen, Trogdon & Ubaru 2021, arXiv:2105.06595). Rows of ``nodes`` are ascending.
    """
    k = (nodes <= t).sum(dim=-1, keepdim=True)  # nodes 0..k-1 are <= t
    j = torch.arange(nodes.shape[-1], device=nodes.device)
    lower_F = (w * (j < k - 1)).sum(dim=-1)
    upper_F = (w * (j < k + 1)).sum(dim=-1)
    return (1.0 - upper_F).clamp(min=0.0), (1.0 - lower_F).clamp(min=0.0)


def _honest_mean(est: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> tuple[float, float]:
    r"""Mean of the per-probe estimates and a standard error that includes the quadrature.

    The per-probe exact counts :math:`c_l` (unbiased for the count) lie in
    :math:`[\mathrm{lo}_l, \mathrm{hi}_l]`; :math:`s` is the largest sample deviation of
    ``est``, ``lo`` and ``hi`` over :math:`\sqrt{N}`; :math:`\delta` the distance from the
    mean estimate to the far end of the mean bracket. The returned standard error
    :math:`s + \delta/2` makes :math:`\pm 2` standard errors cover
    :math:`[\overline{\mathrm{lo}} - 2s, \overline{\mathrm{hi}} + 2s]`, which holds the true
    count whenever the probe average is within two of its standard errors.
    """
    n = est.numel()
    mean = float(est.mean())
    s = max(float(x.std()) for x in (est, lo, hi)) / math.sqrt(n) if n > 1 else math.inf
    delta = max(mean - float(lo.mean()), float(hi.mean()) - mean, 0.0)
    return mean, s + delta / 2


def _coupling(C: torch.Tensor, theta: torch.Tensor, t: float) -> TorchLinearOperator:
    r""":math:`C (\Theta - t I)^{-1} C^\top` as an operator (the Schur-complement correction).

    Ritz values within :math:`10^{-3} t` of ``t`` are moved to that distance (keeping their
    side), so one sitting on the threshold cannot blow the correction up.
    """
    d = theta - t
    floor = 1e-3 * t
    d = torch.where(d >= 0, d.clamp(min=floor), d.clamp(max=-floor))
    return aslinearoperator(C / d) @ aslinearoperator(C.mH)


def _ramp(s: torch.Tensor, tau: torch.Tensor, h: float) -> torch.Tensor:
    r"""Return :math:`g_h(s)`, shape ``s.shape[:-1] + (len(tau), s.shape[-1])``.

    The step :math:`s > \tau` when ``h == 0``, else the linear ramp across
    :math:`[(1-h)\tau, (1+h)\tau]`.
    """
    s, tau = s[..., None, :], tau[:, None]
    if h == 0.0:
        return (s > tau).to(torch.float64)
    return ((s - (1.0 - h) * tau) / (2.0 * h * tau)).clamp(0.0, 1.0)


def _block_krylov(
    op: TorchLinearOperator, b: int, iters: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Return ``(A Q, Q, A^T A Q)`` for an orthonormal block Krylov basis :math:`Q`.

    :math:`Q` spans :math:`\mathcal{K}_q(A^\top A, \Omega)`, :math:`\Omega` Gaussian with ``b``
    columns.

    Each iteration applies ``A`` and ``A^T`` to one orthonormalised block (``2 b`` products).
    """
    m = op.shape[1]
    X = kr.random_block(m, b, op, gen)
    V = X.new_empty(m, b * iters)  # filled block by block (no re-copying of the basis)
    AV, AtAV = [], []
    for i in range(iters):
        Qb, _, _ = kr.orth_qr(X, V[:, : i * b], gen, ref=1.0)
        Y = op._apply(Qb)
        X = op._apply(Y, adjoint=True)
        kr.check_products(X, 2 * b * (i + 1))
        V[:, i * b : (i + 1) * b] = Qb
        AV.append(Y)
        AtAV.append(X)
    return torch.cat(AV, dim=1), V, torch.cat(AtAV, dim=1)


def _deflated_normal(op: TorchLinearOperator, Q: torch.Tensor) -> TorchLinearOperator:
    r""":math:`P A^\top A P` with :math:`P = I - Q Q^\top`, as an operator."""
    m = op.shape[1]
    AtA = op.H @ op
    eye = IdentityOperator(m, dtype=op.torch_dtype, device=op.device)
    P = eye - aslinearoperator(Q) @ aslinearoperator(Q.mH)
    return P @ AtA @ P
