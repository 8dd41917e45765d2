r"""Spectral density by stochastic Lanczos quadrature (SLQ).

The report of ``linops report`` built on it is :func:`reports.density_report`.

For symmetric :math:`A = \sum_i \lambda_i u_i u_i^H` the spectral density
:math:`\phi(x) = \frac1n\sum_i \delta(x - \lambda_i)` is smoothed by a Gaussian
:math:`g_\sigma` and estimated with :math:`N` normalised Rademacher probes :math:`v_l`:
:math:`m` steps of Lanczos from :math:`v_l` give :math:`T_l = S_l \Theta_l S_l^H`, the
Gauss quadrature nodes :math:`\theta_{lj}` and weights :math:`\tau_{lj} = (S_l)_{1j}^2`, and

.. math:: \hat\phi_\sigma(x) = \frac1N \sum_{l=1}^N \sum_{j=1}^m \tau_{lj}\,
   g_\sigma(x - \theta_{lj}),

(Lin, Saad & Yang 2016; Ghorbani, Krishnan & Xiao 2019 for Hessians). The :math:`N` Lanczos
processes run side by side, so each step is one block product with :math:`N` columns, and
each is fully reorthogonalised.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, NamedTuple

import torch

from estimators._budget import count_within, rademacher_probes
from estimators.trace import TraceEstimate, _Forms
from linops import ArrayLike, OperatorLike
from linops import blocks as kr

__all__ = ["SpectralDensity", "spectral_density"]


COMPLEX_REFUSAL = (
    "A: expected a real symmetric operator, got a complex one: stochastic Lanczos quadrature "
    "here draws real Rademacher probes; for a complex Hermitian H pass its real form "
    "[[Re H, -Im H], [Im H, Re H]], whose spectrum is H's with every eigenvalue twice"
)


class SpectralDensity(NamedTuple):
    r"""Result of :func:`spectral_density`.

    Attributes
    ----------
    grid, density
        ``(num_points,)`` abscissae and smoothed density (integrates to about 1).
    nodes, weights
        ``(num_probes, num_steps)`` quadrature nodes and weights (each row sums to 1). A
        probe whose Lanczos run found an invariant subspace after :math:`s <` ``num_steps``
        steps (an operator with few distinct eigenvalues) has :math:`s` nodes; its other
        nodes repeat its largest, with weight 0.
    trace
        :math:`n \cdot \frac1N\sum_l\sum_j \tau_{lj}\theta_{lj}` (Hutchinson's estimate of
        :math:`\operatorname{tr}A` from the same probes), a
        :class:`estimators.TraceEstimate` with ``method="slq"`` and its standard error: as
        :func:`estimators.hutchinson_trace`'s, the larger of the probes' sample standard
        error and the moment estimate from the same products (the sample alone was 7x too
        small on a 5-parameter block with 6 probes).
    sigma
        Gaussian broadening used.
    num_matvecs
        Products used (``num_probes * num_steps``).
    reorthogonalized
        Whether every Lanczos run was fully reorthogonalised (False when the bases did not fit
        the memory budget: :func:`spectral_density`).
    log10
        Whether ``grid``, ``nodes`` and ``sigma`` are in :math:`\log_{10}` units (a result of
        :meth:`log_density`).
    """

    grid: Any  # array kind follows the input
    density: Any  # array kind follows the input
    nodes: Any  # array kind follows the input
    weights: Any  # array kind follows the input
    trace: TraceEstimate
    sigma: float
    num_matvecs: int
    reorthogonalized: bool = True
    log10: bool = False

    def resmooth(
        self, *, sigma: float | None = None, grid: ArrayLike | None = None, num_points: int = 512
    ) -> SpectralDensity:
        r"""Return the density of the same nodes and weights with another broadening or grid.

        No products: :math:`\hat\phi_\sigma(x)` (module docstring) is recomputed from the
        stored :math:`\theta_{lj}, \tau_{lj}`, exactly as :func:`spectral_density` with the
        same seed and this ``sigma`` / ``grid`` would compute it. ``num_matvecs`` and
        ``trace`` stay those of the products that produced the nodes.

        Parameters
        ----------
        sigma
            Gaussian broadening; default: the one stored.
        grid, num_points
            Abscissae, or the size of the default grid (the nodes' span plus ``5 sigma``; at
            least 4 points per ``sigma``, at most 20,000).

        Raises
        ------
        ValueError
            For a broadening that is not positive.

        Examples
        --------
        >>> A = torch.diag(torch.linspace(0, 1, 40, dtype=torch.float64))
        >>> sd = spectral_density(A, num_probes=4, num_steps=10, seed=0)
        >>> wide = sd.resmooth(sigma=0.2)
        >>> wide.sigma, wide.num_matvecs == sd.num_matvecs
        (0.2, True)
        """
        theta, tau, back = _stored(self)
        sig = self.sigma if sigma is None else sigma
        x, dens, sig = _smooth(theta, tau, sig, grid, num_points)
        return self._replace(grid=back(x), density=back(dens), sigma=sig)

    def log_density(
        self,
        *,
        sigma: float | None = None,
        grid: ArrayLike | None = None,
        num_points: int = 512,
        floor: float | None = None,
    ) -> SpectralDensity:
        r"""Return the density of :math:`\log_{10}\lambda` from the stored nodes (no products).

        For a positive semi-definite :math:`A` (a GGN, a Fisher) whose spectrum spans decades:
        the nodes become :math:`t_{lj} = \log_{10}\max(\theta_{lj}, \mathrm{floor})` with the
        same weights, and

        .. math:: \hat\psi_\sigma(t) = \frac1N \sum_{l,j} \tau_{lj}\, g_\sigma(t - t_{lj}),

        a density in :math:`t` (it integrates to about 1 over ``grid``, in decades). Nodes at
        or below ``floor`` (the near-null space, and negative rounding) are put at
        :math:`\log_{10}\mathrm{floor}`: their weight is the mass of that spike.

        Parameters
        ----------
        sigma
            Broadening in decades; default: the span of the log-nodes over the steps per probe.
        grid, num_points
            Abscissae in :math:`\log_{10}` units, or the size of the default grid.
        floor
            Smallest eigenvalue resolved; default :math:`10^{-12}\max_{lj}|\theta_{lj}|`.

        Returns
        -------
        SpectralDensity
            ``grid``, ``density``, ``nodes`` and ``sigma`` in :math:`\log_{10}` units; the same
            ``weights``, ``trace`` and ``num_matvecs``. Its :meth:`resmooth` works in them.

        Raises
        ------
        ValueError
            For a ``floor`` or broadening that is not positive, or a result that is already a
            log density (its nodes are logarithms: use :meth:`resmooth`).
        """
        if self.log10:
            raise ValueError(
                "log_density: this is already a density of log10 eigenvalues (its nodes are "
                "logarithms); call log_density on the spectral_density result, or resmooth "
                "this one"
            )
        theta, tau, back = _stored(self)
        top = float(theta.abs().max()) or 1.0
        floor = 1e-12 * top if floor is None else float(floor)
        if not floor > 0:
            raise ValueError(f"floor: expected a positive number, got {floor!r}")
        t = torch.log10(theta.clamp(min=floor))
        if sigma is None:
            sigma = (float(t.max() - t.min()) or 1.0) / t.shape[1]
        x, dens, sig = _smooth(t, tau, sigma, grid, num_points)
        return self._replace(grid=back(x), density=back(dens), nodes=back(t), sigma=sig, log10=True)


def spectral_density(
    A: OperatorLike,
    *,
    num_probes: int = 10,
    num_steps: int | None = None,
    num_points: int = 512,
    sigma: float | None = None,
    grid: ArrayLike | None = None,
    seed: int | torch.Generator | None = None,
    memory_budget: int | None = None,
) -> SpectralDensity:
    r"""Smoothed spectral density of a symmetric operator by stochastic Lanczos quadrature.

    Parameters
    ----------
    A
        Symmetric ``n x n`` operator (a Hessian, a GGN, a dense array, ...).
    num_probes, num_steps
        Probes :math:`N` (default 10) and Lanczos steps :math:`m` per probe (default
        ``min(32, n)``); ``N * m`` products in all (320 by default).
    num_points
        Grid size when ``grid`` is not given (raised so that the grid has at least 4 points per
        ``sigma``, at most 20,000).
    sigma
        Gaussian broadening; default :math:`(\theta_{\max} - \theta_{\min}) / m`, the span of
        the nodes over the number of steps (Notes).
    grid
        Abscissae (1-d); default ``num_points`` points spanning the nodes plus ``5 sigma``.
    seed
        Seed (or ``torch.Generator``) of the Rademacher probes.
    memory_budget
        Bytes the Lanczos bases may take (default: :func:`linops.memory.default_memory_budget`
        of the operator's device, a fraction of its free memory). Each probe's run keeps its
        ``m`` basis vectors for full reorthogonalisation (``m n`` numbers); the probes run
        in as many groups as the budget needs, the same probes and nodes either way. If not
        even one basis fits (``m n`` numbers of a 124M-parameter model are 16 GB in float32
        at 32 steps), the runs keep three vectors each and are not reorthogonalised, with a
        ``RuntimeWarning`` and ``reorthogonalized=False`` in the result: the quadrature
        stays valid (Lanczos in floating point without reorthogonalisation still gives Gauss
        quadrature to rounding for smooth functions, Knizhnerman 1996; lost orthogonality
        shows as ghost copies of outlying nodes that share their weight), but the nodes are
        no longer distinct eigenvalue estimates.

    Raises
    ------
    ValueError
        For a non-square operator or out-of-range counts.
    FloatingPointError
        If the operator returns NaN or inf.

    Notes
    -----
    **Default broadening.** One probe's Gauss rule has :math:`m` nodes across the spectrum,
    about :math:`\mathrm{span}/m` apart, and a Gaussian narrower than that spacing shows the
    nodes rather than the density. Measured L1 distance :math:`\int|\hat\phi_\sigma -
    \phi_\sigma|` to the exact eigenvalues smoothed with the same :math:`\sigma` (mean / max
    over 10 seeds, :math:`n = 1000`, ``bench/estimator_coverage.py``): the former default
    (8 probes, 40 steps, :math:`\sigma = \mathrm{span}/200`) gave 0.68 on a uniform and 0.31
    on a bimodal spectrum (two Gaussians); 8 x 40 with :math:`\mathrm{span}/40`
    0.041 / 0.049 and 0.028 / 0.033; the default 10 x 32 with :math:`\mathrm{span}/32`, at the
    same 320 products, 0.031 / 0.036 and 0.021 / 0.029. A wider :math:`\sigma` lowers this
    distance further but blurs the density itself (bimodal, L1 to the true mixture density:
    0.11 at :math:`\mathrm{span}/40`, 0.16 at :math:`\mathrm{span}/32`, 0.32 at
    :math:`\mathrm{span}/20`). The rest of the error is probe noise, which falls like
    :math:`1/\sqrt{nN}`: at :math:`n = 800` the uniform spectrum's L1 is 0.042 with 10
    probes, 0.026 with 20 (the quadrature's own part, with 200 probes, is 0.006); pass more
    probes for small operators. The span includes outliers: for a bulk with a few far
    eigenvalues (a Hessian) pass ``sigma`` (and ``grid``) for the bulk.

    References
    ----------
    .. [1] L. Lin, Y. Saad and C. Yang, "Approximating spectral densities of large matrices",
       SIAM Review 58(1), 2016. doi:10.1137/130934283
    .. [2] B. Ghorbani, S. Krishnan and Y. Xiao, "An investigation into neural net
       optimization via Hessian eigenvalue density", ICML 2019. arXiv:1901.10159

    Examples
    --------
    >>> import torch
    >>> A = torch.diag(torch.linspace(-1, 1, 50, dtype=torch.float64))
    >>> sd = spectral_density(A, num_probes=4, num_steps=20, seed=0)
    >>> round(float(sd.density.sum() * (sd.grid[1] - sd.grid[0])), 3)
    1.0
    """
    sd, lean = _spectral_density(
        A,
        num_probes=num_probes,
        num_steps=num_steps,
        num_points=num_points,
        sigma=sigma,
        grid=grid,
        seed=seed,
        memory_budget=memory_budget,
    )
    if lean is not None:
        warnings.warn(lean, RuntimeWarning, stacklevel=2)
    return sd


def _spectral_density(
    A: OperatorLike,
    *,
    num_probes: int,
    num_steps: int | None,
    num_points: int,
    sigma: float | None,
    grid: ArrayLike | None,
    seed: int | torch.Generator | None,
    memory_budget: int | None,
) -> tuple[SpectralDensity, str | None]:
    """:func:`spectral_density` and, for runs without reorthogonalisation, the warning's text.

    Callers that run many densities (:func:`estimators.blockwise_spectra`) warn once for all.
    """
    op, kind = kr.prepare(A)
    n = op.shape[0]
    if op.shape[0] != op.shape[1]:
        raise ValueError(f"A: expected a square (symmetric) operator, got shape {op.shape}")
    if op.torch_dtype.is_complex:
        raise ValueError(COMPLEX_REFUSAL)
    probes = kr.check_symmetric(op)  # the symmetry probe's products count
    N = kr.check_int(num_probes, "num_probes", 1)
    m = min(32, n) if num_steps is None else kr.check_int(num_steps, "num_steps", 1, n)
    gen = kr.make_generator(seed, op.device)
    V0 = rademacher_probes(op, n, N, gen) / math.sqrt(n)
    per_probe = m * n * op.torch_dtype.itemsize
    fit, budget = count_within(op, per_probe, memory_budget)
    group = min(N, fit)
    reorthogonalized = group >= 1
    lean = None
    if not reorthogonalized:
        lean = (
            f"spectral_density: one probe's Lanczos basis ({m} steps x {n} = "
            f"{per_probe / 2**30:.2g} GiB) exceeds the memory budget ({budget / 2**30:.2g} "
            "GiB); running without reorthogonalisation (the quadrature stays valid; outlying "
            "nodes may appear as ghost copies sharing their weight)"
        )
    group = group or N
    forms = _Forms(rademacher=True)
    parts = [
        _lanczos_batch(op, V0[:, i : i + group], m, reorthogonalize=reorthogonalized, forms=forms)
        for i in range(0, N, group)
    ]
    alpha = torch.cat([r.alpha for r in parts])
    beta = torch.cat([r.beta for r in parts])
    theta, tau = gauss_rules(alpha, beta, torch.cat([r.steps for r in parts]))
    per_probe_trace = n * (tau * theta).sum(dim=1)
    tr_se = forms.result()[1] if N > 1 else math.nan  # as hutchinson_trace's
    span = float(theta.max() - theta.min()) or max(1.0, float(theta.abs().max()))
    x, dens, sigma = _smooth(theta, tau, span / m if sigma is None else sigma, grid, num_points)
    out = [kr.to_output(t.to(op.device), kind) for t in (x, dens, theta, tau)]
    grid_out, dens_out, nodes_out, weights_out = out
    sd = SpectralDensity(
        grid_out,
        dens_out,
        nodes_out,
        weights_out,
        TraceEstimate(float(per_probe_trace.mean()), tr_se, N * m + probes, "slq"),
        sigma,
        N * m + probes,
        reorthogonalized,
    )
    return sd, lean


class LanczosRuns(NamedTuple):
    r"""What :func:`_lanczos_batch` returns: ``N`` runs' tridiagonal matrices and more.

    ``alpha`` ``(N, m)`` diagonals; ``beta`` ``(N, m - 1)`` off-diagonals, or ``(N, m)`` with
    the last residual norm :math:`\beta_m` (``last_beta``); ``steps`` ``(N,)`` the steps
    before an invariant subspace was found (``beta = 0`` there; the rest is zero padding);
    ``basis`` the ``(m + 1, n, N)`` Lanczos vectors (``keep_basis``) or None.
    """

    alpha: torch.Tensor
    beta: torch.Tensor
    steps: torch.Tensor
    basis: torch.Tensor | None


def _lanczos_batch(
    op: Any,
    V0: torch.Tensor,
    m: int,
    *,
    reorthogonalize: bool = True,
    keep_basis: bool = False,
    last_beta: bool = False,
    forms: _Forms | None = None,
) -> LanczosRuns:
    """Run ``N`` independent Lanczos runs of ``m`` steps, fully reorthogonalised by default.

    They start from the unit columns of ``V0`` (``(n, N)``), in the operator's dtype and on
    its device (see :class:`LanczosRuns`). Without reorthogonalisation only the last two
    basis blocks are kept (the three-term recurrence, updated in place). A run that finds an
    invariant subspace (a residual norm below ``100 eps`` of the largest coefficient so far)
    stops there: its later coefficients and vectors are zero. ``forms`` collects the
    quadratic forms of the starting vectors as Rademacher probes (for the trace's standard
    error, :func:`estimators.trace._quadratic_forms`).
    """
    if keep_basis and not reorthogonalize:
        raise ValueError("keep_basis: the basis is kept only with reorthogonalize=True")
    n, N = V0.shape
    kw = {"dtype": op.torch_dtype, "device": op.device}
    V = torch.zeros((m + 1 if keep_basis else m) if reorthogonalize else 2, n, N, **kw)
    V[0] = V0
    alpha = torch.zeros(m, N, **kw)
    beta = torch.zeros(m if last_beta else max(m - 1, 0), N, **kw)
    steps = torch.full((N,), m, dtype=torch.long)
    anorm = 0.0
    for j in range(m):
        cur = j if reorthogonalize else j % 2
        W = op._apply(V[cur])
        kr.check_products(W, (j + 1) * N)
        alpha[j] = kr.column_dots(V[cur], W).real
        if j == 0 and forms is not None:
            # without reorthogonalisation memory is short: no n-vector for the diagonal term
            forms.add_lanczos_start(V[0], W, alpha[0], diagonal=reorthogonalize)
        if reorthogonalize:
            for _ in range(2):  # full reorthogonalisation, twice
                W = W - torch.einsum(
                    "jnl,jl->nl", V[: j + 1], torch.einsum("jnl,nl->jl", V[: j + 1].conj(), W)
                )
        else:  # in place: a 124M-parameter model's vectors are 0.5 GB each
            W.addcmul_(V[cur], alpha[j].to(W.dtype), value=-1)
            if j > 0:
                W.addcmul_(V[1 - cur], beta[j - 1].to(W.dtype), value=-1)
        if j + 1 == m and not last_beta:
            break
        b = kr.column_norms(W)
        anorm = max(anorm, float(alpha[j].abs().max()), float(b.max()))
        ok = b > 100 * torch.finfo(b.dtype).eps * max(anorm, 1e-300)
        broke = (~ok).cpu() & (steps == m)
        steps[broke] = j + 1
        beta[j] = torch.where(ok, b, torch.zeros_like(b))
        if j + 1 == m and not keep_basis:
            break
        nxt = j + 1 if reorthogonalize else 1 - cur
        torch.div(W, torch.where(ok, b, torch.ones_like(b)), out=V[nxt])
        V[nxt][:, ~ok] = 0
    return LanczosRuns(alpha.T.real, beta.T.real, steps, V if keep_basis else None)


def gauss_rules(
    alpha: torch.Tensor, beta: torch.Tensor, steps: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Return the Gauss nodes and weights ``(N, m)`` of ``N`` Lanczos runs (float64, host).

    The eigenvalues :math:`\theta_{lj}` of each tridiagonal :math:`T_l` (``alpha`` ``(N, m)``,
    ``beta`` ``(N, m - 1)``) and the squared first entries of its eigenvectors. A run that
    found an invariant subspace after :math:`s < m` steps (``steps``) is zero past :math:`s`;
    the nodes of those zeros would be 0, outside the spectrum (they set the default broadening
    and grid of a density: twice the broadening on a two-value spectrum), so its nodes past
    :math:`s` repeat its largest, with weight 0. Rows are ascending.
    """
    m = alpha.shape[1]
    T = torch.diag_embed(alpha) + torch.diag_embed(beta[:, : m - 1], 1)
    T = (T + torch.diag_embed(beta[:, : m - 1], -1)).to("cpu", torch.float64)
    theta, S = torch.linalg.eigh(T)
    tau = S[:, 0, :] ** 2
    for i in torch.nonzero(steps < m).flatten().tolist():
        k = int(steps[i])
        th, Si = torch.linalg.eigh(T[i, :k, :k])
        theta[i, :k], theta[i, k:] = th, th[-1]
        tau[i, :k], tau[i, k:] = Si[0] ** 2, 0.0
    return theta, tau


def grid_points(num_points: int, width: float, sigma: float) -> int:
    """Return ``num_points``, raised to 4 points per ``sigma`` over ``width`` (at most 20,000).

    A Gaussian of width ``sigma`` sampled more coarsely is still right at the grid points,
    but the density no longer integrates to 1 on the grid (0.39 at a quarter point per
    ``sigma``).
    """
    ratio = 4 * width / sigma
    # rounded first: nodes 1e-16 apart (a streamed and a cached operator) gave 81 and 82 points
    wanted = math.ceil(round(ratio, 6)) + 1 if math.isfinite(ratio) else 10**9
    if wanted > 40_000:  # fewer than 2 points per sigma at the cap
        warnings.warn(
            f"sigma: {sigma:.3g} is below 1/10,000 of the grid's width {width:.3g}; the "
            "density is right at the 20,000 grid points but its integral over them is no "
            "longer 1: pass grid= over the range you want at that resolution",
            RuntimeWarning,
            stacklevel=3,
        )
    return min(20_000, max(kr.check_int(num_points, "num_points", 2), wanted))


def _smooth(
    theta: torch.Tensor, tau: torch.Tensor, sigma: Any, grid: Any, num_points: int
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Return the grid, the Gaussian-smoothed density of nodes ``theta`` with weights ``tau``, sigma.

    The grid defaults to ``num_points`` points over the nodes' span plus ``5 sigma``, more
    where needed for 4 points per ``sigma`` (:func:`grid_points`).
    """
    sigma = float(sigma)
    if not sigma > 0:
        raise ValueError(f"sigma: expected a positive number, got {sigma!r}")
    if grid is None:
        lo, hi = float(theta.min()) - 5 * sigma, float(theta.max()) + 5 * sigma
        x = torch.linspace(lo, hi, grid_points(num_points, hi - lo, sigma), dtype=torch.float64)
    else:
        x = torch.as_tensor(grid, dtype=torch.float64).reshape(-1).cpu()
    g = torch.exp(-((x[:, None, None] - theta[None]) ** 2) / (2 * sigma**2))
    N = theta.shape[0]
    dens = (g * tau[None]).sum(dim=(1, 2)) / (N * sigma * math.sqrt(2 * math.pi))
    return x, dens, sigma


def _stored(sd: SpectralDensity) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """Return a result's nodes and weights as float64 CPU tensors, and the map back to its kind."""
    _, kind = kr.prepare(sd.nodes)
    device = sd.nodes.device if isinstance(sd.nodes, torch.Tensor) else torch.device("cpu")
    theta = torch.as_tensor(sd.nodes).to("cpu", torch.float64)
    tau = torch.as_tensor(sd.weights).to("cpu", torch.float64)
    return theta, tau, lambda t: kr.to_output(t.to(device), kind)
