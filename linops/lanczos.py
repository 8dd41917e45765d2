r"""Symmetric (block) Lanczos with full reorthogonalisation and thick restart.

For a symmetric (Hermitian) operator :math:`A \in \mathbb{R}^{n \times n}` the method keeps an
orthonormal basis :math:`V_j`, the projected matrix :math:`H_j = V_j^H A V_j` and a pending
block :math:`P` with the Krylov-Schur relation

.. math:: A V_j = V_j H_j + P R E_j^H,

where :math:`E_j` selects the last block. Every new block is orthogonalised against the whole
basis twice (full reorthogonalisation, so no "ghost" copies of converged eigenvalues appear).
The Ritz pairs :math:`(\theta_i, V_j s_i)` of :math:`H_j = S \Theta S^H` have residual norms
:math:`\|A V_j s_i - \theta_i V_j s_i\| = \|R\, E_j^H s_i\|`, checked after every block. When
the basis is full it is thick-restarted (Wu & Simon 2000; Stewart 2001, Krylov-Schur): the
wanted Ritz vectors are kept, :math:`H` becomes diagonal and :math:`P` is untouched, so the
relation above still holds and nothing is recomputed.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from linops import _krylov as kr

__all__ = ["LanczosNoConvergence", "LanczosResult", "lanczos"]

_WHICH = ("LA", "SA", "LM", "BE")


class LanczosResult(NamedTuple):
    """Eigenpairs from :func:`lanczos`, eigenvalues in ascending algebraic order.

    Attributes
    ----------
    eigenvalues
        ``(k,)`` Ritz values, ascending.
    eigenvectors
        ``(n, k)`` orthonormal Ritz vectors, column ``i`` belongs to ``eigenvalues[i]``.
    residuals
        ``(k,)`` residual norms :math:`\\|A v_i - \\lambda_i v_i\\|`.
    num_matvecs
        Number of operator-vector products used (a block of ``b`` vectors counts ``b``).
    converged
        Whether every residual is at most ``tol * ||A||``.
    """

    eigenvalues: Any
    eigenvectors: Any
    residuals: Any
    num_matvecs: int
    converged: bool


class LanczosNoConvergence(RuntimeError):
    """Raised when :func:`lanczos` hits ``maxiter``; ``.result`` holds the partial result."""

    def __init__(self, message: str, result: LanczosResult) -> None:
        super().__init__(message)
        self.result = result


def lanczos(
    A: Any,
    k: int = 6,
    which: str = "LA",
    *,
    tol: float | None = None,
    maxiter: int | None = None,
    ncv: int | None = None,
    block_size: int = 1,
    v0: Any = None,
    seed: int | torch.Generator | None = None,
) -> LanczosResult:
    r"""``k`` eigenpairs of a symmetric operator by thick-restart Lanczos.

    Parameters
    ----------
    A
        Symmetric (Hermitian) ``n x n`` operator: a ``TorchLinearOperator``, a SciPy
        ``LinearOperator`` or sparse matrix, or a dense torch/numpy/CuPy array.
    k
        Number of eigenpairs, ``1 <= k <= n``.
    which
        ``"LA"`` largest algebraic, ``"SA"`` smallest algebraic, ``"LM"`` largest magnitude,
        ``"BE"`` both ends (``k // 2`` from the bottom, the rest from the top).
    tol
        Relative tolerance: pair ``i`` has converged when
        :math:`\|A v_i - \theta_i v_i\| \le \mathrm{tol}\,\|A\|`, with :math:`\|A\|` estimated by
        the largest :math:`|\theta|` seen. Default ``sqrt(eps)`` of the operator's dtype.
    maxiter
        Largest number of restarts (default ``10 n``, as ARPACK).
    ncv
        Basis size (default ``min(n, max(2k + 1, k + 30))`` rounded to whole blocks).
    block_size
        Vectors per block. A single vector (the default) finds each distinct eigenvalue once
        in exact arithmetic; ``block_size >= m`` resolves eigenvalues of multiplicity ``m``.
    v0
        Start vector ``(n,)`` or block ``(n, block_size)``; default Gaussian.
    seed
        Seed (or ``torch.Generator``) for the random start and breakdown restarts.

    Returns
    -------
    LanczosResult
        Torch tensors on the operator's device for torch input, numpy arrays otherwise.

    Raises
    ------
    ValueError
        For a non-square operator, ``k`` out of range, an unknown ``which``, or a zero ``v0``.
    FloatingPointError
        If the operator returns NaN or inf.
    LanczosNoConvergence
        If not all ``k`` pairs converge within ``maxiter`` restarts (carries ``.result``).

    References
    ----------
    .. [1] K. Wu and H. Simon, "Thick-restart Lanczos method for large symmetric eigenvalue
       problems", SIAM J. Matrix Anal. Appl. 22(2), 2000. doi:10.1137/S0895479898334605
    .. [2] G. W. Stewart, "A Krylov-Schur algorithm for large eigenproblems", SIAM J.
       Matrix Anal. Appl. 23(3), 2001. doi:10.1137/S0895479800371529

    Examples
    --------
    >>> import torch
    >>> A = torch.diag(torch.arange(1.0, 101.0, dtype=torch.float64))
    >>> res = lanczos(A, 3, "LA", seed=0)
    >>> [round(x) for x in res.eigenvalues.tolist()]
    [98, 99, 100]
    """
    op, kind = kr.prepare(A)
    n = _check_square(op.shape)
    b = kr.check_int(block_size, "block_size", 1, n)
    k = kr.check_int(k, "k", 1, n)
    kr.check_which(which, _WHICH)
    ncv = _default_ncv(n, k, b) if ncv is None else kr.check_int(ncv, "ncv", min(n, k + 1), n)
    ncv = _fit_ncv(ncv, n, k, b)
    maxiter = 10 * n if maxiter is None else kr.check_int(maxiter, "maxiter", 1)
    eps = torch.finfo(op.torch_dtype).eps
    tol = eps**0.5 if tol is None else float(tol)
    if not tol > 0:
        raise ValueError(f"tol: expected a positive number, got {tol!r}")
    gen = kr.make_generator(seed, op.device)
    P = kr.start_block(v0, n, b, op, gen)
    return _thick_restart(op, kind, P, k, which, tol, maxiter, ncv, gen)


def _thick_restart(op, kind, P, k, which, tol, maxiter, ncv, gen) -> LanczosResult:
    n, b = P.shape
    V = torch.empty(n, ncv, dtype=op.torch_dtype, device=op.device)
    H = torch.zeros(ncv, ncv, dtype=op.torch_dtype, device=op.device)
    j, nmv, anorm = 0, 0, 0.0
    for it in range(maxiter + 1):
        while j + b <= ncv:
            W = op._apply(P)
            nmv += b
            kr.check_products(W, nmv)
            V[:, j : j + b] = P
            anorm = max(anorm, float(torch.linalg.vector_norm(W, dim=0).max()))
            P, C, R = kr.orth_qr(W, V[:, : j + b], gen, anorm)
            H[: j + b, j : j + b] = C
            H[j : j + b, :j] = C[:j].mH
            H[j : j + b, j : j + b] = (C[j:] + C[j:].mH) / 2
            j += b
            theta, S, res = _ritz(H[:j, :j], R)
            anorm = max(anorm, float(theta.abs().max()))
            want = _select(theta, k, which) if j >= k else None
            if want is not None and bool((res[want] <= tol * anorm).all()):
                return _finish(V[:, :j], theta, S, res, want, nmv, True, kind)
        if it == maxiter:
            break
        keep = _select(theta, _keep_count(j, k, b, ncv), which)
        V[:, : keep.numel()] = V[:, :j] @ S[:, keep].to(V)
        j = keep.numel()
        H.zero_()
        H[:j, :j] = torch.diag(theta[keep]).to(H)
    want = _select(theta, k, which)
    result = _finish(V[:, :j], theta, S, res, want, nmv, False, kind)
    k_ok = int((res[want] <= tol * anorm).sum())
    raise LanczosNoConvergence(
        f"lanczos did not converge: {maxiter} restarts ({nmv} products), {k_ok}/{k} converged "
        f"to tol={tol:.3g}",
        result,
    )


def _ritz(H: torch.Tensor, R: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ritz values (host, float64), vectors and residual norms ``||R S[-b:]||`` per column."""
    b = R.shape[0]
    Hh = H.detach().to("cpu", torch.complex128 if H.is_complex() else torch.float64)
    theta, S = torch.linalg.eigh((Hh + Hh.mH) / 2)
    res = torch.linalg.vector_norm(R.detach().to(S).cpu() @ S[-b:], dim=0)
    return theta, S, res


def _select(theta: torch.Tensor, k: int, which: str) -> torch.Tensor:
    """Indices (into ascending ``theta``) of the ``k`` wanted Ritz values."""
    m = theta.numel()
    k = min(k, m)
    if which == "LA":
        return torch.arange(m - k, m)
    if which == "SA":
        return torch.arange(k)
    if which == "LM":
        return torch.sort(torch.argsort(theta.abs(), descending=True, stable=True)[:k]).values
    low = k // 2
    return torch.cat([torch.arange(low), torch.arange(m - (k - low), m)])


def _keep_count(j: int, k: int, b: int, ncv: int) -> int:
    """Ritz vectors kept at a restart: the wanted ones plus half of the rest (room for a block)."""
    return max(min(k + (j - k) // 2, ncv - b), 1)


def _finish(V, theta, S, res, want, nmv, converged, kind) -> LanczosResult:
    vals = theta[want].to(device=V.device, dtype=V.real.dtype)
    vecs = V @ S[:, want].to(V)
    r = res[want].to(device=V.device, dtype=V.real.dtype)
    out = (kr.to_output(t, kind) for t in (vals, vecs, r))
    return LanczosResult(*out, num_matvecs=nmv, converged=converged)


def _default_ncv(n: int, k: int, b: int) -> int:
    ncv = max(2 * k + 1, k + 30)
    return min(n, -(-ncv // b) * b)


def _fit_ncv(ncv: int, n: int, k: int, b: int) -> int:
    """Basis size that leaves room for a whole pending block (or spans the whole space)."""
    if ncv < n or n % b:
        ncv = min(ncv, n - b)
    if ncv < k or ncv < b:
        raise ValueError(
            f"ncv: a basis of {ncv} vectors cannot hold k={k} pairs and blocks of "
            f"block_size={b} for n={n}; lower k or block_size"
        )
    return ncv


def _check_square(shape: tuple[int, int]) -> int:
    if shape[0] != shape[1]:
        raise ValueError(f"A: expected a square (symmetric) operator, got shape {shape}")
    if shape[0] == 0:
        raise ValueError("A: expected a non-empty operator, got shape (0, 0)")
    return shape[0]
