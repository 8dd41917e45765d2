r"""Damped inverses as operators: products that solve :math:`(A + \lambda I) X = B`.

:func:`inverse` returns an :class:`InverseOperator` whose product with a block ``B`` of ``k``
right-hand sides runs one Krylov solve for all of them at once on the operator's device: each
iteration is a single block product with the columns that have not converged yet. Every
column :math:`j` must reach the stopping test of ``scipy.sparse.linalg.cg``,

.. math:: \|b_j - (A + \lambda I) x_j\| \le \max(\mathrm{rtol}\,\|b_j\|, \mathrm{atol}),

on its **true** residual, recomputed from one counted product at the end (a solver's
recursive residual drifts from the true one in finite precision). Columns whose true residual
is still too large are solved again for the correction from their residual (a restart); if a
restart no longer halves the true residual the tolerance is below what the dtype reaches and
:class:`InverseNoConvergence` says so, naming the reachable ``rtol``. The residuals reached are
on ``op.info`` after each product; no product ever returns an unconverged solve.

Solvers (``method``): ``"cg"``, preconditioned conjugate gradients (Hestenes & Stiefel 1952;
symmetric positive definite :math:`A + \lambda I`), as breakdown-free block CG (O'Leary 1980;
Ji & Li 2017) for a block of right-hand sides, or one CG per column; ``"minres"`` (Paige &
Saunders 1975; symmetric, possibly indefinite, e.g. a Hessian); ``"lsmr"`` (Fong & Saunders
2011, arXiv:1006.0758; any square :math:`A`, two products per iteration); ``"neumann"``, the
truncated Neumann series :math:`x = \alpha\sum_j (I - \alpha M^{-1}(A + \lambda I))^j
M^{-1} b` (Richardson iteration, step :math:`\alpha` from a Lanczos estimate of the largest
eigenvalue; for a PSD :math:`A`). The randomized Nyström preconditioner is in
:mod:`linops._nystrom_pc`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import torch

from linops import _krylov as kr
from linops._checks import check_damping
from linops._nystrom_pc import NystromPreconditioner, nystrom_preconditioner
from linops._solvers import SOLVERS, Apply, Solved, neumann_step
from linops._types import OperatorLike
from linops.base import TorchLinearOperator, aslinearoperator

__all__ = [
    "InverseNoConvergence",
    "InverseOperator",
    "InverseResult",
    "NystromPreconditioner",
    "inverse",
    "nystrom_preconditioner",
]

_METHODS = ("cg", "minres", "lsmr", "neumann")
_ROUNDS = 8  # restarts from the true residual before a non-halving one is called stagnation


class InverseResult(NamedTuple):
    r"""One product of an :class:`InverseOperator` (``op.info``) or a failed one (``err.result``).

    Attributes
    ----------
    x
        ``(n, k)`` solution block (``None`` on ``op.info``: the product returned it).
    residuals
        ``(k,)`` true residual norms :math:`\|b_j - (A + \lambda I)x_j\|`.
    tolerances
        ``(k,)`` :math:`\max(\mathrm{rtol}\|b_j\|, \mathrm{atol})`.
    num_matvecs
        Products with ``A`` (a block of ``b`` columns counts ``b``), restarts, the true
        residuals and the symmetry probe included (a Nyström preconditioner's sketch is
        counted on the preconditioner).
    iterations
        Solver iterations, summed over restarts.
    converged
        Whether every residual is within its tolerance.
    """

    x: torch.Tensor | None
    residuals: torch.Tensor
    tolerances: torch.Tensor
    num_matvecs: int
    iterations: int
    converged: bool


class InverseNoConvergence(RuntimeError):
    """A solve missed its tolerance.

    ``.result`` (an :class:`InverseResult`) holds the partial solution and the residuals it
    reached.
    """

    def __init__(self, message: str, result: InverseResult) -> None:
        super().__init__(message)
        self.result = result


class InverseOperator(TorchLinearOperator):
    r""":math:`(A + \lambda I)^{-1}` as an operator (see :func:`inverse`).

    Attributes
    ----------
    info
        :class:`InverseResult` of the last product (``None`` before the first).
    num_matvecs
        Products with ``A`` over all products of this operator.
    preconditioner
        The preconditioner in use (a Nyström one is built at the first product).
    """

    def __init__(
        self,
        A: TorchLinearOperator,
        damping: float,
        method: str,
        rtol: float | None,
        atol: float,
        maxiter: int | None,
        preconditioner: TorchLinearOperator | Literal["nystrom"] | None,
        seed: int | torch.Generator | None,
        block: bool | None = None,
    ) -> None:
        super().__init__(A.shape, dtype=A.torch_dtype, device=A.device)
        self.block = block
        self.A, self.damping, self.method = A, damping, method
        self.rtol, self.atol, self.maxiter = rtol, atol, maxiter
        self.preconditioner, self.seed = preconditioner, seed
        self.computes_in_promoted_dtype = A.computes_in_promoted_dtype
        self.is_symmetric = method != "lsmr"
        self.info: InverseResult | None = None
        self.num_matvecs = 0
        self._symmetric_checked = method == "lsmr" or kr.trusted_symmetric(A)
        self._step: float | None = None  # Neumann's alpha

    def _to(self, dtype: torch.dtype, device: torch.device) -> InverseOperator:
        pc = self.preconditioner
        pc = pc.to(dtype, device=device) if isinstance(pc, TorchLinearOperator) else pc
        return InverseOperator(
            self.A.to(dtype, device=device), self.damping, self.method, self.rtol, self.atol,
            self.maxiter, pc, self.seed, self.block,
        )  # fmt: skip

    def _matmat_torch(self, X: torch.Tensor) -> torch.Tensor:
        return self._solve(X, adjoint=False)

    def _rmatmat_torch(self, Y: torch.Tensor) -> torch.Tensor:
        return self._solve(Y, adjoint=self.method == "lsmr")

    # ------------------------------------------------------------------ the solve
    def _shifted(self, adjoint: bool) -> tuple[Apply, list[int]]:
        lam = self.damping if not adjoint else complex(self.damping).conjugate().real
        count = [0]

        def apply(V: torch.Tensor, adj: bool = False) -> torch.Tensor:
            W = self.A._apply(V, adjoint ^ adj)
            count[0] += V.shape[1]
            kr.check_products(W, count[0])
            return W + lam * V if lam else W

        return apply, count

    def _prepare(
        self, apply: Apply, count: list[int], dtype: torch.dtype
    ) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """First product: symmetry probe, preconditioner, Neumann step; the M^{-1} to use."""
        if not self._symmetric_checked:
            Z = kr.probe_block(self.A, kr.SYMMETRY_PROBES).to(dtype)
            r, tol = kr.symmetry_defect(Z, apply(Z)), kr.symmetry_tolerance(dtype)
            if r > tol:
                raise ValueError(
                    f"A: expected a symmetric operator for method={self.method!r}, got "
                    f"relative asymmetry {r:.2g} > {tol:.2g}; use method='lsmr'"
                )
            self._symmetric_checked = True
        if self.preconditioner == "kfac":
            from linops.kfac import kfac_preconditioner

            self.preconditioner = kfac_preconditioner(self.A, self.damping)
        elif isinstance(self.preconditioner, str):
            self.preconditioner = nystrom_preconditioner(
                self.A, damping=self.damping, seed=self.seed
            )
        pc = self.preconditioner
        if self.method == "neumann" and self._step is None:
            self._step = _neumann_step_size(self, pc, count)
        if pc is None:
            return None
        return lambda V: pc._apply(V)

    def _solve(self, B: torch.Tensor, adjoint: bool) -> torch.Tensor:
        apply, count = self._shifted(adjoint)
        minv = self._prepare(apply, count, B.dtype)
        eps = torch.finfo(B.dtype).eps
        rtol = math.sqrt(eps) if self.rtol is None else self.rtol
        bnorm = kr.column_norms(B)
        tol = torch.clamp(rtol * bnorm, min=self.atol)
        if bool((tol < 4 * eps * bnorm).any()):
            raise ValueError(
                f"rtol: expected a tolerance at least 4 eps = {4 * eps:.2g} of {B.dtype} "
                f"(no residual below the rounding of b is reachable), got rtol={rtol:.3g}, "
                f"atol={self.atol:.3g}"
            )
        n, k = B.shape
        maxiter = self.maxiter if self.maxiter is not None else 10 * n
        X, R = torch.zeros_like(B), B.clone()
        res, aim = bnorm.clone(), tol.clone()
        iterations = 0
        for _ in range(_ROUNDS):
            todo = torch.nonzero(res > tol).flatten()
            if todo.numel() == 0:
                break
            D, its, ok = self._run(apply, minv, R[:, todo], aim[todo], maxiter - iterations)
            iterations += its
            X[:, todo] += D
            R[:, todo] = B[:, todo] - apply(X[:, todo])
            new = kr.column_norms(R[:, todo])
            stalled = (new > tol[todo]) & (new > 0.5 * res[todo]) & (its > 0)
            # a solver whose estimate is not the 2-norm (preconditioned MINRES) aims lower
            aim[todo] = torch.where(new > tol[todo], aim[todo] * 0.5 * tol[todo] / new, aim[todo])
            res[todo] = new
            # a solver out of budget whose true residuals all passed has converged
            if (not ok or bool(stalled.any())) and bool((res > tol).any()):
                self._fail(X, res, tol, count[0], iterations, B.dtype, not ok, rtol, bnorm)
        else:
            if bool((res > tol).any()):
                self._fail(X, res, tol, count[0], iterations, B.dtype, False, rtol, bnorm)
        self.num_matvecs += count[0]
        self.info = InverseResult(None, res, tol, count[0], iterations, True)
        return X

    def _run(
        self, apply: Apply, minv: Apply | None, R: torch.Tensor, tol: torch.Tensor, budget: int
    ) -> Solved:
        if self.method == "neumann":
            step: Any = self._step  # set by _prepare before the first solve
            return neumann_step(apply, minv, R, tol, budget, step)
        if self.method == "cg" and (self.block or (self.block is None and R.shape[1] > 1)):
            return SOLVERS["block_cg"](apply, minv, R, tol, budget)
        return SOLVERS[self.method](apply, minv, R, tol, budget)

    def _fail(
        self, X: torch.Tensor, res: torch.Tensor, tol: torch.Tensor, count: int, its: int,
        dtype: torch.dtype, maxed: bool, rtol: float, bnorm: torch.Tensor,
    ) -> None:  # fmt: skip
        self.num_matvecs += count
        result = InverseResult(X, res, tol, count, its, False)
        self.info = result._replace(x=None)
        bad = res > tol
        worst = float((res / bnorm.clamp(min=torch.finfo(dtype).tiny))[bad].max())
        ok = int((~bad).sum())
        if worst > 1 and self.method != "cg":
            # the residual grew beyond ||b||, which MINRES, LSMR (monotone in exact arithmetic)
            # and a convergent Neumann series never do: no maxiter helps (CG's residual is not
            # monotone and may exceed ||b|| on its way)
            hint = (
                "the Neumann series needs the (preconditioned) A + damping I positive "
                "definite: use method='minres' for an indefinite A"
                if self.method == "neumann"
                else "A + damping I is singular with b outside its range, so no x reaches the "
                "tolerance; use a damping > 0 (for a least-squares solution, "
                "scipy.sparse.linalg.lsmr on the operator)"
                if not self.damping and self.method == "lsmr"
                else "A + damping I is singular with b outside its range: use a damping > 0 "
                "or method='lsmr' for a least-squares solution"
                if not self.damping
                else f"A + damping I is singular to {dtype}'s rounding of the products (a "
                f"damping of {abs(self.damping):.3g} against their error of about eps ||A||, "
                f"eps = {torch.finfo(dtype).eps:.1e}) with b outside its range: use a larger "
                "damping, float64, or method='lsmr' for a least-squares solution"
            )
            msg = (
                f"inverse: method={self.method!r} diverged: the largest relative residual grew "
                f"to {worst:.3g} after {its} iterations ({ok}/{len(res)} columns converged); "
                f"{hint}"
            )
        elif maxed:
            msg = (
                f"inverse: method={self.method!r} reached maxiter={self.maxiter or 10 * X.shape[0]}"
                f" after {its} iterations with {ok}/{len(res)} columns converged (largest "
                f"relative residual {worst:.3g}, rtol={rtol:.3g}); raise maxiter or use a "
                "preconditioner"
                + (
                    " (the Neumann series converges only for a positive definite A + damping "
                    "I: a slightly indefinite or singular one makes it crawl or diverge slowly, "
                    "which linops.lanczos(A, 1, 'SA') shows)"
                    if self.method == "neumann"
                    else ", or block=False (nearly dependent right-hand sides can cost block "
                    "CG the conjugacy of its blocks: [b, b + 1e-6 e] crawled to maxiter where "
                    "one CG per column converged in a third of it)"
                    if self.method == "cg" and len(res) > 1 and self.block is not False
                    else ""
                )
            )
        else:
            reach = 10.0 ** math.ceil(math.log10(2 * worst))
            msg = (
                f"inverse: rtol={rtol:.3g} is below what {dtype} reaches for this system: "
                f"the true residual stagnates at {worst:.3g} ||b|| after {its} iterations "
                f"({ok}/{len(res)} columns converged); use rtol >= {reach:.0e}"
                + ("" if dtype == torch.float64 else ", or float64")
            )
        raise InverseNoConvergence(msg, result)


def _neumann_step_size(
    op: InverseOperator, pc: TorchLinearOperator | str | None, count: list[int]
) -> float:
    r"""Return :math:`\alpha = 1/\hat\lambda_{\max}` of :math:`M^{-1/2}(A + \lambda I)M^{-1/2}`.

    :math:`\hat\lambda_{\max}` is an upper bound from a Lanczos Ritz value plus its residual
    (products counted).
    """
    from linops.lanczos import lanczos

    S = op.A + op.damping * _identity(op.A)
    if pc is not None:
        if not isinstance(pc, NystromPreconditioner):
            raise ValueError(
                "preconditioner: method='neumann' expected a Nyström preconditioner (its "
                f"square root gives the step size), got {type(pc).__name__}"
            )
        half = pc.sqrt_inverse()
        S = half @ S @ half
    res = lanczos(S, 1, "LA", rtol=1e-3, seed=0)
    count[0] += res.num_matvecs
    upper = float(torch.as_tensor(res.eigenvalues)[0]) + float(torch.as_tensor(res.residuals)[0])
    if not upper > 0:
        raise ValueError(
            "A: method='neumann' expected a positive definite A + damping I, got largest "
            f"eigenvalue estimate {upper:.3g}"
        )
    return 1.0 / upper


def _identity(A: TorchLinearOperator) -> TorchLinearOperator:
    from linops.base import IdentityOperator

    return IdentityOperator(A.shape[0], dtype=A.torch_dtype, device=A.device)


def inverse(
    A: OperatorLike,
    *,
    damping: float = 0.0,
    method: str = "cg",
    rtol: float | None = None,
    atol: float = 0.0,
    maxiter: int | None = None,
    preconditioner: OperatorLike | Literal["nystrom"] | None = None,
    seed: int | torch.Generator | None = None,
    block: bool | None = None,
) -> InverseOperator:
    r"""Return the operator :math:`(A + \lambda I)^{-1}`: each product a converged block solve.

    Parameters
    ----------
    A
        Square operator (anything :func:`linops.aslinearoperator` takes); symmetric for
        ``"cg"`` (positive definite with the damping), ``"minres"`` and ``"neumann"``
        (checked once with a random probe at the first product, 3 products).
    damping
        :math:`\lambda \ge 0`, added to the diagonal.
    method
        ``"cg"`` (default), ``"minres"``, ``"lsmr"`` or ``"neumann"`` (module docstring).
    rtol, atol
        Per column :math:`\|b - (A + \lambda I)x\| \le \max(\mathrm{rtol}\|b\|,
        \mathrm{atol})`, as ``scipy.sparse.linalg.cg``, on the true residual. Default
        ``rtol``: :math:`\sqrt{\varepsilon}` of the dtype (1.5e-8 in float64, 3.5e-4 in
        float32).
    maxiter
        Solver iterations per product (summed over restarts); default ``10 n``.
    preconditioner
        ``None``; ``"nystrom"`` (a randomized Nyström preconditioner built at the first
        product, rank chosen adaptively: :func:`nystrom_preconditioner`); a
        :class:`NystromPreconditioner`; ``"kfac"``, :math:`(B + \lambda I)^{-1}` for the
        KFAC :math:`B` of a GGN, Hessian or Fisher operator's model, loss and data
        (:func:`linops.kfac.kfac_preconditioner`: data passes, no products of ``A``). It pays
        where the block-diagonal Kronecker model is close to ``A``: 139 -> 13 CG products on a
        linear model's GGN with badly scaled inputs (``tests/linops/test_kfac.py``); it is no
        general win: on small tanh MLPs and on the digits MLP's GGN at
        :math:`\lambda = 10^{-4}\lambda_{\max}` it needs more products than plain CG
        (``bench/curvature.py``). Or any symmetric positive definite operator that applies
        :math:`M^{-1}` (not with ``"lsmr"``).
    seed
        Seed of the Nyström sketch.
    block
        For ``"cg"``: whether a product with several right-hand sides runs block CG (one
        Krylov space for all columns, :func:`linops._solvers.block_cg`) instead of one CG per
        column. Default ``None``: block CG for two or more columns, where it pays (16
        right-hand sides of a 200 x 200 matrix with 20 outlying eigenvalues: 285 products to
        1e-10 against 2566; 8 on the digits MLP's GGN: ``bench/curvature.py``). Nearly
        dependent right-hand sides (``[b, b + 1e-6 e]``) can cost block CG the conjugacy of
        its blocks, so that it crawls to ``maxiter``; the error then suggests ``block=False``.

    Returns
    -------
    InverseOperator
        ``op @ B`` solves for every column of ``B``; ``op.info`` reports the residuals.

    Raises
    ------
    ValueError
        For a non-square operator, a negative damping, an unknown method, or a preconditioner
        with ``"lsmr"``; at a product, for a tolerance below the rounding of ``b`` or a
        non-symmetric ``A`` with a symmetric method.
    InverseNoConvergence
        At a product that misses its tolerance (``maxiter`` reached, or a tolerance below what
        the dtype reaches); ``.result`` holds the partial solution.

    References
    ----------
    .. [1] Z. Frangella, J. A. Tropp and M. Udell, "Randomized Nyström preconditioning",
       SIAM J. Matrix Anal. Appl. 44(2), 2023. arXiv:2110.02820
    .. [2] D. C.-L. Fong and M. A. Saunders, "LSMR: an iterative algorithm for sparse
       least-squares problems", SIAM J. Sci. Comput. 33(5), 2011. arXiv:1006.0758

    Examples
    --------
    >>> import torch
    >>> A = torch.diag(torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64))
    >>> Ainv = inverse(A, damping=1.0, rtol=1e-12)
    >>> [round(v, 12) for v in (Ainv @ torch.ones(3, dtype=torch.float64)).tolist()]
    [0.5, 0.333333333333, 0.2]
    >>> bool(Ainv.info.converged), Ainv.info.num_matvecs > 0
    (True, True)
    """
    op = aslinearoperator(A)
    if op.shape[0] != op.shape[1]:
        raise ValueError(f"A: expected a square operator, got shape {op.shape}")
    kr.check_which(method, _METHODS, "method")
    damping = check_damping(damping)
    if rtol is not None and not (isinstance(rtol, int | float) and 0 <= rtol < 1):
        raise ValueError(f"rtol: expected a number in [0, 1), got {rtol!r}")
    if not (isinstance(atol, int | float) and atol >= 0):
        raise ValueError(f"atol: expected a number >= 0, got {atol!r}")
    if maxiter is not None:
        kr.check_int(maxiter, "maxiter", 1)
    if preconditioner is not None and method == "lsmr":
        raise ValueError(
            f"preconditioner: expected None with method='lsmr', got {type(preconditioner).__name__}"
        )
    if isinstance(preconditioner, str):
        kr.check_which(preconditioner, ("nystrom", "kfac"), "preconditioner")
    elif preconditioner is not None:
        preconditioner = aslinearoperator(preconditioner)
        if preconditioner.shape != op.shape:
            raise ValueError(
                f"preconditioner: expected shape {op.shape}, got {preconditioner.shape}"
            )
    if block is not None and not isinstance(block, bool):
        raise TypeError(f"block: expected True, False or None, got {block!r}")
    return InverseOperator(
        op, float(damping), method, rtol, float(atol), maxiter, preconditioner, seed, block
    )
