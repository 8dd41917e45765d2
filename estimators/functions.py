r"""Matrix functions by Lanczos quadrature: :math:`\operatorname{tr} f(A)`, log-determinants, bounds.

For symmetric :math:`A` and a vector :math:`v`, :math:`m` steps of Lanczos from :math:`v/\|v\|`
give a tridiagonal :math:`T_m = S\Theta S^\top`, and :math:`v^\top f(A) v \approx \|v\|^2
\sum_j S_{1j}^2 f(\theta_j)` is the :math:`m`-point Gauss quadrature of the spectral measure
of :math:`v` (Golub & Meurant 2010).

* **Stochastic Lanczos quadrature** (Ubaru, Chen & Saad 2017): with :math:`N` Rademacher probes
  :math:`z_l`, :math:`\operatorname{tr} f(A) \approx \frac1N\sum_l z_l^\top f(A) z_l`, each
  quadratic form by Gauss quadrature; ``stderr`` is the probes' sample standard deviation
  over :math:`\sqrt N` (the quadrature error, :math:`O(\kappa^{-m})`-small for analytic
  :math:`f`, is bracketed by the bounds below).
* **Bounds** (Golub & Meurant 1994, 2010, Thm. 6.3-6.4): if the derivatives of :math:`f` have
  constant sign on the spectrum, the Gauss rule and the Gauss-Radau rule with a node fixed at
  :math:`a \le \lambda_{\min}` bracket :math:`v^\top f(A) v`. For :math:`f(x) = 1/x`
  (:math:`f^{(2k)} > 0`, :math:`f^{(2k+1)} < 0`): Gauss :math:`\le v^\top A^{-1}v \le`
  Radau(:math:`a`); for :math:`f = \log` (signs reversed): Radau(:math:`a`) :math:`\le
  v^\top \log(A) v \le` Gauss. A node :math:`b \ge \lambda_{\max}` gives the other side
  again (optional). With the damping :math:`\lambda > 0` of a PSD :math:`A`,
  :math:`a = \lambda` is a certified lower end of the spectrum of :math:`A + \lambda I`.

References
----------
.. [1] S. Ubaru, J. Chen and Y. Saad, "Fast estimation of tr(f(A)) via stochastic Lanczos
   quadrature", SIAM J. Matrix Anal. Appl. 38(4), 2017. doi:10.1137/16M1104974
.. [2] G. H. Golub and G. Meurant, "Matrices, moments and quadrature", 1994; and *Matrices,
   Moments and Quadrature with Applications*, Princeton University Press, 2010.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from estimators._budget import count_within, rademacher_probes
from estimators.density import COMPLEX_REFUSAL, _lanczos_batch
from linops import ArrayLike, IdentityOperator, OperatorLike, aslinearoperator
from linops import blocks as kr
from linops._checks import check_damping

__all__ = [
    "QuadratureBounds",
    "SLQEstimate",
    "logdet",
    "logdet_bounds",
    "quadratic_form_bounds",
    "trace_function",
]

_FUNCTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "log": torch.log,
    "inverse": torch.reciprocal,
}


class SLQEstimate(NamedTuple):
    r"""Result of :func:`trace_function` / :func:`logdet`.

    Attributes
    ----------
    estimate, stderr
        :math:`\frac nN\sum_l\sum_j\tau_{lj}f(\theta_{lj})` and its standard error over probes
        (``nan`` with one probe: nothing to estimate it from).
    num_matvecs
        Products used (``num_probes * num_steps``, plus the 3 of the symmetry probe for an
        operator that does not declare ``is_symmetric``).
    nodes, weights
        ``(num_probes, num_steps)`` Gauss nodes :math:`\theta_{lj}` and weights
        :math:`\tau_{lj}` (rows sum to 1): ``n * (weights * g(nodes)).sum(1).mean()``
        estimates :math:`\operatorname{tr} g(A)` for any other ``g`` without new products.
    lower, upper
        Bounds on the same probes' quadrature-free estimate :math:`\frac nN\sum_l
        \hat z_l^\top f(A)\hat z_l` (Gauss / Gauss-Radau, for ``"log"`` and ``"inverse"`` with
        a lower spectrum bound; ``nan`` otherwise): they certify the quadrature error, not
        the probe noise that ``stderr`` measures.
    """

    estimate: float
    stderr: float
    num_matvecs: int
    nodes: torch.Tensor
    weights: torch.Tensor
    lower: float
    upper: float


class QuadratureBounds(NamedTuple):
    r"""Certified bounds ``lower <= value <= upper`` and the rules behind them.

    Attributes
    ----------
    lower, upper
        The bounds.
    gauss, radau
        The Gauss rule and the Gauss-Radau rule with the node at the lower spectrum bound.
    num_matvecs
        Products used.
    """

    lower: Any  # array kind follows the input
    upper: Any  # array kind follows the input
    gauss: Any  # array kind follows the input
    radau: Any  # array kind follows the input
    num_matvecs: int


def _shifted(A: Any, damping: float) -> Any:
    op = aslinearoperator(A)
    if op.shape[0] != op.shape[1]:
        raise ValueError(f"A: expected a square (symmetric) operator, got shape {op.shape}")
    if op.torch_dtype.is_complex:
        raise ValueError(COMPLEX_REFUSAL)
    damping = check_damping(damping)
    if damping:
        op = op + damping * IdentityOperator(op.shape[0], dtype=op.torch_dtype, device=op.device)
    return op


def _lanczos(op: Any, V0: torch.Tensor, m: int) -> tuple[torch.Tensor, ...]:
    r"""``m`` fully reorthogonalised Lanczos steps from each unit column of ``V0``.

    Returns ``(alpha, beta, steps, V)``: ``(N, m)`` diagonals and ``(N, m)`` off-diagonals with
    :math:`\beta_m` (the norm of the last residual, which the Radau rule needs), both float64
    on the host, the steps before an invariant subspace was found (``beta = 0``: the
    quadrature is then exact) and the ``(m + 1, n, N)`` basis
    (:func:`estimators.density._lanczos_batch`).
    """
    runs = _lanczos_batch(op, V0, m, keep_basis=True, last_beta=True)
    alpha, beta = runs.alpha.detach().double().cpu(), runs.beta.detach().double().cpu()
    assert runs.basis is not None  # keep_basis=True
    return alpha, beta, runs.steps, runs.basis


def _tridiag(alpha: torch.Tensor, beta: torch.Tensor, k: int) -> torch.Tensor:
    return torch.diag(alpha[:k]) + torch.diag(beta[: k - 1], 1) + torch.diag(beta[: k - 1], -1)


def _stderr(v: torch.Tensor, Z: torch.Tensor, BZ: torch.Tensor) -> float:
    r"""Return the standard error of the mean of the :math:`N` forms :math:`v_l = z_l^\top B z_l`.

    With :math:`B = f(A)`: the larger of the sample one and the moment estimate of the Rademacher
    variance :math:`2(\|B\|_F^2 - \sum_i b_{ii}^2)` from the same probes, with
    :math:`\|B\|_F^2 \approx \frac1N\sum_l\|Bz_l\|^2` and :math:`\sum_i b_{ii}^2` by the
    U-statistic :math:`\frac{1}{N(N-1)}\sum_{l \ne l'}\langle z_l \odot Bz_l, z_{l'} \odot
    Bz_{l'}\rangle` (the rule of :func:`estimators.hutchinson_trace`; the sample variance of a
    few skewed forms is usually too small).
    """
    N = v.numel()
    if N < 2:
        return math.nan
    sem = float(v.std()) / math.sqrt(N)
    D = Z * BZ
    total = D.sum(dim=1)
    diag2 = (float(total @ total) - float((D * D).sum())) / (N * (N - 1))
    model = max(2 * (float((BZ**2).sum()) / N - diag2), 0.0)
    return max(sem, math.sqrt(model / N))


def _rules(
    alpha: torch.Tensor, beta: torch.Tensor, k: int, f: Callable, a: float | None
) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """One probe's rules on ``T_k``: Gauss nodes, eigenvectors, Gauss and Radau values.

    The Gauss weights are ``S[0] ** 2``; the Radau rule has a node at ``a``.
    """
    T = _tridiag(alpha, beta, k)
    theta, S = torch.linalg.eigh(T)
    gauss = float((S[0] ** 2 * f(theta)).sum())
    if a is None:
        return theta, S, gauss, math.nan
    bk = float(beta[k - 1])
    if bk == 0.0:  # an invariant subspace: every rule is exact
        return theta, S, gauss, gauss
    e = torch.zeros(k, dtype=T.dtype)
    e[-1] = bk**2
    delta = torch.linalg.solve(T - a * torch.eye(k, dtype=T.dtype), e)
    Tr = torch.zeros(k + 1, k + 1, dtype=T.dtype)
    Tr[:k, :k], Tr[k - 1, k], Tr[k, k - 1], Tr[k, k] = T, bk, bk, a + delta[-1]
    th, Sr = torch.linalg.eigh(Tr)
    return theta, S, gauss, float((Sr[0] ** 2 * f(th.clamp(min=a))).sum())


def _below_lower(theta: torch.Tensor, a: float, m: int, eps: float) -> bool:
    r"""Whether a Gauss node lies below ``a`` beyond rounding: ``a`` is then no lower bound.

    The nodes lie in the spectrum of :math:`A + \lambda I` (to ``m eps ||A||``); one below
    ``a`` proves that the spectrum reaches below it (an indefinite ``A`` made positive
    definite by the damping, whose default ``a`` is the damping). The converse does not
    hold: a few steps may not reach the low end.
    """
    return float(theta.min()) < a - 16 * m * eps * float(theta.abs().max())


def _lower_message(theta_min: float, a: float, explicit: bool) -> str:
    where = "spectrum_lower" if explicit else "spectrum_lower (default: damping, i.e. A PSD)"
    return (
        f"{where}: expected a lower bound on the spectrum of A + damping I, got {a:g}, but "
        f"a Gauss node lies at {theta_min:.6g}, below it (A is indefinite or the bound is "
        "wrong), so the Gauss-Radau bounds would not hold; pass spectrum_lower=a true lower "
        "bound (damping + the smallest eigenvalue of A, e.g. from linops.lanczos(A, 1, 'SA'))"
    )


def _function(f: Any) -> tuple[Callable, str | None]:
    if isinstance(f, str):
        kr.check_which(f, tuple(_FUNCTIONS), "f")
        return _FUNCTIONS[f], f
    if not callable(f):
        raise TypeError(f"f: expected 'log', 'inverse' or a callable on tensors, got {f!r}")
    return f, None


def _eps(op: Any) -> float:
    return float(torch.finfo(op.torch_dtype).eps)


def _slack(name: str, theta: torch.Tensor, m: int, eps: float) -> float:
    """Return the rounding allowance of a Gauss or Radau bound of ``f = name`` at nodes ``theta``.

    The nodes carry errors of about ``m eps ||A||`` (the Lanczos coefficients in the
    operator's dtype), ``f``'s values ``m eps`` of their size; a bracket without it missed
    the exact value by 1.3e-14 relative once Gauss and Radau coincided (by 2.4e-7 in float32).
    """
    f, fprime = _FUNCTIONS[name], (torch.reciprocal if name == "log" else lambda x: -1 / x**2)
    return (
        16 * m * eps * float(f(theta).abs().max() + theta.abs().max() * fprime(theta).abs().max())
    )


def _warn_unconverged(
    means: tuple[float, float, float], cuts: tuple[int, int], m: int, stderr: float,
    rounding: float, name: str | None,
) -> None:  # fmt: skip
    r"""Warn when the quadrature error of the mean estimate may exceed 3 standard errors.

    From the mean Gauss values :math:`g_a, g_b, g_m` of :math:`a = m/2`, :math:`b = 3m/4`
    and :math:`m` steps (the same probes, no products): with :math:`d_1 = g_b - g_a` and
    :math:`d_2 = g_m - g_b`, a geometric convergence leaves about :math:`d_2^2 / |d_1 - d_2|`
    after :math:`m` steps (Aitken's extrapolation); where the steps do not contract
    (:math:`|d_2| \ge |d_1|`), :math:`|d_2|`. ``rounding`` (``16 m eps n max|f|``) is
    allowed for: a diagonal operator's probes all give one value, its standard error 0.
    """
    ga, gb, gm = means
    d1, d2 = gb - ga, gm - gb
    error = abs(d2) if abs(d2) >= abs(d1) else d2 * d2 / abs(d1 - d2)
    if not (math.isfinite(stderr) and error > 3 * stderr + rounding):
        return
    sigmas = f" ({error / stderr:.0f} standard errors)" if stderr > 0 else ""
    warnings.warn(
        f"trace_function: the quadrature has not converged in {m} steps: extrapolated from "
        f"{cuts[0]}, {cuts[1]} and {m} steps ({ga:.6g}, {gb:.6g}, {gm:.6g}) its error is about "
        f"{error:.3g}{sigmas}, beyond the standard error"
        + (
            ": A + damping I may be singular (the exact value infinite) or ill-conditioned; "
            "pass a damping > 0 or more num_steps"
            if name in ("log", "inverse")
            else "; pass more num_steps"
        ),
        RuntimeWarning,
        stacklevel=3,
    )


def _bounds(name: str | None, gauss: float, radau: float) -> tuple[float, float]:
    if name == "log":
        return radau, gauss
    if name == "inverse":
        return gauss, radau
    return math.nan, math.nan


def _slq_group(op: Any, N: int, m: int, memory_budget: int | None) -> int:
    """Probes whose ``m + 1``-vector bases fit the budget beside the probes and ``f(A) z``."""
    n, size = op.shape[0], op.torch_dtype.itemsize
    basis = (m + 1) * n * size
    group, budget = count_within(op, basis, memory_budget, reserved=N * n * (8 + size))
    if group < 1:
        raise ValueError(
            f"memory_budget: one probe's Lanczos basis ({m + 1} vectors of n={n}) beside the "
            f"{N} probes and their images ({(basis + N * n * (8 + size)) / 2**30:.3g} GiB) "
            f"exceeds the budget ({budget / 2**30:.3g} GiB); lower num_steps or num_probes"
        )
    return min(N, group)


def trace_function(
    A: OperatorLike,
    f: str | Callable[[torch.Tensor], torch.Tensor],
    *,
    damping: float = 0.0,
    num_probes: int = 30,
    num_steps: int | None = None,
    spectrum_lower: float | None = None,
    seed: int | torch.Generator | None = None,
    memory_budget: int | None = None,
) -> SLQEstimate:
    r""":math:`\operatorname{tr} f(A + \lambda I)` by stochastic Lanczos quadrature.

    Parameters
    ----------
    A
        Symmetric ``n x n`` operator (checked with 3 products).
    f
        ``"log"``, ``"inverse"`` or a callable applied elementwise to a float64 tensor of
        nodes (``torch.exp``, ``lambda x: x**2``, ...).
    damping
        :math:`\lambda \ge 0`.
    num_probes, num_steps
        Rademacher probes :math:`N` and Lanczos steps :math:`m` per probe (default
        ``min(30, n)``); :math:`Nm` products.
    spectrum_lower
        A lower bound :math:`a` on the spectrum of :math:`A + \lambda I` for the
        Gauss-Radau bounds (default: ``damping`` when positive, i.e. ``A`` assumed PSD). A
        Gauss node below it proves it wrong: ``ValueError`` for a given ``spectrum_lower``;
        for the default, ``lower`` and ``upper`` are ``nan``, with a ``RuntimeWarning``.
    seed
        Seed of the probes.
    memory_budget
        Bytes for the Lanczos bases (``m + 1`` vectors per probe) and the probes with their
        quadrature images (``f(A) z``, in float64); default a fraction of the device's free
        memory. The probes run in as many groups as the budget needs (the same probes and
        result); if not even one basis fits, ``ValueError``.

    Returns
    -------
    SLQEstimate

    Raises
    ------
    ValueError
        For a non-square or non-symmetric operator, bad counts, or ``f`` undefined at a node
        (``log`` of a non-positive node: ``A + damping I`` is not positive definite).

    Warns
    -----
    RuntimeWarning
        When the quadrature has not converged: its error after ``m`` steps, extrapolated
        from the Gauss rules of ``m/2``, ``3m/4`` and ``m`` steps of the same probes (no
        products), exceeds 3 standard errors plus rounding, so the estimate's error is not
        within its standard error. A singular PSD operator without damping (a model's
        GGN, whose log-determinant is :math:`-\infty`) ends here: Lanczos does not isolate
        its null space in ``m`` steps, and its smallest node stays positive.

    Examples
    --------
    >>> import torch
    >>> A = torch.diag(torch.linspace(1, 2, 40, dtype=torch.float64))
    >>> est = trace_function(A, torch.exp, num_probes=4, num_steps=10, seed=0)
    >>> abs(est.estimate - float(torch.exp(torch.diagonal(A)).sum())) < 1e-10  # diagonal A
    True
    """
    op = _shifted(A, damping)
    fn, name = _function(f)
    n = op.shape[0]
    probes = kr.check_symmetric(op)  # none for an operator that declares is_symmetric
    N = kr.check_int(num_probes, "num_probes", 1)
    m = min(30, n) if num_steps is None else kr.check_int(num_steps, "num_steps", 1, n)
    a = spectrum_lower if spectrum_lower is not None else (damping or None)
    gen = kr.make_generator(seed, op.device)
    V0 = rademacher_probes(op, n, N, gen) / math.sqrt(n)
    group = _slq_group(op, N, m, memory_budget)
    nodes = torch.zeros(N, m, dtype=torch.float64)
    weights = torch.zeros(N, m, dtype=torch.float64)
    BZ = torch.zeros(n, N, dtype=torch.float64)  # f(A) z_l from the same quadrature
    vals, earlier, lows, ups = [], [], [], []
    below = math.inf  # the smallest Gauss node below the default lower end (the damping)
    cuts = (max(1, m // 2), max(1, (3 * m) // 4))
    for first in range(0, N, group):
        alpha, beta, steps, V = _lanczos(op, V0[:, first : first + group], m)
        for j in range(alpha.shape[0]):
            i, k = first + j, int(steps[j])
            th, S, g, r = _rules(alpha[j], beta[j], k, fn, a if name else None)
            nodes[i, :k], weights[i, :k] = th, S[0] ** 2
            nodes[i, k:] = th[-1]  # padding with zero weight
            BZ[:, i] = math.sqrt(n) * (V[:k, :, j].T.cpu().double() @ (S @ (fn(th) * S[0])))
            lo, up = _bounds(name, g, r)
            if name is not None and a is not None and _below_lower(th, a, m, _eps(op)):
                if spectrum_lower is not None:
                    raise ValueError(_lower_message(float(th.min()), a, True))
                below = min(below, float(th.min()))
                lo = up = math.nan
            if name is not None and math.isfinite(r) and math.isfinite(lo):
                slack = _slack(name, th, m, _eps(op))
                lo, up = lo - slack, up + slack
            vals.append(n * g)
            # the Gauss rules of m/2 and 3m/4 steps (exact after an invariant subspace, k < m,
            # or once the steps span the whole space, k = n)
            exact = k < m or k >= n
            earlier.append(
                [n * (g if exact else _rules(alpha[j], beta[j], s, fn, None)[2]) for s in cuts]
            )
            lows.append(n * lo)
            ups.append(n * up)
        del V
    v = torch.tensor(vals, dtype=torch.float64)
    scale = float(nodes.abs().max())
    if name in ("log", "inverse") and float(nodes.min()) <= 64 * m * _eps(op) * scale:
        raise ValueError(
            f"f: expected a function defined on the spectrum of A + damping I; {name!r} needs "
            f"it positive definite, got a node of {float(nodes.min()):.3g} against a largest "
            f"of {scale:.3g} (indefinite or numerically singular: pass a damping > 0)"
        )
    if not bool(torch.isfinite(v).all()):
        raise ValueError(
            f"f: expected a function defined on the spectrum of A + damping I, got non-finite "
            f"values at the nodes (smallest node {float(nodes.min()):.3g})"
        )
    stderr = _stderr(v, math.sqrt(n) * V0.cpu().double(), BZ)
    mean = lambda x: float(torch.tensor(x, dtype=torch.float64).mean())  # noqa: E731
    ga, gb = (float(g) for g in torch.tensor(earlier, dtype=torch.float64).mean(dim=0))
    values = fn(nodes)
    values = values[torch.isfinite(values)].abs()
    rounding = 16 * m * _eps(op) * n * (float(values.max()) if values.numel() else 0.0)
    _warn_unconverged((ga, gb, float(v.mean())), cuts, m, stderr, rounding, name)
    if math.isfinite(below) and a is not None:
        warnings.warn(
            _lower_message(below, a, False) + "; lower and upper are nan (the "
            "estimate itself stands)",
            RuntimeWarning,
            stacklevel=2,
        )
    return SLQEstimate(
        float(v.mean()), stderr, N * m + probes, nodes, weights, mean(lows), mean(ups)
    )


def logdet(
    A: OperatorLike,
    *,
    damping: float = 0.0,
    num_probes: int = 30,
    num_steps: int | None = None,
    spectrum_lower: float | None = None,
    seed: int | torch.Generator | None = None,
    memory_budget: int | None = None,
) -> SLQEstimate:
    r""":math:`\log\det(A + \lambda I) = \operatorname{tr}\log(A + \lambda I)` by SLQ.

    ``A + damping I`` must be positive definite. Parameters and result as in
    :func:`trace_function` with ``f = "log"``; for the certified interval of the
    log-determinant itself see :func:`logdet_bounds`.

    Examples
    --------
    >>> import torch
    >>> A = torch.diag(torch.linspace(1, 3, 50, dtype=torch.float64))
    >>> est = logdet(A, num_probes=10, num_steps=20, seed=0)
    >>> abs(est.estimate - float(torch.log(torch.diagonal(A)).sum())) < 1e-8
    True
    """
    return trace_function(
        A, "log", damping=damping, num_probes=num_probes, num_steps=num_steps,
        spectrum_lower=spectrum_lower, seed=seed, memory_budget=memory_budget,
    )  # fmt: skip


def quadratic_form_bounds(
    A: OperatorLike,
    b: ArrayLike,
    f: str = "inverse",
    *,
    damping: float = 0.0,
    num_steps: int | None = None,
    spectrum_lower: float | None = None,
) -> QuadratureBounds:
    r"""Certified bounds on :math:`b^\top f(A + \lambda I)\, b` for each column of ``b``.

    ``f = "inverse"``: Gauss :math:`\le b^\top(A + \lambda I)^{-1}b \le` Radau(:math:`a`)
    (an influence score, a Laplace predictive variance); ``f = "log"``: Radau(:math:`a`)
    :math:`\le b^\top \log(A + \lambda I) b \le` Gauss (module docstring). :math:`a`
    (``spectrum_lower``, default ``damping``) must be a positive lower bound on the spectrum
    of :math:`A + \lambda I` (with the default, ``A`` must be PSD; a Gauss node below
    :math:`a` proves it is not, and is refused, but a node above it proves nothing); the
    bounds hold for any ``num_steps`` (default ``min(20, n)``) and tighten with it until
    their rounding allowance dominates (spectra over many decades, many steps).
    Each is widened by its rounding, :math:`16 m \epsilon \|b\|^2 (\max|f(\theta)| +
    \max|\theta| \max|f'(\theta)|)` over the Gauss nodes :math:`\theta`.

    Returns
    -------
    QuadratureBounds
        ``(k,)`` tensors (float64) for ``b`` of shape ``(n,)`` or ``(n, k)``.

    Raises
    ------
    ValueError
        For a missing or non-positive lower spectrum bound or one above a Gauss node, a
        non-square or non-symmetric operator, or a zero column of ``b``.

    Examples
    --------
    >>> import torch
    >>> A = torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64))
    >>> bd = quadratic_form_bounds(A, torch.ones(4, dtype=torch.float64), num_steps=2,
    ...                            spectrum_lower=1.0)
    >>> exact = 1 + 1 / 2 + 1 / 3 + 1 / 4
    >>> bool(bd.lower[0] <= exact <= bd.upper[0])
    True
    """
    op = _shifted(A, damping)
    fn, name = _function(f)
    if name is None:
        raise ValueError(f"f: expected 'inverse' or 'log', got {f!r}")
    a = spectrum_lower if spectrum_lower is not None else damping
    if not (isinstance(a, numbers.Real) and not isinstance(a, bool) and a > 0):
        raise ValueError(
            "spectrum_lower: expected a positive lower bound on the spectrum of A + damping I "
            f"(default: damping), got {a!r}"
        )
    a = float(a)
    n = op.shape[0]
    m = min(20, n) if num_steps is None else kr.check_int(num_steps, "num_steps", 1, n)
    B = torch.as_tensor(b, dtype=op.torch_dtype, device=op.device)
    if B.ndim not in (1, 2) or B.shape[0] != n:
        raise ValueError(f"b: expected shape ({n},) or ({n}, k), got {tuple(B.shape)}")
    B = B.reshape(n, -1)
    norms = kr.column_norms(B)
    if bool((norms == 0).any()):
        raise ValueError("b: expected nonzero columns, got a zero column")
    used = kr.check_symmetric(op)
    alpha, beta, steps, _ = _lanczos(op, B / norms, m)
    rows = [_rules(alpha[i], beta[i], int(steps[i]), fn, a) for i in range(B.shape[1])]
    for th, *_ in rows:
        if _below_lower(th, a, m, _eps(op)):
            raise ValueError(_lower_message(float(th.min()), a, spectrum_lower is not None))
    scale = norms.double().cpu() ** 2
    gauss = torch.tensor([r[2] for r in rows], dtype=torch.float64) * scale
    radau = torch.tensor([r[3] for r in rows], dtype=torch.float64) * scale
    lo, up = (radau, gauss) if name == "log" else (gauss, radau)
    slack = torch.tensor([_slack(name, th, m, _eps(op)) for th, *_ in rows]) * scale
    return QuadratureBounds(lo - slack, up + slack, gauss, radau, used + m * B.shape[1])


def logdet_bounds(
    A: OperatorLike,
    *,
    damping: float = 0.0,
    num_steps: int | None = None,
    spectrum_lower: float | None = None,
    block: int = 64,
) -> QuadratureBounds:
    r"""Certified bounds on :math:`\log\det(A + \lambda I)`.

    :math:`\log\det(A + \lambda I) = \sum_i e_i^\top \log(A + \lambda I) e_i`, each term
    bracketed by Gauss-Radau / Gauss (:func:`quadratic_form_bounds`).

    Costs ``n * num_steps`` products (``num_steps`` default ``min(10, n)``; in blocks of
    ``block`` basis vectors): a certificate for moderate ``n``, next to the cheap
    :func:`logdet` estimate.

    Examples
    --------
    >>> import torch
    >>> A = torch.diag(torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64))
    >>> bd = logdet_bounds(A, num_steps=1, spectrum_lower=0.5)
    >>> bool(bd.lower <= float(torch.logdet(A)) <= bd.upper)
    True
    """
    op = aslinearoperator(A)
    n = op.shape[0]
    kr.check_int(block, "block", 1)
    num_steps = min(10, n) if num_steps is None else num_steps
    lo = up = ga = ra = 0.0
    used = 0
    for start in range(0, n, block):
        E = torch.zeros(n, min(block, n - start), dtype=op.torch_dtype, device=op.device)
        E[torch.arange(start, start + E.shape[1]), torch.arange(E.shape[1])] = 1
        bd = quadratic_form_bounds(
            op, E, "log", damping=damping, num_steps=num_steps, spectrum_lower=spectrum_lower
        )
        lo, up = lo + float(bd.lower.sum()), up + float(bd.upper.sum())
        ga, ra = ga + float(bd.gauss.sum()), ra + float(bd.radau.sum())
        used += bd.num_matvecs
    return QuadratureBounds(lo, up, ga, ra, used)
