r"""Block Krylov solvers behind :func:`linops.inverse`: one independent solve per column.

Each solver takes ``apply(V, adjoint=False)`` (the shifted operator :math:`A + \lambda I` on a
block, counting its products), ``minv`` (:math:`M^{-1}` on a block, or ``None``), the
right-hand sides ``B`` ``(n, k)``, per-column tolerances ``tol`` ``(k,)`` and an iteration
budget, and returns ``(X, iterations, ok)``. All columns advance together, so an iteration is
one block product; a column whose residual estimate reaches its tolerance is taken out of the
block (every state tensor keeps the columns on its last axis, so taking columns out is one
index). The caller verifies the true residuals.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from linops._krylov import column_norms

Tensor = torch.Tensor
Apply = Callable[..., Tensor]
#: a solve's ``(correction block, iterations used, whether every column converged)``
Solved = tuple[Tensor, int, bool]


def _dot(U: Tensor, V: Tensor) -> Tensor:
    return (U * V).sum(dim=0)


def _norm(U: Tensor) -> Tensor:
    return column_norms(U)


class _Columns:
    """Which of the ``k`` columns are still iterating, and the finished ones' solutions."""

    def __init__(self, B: Tensor, tol: Tensor) -> None:
        self.out = torch.zeros_like(B)
        self.cols = torch.arange(B.shape[1], device=B.device)
        self.tol = tol

    def retire(self, est: Tensor, X: Tensor, state: dict[str, Any]) -> bool:
        """Store the columns with ``est <= tol``, drop them from ``state``; True if none left."""
        done = est <= self.tol
        if bool(done.any()):
            self.out[:, self.cols[done]] = X[:, done]
            keep = ~done
            for key, val in state.items():
                if isinstance(val, Tensor) and val.dim() > 0:
                    state[key] = val[..., keep]
            self.cols, self.tol = self.cols[keep], self.tol[keep]
        return self.cols.numel() == 0

    def stop(self, X: Tensor) -> Tensor:
        self.out[:, self.cols] = X
        return self.out


def cg(apply: Apply, minv: Apply | None, B: Tensor, tol: Tensor, budget: int) -> Solved:
    """Preconditioned conjugate gradients, one per column (Hestenes & Stiefel 1952)."""
    cols = _Columns(B, tol)
    r = B.clone()
    z = minv(r) if minv is not None else r
    s = {"x": torch.zeros_like(B), "r": r, "p": z.clone(), "rz": _dot(r, z)}
    for its in range(budget + 1):
        if cols.retire(_norm(s["r"]), s["x"], s):
            return cols.out, its, True
        if its == budget:
            break
        q = apply(s["p"])
        pq = _dot(s["p"], q)
        if bool((pq <= 0).any()):
            raise ValueError(
                "A: expected A + damping I positive definite for method='cg', got p^T (A + "
                f"damping I) p = {float(pq.min()):.3g} <= 0 along a search direction; use "
                "method='minres' for an indefinite operator"
            )
        alpha = s["rz"] / pq
        s["x"] = s["x"] + alpha * s["p"]
        s["r"] = s["r"] - alpha * q
        z = minv(s["r"]) if minv is not None else s["r"]
        rz = _dot(s["r"], z)
        s["p"] = z + (rz / s["rz"]) * s["p"]
        s["rz"] = rz
    return cols.stop(s["x"]), budget, False


def minres(apply: Apply, minv: Apply | None, B: Tensor, tol: Tensor, budget: int) -> Solved:
    r"""Solve by MINRES (Paige & Saunders 1975), one run per column.

    The recurrences of ``scipy.sparse.linalg.minres`` vectorised over columns; the estimate
    :math:`\bar\phi` is :math:`\|r\|_{M^{-1}}`.
    """
    cols = _Columns(B, tol)
    y = minv(B) if minv is not None else B.clone()
    beta1 = _dot(B, y)
    if bool((beta1 < 0).any()):
        raise ValueError(
            "preconditioner: expected a positive definite M^{-1}, got b^T M^{-1} b < 0"
        )
    beta1 = beta1.sqrt()
    zero = torch.zeros_like(beta1)
    s = {
        "x": torch.zeros_like(B), "r1": B.clone(), "r2": B.clone(), "y": y,
        "w": torch.zeros_like(B), "w2": torch.zeros_like(B), "oldb": zero, "beta": beta1,
        "dbar": zero, "epsln": zero, "phibar": beta1, "cs": -torch.ones_like(beta1), "sn": zero,
    }  # fmt: skip
    tiny = torch.finfo(B.dtype).eps
    for its in range(budget + 1):
        if cols.retire(s["phibar"], s["x"], s):
            return cols.out, its, True
        if its == budget:
            break
        v = s["y"] / s["beta"]
        y = apply(v)
        if its >= 1:
            y = y - (s["beta"] / s["oldb"]) * s["r1"]
        alfa = _dot(v, y)
        y = y - (alfa / s["beta"]) * s["r2"]
        s["r1"], s["r2"] = s["r2"], y
        s["y"] = minv(y) if minv is not None else y
        s["oldb"], beta = s["beta"], _dot(y, s["y"]).clamp(min=0).sqrt()
        s["beta"] = beta
        oldeps = s["epsln"]
        delta = s["cs"] * s["dbar"] + s["sn"] * alfa
        gbar = s["sn"] * s["dbar"] - s["cs"] * alfa
        s["epsln"], s["dbar"] = s["sn"] * beta, -s["cs"] * beta
        gamma = torch.hypot(gbar, beta).clamp(min=tiny)
        s["cs"], s["sn"] = gbar / gamma, beta / gamma
        phi = s["cs"] * s["phibar"]
        s["phibar"] = s["sn"] * s["phibar"]
        w1, s["w2"] = s["w2"], s["w"]
        s["w"] = (v - oldeps * w1 - delta * s["w2"]) / gamma
        s["x"] = s["x"] + phi * s["w"]
        # an exact invariant subspace (beta = 0): the solution is exact, stop dividing by it
        s["beta"] = torch.where(beta > 0, beta, torch.ones_like(beta))
        s["phibar"] = torch.where(beta > 0, s["phibar"], torch.zeros_like(beta))
    return cols.stop(s["x"]), budget, False


def _sym_ortho(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    r = torch.hypot(a, b)
    safe = torch.where(r > 0, r, torch.ones_like(r))
    return torch.where(r > 0, a / safe, torch.ones_like(r)), torch.where(r > 0, b / safe, 0 * r), r


def _unit(U: Tensor) -> tuple[Tensor, Tensor]:
    n = _norm(U)
    return U / torch.where(n > 0, n, torch.ones_like(n)), n


def lsmr(apply: Apply, minv: Apply | None, B: Tensor, tol: Tensor, budget: int) -> Solved:
    r"""Solve by LSMR (Fong & Saunders 2011, arXiv:1006.0758) without damping.

    The recurrences of ``scipy.sparse.linalg.lsmr`` vectorised over columns; two products
    per iteration.
    """
    cols = _Columns(B, tol)
    u, beta = _unit(B)
    v, alpha = _unit(apply(u, True))
    one, zero = torch.ones_like(beta), torch.zeros_like(beta)
    s = {
        "x": torch.zeros_like(B), "u": u, "v": v, "alpha": alpha, "h": v.clone(),
        "hbar": torch.zeros_like(B), "zetabar": alpha * beta, "alphabar": alpha, "rho": one,
        "rhobar": one, "cbar": one, "sbar": zero, "betadd": beta, "betad": zero,
        "rhodold": one, "tautildeold": zero, "thetatilde": zero, "zeta": zero, "normr": beta,
    }  # fmt: skip
    for its in range(budget + 1):
        # alpha = 0: the bidiagonalisation ended (x is the least-squares solution of the
        # Krylov space); the column leaves, and the caller's true residual judges it
        est = torch.where(s["alpha"] > 0, s["normr"], -torch.ones_like(s["normr"]))
        if cols.retire(est, s["x"], s):
            return cols.out, its, True
        if its == budget:
            break
        s["u"], beta = _unit(apply(s["v"]) - s["alpha"] * s["u"])
        s["v"], alpha = _unit(apply(s["u"], True) - beta * s["v"])
        s["alpha"] = alpha
        rhoold = s["rho"]
        c, sn, s["rho"] = _sym_ortho(s["alphabar"], beta)
        thetanew, s["alphabar"] = sn * alpha, c * alpha
        rhobarold, zetaold = s["rhobar"], s["zeta"]
        thetabar = s["sbar"] * s["rho"]
        s["cbar"], s["sbar"], s["rhobar"] = _sym_ortho(s["cbar"] * s["rho"], thetanew)
        s["zeta"] = s["cbar"] * s["zetabar"]
        s["zetabar"] = -s["sbar"] * s["zetabar"]
        s["hbar"] = s["h"] - (thetabar * s["rho"] / (rhoold * rhobarold)) * s["hbar"]
        s["x"] = s["x"] + (s["zeta"] / (s["rho"] * s["rhobar"])) * s["hbar"]
        s["h"] = s["v"] - (thetanew / s["rho"]) * s["h"]
        betahat, s["betadd"] = c * s["betadd"], -sn * s["betadd"]
        thetatildeold = s["thetatilde"]
        ct, st, rhotildeold = _sym_ortho(s["rhodold"], thetabar)
        s["thetatilde"], s["rhodold"] = st * s["rhobar"], ct * s["rhobar"]
        s["betad"] = -st * s["betad"] + ct * betahat
        s["tautildeold"] = (zetaold - thetatildeold * s["tautildeold"]) / rhotildeold
        taud = (s["zeta"] - s["thetatilde"] * s["tautildeold"]) / s["rhodold"]
        s["normr"] = torch.sqrt((s["betad"] - taud) ** 2 + s["betadd"] ** 2)
    return cols.stop(s["x"]), budget, False


def neumann_step(
    apply: Apply, minv: Apply | None, B: Tensor, tol: Tensor, budget: int, alpha: float
) -> Solved:
    r"""Solve by the truncated Neumann series, i.e. Richardson iteration.

    :math:`x \leftarrow x + \alpha M^{-1} r`, :math:`r \leftarrow r - \alpha (A + \lambda I)
    M^{-1} r`: after :math:`j` steps :math:`x = \alpha \sum_{i<j} (I - \alpha M^{-1}
    (A + \lambda I))^i M^{-1} b`.
    """
    cols = _Columns(B, tol)
    s = {"x": torch.zeros_like(B), "r": B.clone()}
    for its in range(budget + 1):
        if cols.retire(_norm(s["r"]), s["x"], s):
            return cols.out, its, True
        if its == budget:
            break
        z = minv(s["r"]) if minv is not None else s["r"]
        s["x"] = s["x"] + alpha * z
        s["r"] = s["r"] - alpha * apply(z)
    return cols.stop(s["x"]), budget, False


def _orth(Z: Tensor, drop: float) -> Tensor:
    """Return an orthonormal basis of the columns of ``Z`` without dependent directions.

    Directions with singular values below ``drop`` times the largest are dropped.
    """
    U, s, _ = torch.linalg.svd(Z, full_matrices=False)
    keep = s > drop * s[0] if s.numel() and s[0] > 0 else s > 0
    return U[:, keep]


def block_cg(apply: Apply, minv: Apply | None, B: Tensor, tol: Tensor, budget: int) -> Solved:
    r"""Breakdown-free block conjugate gradients (O'Leary 1980; Ji & Li 2017, Algorithm 2).

    One Krylov space for all columns: :math:`P` is an orthonormal basis of
    :math:`Z + P\beta` with its dependent directions dropped (so the block shrinks as columns
    converge or their residuals become dependent), :math:`\alpha = (P^\top AP)^{-1}
    P^\top R`, :math:`\beta = -(P^\top AP)^{-1}(AP)^\top Z`. A step costs one product per
    column of :math:`P`; the residual is exact (not a recurrence per column), and the search
    space after :math:`j` steps is the block Krylov space, so outlying eigenvalues are
    resolved ``k`` at a time.
    """
    drop = torch.finfo(B.dtype).eps ** 0.5
    X, R = torch.zeros_like(B), B.clone()
    Z = minv(R) if minv is not None else R
    P = _orth(Z, drop)
    for its in range(budget + 1):
        if bool((_norm(R) <= tol).all()):
            return X, its, True
        if its == budget or P.shape[1] == 0:
            break
        Q = apply(P)
        PQ = P.mT @ Q
        PQ = (PQ + PQ.mT) / 2
        L, info = torch.linalg.cholesky_ex(PQ)
        if int(info) != 0:
            raise ValueError(
                "A: expected A + damping I positive definite for method='cg', got a search "
                "block with P^T (A + damping I) P not positive definite; use method='minres'"
            )
        alpha = torch.cholesky_solve(P.mT @ R, L)
        X = X + P @ alpha
        R = R - Q @ alpha
        Z = minv(R) if minv is not None else R
        beta = -torch.cholesky_solve(Q.mT @ Z, L)
        P = _orth(Z + P @ beta, drop)
    return X, budget, False


SOLVERS = {"cg": cg, "block_cg": block_cg, "minres": minres, "lsmr": lsmr}
