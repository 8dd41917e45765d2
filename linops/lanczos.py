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
relation above still holds and nothing is recomputed. The number kept grows with the number
of converged wanted pairs as in ARPACK (``k + min(nconv, (ncv - k) / 2)``, Lehoucq, Sorensen
and Yang 1998, ``dsaup2``). Convergence is declared only from true residuals (see
:class:`linops._krylov.Verifier`).
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import torch

from linops import _krylov as kr
from linops._backend import ArrayKind
from linops._certify import Recombination, carry, recombine
from linops._checks import check_positive_number, check_square
from linops._disk_basis import DiskColumns
from linops._types import ArrayLike, ArrayOut, OperatorLike
from linops.base import TorchLinearOperator
from linops.memory import check_memory_budget, default_memory_budget

__all__ = ["LanczosNoConvergence", "LanczosResult", "lanczos"]

_WHICH = ("LA", "SA", "LM", "BE")
_PROBES = 2  # random vectors added to the first product for the symmetry check


class LanczosResult(NamedTuple):
    r"""Eigenpairs from :func:`lanczos`, eigenvalues in ascending algebraic order.

    Attributes
    ----------
    eigenvalues
        ``(k,)`` Ritz values, ascending.
    eigenvectors
        ``(n, k)`` orthonormal Ritz vectors, column ``i`` belongs to ``eigenvalues[i]``;
        ``None`` with ``return_eigenvectors=False``.
    residuals
        ``(k,)`` true residual norms :math:`\|A v_i - \lambda_i v_i\|` of the vectors and
        values returned (never the Krylov estimates), or upper bounds of them: from the
        products already taken, recombined, plus a bound on the recombinations' rounding
        (:mod:`linops._certify`), or, where that bound cannot certify ``rtol``, from one
        block product at the end.
    num_matvecs
        Number of operator-vector products used (a block of ``b`` vectors counts ``b``),
        including the symmetry probe (two vectors with the first block, none for an operator
        that declares ``is_symmetric``) and the final true-residual check when one was needed.
    converged
        Whether every true residual is at most ``rtol * ||A||``.
    """

    eigenvalues: ArrayOut
    eigenvectors: ArrayOut | None
    residuals: ArrayOut
    num_matvecs: int
    converged: bool


class LanczosNoConvergence(RuntimeError):
    """Raised when :func:`lanczos` hits ``maxiter``; ``.result`` holds the partial result."""

    def __init__(self, message: str, result: LanczosResult) -> None:
        super().__init__(message)
        self.result = result


def lanczos(
    A: OperatorLike,
    k: int = 6,
    which: str = "LA",
    *,
    rtol: float | None = None,
    maxiter: int | None = None,
    ncv: int | None = None,
    block_size: int = 1,
    v0: ArrayLike | None = None,
    seed: int | torch.Generator | None = None,
    memory_budget: int | None = None,
    basis_dir: str | os.PathLike[str] | None = None,
    return_eigenvectors: bool = True,
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
    rtol
        Relative tolerance: pair ``i`` has converged when
        :math:`\|A v_i - \theta_i v_i\| \le \mathrm{rtol}\,\|A\|`, with :math:`\|A\|` estimated by
        the largest :math:`|\theta|` seen. Default ``sqrt(eps)`` of the operator's dtype.
    maxiter
        Largest number of restarts (default ``10 n``, as ARPACK).
    ncv
        Basis size (default ``min(n, max(2k + 1, k + 30))`` rounded to whole blocks).
    block_size
        Vectors per block. A single vector (the default) finds each distinct eigenvalue once
        in exact arithmetic; ``block_size >= m`` resolves eigenvalues of multiplicity ``m``.
        When the converged wanted values contain repeated (clustered) values, the verified
        pairs are locked and the iteration restarts from a fresh random vector orthogonal to
        them, round after round, until a round finds no further copy; so every copy of a
        repeated value is returned once at least two copies have shown up, or, for
        ``"SA"`` with ``k >= 2``, once the smallest value is 0 to ``max(rtol, sqrt(eps)) ||A||``,
        the null space of a PSD curvature (``lanczos(G, 4, "SA")`` on a GGN with a null space
        returned one 0 and the next three values, all verified eigenpairs). A value repeated
        elsewhere (or at the bottom with ``"BE"``) and seen once is not searched: pass
        ``block_size`` >= its multiplicity.
    v0
        Start vector ``(n,)`` or block ``(n, block_size)``; default Gaussian.
    seed
        Seed (or ``torch.Generator``) for the random start and breakdown restarts.
    memory_budget
        Bytes the basis and the stored products may take (default:
        :func:`linops.memory.default_memory_budget` of the operator's device, a fraction of
        its free memory). The basis ``V`` is ``n x ncv``; by default the products ``A V`` are
        kept too, so that true residuals cost no new product. When both do not fit, ``A V``
        is not kept: every true-residual check then applies ``A`` to the Ritz vectors one at
        a time (two vectors beyond the basis; more products, at most half the memory). When
        not even the basis fits, a default ``ncv`` shrinks to what does (at least ``k + 1``
        vectors) and an explicit one is refused with the largest that fits. With
        ``basis_dir`` the budget bounds what stays in memory: the pending block, its
        product and two vectors of the residual check.
    basis_dir
        Directory for an out-of-core basis (:class:`linops._disk_basis.DiskColumns`): ``V``
        is written to a temporary file there (already unlinked, its ``n ncv`` entries
        reserved up front) and read back by chunks of rows for every projection, restart
        and Ritz vector, so a basis larger than memory costs file reads instead. The
        iteration is the same (true residuals by one product per Ritz vector, as without
        ``A V``); rounding differs from the in-memory basis only in the order of the
        projections' sums. Each step reads the basis three times: worth it when the
        operator's product costs more than that, as for a large model's Hessian.
    return_eigenvectors
        ``False`` returns eigenvalues and residuals only (``eigenvectors`` is ``None``): no
        ``n x k`` block of Ritz vectors is built at the end. Same eigenvalues, same
        products.

    Returns
    -------
    LanczosResult
        Torch tensors on the operator's device for torch input, numpy arrays otherwise.

    Raises
    ------
    ValueError
        For a non-square or non-symmetric operator (checked once with a random probe,
        :math:`\\langle Ax, y\\rangle` against :math:`\\langle x, Ay\\rangle`, unless the operator
        declares ``is_symmetric``, as linops' Hessian, GGN and Fisher operators do), ``k`` out
        of range, an unknown ``which``, or a zero ``v0``.
    FloatingPointError
        If the operator returns NaN or inf.
    LanczosNoConvergence
        If not all ``k`` true residuals reach ``rtol ||A||`` within ``maxiter`` restarts, if
        ``rtol`` is below what the dtype reaches (the true residuals stagnate above ``rtol``
        while the Krylov estimates keep falling; the message names the reachable
        tolerance), or if repeated values leave no room in the basis to search for missing
        copies. ``.result`` carries the partial result with its true residuals.

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
    n = check_square(op.shape, nonempty=True)
    b = kr.check_int(block_size, "block_size", 1, n)
    k = kr.check_int(k, "k", 1, n)
    if which == "SM":
        raise ValueError(
            f"which: expected one of {_WHICH}, got 'SM'; for the eigenvalues nearest -d, "
            "shift and invert: lanczos(linops.inverse(A, damping=d, method='minres'), k, 'LM') "
            "has the eigenvalues 1 / (lambda + d)"
        )
    kr.check_which(which, _WHICH)
    budget = check_memory_budget(memory_budget) or default_memory_budget(op.device)
    given = ncv is not None
    ncv = _default_ncv(n, k, b) if ncv is None else kr.check_int(ncv, "ncv", min(n, k + 1), n)
    if basis_dir is None:
        ncv, keep_products = _fit_budget(ncv, n, k, b, op.torch_dtype.itemsize, budget, given)
    else:  # A V is not kept: it would be a second file to read back
        _check_disk_budget(n, b, op.torch_dtype.itemsize, budget)
        keep_products = False
    ncv = _fit_ncv(ncv, n, k, b)
    maxiter = 10 * n if maxiter is None else kr.check_int(maxiter, "maxiter", 1)
    eps = torch.finfo(op.torch_dtype).eps
    tol = eps**0.5 if rtol is None else check_positive_number(rtol, "rtol")
    gen = kr.make_generator(seed, op.device)
    P = kr.start_block(v0, n, b, op, gen)
    state = _Lanczos(op, P, ncv, gen, keep_products, basis_dir)
    try:
        return _thick_restart(state, kind, k, which, tol, maxiter, return_eigenvectors)
    finally:
        state.close()


class _Lanczos:
    """State of the thick-restart iteration: basis ``V``, projection ``H``, pending block ``P``."""

    def __init__(
        self,
        op: TorchLinearOperator,
        P: torch.Tensor,
        ncv: int,
        gen: torch.Generator,
        keep_products: bool = True,
        basis_dir: str | os.PathLike[str] | None = None,
    ):
        n, b = P.shape
        kw: dict[str, Any] = {"dtype": op.torch_dtype, "device": op.device}
        self.op, self.P, self.gen, self.ncv, self.b, self.n = op, P, gen, ncv, b, n
        self.dtype, self.device = op.torch_dtype, op.device
        # column-major (each basis vector contiguous): the projections against V[:, :j]
        # then need no copy of the slice, and writing a column touches only its own memory
        self.V: torch.Tensor | DiskColumns = (
            torch.empty(ncv, n, **kw).T
            if basis_dir is None
            else DiskColumns(n, ncv, op.torch_dtype, op.device, basis_dir)
        )
        self.H = torch.zeros(ncv, ncv, **kw)
        #: ``A V``: the products already taken, so that true residuals of Ritz vectors
        #: ``V S`` cost no new product while the rounding of recombining them stays small;
        #: ``None`` when the memory budget holds the basis only
        self.AV: torch.Tensor | None = torch.empty(ncv, n, **kw).T if keep_products else None
        #: per column of ``AV``, a bound on ``||AV_i - A V_i|| / ||A||`` from recombining
        self.av_err = torch.zeros(ncv, dtype=torch.float64)
        self.j, self.nmv, self.anorm = 0, 0, 0.0
        self.broke = False  # an exact breakdown happened (see kr.completeness)
        self.first: torch.Tensor | None = None

    def close(self) -> None:
        if isinstance(self.V, DiskColumns):
            self.V.close()

    def _columns(self, j: int) -> kr.Basis:
        """Return the first ``j`` basis vectors."""
        return self.V[:, :j] if isinstance(self.V, torch.Tensor) else self.V.view(j)

    def _write(self, j: int, X: torch.Tensor) -> None:
        if isinstance(self.V, torch.Tensor):
            self.V[:, j : j + X.shape[1]] = X
        else:
            self.V.write(j, X)

    def _recombine_in_place(self, S: torch.Tensor) -> None:
        """``V[:, :p] = V[:, :j] S`` for ``S`` of shape ``(j, p)``, by chunks of rows."""
        j, p = S.shape
        if not isinstance(self.V, torch.Tensor):
            self.V.view(j).recombine_(S)
            return
        for lo in range(0, self.n, kr.CHUNK_ROWS):
            rows = self.V[lo : lo + kr.CHUNK_ROWS]
            rows[:, :p] = rows[:, :j] @ S.to(rows)

    def probe(self) -> None:
        """First product together with the symmetry probe: ``A [P, Z]`` for two more vectors.

        An operator that declares ``is_symmetric`` is trusted (no probe, see
        :func:`linops._krylov.check_symmetric`); its first product is taken by :meth:`step`.
        """
        if kr.trusted_symmetric(self.op):
            return
        Z = torch.cat([self.P, kr.probe_block(self.op, _PROBES)], dim=1)
        AZ = self.op._apply(Z)
        self.nmv += Z.shape[1]
        kr.check_products(AZ, self.nmv)
        kr.raise_if_not_symmetric(Z, AZ)
        self.first = AZ[:, : self.b]

    def step(self) -> torch.Tensor:
        """Apply ``A`` to the pending block, orthogonalise it twice; returns its ``R``."""
        j, b, P = self.j, self.b, self.P
        if self.first is not None:
            W, self.first = self.first, None
        else:
            W = self.op._apply(P)
            self.nmv += b
            kr.check_products(W, self.nmv)
        self._write(j, P)
        if self.AV is not None:
            self.AV[:, j : j + b] = W
        self.av_err[j : j + b] = 0.0
        # a scale for the tolerances only: the plain norm (1e-5 relative in float32) will do,
        # unless its squares overflow (entries of 1e155 in float64, 1e19 in float32: an inf
        # scale accepted inf residuals as converged)
        self.anorm = max(self.anorm, kr.safe_max_norm(W))
        self.P, C, R = kr.orth_qr(W, self._columns(j + b), self.gen, self.anorm, self._broke)
        H = self.H
        H[: j + b, j : j + b] = C
        H[j : j + b, :j] = C[:j].mH
        H[j : j + b, j : j + b] = (C[j:] + C[j:].mH) / 2
        self.j = j + b
        return R

    def _broke(self) -> None:
        """Record an exact breakdown: orth_qr went on in a random direction (see _Check)."""
        self.broke = True

    def restart(self, S: torch.Tensor, theta: torch.Tensor, keep: torch.Tensor) -> None:
        """Keep the Ritz vectors ``V S[:, keep]``: ``H`` becomes diagonal, ``P`` stays."""
        p, j = keep.numel(), self.j
        Sk = S[:, keep]
        if self.AV is None:  # no products to certify: the basis alone, in place
            self._recombine_in_place(Sk)
        else:
            assert isinstance(self.V, torch.Tensor)  # A V is kept with a basis in memory
            err = self._drift(Sk, recombine(self.V[:, :j], self.AV[:, :j], Sk, Sk, inplace=True))
            self.av_err[:p] = err
        self.H.zero_()
        self.H[:p, :p] = torch.diag(theta[keep]).to(self.H)
        self.j = p

    def ritz_vectors(self, Sw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r"""``Y = V S_w`` in the working dtype and an a priori bound on its rounding.

        :math:`|\mathrm{fl}(V s) - V s| \le \gamma_j |V||s|` entrywise (Higham, *Accuracy
        and Stability of Numerical Algorithms*, 2002, section 3.5), so the error of column
        ``s`` is at most :math:`\gamma_j \sum_i |s_i| \|v_i\|`, with
        :math:`\|v_i\| \le 1.01` for the orthonormal basis. One pass over ``V``, no wider
        copy of it.
        """
        j = self.j
        V = self._columns(j)
        Y = V @ Sw.to(V) if isinstance(V, torch.Tensor) else V.combine(Sw)
        u = torch.finfo(self.dtype).eps / 2
        gamma = j * u / (1 - j * u)
        return Y, gamma * 1.01 * Sw.detach().abs().double().sum(dim=0).cpu()

    def _drift(self, Sk: torch.Tensor, rc: Recombination) -> torch.Tensor:
        """Bound on ``||(A V) s - A (V s)|| / ||A||`` of the recombined columns ``s`` of ``Sk``.

        The columns' own bounds carried (:func:`linops._certify.carry`) plus the rounding of
        ``(A V) s`` and of ``V s`` (times ``||A||``), measured in single precision
        (:func:`linops._certify.recombine`).
        """
        anorm = max(self.anorm, float.fromhex("0x1p-1000"))
        return carry(self.av_err[: self.j], Sk) + rc.d_AY / anorm + rc.d_Y

    def lock_and_inject(
        self, Y: torch.Tensor, AY: torch.Tensor, vals: torch.Tensor, err: torch.Tensor
    ) -> None:
        """Restart from the verified pairs ``(vals, Y)`` alone plus a fresh random vector.

        Their coupling to the old pending block is at most ``rtol ||A||`` (they have converged)
        and is dropped (locking, Stewart 2001 section 3); the new block, orthogonal to ``Y``,
        starts a Krylov space that sees the copies of repeated eigenvalues ``Y`` lacks.
        """
        p = Y.shape[1]
        self._write(0, Y)
        if self.AV is not None:
            self.AV[:, :p] = AY
        self.av_err[:p] = err
        self._inject(vals)

    def lock_in_place(self, Sw: torch.Tensor, vals: torch.Tensor) -> None:
        """:meth:`lock_and_inject` for a basis without ``A V``: ``V S_w`` recombined in place."""
        self._recombine_in_place(Sw)
        self.av_err[: Sw.shape[1]] = 0.0
        self._inject(vals)

    def _inject(self, vals: torch.Tensor) -> None:
        p = vals.numel()
        self.H.zero_()
        self.H[:p, :p] = torch.diag(vals).to(self.H)
        self.j = p
        X = kr.random_block(self.n, self.b, self.op, self.gen)
        self.P, _, _ = kr.orth_qr(X, self._columns(p), self.gen, 1.0)

    def true_residuals(
        self,
        S: torch.Tensor,
        theta: torch.Tensor,
        want: torch.Tensor,
        tol: float,
        verifier: kr.Verifier | None = None,
        est_max: float = 0.0,
    ):
        """Ritz vectors ``Y`` of ``want``, their ``A Y`` and ``||A y_i - theta_i y_i||``.

        The residuals are true ones, of the vectors and values returned, never the Lanczos
        recurrence's estimates. First ``A Y`` is taken as ``(A V) S``, the products already
        taken recombined: linear in the vectors, so exact but for the rounding of the
        recombinations, bounded column by column through every restart (:meth:`_drift`,
        :mod:`linops._certify`). If the residuals so computed plus that bound are within
        ``tol ||A||`` they are accepted without a new product; otherwise ``A Y`` is
        recomputed by one block product (counted in ``num_matvecs``), unless ``verifier``
        prefers a few more steps (:meth:`linops._krylov.Verifier.defer`; ``None`` is returned
        then). Also returns the bound on ``A Y``'s error relative to ``||A||`` (zero after a
        product).
        """
        Sw = S[:, want]
        vals = theta[want].to(device=self.device, dtype=self.dtype.to_real())
        if self.AV is None:
            return self._residuals_by_products(Sw, vals)
        assert isinstance(self.V, torch.Tensor)  # A V is kept with a basis in memory
        rc = recombine(self.V[:, : self.j], self.AV[:, : self.j], Sw, Sw, vals)
        err = self._drift(Sw, rc)
        bound = rc.residual + err * self.anorm  # an upper bound of the true residuals
        Y, AY = rc.Y, rc.AY
        if bool((bound <= tol * self.anorm).all()) and bool(torch.isfinite(bound).all()):
            return Y, AY, vals, bound.to(device=Y.device, dtype=vals.dtype), err
        rounding = float((bound - rc.residual).max())
        if verifier is not None and verifier.defer(
            float(rc.residual.max()), rounding, est_max, self.anorm, self.nmv, Y.shape[1]
        ):
            return None
        AY = self.op._apply(Y)
        self.nmv += Y.shape[1]
        kr.check_products(AY, self.nmv)
        res = kr.residual_norms(AY, Y, vals)
        return Y, AY, vals, res, torch.zeros_like(err)

    def _residuals_by_products(self, Sw: torch.Tensor, vals: torch.Tensor):
        """Compute true residuals without stored products, ``A y_i`` one Ritz vector at a time.

        The vectors are not kept (two vectors of memory beyond the basis); the ones returned
        are recomputed as ``V S_w`` (:meth:`ritz_vectors`), so each residual is bounded by
        the one measured plus ``||A||`` times the rounding of both recombinations. Returns
        ``(None, None, vals, residual bounds, zeros)``: ``Y`` is built only for a result.
        """
        res = torch.empty(Sw.shape[1], dtype=torch.float64)
        for i in range(Sw.shape[1]):
            y, d_y = self.ritz_vectors(Sw[:, i : i + 1])
            Ay = self.op._apply(y)
            self.nmv += 1
            kr.check_products(Ay, self.nmv)
            r = kr.residual_norms(Ay, y, vals[i : i + 1]).double().cpu()
            res[i] = r[0] + 2 * self.anorm * d_y[0]  # measured, plus both roundings
            del Ay, y
        zero = torch.zeros(Sw.shape[1], dtype=torch.float64)
        return None, None, vals, res.to(device=vals.device, dtype=vals.dtype), zero


def _thick_restart(
    state: _Lanczos, kind: ArrayKind, k: int, which: str, tol: float, maxiter: int, vectors: bool
) -> LanczosResult:
    b, ncv = state.b, state.ncv
    check = _Check(state, kind, k, which, tol, vectors)
    state.probe()
    for it in range(maxiter + 1):
        while state.j + b <= ncv:
            R = state.step()
            theta, S, est = _ritz(state.H[: state.j, : state.j], R)
            state.anorm = max(state.anorm, float(theta.abs().max()))
            done = check(theta, S, est)
            if done is not None:
                return done
        if it == maxiter:
            break
        est_want = est[_select(theta, k, which)]
        if check.verifier.stalled(float(est_want.max()), state.anorm):
            check.verifier.level = float("inf")  # check the true residuals at the next step
        nconv = int((est_want <= tol * state.anorm).sum())
        state.restart(S, theta, _select(theta, kr.keep_count(k, nconv, ncv, b), which))
    want = _select(theta, k, which)
    got = state.true_residuals(S, theta, want, tol)
    assert got is not None  # without a verifier there is no deferral
    Y, _, vals, res, _ = got
    k_ok = int((res <= tol * state.anorm).sum())
    raise LanczosNoConvergence(
        f"lanczos did not converge: {maxiter} restarts ({state.nmv} products), {k_ok}/{k} "
        f"converged to rtol={tol:.3g} (true residuals)",
        check.result(Y, S[:, want], vals, res, False),
    )


class _Check:
    """The end game: true residuals once the estimates allow, then the search for copies."""

    def __init__(
        self, state: _Lanczos, kind: ArrayKind, k: int, which: str, tol: float, vectors: bool
    ) -> None:
        self.state, self.kind, self.k, self.which, self.tol = state, kind, k, which, tol
        self.vectors = vectors
        self.verifier = kr.Verifier(tol, state.op.torch_dtype)
        self.rounds, self.k_eff, self.locked = 0, k, None

    def __call__(
        self, theta: torch.Tensor, S: torch.Tensor, est: torch.Tensor
    ) -> LanczosResult | None:
        """Return the result if the wanted pairs are verified and complete, else ``None``."""
        st, k = self.state, self.k
        if st.j < self.k_eff:
            return None
        est_max = float(est[_select(theta, self.k_eff, self.which)].max())
        if not self.verifier.due(est_max, st.anorm):
            return None
        want = _select(theta, k, self.which)
        got = st.true_residuals(S, theta, want, self.tol, self.verifier, est_max)
        if got is None:  # iterate on: cheaper than the check's product
            return None
        Y, AY, vals, res, err = got
        verdict = self.verifier.judge(float(res.max()), est_max, st.anorm)
        if verdict == "continue":
            return None
        Sw, dt = S[:, want], st.op.torch_dtype
        if verdict == "floor":
            msg = self.verifier.floor_message(
                "lanczos", dt, float(res.max()), est_max, st.anorm, st.nmv
            )
            raise LanczosNoConvergence(msg, self.result(Y, Sw, vals, res, False))
        n = st.n
        if k == n:  # the whole space: nothing can be missing
            return self.result(Y, Sw, vals, res, True)
        room = k + 1 <= min(st.ncv - st.b, n - st.b)
        # a null space is searched only where copies can change the answer: two or more
        # smallest values wanted ("BE" would give a search round's extra value to its top end)
        smallest = self.which == "SA" and k >= 2
        todo = kr.completeness(
            vals, self.locked, self.tol, st.anorm, dt, self.rounds, k, room, st.broke, smallest
        )
        if todo == "done":
            return self.result(Y, Sw, vals, res, True)
        if todo != "inject":
            raise LanczosNoConvergence(f"lanczos: {todo}", self.result(Y, Sw, vals, res, False))
        if Y is None:  # no stored products: the Ritz vectors are formed in the basis itself
            st.lock_in_place(Sw, vals)
        else:
            st.lock_and_inject(Y, AY, vals, err)
        self.rounds, self.k_eff, self.locked = self.rounds + 1, k + 1, vals.cpu()
        return None

    def result(self, Y, Sw, vals, res, converged: bool) -> LanczosResult:
        """Build the result; without stored products its Ritz vectors ``V S_w`` are formed here."""
        if not self.vectors:
            Y = None
        elif Y is None:
            Y = self.state.ritz_vectors(Sw)[0]
        w, r = kr.to_output(vals, self.kind), kr.to_output(res, self.kind)
        v = None if Y is None else kr.to_output(Y, self.kind)
        return LanczosResult(w, v, r, num_matvecs=self.state.nmv, converged=converged)


def _ritz(H: torch.Tensor, R: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ritz values (host, float64), vectors and residual norms ``||R S[-b:]||`` per column."""
    b = R.shape[0]
    Hh = H.detach().to("cpu", torch.complex128 if H.is_complex() else torch.float64)
    theta, S = torch.linalg.eigh((Hh + Hh.mH) / 2)
    res = kr.column_norms(R.detach().to(S).cpu() @ S[-b:])
    return theta, S, res


def _select(theta: torch.Tensor, k: int, which: str) -> torch.Tensor:
    """Return the indices (into ascending ``theta``) of the ``k`` wanted Ritz values."""
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


def _fit_budget(
    ncv: int, n: int, k: int, b: int, itemsize: int, budget: int, given: bool
) -> tuple[int, bool]:
    """Basis size and whether ``A V`` is kept, within ``budget`` bytes (see :func:`lanczos`).

    With ``A V``: ``2 ncv`` vectors plus the Ritz block and its image (``2 k``); without:
    ``ncv`` plus the pending block and two vectors of the residual check.
    """
    vec = n * itemsize
    if (2 * ncv + 2 * k) * vec <= budget:
        return ncv, True
    if (ncv + b + 2) * vec <= budget:
        return ncv, False
    fits = budget // vec - b - 2
    if not given and fits >= min(n, k + 1):
        return fits, False
    raise ValueError(
        f"memory_budget: a Lanczos basis of ncv={ncv} vectors of n={n} "
        f"({(ncv + b + 2) * vec / 2**30:.3g} GiB with the pending block and two work vectors) "
        f"exceeds the budget ({budget / 2**30:.3g} GiB); "
        + (
            f"the largest ncv that fits is {fits}"
            if fits >= min(n, k + 1)
            else f"not even k + 1 = {k + 1} vectors fit: raise memory_budget, lower k, or "
            "keep the basis on disk with basis_dir="
        )
    )


def _check_disk_budget(n: int, b: int, itemsize: int, budget: int) -> None:
    """Check room for the pending block, its product and two vectors (basis on disk)."""
    need = (2 * b + 2) * n * itemsize
    if need > budget:
        raise ValueError(
            f"memory_budget: with the basis on disk, the pending block, its product and two "
            f"work vectors of n={n} need {need / 2**30:.3g} GiB, more than the budget "
            f"({budget / 2**30:.3g} GiB); raise memory_budget or lower block_size"
        )


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
