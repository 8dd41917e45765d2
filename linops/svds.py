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

import warnings
from typing import Any, NamedTuple

import torch

from linops import _krylov as kr
from linops._certify import carry, recombine
from linops._checks import check_positive_number
from linops._types import ArrayLike, ArrayOut, OperatorLike
from linops.base import TorchLinearOperator

__all__ = ["SVDSNoConvergence", "SVDSResult", "svds"]


class SVDSResult(NamedTuple):
    r"""Singular triplets from :func:`svds`, singular values in descending order.

    Attributes
    ----------
    singular_values
        ``(k,)``, descending.
    left_vectors
        ``(m, k)`` orthonormal, :math:`A v_i = \sigma_i u_i`.
    right_vectors
        ``(n, k)`` orthonormal.
    residuals
        ``(k,)`` true residuals :math:`(\|A v_i - \sigma_i u_i\|^2 + \|A^H u_i - \sigma_i
        v_i\|^2)^{1/2}` of the vectors returned, or upper bounds of them: from the products
        already taken, recombined, plus a bound on the recombinations' rounding, or, where
        that bound cannot certify ``rtol``, from two block products at the end.
    num_matvecs
        Products with :math:`A` plus products with :math:`A^H` (vectors), a final check
        included when one was needed.
    converged
        Whether every true residual is at most ``rtol * ||A||``.
    """

    singular_values: ArrayOut
    left_vectors: ArrayOut
    right_vectors: ArrayOut
    residuals: ArrayOut
    num_matvecs: int
    converged: bool


class _Triplets(NamedTuple):
    """Ritz triplets with residuals, and ``A v``, ``A^H u`` with bounds on their drift."""

    u: torch.Tensor
    v: torch.Tensor
    sv: torch.Tensor
    res: torch.Tensor
    Av: torch.Tensor
    Ahu: torch.Tensor
    e_Av: torch.Tensor
    e_Ahu: torch.Tensor


class SVDSNoConvergence(RuntimeError):
    """Raised when :func:`svds` hits ``maxiter``; ``.result`` holds the partial result."""

    def __init__(self, message: str, result: SVDSResult) -> None:
        super().__init__(message)
        self.result = result


def svds(
    A: OperatorLike,
    k: int = 6,
    which: str = "LM",
    *,
    rtol: float | None = None,
    maxiter: int | None = None,
    ncv: int | None = None,
    block_size: int = 1,
    v0: ArrayLike | None = None,
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
    rtol
        Triplet ``i`` has converged when :math:`\|A^H u_i - \sigma_i v_i\| \le
        \mathrm{rtol}\,\sigma_{\max}`. Default ``sqrt(eps)`` of the dtype.
    maxiter
        Largest number of restarts (default ``10 min(m, n)``).
    ncv
        Basis size (default ``min(min(m, n), max(2k + 1, k + 30))``).
    block_size
        Vectors per block (``>= m`` resolves singular values of multiplicity ``m``). With a
        smaller block, repeated converged values start rounds that lock the verified triplets
        and restart from a fresh random vector until no further copy appears (as
        :func:`linops.lanczos`). A value seen once is not searched: with ``"SM"`` a 0 (a null
        space) may hide further copies, and a ``RuntimeWarning`` says so.
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
        If not all ``k`` true residuals reach ``rtol ||A||`` within ``maxiter`` restarts, if
        ``rtol`` is below what the dtype reaches (the message names the reachable tolerance),
        or if repeated values leave no room in the basis to search for missing copies
        (carries ``.result``).

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
    tol = (
        torch.finfo(op.torch_dtype).eps ** 0.5
        if rtol is None
        else check_positive_number(rtol, "rtol")
    )
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
        kw: dict[str, Any] = {"dtype": op.torch_dtype, "device": op.device}
        # column-major bases (each vector contiguous; see linops.lanczos._Lanczos)
        self.V, self.U = torch.empty(ncv, n, **kw).T, torch.empty(ncv, long, **kw).T
        #: the products already taken, ``A V`` and ``A^H U``, so that the residuals of Ritz
        #: triplets cost no new product (:mod:`linops._certify`), with per-column bounds on
        #: their drift from recombining them, relative to ``||A||``
        self.AV, self.AhU = torch.empty(ncv, long, **kw).T, torch.empty(ncv, n, **kw).T
        self.e_AV = torch.zeros(ncv, dtype=torch.float64)
        self.e_AhU = torch.zeros(ncv, dtype=torch.float64)
        self.B = torch.zeros(ncv, ncv, **kw)
        self.j, self.nmv, self.anorm, self.ncv = 0, 0, 0.0, ncv
        self.broke = False  # an exact breakdown happened (see kr.completeness)

    def apply(self, X: torch.Tensor, adjoint: bool) -> torch.Tensor:
        W = self.op._apply(X, adjoint != self.flip)
        self.nmv += X.shape[1]
        kr.check_products(W, self.nmv)
        return W

    def step(self) -> torch.Tensor:
        """One block step; returns ``R`` of the new pending block."""
        j, b, P = self.j, self.P.shape[1], self.P
        X = self.apply(P, adjoint=False)
        self.anorm = max(self.anorm, float(kr.column_norms(X).max()))
        broke: list[bool] = []  # an exact breakdown on either side (orth_qr's replacement)
        Q, C, Ru = kr.orth_qr(X, self.U[:, :j], self.gen, self.anorm, lambda: broke.append(True))
        self.V[:, j : j + b], self.U[:, j : j + b] = P, Q
        self.B[:j, j : j + b], self.B[j : j + b, j : j + b] = C, Ru
        Y = self.apply(Q, adjoint=True)
        self.AV[:, j : j + b], self.AhU[:, j : j + b] = X, Y
        self.e_AV[j : j + b], self.e_AhU[j : j + b] = 0.0, 0.0
        self.P, _, R = kr.orth_qr(
            Y, self.V[:, : j + b], self.gen, self.anorm, lambda: broke.append(True)
        )
        if broke and j + 2 * b <= min(self.op.shape):  # a complement to search remains
            self.broke = True
        self.j = j + b
        return R

    def ritz(self, R: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """SVD of ``B`` on the host (descending) and residual norms ``||R X[-b:]||``."""
        j, b = self.j, R.shape[0]
        dt = torch.complex128 if self.B.is_complex() else torch.float64
        X, s, Yh = torch.linalg.svd(self.B[:j, :j].detach().to("cpu", dt))
        res = kr.column_norms(R.detach().to("cpu", dt) @ X[-b:])
        return X, s, Yh.mH, res

    def restart(
        self, X: torch.Tensor, s: torch.Tensor, Y: torch.Tensor, keep: torch.Tensor
    ) -> None:
        j, p = self.j, keep.numel()
        Yk, Xk = Y[:, keep], X[:, keep]
        rv = recombine(self.V[:, :j], self.AV[:, :j], Yk, Yk, inplace=True)
        ru = recombine(self.U[:, :j], self.AhU[:, :j], Xk, Xk, inplace=True)
        e_AV = carry(self.e_AV[:j], Yk) + rv.d_AY / self._anorm() + rv.d_Y
        self.e_AhU[:p] = carry(self.e_AhU[:j], Xk) + ru.d_AY / self._anorm() + ru.d_Y
        self.e_AV[:p] = e_AV
        self.B.zero_()
        self.B[:p, :p] = torch.diag(s[keep]).to(self.B)
        self.j = p

    def _anorm(self) -> float:
        return max(self.anorm, float.fromhex("0x1p-1000"))

    def lock_and_inject(self, t: _Triplets) -> None:
        """Restart from the verified triplets alone plus a fresh random right block.

        Their coupling to the old pending block is below ``rtol ||A||`` and is dropped
        (locking); the fresh block, orthogonal to ``v``, sees copies of repeated singular
        values that the single-vector Krylov space lacked.
        """
        p = t.sv.numel()
        self.V[:, :p], self.U[:, :p] = t.v, t.u
        self.AV[:, :p], self.AhU[:, :p] = t.Av, t.Ahu
        self.e_AV[:p], self.e_AhU[:p] = t.e_Av, t.e_Ahu
        self.B.zero_()
        self.B[:p, :p] = torch.diag(t.sv).to(self.B)
        self.j = p
        X = kr.random_block(t.v.shape[0], self.P.shape[1], self.op, self.gen)
        self.P, _, _ = kr.orth_qr(X, t.v, self.gen, 1.0)

    def true_residuals(
        self, X, s, Y, want, tol: float, verifier: kr.Verifier | None = None, est_max: float = 0.0
    ) -> _Triplets | None:
        r"""Return ``u, v, sigma`` of ``want`` and their true residuals.

        The residuals are :math:`\sqrt{\|Av - \sigma u\|^2 + \|A^H u - \sigma v\|^2}` of
        the vectors and values returned. First from the products already taken, ``A v =
        (A V) y`` and ``A^H u = (A^H U) x``, with the rounding of those recombinations bounded
        (:mod:`linops._certify`): if the residuals plus those bounds are within
        ``tol ||A||`` no product is needed; otherwise from two block products (counted),
        unless ``verifier`` prefers a few more steps (:meth:`linops._krylov.Verifier.defer`;
        ``None`` is returned then).
        """
        j = self.j
        Xw, Yw = X[:, want], Y[:, want]
        sv = s[want].to(device=self.V.device, dtype=self.V.real.dtype)
        ru = recombine(self.U[:, :j], self.AV[:, :j], Xw, Yw, sv)  # u and (A V) y
        rv = recombine(self.V[:, :j], self.AhU[:, :j], Yw, Xw, sv)  # v and (A^H U) x
        anorm = self._anorm()
        e_Av = carry(self.e_AV[:j], Yw) + ru.d_AY / anorm + rv.d_Y  # ||(AV)y - A v|| / ||A||
        e_Ahu = carry(self.e_AhU[:j], Xw) + rv.d_AY / anorm + ru.d_Y
        bound = torch.hypot(ru.residual + e_Av * anorm, rv.residual + e_Ahu * anorm)
        u, v = ru.Y, rv.Y
        if bool((bound <= tol * self.anorm).all()):
            res = bound.to(device=v.device, dtype=sv.dtype)
            return _Triplets(u, v, sv, res, ru.AY, rv.AY, e_Av, e_Ahu)
        plain = torch.hypot(ru.residual, rv.residual)
        if verifier is not None and verifier.defer(
            float(plain.max()), float((bound - plain).max()), est_max, anorm, self.nmv, 2 * len(sv)
        ):
            return None
        Av, Ahu = self.apply(v, adjoint=False), self.apply(u, adjoint=True)
        r1, r2 = kr.residual_norms(Av, u, sv), kr.residual_norms(Ahu, v, sv)
        zero = torch.zeros_like(e_Av)
        return _Triplets(u, v, sv, torch.hypot(r1, r2).to(sv.dtype), Av, Ahu, zero, zero)

    def run(self, k: int, which: str, tol: float, maxiter: int, kind: str) -> SVDSResult:
        b = self.P.shape[1]
        self.verifier = kr.Verifier(tol, self.op.torch_dtype)
        self.rounds, self.k_eff = 0, k
        self.locked: torch.Tensor | None = None
        for it in range(maxiter + 1):
            while self.j + b <= self.ncv:
                X, s, Y, est = self.ritz(self.step())
                self.anorm = max(self.anorm, float(s[0]))
                done = self.end_game(X, s, Y, est, k, which, tol, kind)
                if done is not None:
                    return done
            if it < maxiter:
                want = _select(s, k, which)
                nconv = int((est[want] <= tol * self.anorm).sum())
                if self.verifier.stalled(float(est[want].max()), self.anorm):
                    self.verifier.level = float("inf")  # check the true residuals next step
                self.restart(X, s, Y, _select(s, kr.keep_count(k, nconv, self.ncv, b), which))
        t = self.true_residuals(X, s, Y, _select(s, k, which), tol)
        assert t is not None  # without a verifier there is no deferral
        u, v, sv, res = t.u, t.v, t.sv, t.res
        k_ok = int((res <= tol * self.anorm).sum())
        raise SVDSNoConvergence(
            f"svds did not converge: {maxiter} restarts ({self.nmv} products), {k_ok}/{k} "
            f"converged to rtol={tol:.3g} (true residuals)",
            self.finish(u, v, sv, res, False, kind),
        )

    def end_game(self, X, s, Y, est, k, which, tol, kind) -> SVDSResult | None:
        """Compute the true residuals once the estimates allow, then the search for missing copies."""
        if self.j < self.k_eff:
            return None
        est_max = float(est[_select(s, self.k_eff, which)].max())
        if not self.verifier.due(est_max, self.anorm):
            return None
        t = self.true_residuals(X, s, Y, _select(s, k, which), tol, self.verifier, est_max)
        if t is None:  # iterate on: cheaper than the check's products
            return None
        u, v, sv, res = t.u, t.v, t.sv, t.res
        verdict = self.verifier.judge(float(res.max()), est_max, self.anorm)
        dt, short, b = self.op.torch_dtype, self.V.shape[0], self.P.shape[1]
        if verdict == "floor":
            msg = self.verifier.floor_message(
                "svds", dt, float(res.max()), est_max, self.anorm, self.nmv
            )
            raise SVDSNoConvergence(msg, self.finish(u, v, sv, res, False, kind))
        if verdict == "continue":
            return None
        if k == short:  # all singular values: none can be missing
            return self.finish(u, v, sv, res, True, kind)
        room = k + 1 <= min(self.ncv - b, short - b)
        todo = kr.completeness(
            sv, self.locked, tol, self.anorm, dt, self.rounds, k, room, self.broke
        )
        if todo == "done":
            if which == "SM" and k >= 2 and b < k and kr.holds_zero(sv, tol, self.anorm, dt):
                warnings.warn(
                    "svds: the smallest singular value found is 0 to rounding (a null space, "
                    "which one start vector sees once): further copies of 0 may be missing "
                    "from the k returned; count them with linops.numerical_rank, or pass "
                    "block_size >= the null space's dimension",
                    RuntimeWarning,
                    stacklevel=3,
                )
            return self.finish(u, v, sv, res, True, kind)
        if todo != "inject":
            raise SVDSNoConvergence(f"svds: {todo}", self.finish(u, v, sv, res, False, kind))
        self.lock_and_inject(t)
        self.rounds, self.k_eff, self.locked = self.rounds + 1, k + 1, sv.cpu()
        return None

    def finish(self, u, v, sv, res, converged, kind) -> SVDSResult:
        if self.flip:
            u, v = v, u
        s_, u_, v_, r_ = (kr.to_output(t, kind) for t in (sv, u, v, res))
        return SVDSResult(s_, u_, v_, r_, num_matvecs=self.nmv, converged=converged)


def _select(s: torch.Tensor, k: int, which: str) -> torch.Tensor:
    """Return the indices (into descending ``s``) of the ``k`` wanted values, in descending order."""
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
