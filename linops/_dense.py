"""Operators backed by data: a dense torch matrix and a SciPy operator or sparse matrix.

Both compute in the promoted dtype of each product (a float32 matrix times a float64 vector
is computed in float64), as SciPy's do.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from linops._backend import operator_dtype
from linops.base import TorchLinearOperator

__all__ = ["_Dense", "_FromScipy"]


class _Dense(TorchLinearOperator):
    """A dense matrix held as a torch tensor; products run in their promoted dtype.

    A product in another dtype than the matrix's casts the matrix for that product (a
    cached cast would go stale if the caller writes to the matrix they passed in);
    :meth:`TorchLinearOperator.to` gives an operator holding the cast once.
    """

    computes_in_promoted_dtype = True

    def __init__(self, A: torch.Tensor) -> None:
        super().__init__(tuple(A.shape), dtype=A.dtype, device=A.device)
        self.A = A
        self.args = (A,)

    def _matmat_torch(self, X: torch.Tensor) -> torch.Tensor:
        return (self.A if X.dtype == self.A.dtype else self.A.to(X.dtype)) @ X

    def _rmatmat_torch(self, Y: torch.Tensor) -> torch.Tensor:
        return (self.A if Y.dtype == self.A.dtype else self.A.to(Y.dtype)).mH @ Y

    def _to(self, dtype: torch.dtype, device: torch.device) -> TorchLinearOperator:
        return _Dense(self.A.to(dtype=dtype, device=device))

    def to_dense(self, **_: Any) -> torch.Tensor:
        return self.A


class _FromScipy(TorchLinearOperator):
    """A SciPy ``LinearOperator`` (or sparse matrix) seen through torch; products go via numpy.

    Integer dtypes (an integer matrix, SciPy's int8-inferred ``LinearOperator(shape, matvec)``)
    are promoted to float64; products are computed by SciPy in their promoted dtype, on the host.
    """

    computes_in_promoted_dtype = True

    def __init__(self, A: Any, *, dtype: Any = None, device: torch.device | str = "cpu") -> None:
        from scipy.sparse.linalg import aslinearoperator as sp_aslinop

        self.A = sp_aslinop(A)
        dtype = operator_dtype(self.A.dtype, "A") if dtype is None else dtype
        super().__init__(self.A.shape, dtype=dtype, device=device)
        self.args = (A,)

    def _via_numpy(self, f: Callable[[np.ndarray], Any], X: torch.Tensor) -> torch.Tensor:
        out = np.asarray(f(X.detach().cpu().resolve_conj().numpy()))
        return torch.from_numpy(np.ascontiguousarray(out)).to(device=self.device, dtype=X.dtype)

    def _matmat_torch(self, X: torch.Tensor) -> torch.Tensor:
        return self._via_numpy(self.A.matmat, X)

    def _rmatmat_torch(self, Y: torch.Tensor) -> torch.Tensor:
        return self._via_numpy(self.A.rmatmat, Y)

    def _to(self, dtype: torch.dtype, device: torch.device) -> TorchLinearOperator:
        return _FromScipy(self.args[0], dtype=dtype, device=device)
