"""The lazy composites of :class:`linops.base.TorchLinearOperator`.

Sums, products, scalings, powers, adjoints and transposes (``A + B``, ``A @ B``,
``alpha * A``, ``A ** p``, ``A.H``, ``A.T``).

Each one holds its operands in ``ops`` (chains of sums and of products are flattened) and
computes in the promoted dtype of each product; ``args`` keeps the operands as SciPy's
composites do.
"""

from __future__ import annotations

import functools
import itertools
import numbers
from collections.abc import Sequence
from typing import Any, cast

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator

from linops._backend import numpy_dtype, scalar_dtype
from linops.base import TorchLinearOperator, aslinearoperator

__all__ = ["_Adjoint", "_Composite", "_Power", "_Product", "_Scaled", "_Sum", "_Transposed"]


class _Composite(TorchLinearOperator):
    """An operator built from others; computes in the promoted dtype of each product."""

    computes_in_promoted_dtype = True

    def __init__(
        self,
        shape: tuple[int, int],
        ops: Sequence[TorchLinearOperator],
        dtype: np.dtype | None = None,
    ) -> None:
        dtype = np.result_type(*(op.dtype for op in ops)) if dtype is None else dtype
        devices = {op.device for op in ops}
        if len(devices) > 1:
            raise ValueError(f"operands live on different devices: {sorted(map(str, devices))}")
        super().__init__(shape, dtype=dtype, device=devices.pop())
        self.ops = list(ops)

    def _converted_ops(self, dtype: torch.dtype, device: torch.device) -> list[TorchLinearOperator]:
        """Return the operands converted so that the rebuilt composite has ``dtype``."""
        if dtype.is_complex and not self.torch_dtype.is_complex:
            return [op.to(dtype, device=device) for op in self.ops]
        real = dtype.to_real()
        return [
            op.to(dtype if op.torch_dtype.is_complex else real, device=device) for op in self.ops
        ]


class _Sum(_Composite):
    """``A + B``; nested sums are flattened into ``ops``, ``args`` keeps the two operands."""

    def __init__(self, *operands: Any) -> None:
        flat: list[TorchLinearOperator] = []
        for op in map(aslinearoperator, operands):
            flat.extend(op.ops if isinstance(op, _Sum) else [op])
        shapes = {op.shape for op in flat}
        if len(shapes) > 1:
            raise ValueError(f"cannot add operators of shapes {sorted(shapes)}")
        super().__init__(flat[0].shape, flat)
        self.args = operands
        self.is_symmetric = all(op.is_symmetric for op in flat)

    def _matmat_torch(self, X: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, sum(op._apply(X) for op in self.ops))

    def _rmatmat_torch(self, Y: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, sum(op._apply(Y, True) for op in self.ops))

    def _adjoint(self) -> TorchLinearOperator:
        if self.is_symmetric and not self.torch_dtype.is_complex:
            return self
        return _Sum(*(op.H for op in self.ops))

    def _to(self, dtype: torch.dtype, device: torch.device) -> TorchLinearOperator:
        return _Sum(*self._converted_ops(dtype, device))


class _Product(_Composite):
    """``ops[0] @ ops[1] @ ... @ ops[-1]``, applied right to left; ``args`` keeps the two operands."""

    def __init__(self, *operands: Any) -> None:
        flat: list[TorchLinearOperator] = []
        for op in map(aslinearoperator, operands):
            flat.extend(op.ops if isinstance(op, _Product) else [op])
        for left, right in itertools.pairwise(flat):
            if left.shape[1] != right.shape[0]:
                raise ValueError(f"dimension mismatch in product: {left.shape} @ {right.shape}")
        super().__init__((flat[0].shape[0], flat[-1].shape[1]), flat)
        self.args = operands

    def _matmat_torch(self, X: torch.Tensor) -> torch.Tensor:
        for op in reversed(self.ops):
            X = op._apply(X)
        return X

    def _rmatmat_torch(self, Y: torch.Tensor) -> torch.Tensor:
        for op in self.ops:
            Y = op._apply(Y, True)
        return Y

    def _adjoint(self) -> TorchLinearOperator:
        return _Product(*(op.H for op in reversed(self.ops)))

    def _to(self, dtype: torch.dtype, device: torch.device) -> TorchLinearOperator:
        return _Product(*self._converted_ops(dtype, device))


class _Scaled(_Composite):
    """``alpha * A``; its dtype is numpy's promotion of ``A``'s and ``alpha``'s (NEP 50)."""

    def __init__(self, op: TorchLinearOperator, alpha: Any, dtype: np.dtype | None = None) -> None:
        alpha = _python_scalar(alpha) if isinstance(alpha, torch.Tensor) else alpha
        if isinstance(op, _Scaled):
            op, alpha = op.args[0], alpha * op.args[1]
        dtype = scalar_dtype(op.dtype, alpha) if dtype is None else dtype
        super().__init__(op.shape, [op], dtype)
        self.args = (op, alpha)
        #: the scale as a Python number (weak in torch's promotion)
        self.alpha = complex(alpha) if np.iscomplexobj(alpha) else float(alpha)
        self.is_symmetric = op.is_symmetric and not np.iscomplexobj(alpha)

    def _matmat_torch(self, X: torch.Tensor) -> torch.Tensor:
        return self.alpha * self.ops[0]._apply(X)

    def _rmatmat_torch(self, Y: torch.Tensor) -> torch.Tensor:
        return self.alpha.conjugate() * self.ops[0]._apply(Y, True)

    def _adjoint(self) -> TorchLinearOperator:
        if self.is_symmetric and not self.torch_dtype.is_complex:
            return self
        return _Scaled(self.ops[0].H, self.args[1].conjugate(), self.dtype)

    def _to(self, dtype: torch.dtype, device: torch.device) -> TorchLinearOperator:
        return _Scaled(self._converted_ops(dtype, device)[0], self.alpha, numpy_dtype(dtype))


class _Power(_Composite):
    """``A ** p``: ``p`` products with the square operator ``A`` (a copy of ``x`` for ``p = 0``)."""

    def __init__(self, op: TorchLinearOperator, p: Any) -> None:
        if op.shape[0] != op.shape[1]:
            raise ValueError(f"p: powers need a square operator, got shape {op.shape}")
        if not isinstance(p, numbers.Integral | np.integer) or p < 0:
            raise ValueError(f"p: expected a non-negative integer, got {p!r}")
        super().__init__(op.shape, [op])
        self.args, self.p = (op, p), int(p)
        self.is_symmetric = op.is_symmetric

    def _matmat_torch(self, X: torch.Tensor) -> torch.Tensor:
        return self._power(X, False)

    def _rmatmat_torch(self, Y: torch.Tensor) -> torch.Tensor:
        return self._power(Y, True)

    def _power(self, X: torch.Tensor, adjoint: bool) -> torch.Tensor:
        if self.p == 0:
            return X.clone()
        for _ in range(self.p):
            X = self.ops[0]._apply(X, adjoint)
        return X

    def _adjoint(self) -> TorchLinearOperator:
        if self.is_symmetric and not self.torch_dtype.is_complex:
            return self
        return _Power(self.ops[0].H, self.p)

    def _to(self, dtype: torch.dtype, device: torch.device) -> TorchLinearOperator:
        return _Power(self._converted_ops(dtype, device)[0], self.p)


class _Adjoint(_Composite):
    """``A^H``."""

    def __init__(self, op: TorchLinearOperator) -> None:
        super().__init__((op.shape[1], op.shape[0]), [op])
        self.args = (op,)

    def _matmat_torch(self, X: torch.Tensor) -> torch.Tensor:
        return self.ops[0]._apply(X, True)

    def _rmatmat_torch(self, Y: torch.Tensor) -> torch.Tensor:
        return self.ops[0]._apply(Y)

    def _adjoint(self) -> TorchLinearOperator:
        return self.ops[0]

    def _to(self, dtype: torch.dtype, device: torch.device) -> TorchLinearOperator:
        return self._converted_ops(dtype, device)[0].H


class _Transposed(_Composite):
    """``A^T = conj(A^H)`` of a complex operator: ``A^T x = conj(A^H conj(x))``."""

    def __init__(self, op: TorchLinearOperator) -> None:
        super().__init__((op.shape[1], op.shape[0]), [op])
        self.args = (op,)

    def _matmat_torch(self, X: torch.Tensor) -> torch.Tensor:
        return _conj(self.ops[0]._apply(_conj(X), True))

    def _rmatmat_torch(self, Y: torch.Tensor) -> torch.Tensor:
        return _conj(self.ops[0]._apply(_conj(Y)))

    def _transpose(self) -> TorchLinearOperator:
        return self.ops[0]

    def _to(self, dtype: torch.dtype, device: torch.device) -> TorchLinearOperator:
        return self._converted_ops(dtype, device)[0].T


def _python_scalar(t: torch.Tensor) -> Any:
    return t.item()


def _conj(X: torch.Tensor) -> torch.Tensor:
    return X.conj_physical() if X.is_complex() else X


# --------------------------------------------------------------------------- SciPy's side
def _defer_scipy_composition() -> None:
    """Make SciPy's operators build linops composites when the other operand is ours.

    ``scipy_op + A`` and ``scipy_op @ A`` call SciPy's ``__add__`` / ``dot`` first, which
    never return ``NotImplemented``: their composites would turn torch tensors into numpy
    arrays. The patched methods hand the operation to ``A`` when ``A`` is a
    :class:`TorchLinearOperator` and behave exactly as before otherwise. Idempotent.
    """
    if getattr(LinearOperator.dot, "_linops_defers", False):
        return
    add, dot = LinearOperator.__add__, LinearOperator.dot

    @functools.wraps(add)
    def __add__(self: LinearOperator, x: Any) -> Any:
        if isinstance(x, TorchLinearOperator) and not isinstance(self, TorchLinearOperator):
            return _Sum(self, x)
        return add(self, x)

    @functools.wraps(dot)
    def dot_(self: LinearOperator, x: Any) -> Any:
        if isinstance(x, TorchLinearOperator) and not isinstance(self, TorchLinearOperator):
            return _Product(self, x)
        return dot(self, x)

    __add__._linops_defers = dot_._linops_defers = True  # type: ignore[attr-defined]
    LinearOperator.__add__, LinearOperator.dot = __add__, dot_


_defer_scipy_composition()
