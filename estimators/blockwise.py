r"""Spectra of the diagonal blocks of a Hessian, computed in lockstep, and their JS distance.

For a symmetric model operator :math:`H` (a :class:`linops.HessianOperator`, a GGN, ...) over
the parameters :math:`\theta = (\theta_1, \dots, \theta_B)` split into blocks (each layer by
default, or groups the user names), the diagonal block :math:`H_{bb} = P_b^\top H P_b` is the
curvature of the loss in block :math:`b` with the other blocks held fixed
(:math:`P_b` the columns of the identity that select block :math:`b`). This module gives, for
every block at once, the top eigenvalues of :math:`H_{bb}` (thick-restart Lanczos,
:func:`linops.lanczos`) and its spectral density (stochastic Lanczos quadrature,
:func:`estimators.spectral_density`), and the averaged Jensen-Shannon distance between the
block densities proposed as a measure of *block heterogeneity* in "Why Transformers Need Adam:
A Hessian Perspective" (Zhang et al. 2024, arXiv:2402.16788).

**What is shared.** :math:`H_{bb} v_b` for all blocks cannot come from one product
:math:`H v` with :math:`v = \sum_b P_b v_b`: row block :math:`b` of it is
:math:`\sum_{b'} H_{bb'} v_{b'}`, which mixes in the off-diagonal blocks. So every block's
algorithm runs as its own (unchanged) Lanczos / SLQ iteration, and the iterations advance in
lockstep: at each round, the vectors that all blocks' iterations need next are placed in one
multi-vector block :math:`Z = [P_{b_1} v_1, P_{b_2} v_2, \dots]` of the full parameter length
(column :math:`j` zero outside its own block) and sent to :math:`H` as one product
:math:`HZ` (split into the operator's own passes of at most ``H.vectors_per_pass()``
columns); block :math:`b` keeps the rows :math:`P_b^\top (H Z)_{:,j}` of its own columns.
What this shares:

* the operator itself: one forward pass and one retained gradient graph per data batch
  (built at the first product and cached, or, for a streamed dataset, rebuilt once per
  batch per *round* instead of once per batch per block and step);
* the passes: every round is ``ceil(columns / vectors_per_pass)`` passes through that graph
  for all blocks together, instead of one pass per block per step (where torch batches the
  double backward natively, an MLP or a transformer, a pass of 8 columns costs much less than
  8 passes; where it does not, the engine computes one column at a time inside the pass, and
  what is shared is the graph).

What is not shared: every column is its own tangent through the double backward; a product
costs what a full-model Hessian-vector product costs, whatever the block's size.

**The averaged JS distance.** The paper measures block heterogeneity by
:math:`\mathrm{JS}_0`, the Jensen-Shannon distance between the SLQ spectral densities of two
blocks averaged over all pairs of blocks, at initialisation. Computed here so that the number
measures the spectra and nothing else: (i) every block's density uses the same Gaussian
broadening :math:`\sigma` and the same grid (densities smoothed per block at their own
:math:`\sigma` would differ by the smoothing alone, and a grid coarser than :math:`\sigma`
would alias them); (ii) each density is normalised to a probability vector over the grid's
cells before the divergence; (iii) the distance is the square root of the base-2 divergence,
a metric with values in :math:`[0, 1]`. The paper's exact discretisation (its grid, per-block
smoothing, logarithm base) was not available to check against; values agree with its
:math:`\mathrm{JS}_0` up to those choices, not digit for digit.

The module is over 500 lines for one concept: the lockstep driver (threads feeding one
shared multi-vector product) and the per-block results it collects belong together.
"""

from __future__ import annotations

import math
import threading
import warnings
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch

from estimators._budget import count_within
from estimators.density import _spectral_density, grid_points
from estimators.seeding import Seed, make_generator
from estimators.trace import TraceEstimate
from linops import ArrayLike, OperatorLike
from linops import blocks as kr
from linops.base import TorchLinearOperator
from linops.lanczos import LanczosNoConvergence, lanczos
from linops.params import ParamSpace

__all__ = [
    "BlockSpectrum",
    "BlockwiseSpectra",
    "averaged_js_distance",
    "blockwise_spectra",
    "js_distance",
    "layer_blocks",
]


class BlockSpectrum(NamedTuple):
    r"""The spectrum of one diagonal block :math:`H_{bb}` (an entry of :class:`BlockwiseSpectra`).

    Attributes
    ----------
    params
        The parameter names of the block, in the operator's order.
    dim
        :math:`n_b`, the number of parameters of the block.
    eigenvalues, residuals
        The ``k`` largest eigenvalues of :math:`H_{bb}` in ascending order (as
        :func:`linops.lanczos` returns them) and their true residual norms
        :math:`\|H_{bb} y_i - \lambda_i y_i\|`; empty when not asked for.
    converged
        Whether every residual reached ``rtol`` times the largest Ritz value's magnitude
        (otherwise the values are Lanczos' partial result).
    density
        The block's SLQ density on the common ``grid`` of :class:`BlockwiseSpectra` (common
        broadening ``sigma``), integrating to about 1.
    nodes, weights
        ``(num_probes, num_steps)`` quadrature nodes and weights of the block's SLQ.
    trace
        The SLQ (Hutchinson) estimate of :math:`\operatorname{tr} H_{bb}` with its standard
        error.
    num_matvecs
        Products of :math:`H_{bb}` this block used (columns it sent).
    reorthogonalized
        Whether the block's SLQ runs kept their bases (False when the block's share of
        ``memory_budget`` could not hold one; see :func:`estimators.spectral_density`).
    """

    params: list[str]
    dim: int
    eigenvalues: torch.Tensor
    residuals: torch.Tensor
    converged: bool
    density: torch.Tensor
    nodes: torch.Tensor
    weights: torch.Tensor
    trace: TraceEstimate
    num_matvecs: int
    reorthogonalized: bool = True


class BlockwiseSpectra(NamedTuple):
    r"""Result of :func:`blockwise_spectra`.

    Attributes
    ----------
    blocks
        Block name -> :class:`BlockSpectrum`, in the order of the ``blocks`` argument.
    grid, sigma
        The common abscissae, eigenvalues (float64, on the CPU), and the Gaussian broadening
        of every block's density, in units of ``axis``.
    js_distances
        ``(B, B)`` Jensen-Shannon distances between the block densities
        (:func:`js_distance`, base 2, in :math:`[0, 1]`).
    js_mean
        Their average over the :math:`B(B-1)/2` pairs of distinct blocks: the averaged JS
        distance of arXiv:2402.16788 (``nan`` for one block).
    num_matvecs
        Columns sent to the full operator (the sum of the blocks' ``num_matvecs``).
    num_passes
        Calls of the full operator's product (each of at most ``vectors_per_pass`` columns).
    num_rounds
        Lockstep rounds (each serves the next request of every block still running).
    axis, linthresh
        ``"symlog"`` (densities in :math:`\operatorname{asinh}(\lambda/\mathrm{linthresh})`)
        or ``"linear"``; see :func:`blockwise_spectra`.
    """

    blocks: dict[str, BlockSpectrum]
    grid: torch.Tensor
    sigma: float
    js_distances: torch.Tensor
    js_mean: float
    num_matvecs: int
    num_passes: int
    num_rounds: int
    axis: str = "linear"
    linthresh: float = 1.0


def layer_blocks(H: TorchLinearOperator | ParamSpace) -> dict[str, list[str]]:
    """Group the operator's parameters by the module that owns them (one block per layer).

    Parameters
    ----------
    H
        A model operator (it has a :class:`linops.ParamSpace` as ``H.space``) or a
        :class:`linops.ParamSpace`.

    Returns
    -------
    dict
        Module name (``"features.0"``; a parameter of the top module keeps its own name) ->
        the names of its parameters, in the operator's order.

    Examples
    --------
    >>> import torch
    >>> from linops import ParamSpace
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1))
    >>> layer_blocks(ParamSpace(net))
    {'0': ['0.weight', '0.bias'], '2': ['2.weight', '2.bias']}
    """
    space = _space_of(H)
    out: dict[str, list[str]] = {}
    for name in space.names:
        out.setdefault(name.rsplit(".", 1)[0] if "." in name else name, []).append(name)
    return out


def js_distance(p: ArrayLike, q: ArrayLike) -> float:
    r"""Jensen-Shannon distance between two densities sampled on one uniform grid.

    With :math:`P = p / \sum p` and :math:`Q = q / \sum q` (the densities as probability
    vectors over the grid's cells) and :math:`M = (P + Q)/2`,

    .. math:: \mathrm{JS}(P, Q) = \Big(\tfrac12 \mathrm{KL}(P\,\|\,M)
       + \tfrac12 \mathrm{KL}(Q\,\|\,M)\Big)^{1/2},

    with base-2 logarithms: a metric with values in :math:`[0, 1]` (Endres & Schindelin 2003),
    zero exactly for equal densities, 1 for densities with disjoint supports.

    Raises
    ------
    ValueError
        For arrays of different shapes, negative or non-finite entries, or a density that is
        zero everywhere.

    References
    ----------
    .. [1] D. M. Endres and J. E. Schindelin, "A new metric for probability distributions",
       IEEE Trans. Inf. Theory 49(7), 2003. doi:10.1109/TIT.2003.813506

    Examples
    --------
    >>> js_distance([1.0, 0.0], [0.0, 1.0]), js_distance([1.0, 2.0], [2.0, 4.0])
    (1.0, 0.0)
    """
    P, Q = (torch.as_tensor(t, dtype=torch.float64).reshape(-1).cpu() for t in (p, q))
    if P.shape != Q.shape:
        raise ValueError(f"p, q: expected densities on one grid, got {P.numel()} and {Q.numel()}")
    for name, t in (("p", P), ("q", Q)):
        if bool((t < 0).any()) or not float(t.sum()) > 0 or not bool(t.isfinite().all()):
            raise ValueError(f"{name}: expected a finite non-negative density that is not all zero")
    P, Q = P / P.sum(), Q / Q.sum()
    M = (P + Q) / 2
    kl = (torch.xlogy(P, P) - torch.xlogy(P, M)).sum() + (
        torch.xlogy(Q, Q) - torch.xlogy(Q, M)
    ).sum()
    return math.sqrt(max(0.0, float(kl) / (2 * math.log(2))))


def averaged_js_distance(densities: ArrayLike) -> tuple[torch.Tensor, float]:
    r"""Pairwise JS distances of ``B`` densities on one grid and their average over pairs.

    :math:`\mathrm{JS}_0 = \binom{B}{2}^{-1} \sum_{i<j} \mathrm{JS}(\rho_i, \rho_j)` (the
    averaged JS distance of arXiv:2402.16788, with the distance of :func:`js_distance`).

    Parameters
    ----------
    densities
        ``(B, num_points)`` densities (rows) on one uniform grid.

    Returns
    -------
    tuple
        The symmetric ``(B, B)`` distances (zero diagonal) and their mean over the pairs
        (``nan`` when ``B == 1``).
    """
    D = torch.as_tensor(densities, dtype=torch.float64).cpu()
    if D.dim() != 2:
        raise ValueError(f"densities: expected a (B, num_points) array, got shape {tuple(D.shape)}")
    B = D.shape[0]
    out = torch.zeros(B, B, dtype=torch.float64)
    for i in range(B):
        for j in range(i + 1, B):
            out[i, j] = out[j, i] = js_distance(D[i], D[j])
    mean = float(out[torch.triu_indices(B, B, 1).unbind()].mean()) if B > 1 else math.nan
    return out, mean


def blockwise_spectra(
    H: OperatorLike,
    blocks: Mapping[str, Any] | None = None,
    *,
    k: int = 5,
    rtol: float | None = None,
    maxiter: int | None = None,
    ncv: int | None = None,
    num_probes: int = 10,
    num_steps: int | None = None,
    num_points: int = 512,
    sigma: float | None = None,
    axis: str = "symlog",
    linthresh: float | None = None,
    eigenvalues: bool = True,
    max_vectors: int | None = None,
    memory_budget: int | None = None,
    seed: Seed = None,
    progress: Callable[[int, int], None] | None = None,
) -> BlockwiseSpectra:
    r"""Top eigenvalues and SLQ density of every diagonal block :math:`H_{bb}`, in lockstep.

    Every block runs :func:`linops.lanczos` (``k`` largest, ``"LA"``) and
    :func:`estimators.spectral_density` on :math:`H_{bb} = P_b^\top H P_b`, unchanged; their
    products are gathered round by round into multi-vector products of ``H`` (module
    docstring: what this shares and what it cannot). The densities are then evaluated on one
    grid with one broadening, and their pairwise Jensen-Shannon distances averaged
    (arXiv:2402.16788).

    Parameters
    ----------
    H
        A symmetric model operator over parameters (:class:`linops.HessianOperator`,
        :class:`linops.GGNOperator`, ...; it has ``H.space``, a :class:`linops.ParamSpace`).
        Its options hold: the memory budget, streamed data (``cache=False``), the route.
    blocks
        Block name -> a selection of ``H``'s parameters, anything ``params`` of
        :class:`linops.ParamSpace` accepts (names, prefixes such as ``"layer1"``,
        submodules, tensors). Default: one block per layer (:func:`layer_blocks`). Blocks
        need not cover every parameter; they must not overlap.
    k, rtol, maxiter, ncv
        Eigenvalues per block and the tolerance, restarts and basis size of
        :func:`linops.lanczos` (defaults as there; ``rtol``: ``sqrt(eps)`` of ``H``'s dtype;
        ``ncv`` is capped at ``n_b``). A block with at most ``k`` parameters gets all its
        eigenvalues from its dense matrix (``n_b`` columns).
    num_probes, num_steps
        SLQ probes and Lanczos steps per block (defaults as in
        :func:`estimators.spectral_density`: 10 and ``min(32, n_b)``).
    num_points, sigma
        Grid size (raised so that the grid has at least 4 points per ``sigma``, at most
        20,000) and the common broadening: default the span of all blocks' quadrature
        nodes divided by the largest ``num_steps``, the rule of
        :func:`estimators.spectral_density` applied to the union. One ``sigma`` for every
        block so that the distances compare spectra, not smoothings. In units of the
        ``axis``.
    axis, linthresh
        Where the densities are smoothed and compared. ``"symlog"`` (default): in
        :math:`t = \operatorname{asinh}(\lambda / \lambda_0)`, linear within
        :math:`\lambda_0` = ``linthresh`` of zero (default :math:`10^{-6}` of the largest
        :math:`|\theta|` over all blocks) and logarithmic beyond, so one broadening resolves
        blocks whose spectra lie decades apart (a GPT-2's blocks span five: with a linear
        broadening set by the largest block, every density was the same Gaussian and
        :math:`\mathrm{JS}_0 = 0.000`). ``"linear"``: in :math:`\lambda` itself, the plain
        reading of arXiv:2402.16788. ``grid`` holds eigenvalues either way (uniform in
        :math:`t` for ``"symlog"``) and each ``density`` is per unit of the axis.
    eigenvalues
        Whether to compute the top eigenvalues (``False``: densities only).
    max_vectors
        Columns per product of ``H`` (default ``H.vectors_per_pass()``, else 8): bounds the
        memory of the full-length blocks built per pass (``n x max_vectors`` each way).
    memory_budget
        Bytes this call may hold (default: :func:`linops.memory.default_memory_budget` of
        the device, a fraction of its free memory). The full-length blocks come first:
        ``max_vectors`` is lowered to what fits (``ValueError`` if not one column does).
        What is left is shared among the blocks in proportion to :math:`n_b`, and within a
        block between its SLQ runs (their bases if they fit in half the share, else three
        vectors per probe without reorthogonalisation, warned and recorded in
        ``reorthogonalized``) and its Lanczos run, which gets the rest as its own
        ``memory_budget`` (:func:`linops.lanczos`: ``A V`` dropped, then ``ncv`` lowered, to
        at least ``k + 1``; an ``ncv`` given here is lowered too). ``ValueError`` if a
        block's share cannot hold a Lanczos basis of ``k + 1`` vectors beside its SLQ.
    seed
        Seed of the probes and starts; block ``b`` draws from its own generator, seeded from
        this one, so results do not depend on the scheduling of the rounds.
    progress
        Called as ``progress(rounds, matvecs)`` after every round (a progress bar).

    Returns
    -------
    BlockwiseSpectra

    Raises
    ------
    ValueError
        For a non-square operator, a selection outside ``H``'s parameters, overlapping or
        empty blocks, or out-of-range counts.
    TypeError
        If ``H`` has no parameter space (wrap a dense matrix's blocks yourself).

    Notes
    -----
    The blocks' algorithms run in threads of their own, each waiting on its product; the
    calling thread computes every round's product once each running block has asked for
    its next one, so the rounds, and hence the results, do not depend on thread timing. The
    threads do no autodiff (grad mode is per thread: every product runs on the caller's).

    References
    ----------
    .. [1] Y. Zhang, C. Chen, T. Ding, Z. Li, R. Sun and Z.-Q. Luo, "Why Transformers Need
       Adam: A Hessian Perspective", NeurIPS 2024. arXiv:2402.16788
    .. [2] L. Lin, Y. Saad and C. Yang, "Approximating spectral densities of large
       matrices", SIAM Review 58(1), 2016. doi:10.1137/130934283

    Examples
    --------
    >>> import torch
    >>> from linops import HessianOperator
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    >>> net = net.double()
    >>> X = torch.randn(8, 3, dtype=torch.float64)
    >>> H = HessianOperator(net, torch.nn.CrossEntropyLoss(), (X, torch.arange(8) % 2))
    >>> res = blockwise_spectra(H, k=2, num_probes=2, seed=0)
    >>> list(res.blocks), res.blocks["2"].dim
    (['0', '2'], 10)
    """
    space = _space_of(H)
    op, _ = kr.prepare(H)
    if op.shape[0] != op.shape[1] or op.shape[0] != space.dim:
        raise ValueError(f"H: expected a square operator over its parameters, got {op.shape}")
    index = _block_indices(space, layer_blocks(space) if blocks is None else blocks)
    k = kr.check_int(k, "k", 1)
    N = kr.check_int(num_probes, "num_probes", 1)
    kr.check_which(axis, ("symlog", "linear"), "axis")
    if num_steps is not None:
        kr.check_int(num_steps, "num_steps", 1)
    chunk = max_vectors if max_vectors is not None else (op.vectors_per_pass() or 8)
    chunk = kr.check_int(chunk, "max_vectors", 1)
    fit, budget = count_within(op, 2 * op.shape[0] * op.torch_dtype.itemsize, memory_budget)
    if fit < 1:
        raise ValueError(
            f"memory_budget: one full-length column each way ({2 * op.shape[0]} numbers of "
            f"{op.torch_dtype}) exceeds the budget ({budget} bytes)"
        )
    chunk = min(chunk, fit)
    left = budget - chunk * 2 * op.shape[0] * op.torch_dtype.itemsize
    sizes = [idx.numel() for idx in index.values()]
    shares = [_block_share(left, nb, sum(sizes), op.torch_dtype.itemsize) for nb in sizes]
    master = make_generator(seed, "cpu")
    seeds = [int(s) for s in torch.randint(2**62, (2 * len(index),), generator=master)]

    lock = _Lockstep(op, [idx for idx in index.values()], chunk, progress)
    jobs: list[tuple[int, str, int, Callable[[TorchLinearOperator, int], Any]]] = []
    for i, (name, idx) in enumerate(index.items()):
        nb = idx.numel()
        m = min(32, nb) if num_steps is None else min(num_steps, nb)
        vec = nb * op.torch_dtype.itemsize
        # SLQ: its bases if one fits in half the block's share, else three vectors per probe
        slq_bytes = min(N, shares[i] // 2 // (m * vec)) * m * vec or 3 * N * vec
        kb = min(k, nb)
        eig_bytes = shares[i] - slq_bytes
        lanczos_need = (kb + 4) * vec if eigenvalues and kb < nb else 0
        if eig_bytes < lanczos_need:
            basis = (
                f" and a Lanczos basis of k + 1 = {kb + 1} vectors of n_b = {nb} "
                f"({lanczos_need} bytes with its work vectors)"
                if lanczos_need
                else ""
            )
            raise ValueError(
                f"memory_budget: block {name!r}'s share ({shares[i]} bytes of the {left} left "
                f"beside the full-length columns) cannot hold its SLQ runs ({slq_bytes} bytes)"
                f"{basis}; raise memory_budget or lower k, num_probes or max_vectors"
            )
        if eigenvalues:
            fits = eig_bytes // vec - 3  # the basis beside one pending vector and two work ones
            nc = None if ncv is None else max(min(ncv, nb, fits), kb + 1)

            def top_k(
                A: TorchLinearOperator,
                s: int,
                kb: int = kb,
                nc: int | None = nc,
                b: int = eig_bytes,
            ) -> Any:
                if kb == A.shape[0]:  # a block smaller than k: its dense eigenvalues, exactly
                    return _dense_eigenvalues(A)
                try:
                    return lanczos(
                        A, kb, "LA", rtol=rtol, maxiter=maxiter, ncv=nc, seed=s, memory_budget=b
                    )
                except LanczosNoConvergence as err:
                    return err.result

            jobs.append((i, "eig", seeds[2 * i], top_k))

        def slq(A: TorchLinearOperator, s: int, m: int = m, b: int = max(1, slq_bytes)) -> Any:
            return _spectral_density(  # without its warning: warned about once, below
                A,
                num_probes=N,
                num_steps=m,
                num_points=2,
                sigma=None,
                grid=None,
                seed=s,
                memory_budget=b,
            )[0]

        jobs.append((i, "dens", seeds[2 * i + 1], slq))
    results = lock.run(jobs, dtype=op.torch_dtype)
    lean = [name for i, name in enumerate(index) if not results[(i, "dens")].reorthogonalized]
    if lean:
        warnings.warn(
            f"blockwise_spectra: the SLQ bases of {len(lean)} of {len(index)} blocks "
            f"({', '.join(lean[:4])}{', ...' if len(lean) > 4 else ''}) exceed their share of "
            "memory_budget; they ran without reorthogonalisation (the quadrature stays valid; "
            "outlying nodes may appear as ghost copies sharing their weight; see "
            "BlockSpectrum.reorthogonalized)",
            RuntimeWarning,
            stacklevel=2,
        )

    # one grid and one broadening for all blocks, on the chosen axis
    sds = {name: results[(i, "dens")] for i, name in enumerate(index)}
    thetas = [torch.as_tensor(sd.nodes).to("cpu", torch.float64) for sd in sds.values()]
    top = max(float(t.abs().max()) for t in thetas) or 1.0
    lam0 = 1e-6 * top if linthresh is None else float(linthresh)
    if not lam0 > 0:
        raise ValueError(f"linthresh: expected a positive number, got {linthresh!r}")
    forward = (lambda x: torch.asinh(x / lam0)) if axis == "symlog" else (lambda x: x)
    axes = [forward(t) for t in thetas]
    lo = min(float(t.min()) for t in axes)
    hi = max(float(t.max()) for t in axes)
    steps = max(t.shape[1] for t in thetas)
    span = (hi - lo) or max(1.0, abs(hi))
    sig = span / steps if sigma is None else float(sigma)
    if not sig > 0:
        raise ValueError(f"sigma: expected a positive number, got {sigma!r}")
    points = grid_points(num_points, span + 10 * sig, sig)
    grid = torch.linspace(lo - 5 * sig, hi + 5 * sig, points, dtype=torch.float64)

    out: dict[str, BlockSpectrum] = {}
    for i, (name, idx) in enumerate(index.items()):
        sd = sds[name]
        theta, t = thetas[i], axes[i]
        tau = torch.as_tensor(sd.weights).to("cpu", torch.float64)
        g = torch.exp(-((grid[:, None, None] - t[None]) ** 2) / (2 * sig**2))
        dens = (g * tau[None]).sum(dim=(1, 2)) / (theta.shape[0] * sig * math.sqrt(2 * math.pi))
        eig = results.get((i, "eig"))
        if eig is None:
            vals = res = torch.zeros(0, dtype=torch.float64)
            conv = False
        else:
            vals = torch.as_tensor(eig.eigenvalues).to("cpu", torch.float64)
            res = torch.as_tensor(eig.residuals).to("cpu", torch.float64)
            conv = bool(eig.converged)
        out[name] = BlockSpectrum(
            [space.names[j] for j in _names_of(space, idx)],
            idx.numel(),
            vals,
            res,
            conv,
            dens,
            theta,
            tau,
            sd.trace,
            lock.columns[i],
            sd.reorthogonalized,
        )
    D, mean = averaged_js_distance(torch.stack([b.density for b in out.values()]))
    values = lam0 * torch.sinh(grid) if axis == "symlog" else grid
    return BlockwiseSpectra(
        out, values, sig, D, mean, sum(lock.columns), lock.passes, lock.rounds, axis, lam0
    )


def _block_share(left: int, nb: int, total: int, itemsize: int) -> int:
    """Bytes of ``left`` for a block of ``nb`` of the ``total`` parameters, whole numbers."""
    return max(0, left) * nb // total // itemsize * itemsize


class _DenseEig(NamedTuple):
    eigenvalues: torch.Tensor
    residuals: torch.Tensor
    converged: bool


def _dense_eigenvalues(A: TorchLinearOperator) -> _DenseEig:
    """All eigenvalues of a block with at most ``k`` parameters (its ``n_b`` columns, one round)."""
    n = A.shape[0]
    M = A._apply(torch.eye(n, dtype=A.torch_dtype, device=A.device))
    M = (M + M.mH) / 2
    vals = torch.linalg.eigvalsh(M.to("cpu", torch.float64))
    return _DenseEig(vals, torch.zeros_like(vals), True)


class _BlockOperator(TorchLinearOperator):
    """:math:`H_{bb}` as an operator whose products wait for the round's shared product."""

    is_symmetric = True

    def __init__(self, lock: _Lockstep, block: int, n: int, dtype: torch.dtype, device: Any):
        super().__init__((n, n), dtype=dtype, device=device)
        self._lock, self._block = lock, block

    def _matmat_torch(self, X: torch.Tensor) -> torch.Tensor:
        return self._lock.submit(self._block, X)


class _Lockstep:
    """Serves the products of many block iterations (threads) as shared full-operator products."""

    def __init__(
        self,
        op: TorchLinearOperator,
        index: list[torch.Tensor],
        chunk: int,
        progress: Callable[[int, int], None] | None,
    ) -> None:
        self.op, self.chunk, self.progress = op, chunk, progress
        self.index = [idx.to(op.device) for idx in index]
        self.cond = threading.Condition()
        self.pending: dict[int, tuple[int, torch.Tensor]] = {}  # job -> (block, X)
        self.done: dict[int, torch.Tensor] = {}
        self.live: set[int] = set()
        self.error: BaseException | None = None
        self.columns = [0] * len(index)
        self.passes = self.rounds = 0
        self._local = threading.local()

    def submit(self, block: int, X: torch.Tensor) -> torch.Tensor:
        job = self._local.job
        with self.cond:
            self.pending[job] = (block, X)
            self.cond.notify_all()
            while job not in self.done and self.error is None:
                self.cond.wait()
            if job not in self.done:
                raise RuntimeError("blockwise_spectra: the shared product failed") from self.error
            return self.done.pop(job)

    def run(
        self,
        jobs: list[tuple[int, str, int, Callable[[TorchLinearOperator, int], Any]]],
        dtype: Any,
    ) -> dict[tuple[int, str], Any]:
        """Run every job in a thread of its own; serve their products; return their results."""
        results: dict[tuple[int, str], Any] = {}
        errors: list[BaseException] = []

        def work(
            j: int, block: int, kind: str, s: int, fn: Callable[[TorchLinearOperator, int], Any]
        ) -> None:
            self._local.job = j
            A = _BlockOperator(self, block, self.index[block].numel(), dtype, self.op.device)
            try:
                results[(block, kind)] = fn(A, s)
            except BaseException as err:  # handed to the caller below
                errors.append(err)
            finally:
                with self.cond:
                    self.live.discard(j)
                    self.cond.notify_all()

        self.live = set(range(len(jobs)))
        threads = [
            threading.Thread(target=work, args=(j, *job), daemon=True) for j, job in enumerate(jobs)
        ]
        for t in threads:
            t.start()
        try:
            self._serve()
        finally:
            for t in threads:
                t.join()
        if errors:
            raise errors[0]
        return results

    def _serve(self) -> None:
        while True:
            with self.cond:
                while self.live and not self.live <= set(self.pending):
                    self.cond.wait()
                if not self.live:
                    return
                batch, self.pending = self.pending, {}
            try:
                outs = self._product(batch)
            except BaseException as err:
                with self.cond:
                    self.error = err
                    self.cond.notify_all()
                raise
            with self.cond:
                self.done.update(outs)
                self.rounds += 1
                self.cond.notify_all()
            if self.progress is not None:
                self.progress(self.rounds, sum(self.columns))

    def _product(self, batch: dict[int, tuple[int, torch.Tensor]]) -> dict[int, torch.Tensor]:
        """One round: every job's columns placed in its block, through ``H`` in chunks."""
        cols = [(job, c) for job in sorted(batch) for c in range(batch[job][1].shape[1])]
        outs = {job: torch.empty_like(X) for job, (_, X) in batch.items()}
        n = self.op.shape[0]
        for start in range(0, len(cols), self.chunk):
            part = cols[start : start + self.chunk]
            Z = torch.zeros(len(part), n, dtype=self.op.torch_dtype, device=self.op.device)
            for j, (job, c) in enumerate(part):
                block, X = batch[job]
                Z[j, self.index[block]] = X[:, c].to(Z.dtype)
                self.columns[block] += 1
            W = self.op._apply(Z.T)  # column-major, as the model operators read it
            kr.check_products(W, len(part))
            self.passes += 1
            for j, (job, c) in enumerate(part):
                block, X = batch[job]
                outs[job][:, c] = W[self.index[block], j].to(X.dtype)
            del Z, W
        return outs


def _space_of(H: Any) -> ParamSpace:
    space = H if isinstance(H, ParamSpace) else getattr(H, "space", None)
    if not isinstance(space, ParamSpace):
        raise TypeError(
            "H: expected a model operator over parameters (HessianOperator, GGNOperator, ...: "
            f"it has .space, a linops.ParamSpace), got {type(H).__name__}; for a dense "
            "matrix, take its diagonal blocks and call estimators.spectral_density on each"
        )
    return space


def _block_indices(space: ParamSpace, blocks: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Return each block's positions in the operator's flat parameter vector."""
    if not isinstance(blocks, Mapping) or not blocks:
        raise ValueError(
            "blocks: expected a non-empty mapping of block name -> parameter selection, got "
            f"{type(blocks).__name__ if not isinstance(blocks, Mapping) else 'an empty one'}"
        )
    offsets: dict[str, tuple[int, int]] = {}
    start = 0
    for name, numel in zip(space.names, space.numels, strict=True):
        offsets[name] = (start, start + numel)
        start += numel
    owner: dict[str, str] = {}
    out: dict[str, torch.Tensor] = {}
    for bname, selection in blocks.items():
        names = ParamSpace(space.model, selection).names
        missing = [n for n in names if n not in offsets]
        if missing:
            raise ValueError(
                f"blocks[{bname!r}]: parameters {missing[:4]} are not among the operator's "
                "parameters; build H with params= covering every block"
            )
        for n in names:
            if n in owner:
                raise ValueError(f"blocks: parameter {n!r} is in both {owner[n]!r} and {bname!r}")
            owner[n] = bname
        names.sort(key=lambda n: offsets[n][0])
        out[str(bname)] = torch.cat([torch.arange(*offsets[n]) for n in names])
    return out


def _names_of(space: ParamSpace, idx: torch.Tensor) -> list[int]:
    """Return the indices (into ``space.names``) of the parameters that ``idx`` covers."""
    bounds = torch.tensor([0, *space.numels]).cumsum(0)
    first = torch.bucketize(idx, bounds[1:], right=True).unique()
    return [int(i) for i in first]
