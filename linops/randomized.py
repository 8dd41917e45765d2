r"""Randomized range finder, SVD, symmetric eigendecomposition and Nystrom approximation.

All routines draw Gaussian test matrices :math:`\Omega` from an explicit ``torch.Generator``
on the operator's device and touch the operator only through block products.

* :func:`range_finder`: orthonormal :math:`Q` with :math:`\|(I - QQ^H)A\|` small, either of a
  fixed size (with power iterations) or adaptively until the posterior estimate of
  Halko, Martinsson & Tropp (2011, section 4.3) falls below a tolerance.
* :func:`randomized_svd`: block Krylov (Musco & Musco 2015, implemented as a block
  Golub-Kahan bidiagonalisation, whose projected matrix comes for free) or subspace
  iteration (HMT Algorithm 4.4 / 5.1) at the same product budget.
* :func:`randomized_eigh`: block Lanczos Rayleigh-Ritz for symmetric operators.
* :func:`nystrom`: numerically stable Nystrom approximation of a PSD operator (Tropp,
  Yurtsever, Udell & Cevher 2017, Algorithm 3).
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import NamedTuple, cast

import torch

from linops import _krylov as kr
from linops._checks import check_square
from linops._types import ArrayOut, OperatorLike
from linops.base import TorchLinearOperator
from linops.svds import _Bidiag

__all__ = [
    "EighResult",
    "RandomizedSVDResult",
    "RangeFinderResult",
    "nystrom",
    "randomized_eigh",
    "randomized_svd",
    "range_finder",
]


class RangeFinderResult(NamedTuple):
    """Orthonormal basis of an approximate range from :func:`range_finder`.

    ``basis``: ``(m, l)`` orthonormal (``l`` may be 0); ``error_estimate``: the posterior
    bound on ``||(I - QQ^H) A||`` computed from a fresh Gaussian block against the returned
    ``basis`` (``nan`` when no tolerance was asked); ``num_matvecs``: products used;
    ``converged``: whether ``error_estimate <= atol`` (``True`` in fixed-rank mode, where no
    tolerance is asked).
    """

    basis: ArrayOut
    error_estimate: float
    num_matvecs: int
    converged: bool = True


class RandomizedSVDResult(NamedTuple):
    r"""Approximate truncated SVD :math:`A \approx U \mathrm{diag}(s) V^H`, ``s`` descending."""

    singular_values: ArrayOut
    left_vectors: ArrayOut
    right_vectors: ArrayOut
    num_matvecs: int


class EighResult(NamedTuple):
    r"""Approximate eigenpairs :math:`A \approx V \mathrm{diag}(\lambda) V^H`, ascending."""

    eigenvalues: ArrayOut
    eigenvectors: ArrayOut
    num_matvecs: int


def range_finder(
    A: OperatorLike,
    rank: int | None = None,
    atol: float | None = None,
    *,
    oversample: int = 10,
    power_iters: int = 0,
    block_size: int = 10,
    max_rank: int | None = None,
    seed: int | torch.Generator | None = None,
) -> RangeFinderResult:
    r"""Orthonormal basis :math:`Q` of (approximately) the range of ``A``.

    Give exactly one of ``rank`` (fixed size ``rank + oversample`` with ``power_iters``
    power iterations, re-orthonormalised at every product) or ``atol`` (adaptive).

    **Adaptive mode** (HMT 2011, Algorithm 4.2, blocked). Each step draws a fresh Gaussian
    block :math:`\Omega` of ``block_size`` columns and forms the residual sketch
    :math:`R = (I - QQ^H)A\Omega` of the *current* basis; the posterior estimate

    .. math:: \|(I - QQ^H)A\| \le e := 10\sqrt{2/\pi}\,\max_j \|R e_j\|

    holds with probability at least :math:`1 - 10^{-\mathrm{block\_size}}` (HMT 2011,
    eq. 4.3). If :math:`e \le` ``atol`` (absolute) the current :math:`Q` is returned with
    ``converged=True`` and :math:`e` as ``error_estimate``, so the estimate always refers to the
    returned basis and the test block is not added to it. Otherwise :math:`R = U\Sigma W^H`
    and only the directions :math:`u_j` with :math:`\sigma_j > \max(e_{\mathrm{atol}}/10,\;
    10\,\varepsilon\,\|A\omega\|_{\max})`, :math:`e_{\mathrm{atol}} =
    \mathrm{atol}/(10\sqrt{2/\pi})`, are added: directions the tolerance does not need, or at
    the rounding level of the products, are not (the zero operator gets an empty basis, a
    rank-3 one three columns).

    **Unreachable tolerances.** The estimate cannot fall below the rounding error of the
    products themselves, about :math:`\varepsilon\,\|A\omega\|` (in float32, with
    :math:`\varepsilon = 1.2\cdot 10^{-7}`, typically :math:`10^{-6}\|A\|` to
    :math:`10^{-5}\|A\|`). The loop stops with ``converged=False`` when

    * no direction of the residual sketch is above the rounding level (all at
      :math:`10\,\varepsilon\,\|A\omega\|_{\max}` or below),
    * the estimate has stagnated at the rounding level (the best of the last three blocks
      below :math:`10\sqrt{2/\pi}\cdot 20\,\varepsilon\,\|A\omega\|_{\max}` and not half
      the best before them), or
    * the basis has ``max_rank`` (default :math:`\min(m, n)`) columns and a last block still
      gives :math:`e >` ``atol``.

    The reported estimate is :math:`\max(e,\; 2\,\widehat{\|Q^HQ - I\|}_2\,
    \|A\omega\|_{\max})`: once :math:`Q` spans the space the projection computed with
    :math:`Q` sees almost nothing, while the true error is at the level of :math:`Q`'s loss of
    orthogonality (a four-step power estimate, no products); it is never 0 unless
    :math:`A\Omega = 0`. ``converged`` is whether that estimate is at most ``atol``.

    Each step costs ``block_size`` products, the final certifying block included.

    Raises
    ------
    ValueError
        If both or neither of ``rank`` and ``atol`` are given, or they are out of range.

    References
    ----------
    .. [1] N. Halko, P.-G. Martinsson and J. A. Tropp, "Finding structure with randomness",
       SIAM Review 53(2), 2011, Algorithms 4.2 and 4.4. doi:10.1137/090771806

    Examples
    --------
    >>> import torch
    >>> A = torch.diag(torch.tensor([3.0, 2.0, 1e-9, 0.0], dtype=torch.float64))
    >>> res = range_finder(A, atol=1e-6, block_size=1, seed=0)
    >>> res.error_estimate <= 1e-6, res.converged, res.basis.shape[1]
    (True, True, 2)
    """
    op, kind = kr.prepare(A)
    m, n = op.shape
    gen = kr.make_generator(seed, op.device)
    if (rank is None) == (atol is None):
        raise ValueError(f"expected exactly one of rank and atol, got rank={rank!r}, atol={atol!r}")
    q = kr.check_int(power_iters, "power_iters", 0)
    if rank is not None:
        rank = kr.check_int(rank, "rank", 1, min(m, n))
        ell = min(rank + kr.check_int(oversample, "oversample", 0), min(m, n))
        Q, nmv = _subspace_iteration(op, ell, q, gen)
        return RangeFinderResult(kr.to_output(Q, kind), math.nan, nmv, True)
    real = isinstance(atol, numbers.Real) and not isinstance(atol, bool)
    tol_f = float(cast(float, atol)) if real else math.nan
    if not (math.isfinite(tol_f) and tol_f > 0):
        raise ValueError(f"atol: expected a positive finite number, got {atol!r}")
    b = kr.check_int(block_size, "block_size", 1, min(m, n))
    top = min(m, n) if max_rank is None else kr.check_int(max_rank, "max_rank", 1, min(m, n))
    Q, err, nmv, ok = _adaptive(op, tol_f, b, top, gen)
    return RangeFinderResult(kr.to_output(Q, kind), err, nmv, ok)


def _subspace_iteration(
    op: TorchLinearOperator, ell: int, q: int, gen: torch.Generator
) -> tuple[torch.Tensor, int]:
    Q = torch.linalg.qr(op._apply(kr.random_block(op.shape[1], ell, op, gen)))[0]
    for _ in range(q):
        Z = torch.linalg.qr(op._apply(Q, adjoint=True))[0]
        Q = torch.linalg.qr(op._apply(Z))[0]
    kr.check_products(Q, ell * (1 + 2 * q))
    return Q, ell * (1 + 2 * q)


_HMT = 10 * math.sqrt(2 / math.pi)  # the posterior estimate's factor (HMT 2011, eq. 4.3)


def _adaptive(
    op: TorchLinearOperator, tol: float, b: int, top: int, gen: torch.Generator
) -> tuple[torch.Tensor, float, int, bool]:
    """Blocked adaptive range finder; ``(Q, error_estimate, products, converged)``."""
    m, n = op.shape
    eps = torch.finfo(op.torch_dtype).eps
    Q = torch.empty(m, 0, dtype=op.torch_dtype, device=op.device)
    nmv, ref, errs = 0, 0.0, []
    while True:
        Y = op._apply(kr.random_block(n, b, op, gen))
        nmv += b
        kr.check_products(Y, nmv)
        ref = max(ref, float(kr.column_norms(Y).max()))
        R = _project_out(Y, Q)
        err = _HMT * float(kr.column_norms(R).max())
        errs.append(err)
        U, s, _ = torch.linalg.svd(R, full_matrices=False)
        keep = int((s > max(tol / _HMT / 10, 10 * eps * ref)).sum())
        if (
            err <= tol
            or Q.shape[1] >= top
            or keep == 0  # the whole residual is at the rounding level of the products
            or _stagnated(errs, _HMT * 20 * eps * ref)
        ):
            err = max(err, ref * _orthogonality_defect(Q, gen))
            return Q, err, nmv, err <= tol
        Qn = _project_out(U[:, : min(keep, top - Q.shape[1])], Q)
        Q = torch.cat([Q, torch.linalg.qr(Qn)[0]], dim=1)


def _project_out(Y: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """:math:`(I - QQ^H)Y`, classical Gram-Schmidt twice."""
    for _ in range(2):
        Y = Y - Q @ (Q.mH @ Y)
    return Y


def _orthogonality_defect(Q: torch.Tensor, gen: torch.Generator) -> float:
    r"""Twice a power-iteration estimate (four probes, four steps) of :math:`\|Q^HQ - I\|_2`.

    The rounding floor of :math:`\|(I - QQ^H)A\|` is about :math:`\|Q^HQ - I\|\,\|A\|`,
    which a projection computed with ``Q`` itself cannot see once ``Q`` spans the space.
    """
    if Q.shape[1] == 0:
        return 0.0

    def defect(X: torch.Tensor) -> torch.Tensor:
        return Q.mH @ (Q @ X) - X

    X = torch.randn(Q.shape[1], 4, generator=gen, dtype=Q.dtype, device=Q.device)
    for _ in range(4):
        X = defect(X / kr.column_norms(X).clamp(min=1e-300))
    return 2 * float(kr.column_norms(X).max())


def _stagnated(errs: list[float], floor: float) -> bool:
    """Whether the estimates sit at the rounding floor.

    That is, the best of the last three blocks is below ``floor`` and not half the best before
    them.
    """
    if len(errs) < 4:
        return False
    recent = min(errs[-3:])
    return recent <= floor and recent > 0.5 * min(errs[:-3])


def randomized_svd(
    A: OperatorLike,
    rank: int,
    *,
    oversample: int = 10,
    power_iters: int = 2,
    method: str = "block_krylov",
    block_size: int | None = None,
    seed: int | torch.Generator | None = None,
) -> RandomizedSVDResult:
    r"""Approximate top-``rank`` SVD of ``A`` from a fixed budget of products.

    The budget is :math:`\ell(2q + 2)` products with :math:`\ell` = ``rank + oversample`` and
    :math:`q` = ``power_iters`` (the count of HMT subspace iteration and of
    ``sklearn.utils.extmath.randomized_svd``, whose ``n_iter=2`` and default ``n_iter=7``
    give 120 and 320 products at ``rank=10``).

    ``method="subspace"``: HMT Algorithm 4.4 then 5.1: :math:`Q` from power iterations,
    :math:`B = Q^H A`, :math:`B = \tilde U \Sigma V^H`, :math:`U = Q\tilde U`.

    ``method="block_krylov"`` (default, measured more accurate in ``bench/algorithms.py``):
    the same budget spent on a block Golub-Kahan bidiagonalisation with blocks of
    ``block_size`` (default ``rank``) vectors, i.e. the block Krylov space
    :math:`[A\Omega, (AA^H)A\Omega, \dots]` of Musco & Musco (2015), fully reorthogonalised;
    the projection :math:`B = U^H A V` is a by-product, so no product is spent on it. A
    space smaller than ``rank`` (a ``block_size`` that does not divide the budget's vectors)
    gives fewer triplets, with a ``RuntimeWarning``; a ``block_size`` above half the budget
    takes one step of ``2 block_size`` products, more than the budget.

    Raises
    ------
    ValueError
        For ``rank`` out of ``[1, min(m, n)]`` or an unknown ``method``.

    References
    ----------
    .. [1] N. Halko, P.-G. Martinsson and J. A. Tropp, SIAM Review 53(2), 2011.
    .. [2] C. Musco and C. Musco, "Randomized block Krylov methods for stronger and faster
       approximate singular value decomposition", NeurIPS 2015. arXiv:1504.05477

    Examples
    --------
    >>> import torch
    >>> A = torch.diag(torch.tensor([5.0, 4.0, 3.0, 1e-3] + [0.0] * 60, dtype=torch.float64))
    >>> [round(s, 6) for s in randomized_svd(A, 3, seed=0).singular_values.tolist()]
    [5.0, 4.0, 3.0]
    """
    op, kind = kr.prepare(A)
    short = min(op.shape)
    rank = kr.check_int(rank, "rank", 1, short)
    ell = min(rank + kr.check_int(oversample, "oversample", 0), short)
    q = kr.check_int(power_iters, "power_iters", 0)
    kr.check_which(method, ("block_krylov", "subspace"), "method")
    gen = kr.make_generator(seed, op.device)
    if method == "subspace":
        U, s, V, nmv = _svd_subspace(op, ell, q, gen)
    else:
        bsz = rank if block_size is None else kr.check_int(block_size, "block_size", 1, short)
        U, s, V, nmv = _svd_block_krylov(op, bsz, ell * (2 * q + 2), gen)
    if s.numel() < rank:
        warnings.warn(
            f"randomized_svd: the block Krylov space of the budget holds {s.numel()} vectors, "
            f"fewer than rank={rank} (blocks of {bsz} in {ell * (2 * q + 2)} products): "
            f"{s.numel()} triplets returned; pass a block_size dividing rank (more "
            "oversample or power_iters help only below min(m, n))",
            RuntimeWarning,
            stacklevel=2,
        )
    s_, U_, V_ = (kr.to_output(t, kind) for t in (s[:rank], U[:, :rank], V[:, :rank]))
    return RandomizedSVDResult(s_, U_, V_, num_matvecs=nmv)


def _svd_subspace(op: TorchLinearOperator, ell: int, q: int, gen: torch.Generator):
    Q, nmv = _subspace_iteration(op, ell, q, gen)
    Bh = op._apply(Q, adjoint=True)  # B^H = A^H Q, (n, ell)
    W, s, Zh = torch.linalg.svd(Bh, full_matrices=False)
    return Q @ Zh.mH, s, W, nmv + ell


def _svd_block_krylov(op: TorchLinearOperator, b: int, budget: int, gen: torch.Generator):
    m, n = op.shape
    flip = m < n
    short = min(m, n)
    steps = max(1, min(budget // (2 * b), short // b))
    P = kr.start_block(None, short, b, op, gen)
    state = _Bidiag(op, flip, b * steps, P, gen)
    for _ in range(steps):
        R = state.step()
    # U^H A on [V, P_next]: the square B and the last A^H U's remainder R^H, so the last
    # products count too (the square part alone is A on the start block after one step:
    # 2.43 for a top singular value of 5.0 with 64 vectors in 128 products)
    J = state.j
    Bx = state.B.new_zeros(J, J + b)
    Bx[:, :J] = state.B[:J, :J]
    Bx[J - b :, J:] = R.mH
    X, s, Yh = torch.linalg.svd(Bx, full_matrices=False)
    U = state.U[:, :J] @ X
    V = torch.cat([state.V[:, :J], state.P], dim=1) @ Yh.mH
    return (V, s, U, state.nmv) if flip else (U, s, V, state.nmv)


def randomized_eigh(
    A: OperatorLike,
    rank: int,
    *,
    oversample: int = 10,
    power_iters: int = 2,
    seed: int | torch.Generator | None = None,
) -> EighResult:
    r"""Approximate ``rank`` largest-magnitude eigenpairs of a symmetric operator.

    Block Lanczos without restart: the block Krylov space
    :math:`[\Omega, A\Omega, \dots, A^{q}\Omega]` with blocks of :math:`\ell` = ``rank +
    oversample`` vectors is orthonormalised (twice) into :math:`Q`, and
    :math:`T = Q^H A Q = S \Lambda S^H` is formed from the products already taken
    (:math:`\ell (q + 1)` in all). Returns the ``rank`` Ritz pairs of largest
    :math:`|\lambda|`, ascending (HMT 2011 Algorithm 5.3 with a Krylov range).

    Examples
    --------
    >>> import torch
    >>> A = torch.diag(torch.tensor([-6.0, 5.0, 1.0] + [0.0] * 40, dtype=torch.float64))
    >>> [round(x, 6) for x in randomized_eigh(A, 2, seed=0).eigenvalues.tolist()]
    [-6.0, 5.0]
    """
    op, kind = kr.prepare(A)
    n = op.shape[0]
    check_square(op.shape)
    probes = kr.check_symmetric(op)  # the symmetry probe's products count
    rank = kr.check_int(rank, "rank", 1, n)
    ell = min(rank + kr.check_int(oversample, "oversample", 0), n)
    q = kr.check_int(power_iters, "power_iters", 0)
    gen = kr.make_generator(seed, op.device)
    Q = kr.start_block(None, n, ell, op, gen)
    basis: list[torch.Tensor] = []
    images: list[torch.Tensor] = []
    ref = 0.0
    for _ in range(min(q + 1, n // ell)):
        W = op._apply(Q)
        kr.check_products(W, ell * (len(basis) + 1))
        basis.append(Q)
        images.append(W)
        ref = max(ref, float(kr.column_norms(W).max()))
        Q, _, _ = kr.orth_qr(W, torch.cat(basis, dim=1), gen, ref)
    V, AV = torch.cat(basis, dim=1), torch.cat(images, dim=1)
    T = V.mH @ AV
    lam, S = torch.linalg.eigh((T + T.mH) / 2)
    idx = torch.sort(torch.argsort(lam.abs(), descending=True)[:rank]).values
    vals, vecs = lam[idx], V @ S[:, idx]
    return EighResult(kr.to_output(vals, kind), kr.to_output(vecs, kind), ell * len(basis) + probes)


def nystrom(
    A: OperatorLike,
    rank: int,
    *,
    oversample: int = 10,
    seed: int | torch.Generator | None = None,
) -> EighResult:
    r"""Randomized Nystrom approximation :math:`A \approx (A\Omega)(\Omega^H A\Omega)^+(A\Omega)^H`.

    For a PSD operator, with orthonormal :math:`\Omega` (:math:`\ell` = ``rank + oversample``
    columns), :math:`Y = A\Omega`, shift :math:`\nu = \varepsilon\|Y\|_F`,
    :math:`Y_\nu = Y + \nu\Omega`, :math:`C = \mathrm{chol}(\Omega^H Y_\nu)`,
    :math:`U\Sigma = \mathrm{svd}(Y_\nu C^{-1})` and :math:`\lambda = \max(\Sigma^2 - \nu, 0)`
    (Tropp, Yurtsever, Udell & Cevher 2017, Algorithm 3). Uses :math:`\ell` products and
    returns the ``rank`` largest eigenpairs, ascending.

    Raises
    ------
    ValueError
        If the core matrix is not positive definite (``A`` is not PSD).

    References
    ----------
    .. [1] J. A. Tropp, A. Yurtsever, M. Udell and V. Cevher, "Fixed-rank approximation of a
       positive-semidefinite matrix from streaming data", NeurIPS 2017. arXiv:1706.05736

    Examples
    --------
    >>> import torch
    >>> A = torch.diag(torch.tensor([4.0, 2.0] + [0.0] * 30, dtype=torch.float64))
    >>> [round(x, 6) for x in nystrom(A, 2, seed=0).eigenvalues.tolist()]
    [2.0, 4.0]
    """
    op, kind = kr.prepare(A)
    n = op.shape[0]
    check_square(op.shape, kind="PSD")
    rank = kr.check_int(rank, "rank", 1, n)
    ell = min(rank + kr.check_int(oversample, "oversample", 0), n)
    gen = kr.make_generator(seed, op.device)
    Omega = torch.linalg.qr(kr.random_block(n, ell, op, gen))[0]
    Y = op._apply(Omega)
    kr.check_products(Y, ell)
    nu = torch.finfo(Y.dtype).eps * float(torch.linalg.matrix_norm(Y))
    Y = Y + nu * Omega
    core = Omega.mH @ Y
    C, info = torch.linalg.cholesky_ex((core + core.mH) / 2)
    if int(info) != 0:
        raise ValueError("A: expected a positive semidefinite operator (Nystrom core not PD)")
    B = torch.linalg.solve_triangular(C.mH, Y, upper=True, left=False)
    U, s, _ = torch.linalg.svd(B, full_matrices=False)
    lam = (s[:rank] ** 2 - nu).clamp(min=0).flip(0)
    return EighResult(kr.to_output(lam, kind), kr.to_output(U[:, :rank].flip(1), kind), ell)
