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
from typing import Any, NamedTuple

import torch

from linops import _krylov as kr
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
    """``basis``: ``(m, l)`` orthonormal; ``error_estimate``: bound on ``||(I - QQ^H) A||``
    (``nan`` when no tolerance was asked); ``num_matvecs``: products used."""

    basis: Any
    error_estimate: float
    num_matvecs: int


class RandomizedSVDResult(NamedTuple):
    """Approximate truncated SVD :math:`A \\approx U \\mathrm{diag}(s) V^H`, ``s`` descending."""

    singular_values: Any
    left_vectors: Any
    right_vectors: Any
    num_matvecs: int


class EighResult(NamedTuple):
    """Approximate eigenpairs :math:`A \\approx V \\mathrm{diag}(\\lambda) V^H`, ascending."""

    eigenvalues: Any
    eigenvectors: Any
    num_matvecs: int


def range_finder(
    A: Any,
    rank: int | None = None,
    tol: float | None = None,
    *,
    oversample: int = 10,
    power_iters: int = 0,
    block_size: int = 10,
    max_rank: int | None = None,
    seed: int | torch.Generator | None = None,
) -> RangeFinderResult:
    r"""Orthonormal basis :math:`Q` of (approximately) the range of ``A``.

    Give exactly one of ``rank`` (fixed size ``rank + oversample`` with ``power_iters``
    power iterations, re-orthonormalised at every product) or ``tol`` (adaptive): blocks of
    ``block_size`` Gaussian vectors are added until the posterior estimate

    .. math:: \|(I - QQ^H)A\| \le 10\sqrt{2/\pi}\,\max_j \|(I - QQ^H) A\omega_j\|,

    which holds with probability at least :math:`1 - 10^{-\mathrm{block\_size}}` (HMT 2011,
    eq. 4.3), is at most the absolute tolerance ``tol``. The test block is kept in ``Q``.

    Raises
    ------
    ValueError
        If both or neither of ``rank`` and ``tol`` are given, or they are out of range.

    References
    ----------
    .. [1] N. Halko, P.-G. Martinsson and J. A. Tropp, "Finding structure with randomness",
       SIAM Review 53(2), 2011, Algorithms 4.2 and 4.4. doi:10.1137/090771806

    Examples
    --------
    >>> import torch
    >>> A = torch.diag(torch.tensor([3.0, 2.0, 1e-9, 0.0], dtype=torch.float64))
    >>> res = range_finder(A, tol=1e-6, block_size=1, seed=0)
    >>> res.error_estimate <= 1e-6
    True
    """
    op, kind = kr.prepare(A)
    m, n = op.shape
    gen = kr.make_generator(seed, op.device)
    if (rank is None) == (tol is None):
        raise ValueError(f"expected exactly one of rank and tol, got rank={rank!r}, tol={tol!r}")
    q = kr.check_int(power_iters, "power_iters", 0)
    if rank is not None:
        rank = kr.check_int(rank, "rank", 1, min(m, n))
        ell = min(rank + kr.check_int(oversample, "oversample", 0), min(m, n))
        Q, nmv = _subspace_iteration(op, ell, q, gen)
        return RangeFinderResult(kr.to_output(Q, kind), math.nan, nmv)
    if not float(tol) > 0:
        raise ValueError(f"tol: expected a positive number, got {tol!r}")
    b = kr.check_int(block_size, "block_size", 1, min(m, n))
    top = min(m, n) if max_rank is None else kr.check_int(max_rank, "max_rank", 1, min(m, n))
    Q, err, nmv = _adaptive(op, float(tol), b, top, gen)
    return RangeFinderResult(kr.to_output(Q, kind), err, nmv)


def _subspace_iteration(
    op: TorchLinearOperator, ell: int, q: int, gen: torch.Generator
) -> tuple[torch.Tensor, int]:
    Q = torch.linalg.qr(op._apply(kr.random_block(op.shape[1], ell, op, gen)))[0]
    for _ in range(q):
        Z = torch.linalg.qr(op._apply(Q, adjoint=True))[0]
        Q = torch.linalg.qr(op._apply(Z))[0]
    kr.check_products(Q, ell * (1 + 2 * q))
    return Q, ell * (1 + 2 * q)


def _adaptive(
    op: TorchLinearOperator, tol: float, b: int, top: int, gen: torch.Generator
) -> tuple[torch.Tensor, float, int]:
    m, n = op.shape
    Q = torch.empty(m, 0, dtype=op.torch_dtype, device=op.device)
    nmv, err, ref = 0, math.inf, 0.0
    while Q.shape[1] < top:
        bb = min(b, top - Q.shape[1])
        Y = op._apply(kr.random_block(n, bb, op, gen))
        nmv += bb
        kr.check_products(Y, nmv)
        ref = max(ref, float(torch.linalg.vector_norm(Y, dim=0).max()))
        Qn, _, _ = kr.orth_qr(Y, Q, gen, ref)
        resid = Y - Q @ (Q.mH @ Y)
        err = 10 * math.sqrt(2 / math.pi) * float(torch.linalg.vector_norm(resid, dim=0).max())
        Q = torch.cat([Q, Qn], dim=1)
        if err <= tol:
            break
    if Q.shape[1] >= min(m, n):
        err = 0.0
    return Q, err, nmv


def randomized_svd(
    A: Any,
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
    the projection :math:`B = U^H A V` is a by-product, so no product is spent on it.

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
    out = (kr.to_output(t, kind) for t in (s[:rank], U[:, :rank], V[:, :rank]))
    return RandomizedSVDResult(*out, num_matvecs=nmv)


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
        state.step()
    X, s, Yh = torch.linalg.svd(state.B[: state.j, : state.j])
    U, V = state.U[:, : state.j] @ X, state.V[:, : state.j] @ Yh.mH
    return (V, s, U, state.nmv) if flip else (U, s, V, state.nmv)


def randomized_eigh(
    A: Any,
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
    if op.shape[0] != op.shape[1]:
        raise ValueError(f"A: expected a square (symmetric) operator, got shape {op.shape}")
    kr.check_symmetric(op)  # 3 products, not counted in num_matvecs
    rank = kr.check_int(rank, "rank", 1, n)
    ell = min(rank + kr.check_int(oversample, "oversample", 0), n)
    q = kr.check_int(power_iters, "power_iters", 0)
    gen = kr.make_generator(seed, op.device)
    Q = kr.start_block(None, n, ell, op, gen)
    basis, images, ref = [], [], 0.0
    for _ in range(min(q + 1, n // ell)):
        W = op._apply(Q)
        kr.check_products(W, ell * (len(basis) + 1))
        basis.append(Q)
        images.append(W)
        ref = max(ref, float(torch.linalg.vector_norm(W, dim=0).max()))
        Q, _, _ = kr.orth_qr(W, torch.cat(basis, dim=1), gen, ref)
    V, AV = torch.cat(basis, dim=1), torch.cat(images, dim=1)
    T = V.mH @ AV
    lam, S = torch.linalg.eigh((T + T.mH) / 2)
    idx = torch.sort(torch.argsort(lam.abs(), descending=True)[:rank]).values
    vals, vecs = lam[idx], V @ S[:, idx]
    return EighResult(kr.to_output(vals, kind), kr.to_output(vecs, kind), ell * len(basis))


def nystrom(
    A: Any,
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
    if op.shape[0] != op.shape[1]:
        raise ValueError(f"A: expected a square (PSD) operator, got shape {op.shape}")
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
