r"""Stochastic trace and diagonal estimation from matrix-vector products.

All estimators take a square operator (anything :func:`linops.aslinearoperator` accepts), a
budget ``num_matvecs`` of products, and a ``seed``; probes come from a ``torch.Generator`` on
the operator's device, and products are taken in blocks.

* Hutchinson (1989): :math:`\operatorname{tr}A \approx \frac1N\sum_j \omega_j^H A\omega_j`,
  unbiased since :math:`E[\omega\omega^H] = I`.
* Hutch++ (Meyer, Musco, Musco & Woodruff 2021): exact trace on a sketched top subspace plus
  Hutchinson on the deflated remainder.
* XTrace (Epperly, Tropp & Webber 2024): the exchangeable (leave-one-out) version of Hutch++
  that uses every probe both for the low-rank part and for the remainder.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch

from estimators._budget import check_sketch, grouped_probes, probe_group, rademacher_probes
from linops import Array, OperatorLike, Seed
from linops import blocks as kr
from linops.base import TorchLinearOperator

__all__ = [
    "DiagonalEstimate",
    "TraceEstimate",
    "diagonal",
    "hutchinson_trace",
    "hutchpp_trace",
    "xtrace",
]


class TraceEstimate(NamedTuple):
    """A trace estimate with its standard error and cost.

    ``estimate`` of the trace, its ``stderr`` (standard error, ``nan`` if unavailable), the
    ``num_matvecs`` used and the ``method`` that produced it.
    """

    estimate: float
    stderr: float
    num_matvecs: int
    method: str


class DiagonalEstimate(NamedTuple):
    """``(n,)`` ``estimate`` of the diagonal, per-entry ``stderr``, and ``num_matvecs``.

    ``stderr`` is ``nan`` where it cannot be estimated (Hutchinson with one product).
    """

    estimate: Array
    stderr: Array
    num_matvecs: int


_SKETCH_HINT = (
    "lower num_matvecs, raise memory_budget, or use hutchinson_trace, which holds one group "
    "of probes at a time"
)


#: the trace estimators' refusal of complex operators (their estimates are real numbers)
COMPLEX_TRACE_REFUSAL = (
    "A: expected a real operator, got a complex one: the trace estimators return a real "
    "estimate, and a complex A's trace is complex in general (its real part alone would be "
    "returned); for a complex Hermitian A pass its real form [[Re A, -Im A], [Im A, Re A]], "
    "whose trace is twice A's (estimators.diagonal and frobenius_norm take complex operators)"
)


def _setup(
    A: OperatorLike, num_matvecs: int, lo: int, seed: Seed, real: bool = True
) -> tuple[TorchLinearOperator, int, tuple[torch.Generator, Literal["numpy", "torch", "cupy"]]]:
    op, kind = kr.prepare(A)
    if op.shape[0] != op.shape[1]:
        raise ValueError(f"A: expected a square operator, got shape {op.shape}")
    if real and op.torch_dtype.is_complex:
        raise ValueError(COMPLEX_TRACE_REFUSAL)
    N = kr.check_int(num_matvecs, "num_matvecs", lo)
    return op, N, (kr.make_generator(seed, op.device), kind)


def _apply(op: TorchLinearOperator, X: torch.Tensor, count: int) -> torch.Tensor:
    Y = op._apply(X)
    kr.check_products(Y, count)
    return Y


def _column_sums(X: torch.Tensor) -> torch.Tensor:
    """Each column's sum, one contiguous column at a time.

    ``X.sum(dim=0)`` splits its work over the threads by the number of columns, and torch adds
    a strided column (of a row-major block) in another order than a contiguous one, so a
    column's sum depended on how many columns came with it (float32 standard errors of
    :func:`hutchinson_trace` differed in the eighth digit between groups of 4 and 9 probes).
    """
    if not X.shape[1]:
        return X[0]
    return torch.stack([X[:, j].contiguous().sum() for j in range(X.shape[1])])


def _running_sum(total: float, values: torch.Tensor) -> float:
    """``total`` plus each of ``values`` in turn (in float64, one probe after another)."""
    for v in values.tolist():
        total += v
    return total


def _mean_sem(samples: torch.Tensor) -> tuple[float, float]:
    k = samples.numel()
    sem = float(samples.std(unbiased=True)) / math.sqrt(k) if k > 1 else math.nan
    return float(samples.mean()), sem


def _quadratic_forms(Z: torch.Tensor, BZ: torch.Tensor, rademacher: bool) -> tuple[float, float]:
    r"""Mean of :math:`z_j^H B z_j` and a standard error that does not trust a small sample.

    The sample variance of :math:`N` quadratic forms is noisy and, for the skewed
    (chi-square-like) forms of a decaying spectrum, usually too small: with 10 probes
    :math:`\pm 2` of its standard errors covered the truth in 89-93% of seeds for Hutchinson
    and 74-92% for Hutch++'s remainder at 10-20 products (``bench/estimator_coverage.py``). The per-probe variance is also known in closed form,
    :math:`2(\|B_s\|_F^2 - \sum_i b_{ii}^2)` for Rademacher and :math:`2\|B_s\|_F^2` for
    Gaussian probes (:math:`B_s` the symmetric part), and both terms have unbiased estimates
    from the same products: :math:`\|B_s\|_F^2 \le \frac1N\sum_j\|Bz_j\|^2` and
    :math:`\sum_i b_{ii}^2` by the U-statistic
    :math:`\frac{1}{N(N-1)}\sum_{j\ne k} \langle z_j\odot Bz_j, z_k\odot Bz_k\rangle`
    (:math:`E[z\odot Bz] = \operatorname{diag}B`, Bekas et al. 2007). The standard error uses
    the larger of that moment estimate and the sample variance.
    """
    forms = _Forms(rademacher)
    forms.add(Z, BZ)
    return forms.result()


class _Forms:
    """The sums :func:`_quadratic_forms` needs, accumulated over groups of probes.

    Probe by probe, in order: each probe's sums are taken over its own column and added one
    after another, so the result does not depend on how the probes were grouped (the group
    size follows the memory budget, and for a streamed operator its first product).
    """

    def __init__(self, rademacher: bool) -> None:
        self.rademacher = rademacher
        self.samples: list[torch.Tensor] = []
        self.fro2 = 0.0  # sum of ||B z_j||^2
        self.total: torch.Tensor | None = None  # sum_j z_j * B z_j
        self.squares = 0.0  # sum_j ||z_j * B z_j||^2

    def add(self, Z: torch.Tensor, BZ: torch.Tensor) -> None:
        # as few n-sized temporaries as the sums allow (a GPT-2-sized probe is 0.5 GB, and
        # each fresh one costs about what a pass over it does); summed by torch.sum, not by
        # a BLAS dot (einsum), whose float32 sums of 124M squares were off by 1e-3 here
        D = Z.conj() * BZ
        self.samples.append(_column_sums(D).real)
        norms2 = _column_sums(BZ.abs() ** 2 if BZ.is_complex() else BZ * BZ)
        self.fro2 = _running_sum(self.fro2, norms2)
        if self.rademacher:
            D = D.real
            if self.total is None:
                self.total = torch.zeros_like(D[:, 0])
            for j in range(D.shape[1]):
                self.total.add_(D[:, j])
            self.squares = _running_sum(self.squares, _column_sums(D.mul_(D)))

    def add_lanczos_start(
        self, V0: torch.Tensor, W: torch.Tensor, alpha0: torch.Tensor, *, diagonal: bool = True
    ) -> None:
        r"""Add Rademacher probes :math:`z_j = \sqrt n\, v_j` from a Lanczos run's first step.

        ``W`` holds :math:`A v_j` and ``alpha0`` :math:`v_j^\top A v_j`; no ``n x N``
        temporaries: :math:`z^\top A z = n\alpha_0` and, as :math:`z = \pm 1`,
        :math:`\|z \odot Az\| = \|Az\|`. ``diagonal=False`` spares the one ``n``-vector
        that the estimate of :math:`\sum_i a_{ii}^2` needs (the moment estimate is then
        :math:`2\|A\|_F^2`, an upper bound of the Rademacher variance).
        """
        n = V0.shape[0]
        self.samples.append(n * alpha0.real.to("cpu", torch.float64))
        norms = torch.cat([kr.column_norms(W[:, j : j + 1]) for j in range(W.shape[1])])
        norms2 = n * norms.double() ** 2
        self.fro2 = _running_sum(self.fro2, norms2)
        self.squares = _running_sum(self.squares, norms2)
        if not diagonal:
            self.rademacher = False  # result(): no diagonal term
            return
        if self.total is None:
            self.total = torch.zeros(n, dtype=W.real.dtype, device=W.device)
        for j in range(V0.shape[1]):
            self.total.addcmul_(V0[:, j].real, W[:, j].real, value=n)

    def result(self) -> tuple[float, float]:
        samples = torch.cat(self.samples)
        N = samples.numel()
        mean, sem = _mean_sem(samples)
        if N < 2:
            return mean, sem
        diag2 = 0.0
        if self.rademacher and self.total is not None:
            diag2 = (float(self.total @ self.total) - self.squares) / (N * (N - 1))
        model = max(2 * (self.fro2 / N - diag2), 0.0)
        return mean, max(sem, math.sqrt(model / N))


def hutchinson_trace(
    A: OperatorLike,
    num_matvecs: int = 100,
    *,
    distribution: str = "rademacher",
    seed: int | torch.Generator | None = None,
    memory_budget: int | None = None,
) -> TraceEstimate:
    r"""Hutchinson's estimator :math:`\frac1N\sum_{j=1}^N \omega_j^H A \omega_j`.

    With :math:`E[\omega\omega^H] = I`, :math:`E[\omega^H A\omega] = \operatorname{tr}(A)`.
    Variance per probe :math:`2(\|A\|_F^2 - \sum_i a_{ii}^2)` for Rademacher,
    :math:`2\|A\|_F^2` for Gaussian probes; ``stderr`` is the larger of the sample standard
    deviation and the square root of that variance estimated from the same products, over
    :math:`\sqrt N` (:func:`_quadratic_forms`: the sample alone covered the truth with
    :math:`\pm 2` standard errors in 89-93% of seeds at :math:`N = 10` on decaying spectra,
    now 94-98%; ``bench/estimator_coverage.py``).

    The probes go in groups of the operator's vectors per pass, at most what
    ``memory_budget`` holds (three ``n``-vectors per probe: the probe, its product, a
    temporary; default a fraction of the device's free memory): a 124M-parameter model's
    probes need not all live at once. Each probe is drawn on its own
    (:func:`estimators._budget.grouped_probes`) and its sums are taken probe by probe
    (:class:`_Forms`), so a seeded estimate does not depend on the group size (the products'
    rounding may, at the last digits, where an operator's vectors per pass change it).

    References
    ----------
    .. [1] M. F. Hutchinson, "A stochastic estimator of the trace of the influence matrix for
       Laplacian smoothing splines", Commun. Stat. Simul. Comput. 18(3), 1989.

    Examples
    --------
    >>> import torch
    >>> hutchinson_trace(torch.eye(5, dtype=torch.float64), 4, seed=0).estimate
    5.0
    """
    op, N, (gen, _) = _setup(A, num_matvecs, 1, seed)
    kr.check_which(distribution, ("rademacher", "gaussian"), "distribution")
    forms, done = _Forms(distribution == "rademacher"), 0
    while done < N:  # in groups, so a model operator's probes never all live at once
        group = probe_group(op, N - done, memory_budget)
        Z = grouped_probes(op, op.shape[0], group, gen, distribution == "rademacher")
        done += Z.shape[1]
        forms.add(Z, _apply(op, Z, done))
    mean, sem = forms.result()
    return TraceEstimate(mean, sem, N, "hutchinson")


def hutchpp_trace(
    A: OperatorLike,
    num_matvecs: int = 102,
    *,
    seed: int | torch.Generator | None = None,
    memory_budget: int | None = None,
) -> TraceEstimate:
    r"""Hutch++: :math:`\operatorname{tr}(Q^H A Q) + \frac{1}{m}\sum_j g_j^H(I-QQ^H)A(I-QQ^H)g_j`.

    The budget is split in thirds: :math:`Q = \operatorname{orth}(AS)` from :math:`m` sketch
    vectors, :math:`AQ` for the exact part, and :math:`m` Rademacher probes :math:`g_j` of the
    deflated remainder (Meyer et al. 2021, Algorithm 1). ``stderr`` is that of the remainder,
    as for :func:`hutchinson_trace` the larger of the sample and the moment estimate (the
    sample alone: 74-92% coverage of :math:`\pm 2` standard errors at :math:`N \le 20` on
    decaying spectra; now 93-97%).

    The sketch holds about ``5 N / 3`` vectors at once; beyond ``memory_budget`` (bytes,
    default a fraction of the device's free memory) it is refused.

    References
    ----------
    .. [1] R. A. Meyer, C. Musco, C. Musco and D. P. Woodruff, "Hutch++: optimal stochastic
       trace estimation", SOSA 2021. arXiv:2010.09649
    """
    op, N, (gen, _) = _setup(A, num_matvecs, 3, seed)
    check_sketch(op, 5 * (N // 3), memory_budget, "hutchpp_trace", _SKETCH_HINT)
    m = N // 3
    Q = torch.linalg.qr(_apply(op, rademacher_probes(op, op.shape[0], m, gen), m))[0]
    exact = torch.diagonal(Q.mH @ _apply(op, Q, 2 * m)).sum().real
    G = rademacher_probes(op, op.shape[0], m, gen)
    AG = _apply(op, G - Q @ (Q.mH @ G), 3 * m)
    mean, sem = _quadratic_forms(G, AG - Q @ (Q.mH @ AG), True)  # B = (I-QQ^H) A (I-QQ^H)
    return TraceEstimate(float(exact) + mean, sem, 3 * m, "hutch++")


def xtrace(
    A: OperatorLike,
    num_matvecs: int = 100,
    *,
    fallback: bool = True,
    seed: int | torch.Generator | None = None,
    memory_budget: int | None = None,
) -> TraceEstimate:
    r"""XTrace, the exchangeable Hutch++ estimator, for symmetric (Hermitian) ``A``.

    With Rademacher :math:`\Omega = [\omega_1 \dots \omega_m]`, :math:`m = N/2`, and
    :math:`Q_{(i)}` an orthonormal basis of :math:`A\Omega_{-i}` (all probes but the
    :math:`i`-th),

    .. math:: \hat t = \frac1m\sum_{i=1}^m \Big[\operatorname{tr}(Q_{(i)}^H A Q_{(i)})
       + \omega_i^H (I - Q_{(i)}Q_{(i)}^H) A (I - Q_{(i)}Q_{(i)}^H)\omega_i\Big],

    each term unbiased since :math:`\omega_i` is independent of :math:`Q_{(i)}`. All
    :math:`m` downdates come from one QR :math:`A\Omega = QR`: :math:`Q_{(i)}Q_{(i)}^H =
    Q(I - s_is_i^H)Q^H` with :math:`s_i` the normalised :math:`i`-th column of
    :math:`R^{-H}`, so the cost is :math:`2m` products (Epperly, Tropp & Webber 2024,
    section 2).

    ``stderr`` is the jackknife standard error over the probes,
    :math:`\big(\frac{m-1}{m}\sum_j (\hat t_{(-j)} - \bar t_{(\cdot)})^2\big)^{1/2}`, with
    :math:`\hat t_{(-j)}` XTrace without :math:`\omega_j`, computed in the span of :math:`Q`
    (no products; beyond 32 probes, 32 groups of probes are left out in turn, so
    :math:`O(\min(m, 32)\, m^3)` flops: about 3 s at :math:`m = 500` on one core). The
    paper's estimate, the standard deviation of the :math:`m` terms over :math:`\sqrt m`
    ([1], section 2, and its reference code), treats the terms as independent; they share all
    but one probe and are positively correlated, and :math:`\pm 2` of it covered the truth in
    only 54-93% (mostly 78-87%) of 200 seeds on five decaying spectra (:math:`n = 200`,
    :math:`N = 10` to 80); now 94-100%, with mean standard errors 1-3.5 times the
    root-mean-square error (``bench/estimator_coverage.py``). By the Efron-Stein inequality [2] the jackknife
    variance is conservative in expectation. With very few probes the jackknife is itself
    noisy, so the larger of it and a moment estimate of the remainder's variance
    (:func:`_xtrace_moment_stderr`, :math:`2\|B_i\omega_i\|^2` per term) is reported.

    When ``num_matvecs >= n`` the trace is computed exactly from the :math:`n` products
    :math:`Ae_i` (``method="exact"``, ``stderr=0``, ``num_matvecs=n``): cheaper than XTrace and
    without error (a budget above :math:`2n` made the QR factor :math:`R` rectangular).

    With ``fallback=True`` (default), after :math:`A\Omega` the per-probe variances of
    Hutchinson (from :math:`\omega_i^H A\omega_i`) and of the deflated remainder (from the
    leave-one-out samples :math:`(\omega_i^H Q s_i)(s_i^H r_i)`) are compared; when
    :math:`N` Hutchinson probes are predicted to do better than XTrace (a flat spectrum,
    where deflation cannot pay for the products it costs) the rest of the budget is spent
    on more Rademacher probes and the :math:`\omega_i^H A\omega_i` already computed are
    reused: plain Hutchinson with :math:`N` probes (``method="hutchinson"``).

    The sketch holds about ``5 N / 2`` vectors at once; beyond ``memory_budget`` (bytes,
    default a fraction of the device's free memory) it is refused.

    References
    ----------
    .. [1] E. N. Epperly, J. A. Tropp and R. J. Webber, "XTrace: making the most of every
       sample in stochastic trace estimation", SIAM J. Matrix Anal. Appl. 45(1), 2024.
       arXiv:2301.07825
    .. [2] B. Efron and C. Stein, "The jackknife estimate of variance", Ann. Statist. 9(3),
       1981. doi:10.1214/aos/1176345462

    Examples
    --------
    >>> import torch
    >>> A = torch.diag(torch.tensor([5.0, 3.0, 1.0] + [0.0] * 20, dtype=torch.float64))
    >>> round(xtrace(A, 10, seed=0).estimate, 8)
    9.0
    """
    op, N, (gen, _) = _setup(A, num_matvecs, 4, seed)
    check_sketch(op, 5 * (N // 2), memory_budget, "xtrace", _SKETCH_HINT)
    n = op.shape[0]
    if N >= n:  # n products give the trace exactly: cheaper than XTrace and without error
        return TraceEstimate(_exact_trace(op), 0.0, n, "exact")
    m = N // 2
    Om = rademacher_probes(op, op.shape[0], m, gen)
    Y = _apply(op, Om, m)
    Q, R = _qr_regularized(Y)
    S = _normalized_inverse_adjoint(R)
    hutch = (Om.conj() * Y).sum(dim=0).real
    if fallback and m > 1 and _prefer_hutchinson(hutch, Q, R, S, Om):
        G = rademacher_probes(op, op.shape[0], N - m, gen)
        AG = _apply(op, G, N)
        mean, sem = _quadratic_forms(torch.cat([Om, G], dim=1), torch.cat([Y, AG], dim=1), True)
        return TraceEstimate(mean, sem, N, "hutchinson")
    Z = _apply(op, Q, 2 * m)
    H, W, T, oy = _xtrace_inner_products(Om, Y, Q, Z)
    terms = _xtrace_terms_small(H, W, T, oy, R, S)
    se = max(_xtrace_jackknife(H, W, T, oy, R), _xtrace_moment_stderr(Y, Q, Z, W, S))
    return TraceEstimate(float(terms.mean()), se, 2 * m, "xtrace")


def _xtrace_moment_stderr(Y, Q, Z, W, S) -> float:
    r"""Moment standard error of XTrace's remainder part, no products.

    Term :math:`i` is Hutchinson on :math:`B_i = (I - P_i)A(I - P_i)`,
    :math:`P_i = Q(I - s_is_i^H)Q^H`, with :math:`\omega_i` independent of :math:`B_i`, so its
    variance is at most :math:`2\|B_i\|_F^2`, estimated without bias by
    :math:`2\|B_i\omega_i\|^2`; with :math:`c_i = s_i^H w_i`,
    :math:`A(I - P_i)\omega_i = y_i - Zw_i + c_iZs_i`. Returns
    :math:`(2\sum_i\|B_i\omega_i\|^2)^{1/2}/m`.
    """
    m = W.shape[1]
    c = (S.conj() * W).sum(dim=0)
    V = Y - Z @ W + Z @ (S * c)
    QV = Q.mH @ V
    BV = V - Q @ QV + Q @ (S * (S.conj() * QV).sum(dim=0))
    return math.sqrt(2 * float((BV.abs() ** 2).sum())) / m


def _exact_trace(op: TorchLinearOperator, block: int = 256) -> float:
    r""":math:`\sum_i e_i^H A e_i` from ``n`` products, in blocks of ``block`` columns."""
    n = op.shape[0]
    total = 0.0
    for lo in range(0, n, block):
        hi = min(n, lo + block)
        E = torch.zeros(n, hi - lo, dtype=op.torch_dtype, device=op.device)
        E[torch.arange(lo, hi), torch.arange(hi - lo)] = 1
        AE = _apply(op, E, hi)
        total += float(torch.diagonal(AE[lo:hi]).sum().real)
    return total


def _normalized_inverse_adjoint(R: torch.Tensor) -> torch.Tensor:
    """Columns of :math:`R^{-H}`, normalised: the :math:`s_i` of the leave-one-out downdates."""
    S = torch.linalg.inv(R).mH
    return S / kr.column_norms(S)


def _xtrace_inner_products(Om, Y, Q, Z) -> tuple[torch.Tensor, ...]:
    r"""Return the small quantities XTrace needs.

    :math:`H = Q^HAQ` (symmetrised), :math:`W = Q^H\Omega`, :math:`T = Z^H\Omega` and
    :math:`\omega_i^H y_i`.
    """
    H = Q.mH @ Z
    return (H + H.mH) / 2, Q.mH @ Om, Z.mH @ Om, (Om.conj() * Y).sum(dim=0)


def _xtrace_jackknife(H, W, T, oy, R, groups: int = 32) -> float:
    r"""Jackknife standard error of XTrace over the probes.

    The probes are split into :math:`g = \min(m, 32)` groups (single probes when
    :math:`m \le 32`); :math:`\hat t_{(-k)}` is the XTrace estimate from the probes outside
    group :math:`k`, and the standard error is
    :math:`\big(\frac{g-1}{g}\sum_k(\hat t_{(-k)} - \bar t_{(\cdot)})^2\big)^{1/2}`
    (the delete-a-group jackknife). Everything lives in the span of :math:`Q`: with
    :math:`R_{:,-k} = U_k R_k'` (QR) the basis without group :math:`k` is :math:`QU_k` and its
    product :math:`ZU_k`, so no product is spent; :math:`O(g m^3)` flops.
    """
    m = R.shape[1]
    if m < 3:
        return math.nan
    g = min(m, groups)
    label = torch.arange(m, device=R.device) * g // m
    loo = torch.empty(g, dtype=torch.float64)
    for k in range(g):
        keep = label != k
        U, Rk = torch.linalg.qr(R[:, keep])
        Rk = _lift_diagonal(Rk)
        terms = _xtrace_terms_small(
            U.mH @ H @ U,
            U.mH @ W[:, keep],
            U.mH @ T[:, keep],
            oy[keep],
            Rk,
            _normalized_inverse_adjoint(Rk),
        )
        loo[k] = float(terms.mean())
    return math.sqrt((g - 1) / g * float(((loo - loo.mean()) ** 2).sum()))


def _qr_regularized(Y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """QR of the sketch with diagonal entries of ``R`` lifted to at least ``m eps max|r_ii|``.

    This is the QR of a sketch perturbed at rounding level, so that ``R`` is invertible when
    ``A`` has rank below ``m``.
    """
    Q, R = torch.linalg.qr(Y)
    return Q, _lift_diagonal(R)


def _lift_diagonal(R: torch.Tensor) -> torch.Tensor:
    """``R`` with diagonal entries below ``m eps max|r_ii|`` lifted to that floor."""
    d = torch.linalg.diagonal(R)
    floor = max(R.shape[1] * torch.finfo(d.abs().dtype).eps * float(d.abs().max()), 1e-300)
    lifted = torch.where(d.abs() < floor, torch.full_like(d, floor), d)
    return R - torch.diag(d) + torch.diag(lifted)


def _prefer_hutchinson(hutch, Q, R, S, Om) -> bool:
    r"""Whether :math:`N` Hutchinson probes beat XTrace with :math:`N/2` probes and :math:`AQ`.

    Hutchinson's per-probe variance is estimated from :math:`\omega_i^H A\omega_i`; XTrace's
    terms behave like Hutchinson on the deflated operator, whose per-probe variance is
    estimated from the leave-one-out samples :math:`\omega_i^H (I - Q_{(i)}Q_{(i)}^H)A\omega_i
    = (\omega_i^H Q s_i)(s_i^H r_i)`, available before any further product.
    """
    deflated = ((Q.mH @ Om).conj() * S).sum(dim=0).conj() * (S.conj() * R).sum(dim=0)
    return float(hutch.var()) <= 2 * float(deflated.real.var())


def _xtrace_terms(Om, Y, Q, R, S, Z) -> torch.Tensor:
    """Return the :math:`m` exchangeable estimates from the probes and products.

    (:func:`_xtrace_terms_small` on their inner products.)
    """
    H, W, T, oy = _xtrace_inner_products(Om, Y, Q, Z)
    return _xtrace_terms_small(H, W, T, oy, R, S)


def _xtrace_terms_small(H, W, T, oy, R, S) -> torch.Tensor:
    r"""Return the :math:`m` exchangeable estimates from :math:`H = Q^H A Q` and small products.

    With :math:`w = Q^H\omega`, :math:`c = s^H w`, :math:`t = Z^H\omega`, :math:`r = Q^H y`:
    :math:`\operatorname{tr}H - s^H H s + \omega^H y - w^H r + c\,r^H s - t^H w + w^H H w
    - 2\operatorname{Re}(\bar c\, s^H H w) + \bar c\, t^H s + |c|^2 s^H H s`.
    """

    def cdot(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:  # columnwise x_i^H y_i
        return (X.conj() * Y).sum(dim=0)

    HS, HW = H @ S, H @ W
    c = cdot(S, W)
    sHs, sHw = cdot(S, HS), cdot(S, HW)
    terms = (
        torch.diagonal(H).sum()
        - sHs
        + oy
        - cdot(W, R)
        + c * cdot(R, S)
        - cdot(T, W)
        + cdot(W, HW)
        - 2 * (c.conj() * sHw).real
        + c.conj() * cdot(T, S)
        + c.abs() ** 2 * sHs
    )
    return terms.real


def diagonal(
    A: OperatorLike,
    num_matvecs: int = 100,
    *,
    method: str = "deflated",
    seed: int | torch.Generator | None = None,
    memory_budget: int | None = None,
) -> DiagonalEstimate:
    r"""Estimate :math:`\operatorname{diag}(A)` from products.

    ``method="hutchinson"``: :math:`\frac1N\sum_j \omega_j \odot A\omega_j` with Rademacher
    probes (Bekas, Kokiopoulou & Saad 2007), exact for diagonal ``A``.

    ``method="deflated"`` (Diag++, Baston & Nakatsukasa 2022): a third of the budget sketches
    :math:`Q = \operatorname{orth}(AS)`, a third gives :math:`\operatorname{diag}(QQ^HA)`
    exactly from :math:`A^HQ`, and the last third is Hutchinson on :math:`(I - QQ^H)A`.

    ``stderr`` is the per-entry sample standard deviation of the Hutchinson part over
    :math:`\sqrt{N_{\mathrm{probes}}}` (for a complex operator, of its real part).

    The Hutchinson probes go in groups within ``memory_budget`` (bytes, default a fraction
    of the device's free memory; four ``n``-vectors per probe), their mean and variance
    updated probe by probe (Welford 1962), so the estimate does not depend on the groups;
    Diag++'s sketch (two vectors per sketch column) must fit whole, or it is refused.

    References
    ----------
    .. [1] C. Bekas, E. Kokiopoulou and Y. Saad, "An estimator for the diagonal of a matrix",
       Appl. Numer. Math. 57, 2007. doi:10.1016/j.apnum.2007.01.003
    .. [2] R. A. Baston and Y. Nakatsukasa, "Stochastic diagonal estimation: probabilistic
       bounds and an improved algorithm", 2022. arXiv:2201.10684
    """
    op, N, (gen, kind) = _setup(A, num_matvecs, 1, seed, real=False)
    kr.check_which(method, ("hutchinson", "deflated"), "method")
    if method == "deflated" and N < 3:
        raise ValueError(f"num_matvecs: expected >= 3 for method='deflated', got {N}")
    base = torch.zeros(op.shape[0], dtype=op.torch_dtype, device=op.device)
    Q, used = None, 0
    if method == "deflated":
        m = N // 3
        check_sketch(op, 2 * m + 4, memory_budget, "diagonal", "use method='hutchinson'")
        Q = torch.linalg.qr(_apply(op, rademacher_probes(op, op.shape[0], m, gen), m))[0]
        base = (Q * op._apply(Q, adjoint=True).conj()).sum(dim=1)
        used = 2 * m
    k = N - used
    count, mean, m2 = 0, torch.zeros_like(base), torch.zeros_like(base.real)
    while count < k:  # per-entry mean and variance, combined group by group
        Z = grouped_probes(op, op.shape[0], probe_group(op, k - count, memory_budget, 4), gen)
        AZ = _apply(op, Z, used + count + Z.shape[1])
        if Q is not None:
            AZ = AZ - Q @ (Q.mH @ AZ)
        samples = Z.conj() * AZ
        del Z, AZ
        for j in range(samples.shape[1]):  # Welford, probe by probe: whatever the groups
            s = samples[:, j]
            count += 1
            delta = s.real - mean.real
            mean += (s - mean) / count
            m2 += delta * (s.real - mean.real)
    est = base + mean
    sem = (m2 / (k - 1)).sqrt() / math.sqrt(k) if k > 1 else torch.full_like(est.real, math.nan)
    return DiagonalEstimate(kr.to_output(est, kind), kr.to_output(sem, kind), N)
