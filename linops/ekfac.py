r"""Eigenvalue-corrected KFAC (EKFAC) and the eigenbasis inverse of KFAC / EKFAC.

See :class:`EKFACOperator`; the Kronecker factors and their conventions are those of
:mod:`linops.kfac`.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from linops._checks import check_damping
from linops.base import TorchLinearOperator
from linops.kfac import KFACOperator, _damped_logdet

__all__ = ["EKFACOperator"]

Tensor = torch.Tensor


class EKFACOperator(KFACOperator):
    r"""Eigenvalue-corrected KFAC (George, Laurent, Bouthillier, Ballas & Vincent 2018).

    In the eigenbasis :math:`Q_G \otimes Q_A` of each KFAC block the eigenvalues
    :math:`g_i a_j` are replaced by the second moments of the per-sample gradients there,
    :math:`E = \sum_n \sum_r (Q_G^\top \hat g_{nr} \tilde a_n^\top Q_A)^{\odot 2}`
    (per-sample gradients summed over shared positions for convolutions; KFAC's scaling),
    the diagonal of the exact block of the Fisher family in that basis; one more pass over
    the data (the same labels for ``"mc"``). Parameters as :class:`KFACOperator`;
    ``inverse`` supports exact damping only. The basis is unique only where the factors'
    eigenvalues are distinct: with a rank-deficient factor (``kfac_approx="reduce"`` with
    fewer samples than a convolution's patch size) EKFAC depends on the null-space basis
    ``eigh`` returns, as curvlinops' does (0.2-18% apart in such cases).

    References
    ----------
    .. [1] T. George, C. Laurent, X. Bouthillier, N. Ballas and P. Vincent, "Fast approximate
       natural gradient descent in a Kronecker-factored eigenbasis", NeurIPS 2018.
       arXiv:1806.03884
    """

    def _reset_derived(self) -> None:
        super()._reset_derived()
        self._corrected = None

    def _eigen(self) -> dict[str, tuple[Tensor, ...]]:
        if self._corrected is None:
            basis = super()._eigen()

            def local() -> list[Tensor]:
                E: dict[str, list[Any]] = {k: [0, 0] for k in self.units}
                for inputs, grads, _ in self._layer_gradients():
                    for k, (QA, QG, _, _) in basis.items():
                        Ar = inputs[k] @ QA  # (n, L, d_A): L positions sharing the weight
                        Ar2 = Ar[:, 0].pow(2) if Ar.shape[1] == 1 else None
                        for g in grads:
                            Gr = g[k] @ QG
                            # the rotated per-sample gradient sum_l (Q_G^T g_l)(Q_A^T a_l)^T;
                            # with one position its square is the outer product of the squares
                            if Ar2 is not None:
                                sq = Gr[:, 0].pow(2).mT @ Ar2
                            else:
                                sq = (Gr.mT @ Ar).pow(2).sum(0)
                            E[k][0] = E[k][0] + sq
                            E[k][1] = E[k][1] + Gr.sum(1).pow(2).sum(0)[:, None]
                return [t for k in self.units for t in E[k]]

            sums = self._global_sums(local, "eigenvalue corrections")
            E = {k: sums[2 * i : 2 * i + 2] for i, k in enumerate(self.units)}
            self._corrected = {k: (QA, QG, *E[k]) for k, (QA, QG, _, _) in basis.items()}
        return self._corrected

    def _matmat_torch(self, X: Tensor) -> Tensor:
        eig = self._eigen()
        return self._eigen_map(X, eig, lambda E: E)

    def _eigenvalues(self) -> list[Tensor]:
        eig = self._eigen()
        vals = []
        for k, (name, _, _) in self.units.items():
            wn, bn = self.layers[name]
            if wn is not None:
                vals.append(eig[k][2].reshape(-1))
            if bn is not None and (self.separate or wn is None):
                vals.append(eig[k][3].reshape(-1))
        return vals

    def trace(self) -> float:
        r"""Return :math:`\sum E`, the trace."""
        return float(sum(v.sum() for v in self._eigenvalues()))

    def frobenius_norm(self) -> float:
        r"""Return :math:`(\sum E^2)^{1/2}`, the Frobenius norm."""
        return float(sum((v**2).sum() for v in self._eigenvalues())) ** 0.5

    def logdet(self, damping: float = 0.0) -> float:
        r"""Return :math:`\sum \log(E + \lambda)`, the damped log-determinant.

        Without damping, a block's values below ``sqrt(size) eps`` of its largest count as zero
        (``-inf`` for a singular EKFAC, as for KFAC).

        Raises
        ------
        ValueError
            For a negative or non-finite damping.
        """
        check_damping(damping)
        blocks = ((v, math.isqrt(v.numel()) + 1) for v in self._eigenvalues())
        return _damped_logdet(blocks, damping)

    def state_dict(self) -> dict[str, Any]:
        """Return KFAC's state with the corrected eigenbasis and eigenvalues."""
        return super().state_dict() | {"corrected": self._eigen()}

    def inverse(self, damping: float, *, heuristic: bool = False) -> TorchLinearOperator:
        r"""Return :math:`(B + \lambda I)^{-1}` in the eigenbasis (exact damping only).

        Raises
        ------
        ValueError
            For ``heuristic=True`` or a damping that is not positive.
        """
        if heuristic:
            raise ValueError("heuristic: expected False for EKFAC (no Kronecker factors to damp)")
        return super().inverse(damping)


class _EigenInverse(TorchLinearOperator):
    r""":math:`(B + \lambda I)^{-1}` of a KFAC / EKFAC operator.

    In its eigenbasis, or with KFAC's heuristic factored damping.
    """

    is_symmetric = True

    def __init__(self, op: KFACOperator, damping: float, heuristic: bool) -> None:
        super().__init__(op.shape, dtype=op.torch_dtype, device=op.device)
        self.op, self.damping, self.heuristic = op, damping, heuristic
        if not heuristic:
            eig = op._eigen()
            self._apply_blocks = lambda X: op._eigen_map(X, eig, lambda E: 1.0 / (E + damping))
            return
        # factored damping: (A + d_A I)^{-1} (x) (G + d_G I)^{-1}, two matrix products a block
        inv: dict[str, tuple[Tensor, Tensor, Tensor]] = {}
        for k, (A, G) in op.compute_factors().items():
            a_mean = float(torch.trace(A)) / A.shape[0]
            g_mean = float(torch.trace(G)) / G.shape[0]
            eye_a = torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
            eye_g = torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
            if g_mean > 0:  # a separate bias block has A = [[1]]: its own pi
                dab, dgb = _split_damping(1.0 / g_mean, damping)
                inv_b = _spd_inverse(G + dgb * eye_g) / (1 + dab)
            else:
                inv_b = eye_g / damping
            if a_mean > 0 and g_mean > 0:
                da, dg = _split_damping(a_mean / g_mean, damping)
                inv[k] = (_spd_inverse(A + da * eye_a), _spd_inverse(G + dg * eye_g), inv_b)
            else:  # a zero factor: the block is zero, and (0 + lambda I)^{-1} = I / lambda
                inv[k] = (eye_a, eye_g / damping, inv_b)
        self._apply_blocks = lambda X: op._map_blocks(
            X,
            lambda k, V, lay, out: lay.right(lay.left(inv[k][1], V), inv[k][0], out),
            lambda k, V, lay, out: lay.left(inv[k][2], V, out),
        )

    def _matmat_torch(self, X: Tensor) -> Tensor:
        return self._apply_blocks(X)


def _split_damping(pi2: float, damping: float) -> tuple[float, float]:
    r"""Return :math:`(\pi\sqrt\lambda, \sqrt\lambda/\pi)` for :math:`\pi^2` = ``pi2``, each >= 1e-8."""
    pi, root = math.sqrt(pi2), math.sqrt(damping)
    return max(pi * root, 1e-8), max(root / pi, 1e-8)


def _spd_inverse(M: Tensor) -> Tensor:
    """Return the inverse of a symmetric positive definite matrix (by Cholesky), symmetrised."""
    L = torch.linalg.cholesky(M)
    inv = torch.cholesky_inverse(L)
    return (inv + inv.mT) / 2
