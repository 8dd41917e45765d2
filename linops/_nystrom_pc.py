r"""Randomized Nyström preconditioner for :math:`A + \mu I` (Frangella, Tropp & Udell 2023).

From a rank-:math:`\ell` Nyström approximation :math:`\hat A = U \hat\Lambda U^\top` of a PSD
:math:`A` (:func:`linops.nystrom`), the preconditioner and its inverse are

.. math::

    P = \frac{1}{\hat\lambda_\ell + \mu} U (\hat\Lambda + \mu I) U^\top + (I - UU^\top),
    \qquad
    P^{-1} = (\hat\lambda_\ell + \mu)\, U (\hat\Lambda + \mu I)^{-1} U^\top + (I - UU^\top),

with :math:`\hat\lambda_\ell` the smallest retained eigenvalue ("Randomized Nyström
preconditioning", arXiv:2110.02820, eq. (5.3)). The condition number of
:math:`P^{-1/2}(A + \mu I)P^{-1/2}` is at most about :math:`(\hat\lambda_\ell + \mu +
\|A - \hat A\|)/\mu`, so the rank is chosen where :math:`\hat\lambda_\ell` falls to a small
multiple of :math:`\mu` (the paper's adaptive rule, Section 5.4.2: the rank is doubled until
it does).
"""

from __future__ import annotations

import torch

from linops import _krylov as kr
from linops._checks import check_damping
from linops._types import OperatorLike
from linops.base import TorchLinearOperator, aslinearoperator
from linops.randomized import nystrom

__all__ = ["NystromPreconditioner", "nystrom_preconditioner"]

#: the adaptive rank stops once the smallest retained eigenvalue is below this multiple of mu
RATIO = 10.0


class NystromPreconditioner(TorchLinearOperator):
    r""":math:`P^{-1}` of the module docstring (symmetric positive definite).

    Attributes
    ----------
    eigenvectors
        :math:`U` ``(n, l)`` of the Nyström approximation.
    eigenvalues
        :math:`\hat\Lambda` ``(l,)`` of the Nyström approximation.
    damping
        :math:`\mu`.
    num_matvecs
        Products with ``A`` spent on the sketch(es).
    """

    is_symmetric = True

    def __init__(
        self, eigenvectors: torch.Tensor, eigenvalues: torch.Tensor, damping: float,
        num_matvecs: int = 0, power: float = 1.0,
    ) -> None:  # fmt: skip
        U = eigenvectors
        super().__init__((U.shape[0], U.shape[0]), dtype=U.dtype, device=U.device)
        self.eigenvectors, self.eigenvalues = U, eigenvalues
        self.damping, self.num_matvecs, self._power = damping, num_matvecs, power
        lam = eigenvalues + damping
        floor = lam.min() if lam.numel() else torch.ones((), dtype=U.dtype)
        safe = torch.where(lam > 0, lam, torch.ones_like(lam))
        factor = torch.where(lam > 0, floor / safe, torch.ones_like(lam))
        self._coef = factor**power - 1.0  # P^{-p} = I + U diag(coef) U^T

    @property
    def rank(self) -> int:
        return int(self.eigenvalues.numel())

    def _matmat_torch(self, X: torch.Tensor) -> torch.Tensor:
        U = self.eigenvectors
        return X + U @ (self._coef[:, None] * (U.mT @ X))

    def sqrt_inverse(self) -> NystromPreconditioner:
        r""":math:`P^{-1/2}` (same :math:`U`, square roots of the factors)."""
        return NystromPreconditioner(
            self.eigenvectors, self.eigenvalues, self.damping, 0, self._power / 2
        )

    def _to(self, dtype: torch.dtype, device: torch.device) -> NystromPreconditioner:
        return NystromPreconditioner(
            self.eigenvectors.to(dtype=dtype, device=device),
            self.eigenvalues.to(dtype=dtype, device=device), self.damping,
            self.num_matvecs, self._power,
        )  # fmt: skip


def nystrom_preconditioner(
    A: OperatorLike,
    rank: int | None = None,
    *,
    damping: float,
    oversample: int = 10,
    max_rank: int | None = None,
    seed: int | torch.Generator | None = None,
) -> NystromPreconditioner:
    r"""Randomized Nyström preconditioner :math:`P^{-1}` of :math:`A + \mu I` (module docstring).

    Parameters
    ----------
    A
        Symmetric positive semi-definite operator (a GGN, a Fisher, a kernel matrix).
    rank
        :math:`\ell`; default adaptive: 16, doubled (the sketch grows, keeping the columns
        already multiplied: :math:`\ell` + ``oversample`` products in all) until
        :math:`\hat\lambda_\ell \le 10\mu` or ``max_rank`` is reached.
    damping
        :math:`\mu > 0`, the damping of the system the preconditioner is for.
    oversample
        Extra sketch columns (:func:`linops.nystrom`).
    max_rank
        Cap of the adaptive rank (default ``min(n, 1024)``).
    seed
        Seed of the sketches.

    Returns
    -------
    NystromPreconditioner
        The operator :math:`P^{-1}`; ``.num_matvecs`` products of ``A`` were spent.

    Raises
    ------
    ValueError
        For a non-square ``A``, a damping that is not positive, or bad ranks; if ``A`` is
        not PSD (from :func:`linops.nystrom`).

    Examples
    --------
    >>> import torch
    >>> A = torch.diag(torch.logspace(0, -6, 60, dtype=torch.float64))
    >>> P = nystrom_preconditioner(A, damping=1e-4, seed=0)
    >>> P.rank, float(P.eigenvalues.min()) <= 1e-3
    (32, True)
    """
    op = aslinearoperator(A)
    n = op.shape[0]
    if op.shape[0] != op.shape[1]:
        raise ValueError(f"A: expected a square (PSD) operator, got shape {op.shape}")
    damping = check_damping(damping, allow_zero=False)
    cap = kr.check_int(max_rank, "max_rank", 1, n) if max_rank is not None else min(n, 1024)
    gen = kr.make_generator(seed, op.device)
    if rank is not None:
        res = nystrom(op, kr.check_int(rank, "rank", 1, n), oversample=oversample, seed=gen)
        lam = torch.as_tensor(res.eigenvalues, device=op.device)
        U = torch.as_tensor(res.eigenvectors, device=op.device)
        return NystromPreconditioner(U, lam, float(damping), res.num_matvecs)
    over = kr.check_int(oversample, "oversample", 0)
    ell = min(16, cap)
    Omega = torch.zeros(n, 0, dtype=op.torch_dtype, device=op.device)
    Y = torch.zeros_like(Omega)
    while True:  # the sketch grows: the columns already multiplied are kept
        Omega, Y = _extend(op, Omega, Y, min(ell + over, n), gen)
        lam, U = _nystrom_from(Omega, Y, ell)
        if ell >= cap or float(lam.min()) <= RATIO * damping:
            return NystromPreconditioner(U, lam, float(damping), Omega.shape[1])
        ell = min(2 * ell, cap)


def _extend(
    op: TorchLinearOperator, Omega: torch.Tensor, Y: torch.Tensor, size: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Grow the orthonormal test matrix to ``size`` columns and multiply only the new ones."""
    G = kr.random_block(op.shape[0], size - Omega.shape[1], op, gen)
    for _ in range(2):
        G = G - Omega @ (Omega.mT @ G)
    new = torch.linalg.qr(G)[0]
    AN = op._apply(new)
    kr.check_products(AN, size)
    return torch.cat([Omega, new], dim=1), torch.cat([Y, AN], dim=1)


def _nystrom_from(
    Omega: torch.Tensor, Y: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the ``rank`` largest eigenpairs of the Nyström approximation from ``Y = A Omega``.

    Tropp, Yurtsever, Udell & Cevher 2017, Algorithm 3: the steps of :func:`linops.nystrom`,
    which starts from a fresh sketch.
    """
    nu = torch.finfo(Y.dtype).eps * float(torch.linalg.matrix_norm(Y))
    Y = Y + nu * Omega
    core = Omega.mH @ Y
    C, info = torch.linalg.cholesky_ex((core + core.mH) / 2)
    if int(info) != 0:
        raise ValueError("A: expected a positive semidefinite operator (Nystrom core not PD)")
    B = torch.linalg.solve_triangular(C.mH, Y, upper=True, left=False)
    U, s, _ = torch.linalg.svd(B, full_matrices=False)
    return (s[:rank] ** 2 - nu).clamp(min=0).flip(0), U[:, :rank].flip(1)
