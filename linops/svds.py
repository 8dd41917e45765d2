r"""Singular triplets by (block) Golub-Kahan-Lanczos bidiagonalisation with thick restart.

For :math:`A \in \mathbb{R}^{m \times n}` the method keeps orthonormal bases :math:`V_j`
(right) and :math:`U_j` (left), the projected matrix :math:`B_j = U_j^H A V_j` and a pending
right block :math:`P`, with

.. math:: A V_j = U_j B_j, \qquad A^H U_j = V_j B_j^H + P R E_j^H .

Each step multiplies :math:`P` by :math:`A` and the new left block by :math:`A^H`, and
orthogonalises both twice against the whole bases. With :math:`B_j = X \Sigma Y^H`, the Ritz
triplets :math:`(\sigma_i, U_j x_i, V_j y_i)` satisfy :math:`A v_i = \sigma_i u_i` exactly and
:math:`\|A^H u_i - \sigma_i v_i\| = \|R E_j^H x_i\|`. Restarts keep the wanted triplets, so
:math:`B` becomes diagonal (thick restart, Wu & Simon 2000; Baglama & Reichel 2005).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from linops import _krylov as kr
from linops.base import TorchLinearOperator

__all__ = ["SVDSNoConvergence", "SVDSResult", "svds"]


class SVDSResult(NamedTuple):
    """Singular triplets from :func:`svds`, singular values in descending order.

    Attributes
    ----------
    singular_values
        ``(k,)``, descending.
    left_vectors
        ``(m, k)`` orthonormal, :math:`A v_i = \\sigma_i u_i`.
    right_vectors
        ``(n, k)`` orthonormal.
    residuals
        ``(k,)`` :math:`\\|A^H u_i - \\sigma_i v_i\\|` (the other residual is zero).
    num_matvecs
        Products with :math:`A` plus products with :math:`A^H` (vectors).
    converged
        Whether every residual is at most ``tol * ||A||``.
    """

    singular_values: Any
    left_vectors: Any
    right_vectors: Any
    residuals: Any
    num_matvecs: int
    converged: bool


class SVDSNoConvergence(RuntimeError):
    """Raised when :func:`svds` hits ``maxiter``; ``.result`` holds the partial result."""

    def __init__(self, message: str, result: SVDSResult) -> None:
        super().__init__(message)
        self.result = result


def svds(
    A: Any,
    k: int = 6,
    which: str = "LM",
    *,
    tol: float | None = None,
    maxiter: int | None = None,
    ncv: int | None = None,
    block_size: int = 1,
    v0: Any = None,
    seed: int | torch.Generator | None = None,
) -> SVDSResult:
    r"""``k`` singular triplets of a (rectangular) operator by thick-restart Golub-Kahan.

    Parameters
    ----------
    A
        ``m x n`` operator (``TorchLinearOperator``, SciPy ``LinearOperator``, dense array).
    k
        Number of triplets, ``1 <= k <= min(m, n)``.
    which
        ``"LM"`` largest or ``"SM"`` smallest singular values (of the ``min(m, n)``).
    tol
        Triplet ``i`` has converged when :math:`\|A^H u_i - \sigma_i v_i\| \le
        \mathrm{tol}\,\sigma_{\max}`. Default ``sqrt(eps)`` of the dtype.
    maxiter
        Largest number of restarts (default ``10 min(m, n)``).
    ncv
        Basis size (default ``min(min(m, n), max(2k + 1, k + 30))``).
    block_size
        Vectors per block (``>= m`` resolves singular values of multiplicity ``m``).
    v0
        Start vector of the short side (length ``min(m, n)``; of ``n`` when ``m == n``).
    seed
        Seed (or ``torch.Generator``) for the random start.

    Returns
    -------
    SVDSResult

    Raises
    ------
    ValueError
        For ``k`` out of range, an unknown ``which`` or a zero ``v0``.
    FloatingPointError
        If the operator returns NaN or inf.
    SVDSNoConvergence
        If not all ``k`` triplets converge within ``maxiter`` restarts (carries ``.result``).

    Notes
    -----
    The bidiagonalisation runs on :math:`A^H` when :math:`m < n` (so that the right basis
    lives in the smaller space) and the roles of the vectors are swapped back at the end.

    References
    ----------
    .. [1] G. Golub and W. Kahan, "Calculating the singular values and pseudo-inverse of a
       matrix", SIAM J. Numer. Anal. 2(2), 1965. doi:10.1137/0702016
    .. [2] J. Baglama and L. Reichel, "Augmented implicitly restarted Lanczos
       bidiagonalization methods", SIAM J. Sci. Comput. 27(1), 2005. doi:10.1137/04060593X

    Examples
    --------
    >>> import torch
    >>> A = torch.diag(torch.arange(1.0, 51.0, dtype=torch.float64))[:, :40]
    >>> [round(s) for s in svds(A, 2, seed=0).singular_values.tolist()]
    [40, 39]
    """
    op, kind = kr.prepare(A)
    m, n = op.shape
    short = min(m, n)
    if short == 0:
        raise ValueError(f"A: expected a non-empty operator, got shape {op.shape}")
    b = kr.check_int(block_size, "block_size", 1, short)
    k = kr.check_int(k, "k", 1, short)
    kr.check_which(which, ("LM", "SM"))
    ncv = min(short, max(2 * k + 1, k + 30)) if ncv is None else ncv
    ncv = _fit_ncv(kr.check_int(ncv, "ncv", min(short, k + 1), short), short, k, b)
    maxiter = 10 * short if maxiter is None else kr.check_int(maxiter, "maxiter", 1)
    tol = torch.finfo(op.torch_dtype).eps ** 0.5 if tol is None else float(tol)
    if not tol > 0:
        raise ValueError(f"tol: expected a positive number, got {tol!r}")
    gen = kr.make_generator(seed, op.device)
    flip = m < n
    P = kr.start_block(v0, short, b, op, gen)
    state = _Bidiag(op, flip, ncv, P, gen)
    return state.run(k, which, tol, maxiter, kind)


class _Bidiag:
    """State of the restarted bidiagonalisation of ``op`` (or of ``op^H`` when ``flip``)."""

    def __init__(
        self, op: TorchLinearOperator, flip: bool, ncv: int, P: torch.Tensor, gen: torch.Generator
    ) -> None:
        self.op, self.flip, self.gen, self.P = op, flip, gen, P
        n, long = P.shape[0], max(op.shape)
        kw = {"dtype": op.torch_dtype, "device": op.device}
        self.V, self.U = torch.empty(n, ncv, **kw), torch.empty(long, ncv, **kw)
        self.B = torch.zeros(ncv, ncv, **kw)
        self.j, self.nmv, self.anorm, self.ncv = 0, 0, 0.0, ncv

    def apply(self, X: torch.Tensor, adjoint: bool) -> torch.Tensor:
        W = self.op._apply(X, adjoint != self.flip)
        self.nmv += X.shape[1]
        kr.check_products(W, self.nmv)
        return W

    def step(self) -> torch.Tensor:
        """One block step; returns ``R`` of the new pending block."""
        j, b, P = self.j, self.P.shape[1], self.P
        X = self.apply(P, adjoint=False)
        self.anorm = max(self.anorm, float(torch.linalg.vector_norm(X, dim=0).max()))
        Q, C, Ru = kr.orth_qr(X, self.U[:, :j], self.gen, self.anorm)
        self.V[:, j : j + b], self.U[:, j : j + b] = P, Q
        self.B[:j, j : j + b], self.B[j : j + b, j : j + b] = C, Ru
        Y = self.apply(Q, adjoint=True)
        self.P, _, R = kr.orth_qr(Y, self.V[:, : j + b], self.gen, self.anorm)
        self.j = j + b
        return R

    def ritz(self, R: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """SVD of ``B`` on the host (descending) and residual norms ``||R X[-b:]||``."""
        j, b = self.j, R.shape[0]
        dt = torch.complex128 if self.B.is_complex() else torch.float64
        X, s, Yh = torch.linalg.svd(self.B[:j, :j].detach().to("cpu", dt))
        res = torch.linalg.vector_norm(R.detach().to("cpu", dt) @ X[-b:], dim=0)
        return X, s, Yh.mH, res

    def restart(
        self, X: torch.Tensor, s: torch.Tensor, Y: torch.Tensor, keep: torch.Tensor
    ) -> None:
        j, p = self.j, keep.numel()
        self.V[:, :p] = self.V[:, :j] @ Y[:, keep].to(self.V)
        self.U[:, :p] = self.U[:, :j] @ X[:, keep].to(self.U)
        self.B.zero_()
        self.B[:p, :p] = torch.diag(s[keep]).to(self.B)
        self.j = p

    def run(self, k: int, which: str, tol: float, maxiter: int, kind: str) -> SVDSResult:
        b = self.P.shape[1]
        for it in range(maxiter + 1):
            while self.j + b <= self.ncv:
                X, s, Y, res = self.ritz(self.step())
                self.anorm = max(self.anorm, float(s[0]))
                if self.j >= k and bool((res[_select(s, k, which)] <= tol * self.anorm).all()):
                    return self.finish(X, s, Y, res, _select(s, k, which), True, kind)
            if it < maxiter:
                keep_n = max(min(k + (self.j - k) // 2, self.ncv - b), 1)
                self.restart(X, s, Y, _select(s, keep_n, which))
        want = _select(s, k, which)
        result = self.finish(X, s, Y, res, want, False, kind)
        k_ok = int((res[want] <= tol * self.anorm).sum())
        raise SVDSNoConvergence(
            f"svds did not converge: {maxiter} restarts ({self.nmv} products), {k_ok}/{k} "
            f"converged to tol={tol:.3g}",
            result,
        )

    def finish(self, X, s, Y, res, want, converged, kind) -> SVDSResult:
        j = self.j
        u = self.U[:, :j] @ X[:, want].to(self.U)
        v = self.V[:, :j] @ Y[:, want].to(self.V)
        if self.flip:
            u, v = v, u
        rdt = self.V.real.dtype
        sv = s[want].to(device=self.V.device, dtype=rdt)
        r = res[want].to(device=self.V.device, dtype=rdt)
        out = (kr.to_output(t, kind) for t in (sv, u, v, r))
        return SVDSResult(*out, num_matvecs=self.nmv, converged=converged)


def _select(s: torch.Tensor, k: int, which: str) -> torch.Tensor:
    """Indices (into descending ``s``) of the ``k`` wanted values, in descending order."""
    k = min(k, s.numel())
    return torch.arange(k) if which == "LM" else torch.arange(s.numel() - k, s.numel())


def _fit_ncv(ncv: int, short: int, k: int, b: int) -> int:
    if ncv < short or short % b:
        ncv = min(ncv, short - b)
    if ncv < k or ncv < b:
        raise ValueError(
            f"ncv: a basis of {ncv} vectors cannot hold k={k} triplets and blocks of "
            f"block_size={b} for min(m, n)={short}; lower k or block_size"
        )
    return ncv
