r"""The numerical rank of a model's full Jacobian, dense, through its Gram, or matrix-free.

The quantity that the reference rank of :mod:`estimators.reference` estimates ("Leveraging Low
Rank Structure in the Lazy Regime", an anonymous ICLR 2025 submission, no arXiv id given,
section 3.2); thresholds are :func:`linops.numerical_rank`'s.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from estimators._jacobian_blocks import inputs_tensor, num_outputs, param_space, per_sample_blocks
from estimators.seeding import Seed
from linops import Params
from linops.base import TorchLinearOperator
from linops.jacobian import JacobianOperator
from linops.rank import numerical_rank

__all__ = ["exact_jacobian_rank"]


def exact_jacobian_rank(
    model: torch.nn.Module,
    inputs: torch.Tensor | Sequence[torch.Tensor],
    *,
    params: Params | None = None,
    output_index: int | None = None,
    center: bool = False,
    rtol: float | None = None,
    method: str = "auto",
    dtype: torch.dtype | None = None,
    seed: Seed = 0,
) -> int:
    r"""Numerical rank of the full Jacobian (the quantity the reference rank estimates).

    Parameters
    ----------
    center
        Row-centre over all ``m`` columns, :math:`\tilde J = J (I - \mathbf{1}\mathbf{1}^\top/m)`.
    rtol
        Singular values above ``rtol * sigma_1`` count; default ``max(rows, m) eps`` (dense
        and gram), :func:`linops.numerical_rank`'s operator default ``sqrt(eps)``
        (matrix-free: a randomized range finder resolves no less); the gram method's default
        is at least ``sqrt(rows eps_64)``, what its float64 Gram can tell from 0.
    method
        ``"dense"``: singular values of the Jacobian assembled from per-sample blocks (for
        ``rows * m`` up to a few 1e7 entries); ``"matrix_free"``: :func:`linops.numerical_rank`
        on the :class:`linops.JacobianOperator` (adaptive range finder); ``"gram"``: the
        Jacobian assembled in its dtype, :math:`J J^\top` formed in float64 by column blocks and
        :math:`\sigma_i = \sqrt{\lambda_i(J J^\top)}` (for few rows and many columns: the
        float64 Gram resolves :math:`\sigma_i/\sigma_1` down to about 1e-8, below float32's
        own rounding of ``J``); ``"auto"``: dense up to 512 MiB, gram up to 4096 rows and
        4 GiB, else matrix-free.
    dtype
        Compute in this dtype (float64 recommended for small models).

    Returns
    -------
    int
    """
    if method not in ("auto", "dense", "gram", "matrix_free"):
        raise ValueError(
            f"method: expected 'auto', 'dense', 'gram' or 'matrix_free', got {method!r}"
        )
    X = inputs_tensor(inputs)
    space = param_space(model, params, dtype)
    X = X.to(dtype=space.dtype, device=space.device)
    d = num_outputs(space, X, output_index)
    rows, m = len(X) * d, space.dim
    item = torch.empty((), dtype=space.dtype).element_size()
    if method == "auto":
        size = rows * m * item
        method = (
            "dense"
            if size <= 512 * 2**20
            else "gram"
            if rows <= 4096 and size <= 4 * 2**30
            else "matrix_free"
        )
    if method in ("dense", "gram"):
        with torch.no_grad():
            J = torch.cat(list(per_sample_blocks(space, X, output_index, d)))
        if center:
            J = J - J.mean(dim=1, keepdim=True)
        if method == "dense":
            return numerical_rank(J, rtol)  # linops' default: max(rows, m) eps
        s = _gram_singular_values(J)
        # the default for the singular values of J found through its Gram: never below what
        # the float64 Gram resolves; its eigenvalues carry errors of about rows eps sigma_1^2,
        # so zero singular values come out near sqrt(rows eps) sigma_1 (5e-9 sigma_1 for 24
        # rows: two zeros counted as nonzero at max(rows, m) eps = 8e-15). A given rtol is kept
        floor = math.sqrt(rows * torch.finfo(torch.float64).eps)
        tol = max(max(rows, m) * torch.finfo(J.dtype).eps, floor) if rtol is None else rtol
        return int((s > tol * float(s[0])).sum())
    return _matrix_free_rank(model, X, params, output_index, center, rtol, space.dtype, seed)


def _gram_singular_values(J: torch.Tensor, block: int = 8192) -> torch.Tensor:
    K = torch.zeros(J.shape[0], J.shape[0], dtype=torch.float64, device=J.device)
    for i in range(0, J.shape[1], block):
        B = J[:, i : i + block].double()
        K += B @ B.T
    return torch.linalg.eigvalsh(K).flip(0).clamp_min(0).sqrt()


def _matrix_free_rank(
    model: torch.nn.Module,
    X: torch.Tensor,
    params: Params | None,
    output_index: int | None,
    center: bool,
    rtol: float | None,
    dtype: torch.dtype,
    seed: Seed,
) -> int:
    J = JacobianOperator(model, X, params, output_index=output_index, dtype=dtype)
    op = _RowCentered(J) if center else J
    kwargs: dict[str, Any] = {"seed": seed}
    if rtol is not None:
        kwargs["rtol"] = rtol
    return int(numerical_rank(op, **kwargs))


class _RowCentered(TorchLinearOperator):
    r""":math:`J (I - \mathbf{1}\mathbf{1}^\top / m)`: every row minus its mean over the columns."""

    def __init__(self, J: JacobianOperator) -> None:
        self.J = J
        super().__init__(J.shape, dtype=J.torch_dtype, device=J.device)

    def _matmat_torch(self, X: torch.Tensor) -> torch.Tensor:
        return self.J._apply(X - X.mean(dim=0, keepdim=True))

    def _rmatmat_torch(self, Y: torch.Tensor) -> torch.Tensor:
        Z = self.J._apply(Y, adjoint=True)
        return Z - Z.mean(dim=0, keepdim=True)
