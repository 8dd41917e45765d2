r"""The operator core: a SciPy ``LinearOperator`` that speaks torch (and CuPy) natively.

A :class:`TorchLinearOperator` represents a matrix :math:`A \in \mathbb{R}^{m \times n}` through
its products :math:`A X` and :math:`A^\top Y`. Subclasses implement two hooks on torch tensors
of shape ``(n, k)`` and ``(m, k)``; the base class does all conversion, validation, chunking of
many-vector products and composition:

* numpy in -> numpy out, so ``scipy.sparse.linalg.eigsh(op)`` works as is;
* torch in -> torch out on the operator's device, no host copy;
* CuPy in -> CuPy out through DLPack, zero copy.

Composition (``@``, ``+``, ``-``, scalar ``*``, ``.T``/``.H``) builds lazy torch composites of
this module, never SciPy's (which would turn tensors into numpy arrays).
"""

from __future__ import annotations

import cmath
import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator

from linops._backend import array_kind, from_torch, numpy_dtype, to_torch, torch_dtype

__all__ = ["IdentityOperator", "TorchLinearOperator", "aslinearoperator"]


class TorchLinearOperator(LinearOperator):
    r"""A linear operator whose products are torch computations.

    Parameters
    ----------
    shape
        ``(m, n)``: the operator maps vectors of length ``n`` to vectors of length ``m``.
    dtype
        Torch dtype of the products (``torch.float32`` or ``torch.float64``, or complex).
    device
        Torch device on which the products run and vectors live.
    max_vectors
        Largest number of vectors pushed through one batched pass; a product with more
        columns is split into chunks of at most this many. ``None``: derived from
        ``memory_limit_bytes`` or unbounded.
    memory_limit_bytes
        Bound on the extra memory of one batched pass, turned into ``max_vectors`` through
        :meth:`bytes_per_vector`.

    Notes
    -----
    Subclasses implement ``_matmat_torch(X) -> A X`` and ``_rmatmat_torch(Y) -> A^H Y``; a
    subclass that sets ``is_symmetric = True`` needs only the first. Inputs to the hooks are
    already validated, on the right device and dtype, two-dimensional and finite.
    """

    is_symmetric: bool = False
    #: whether the hooks read each column as parameter-shaped pieces, which a row-major block
    #: would make strided: :meth:`_apply` then hands them column-major blocks
    column_major_blocks: bool = False

    def __init__(
        self,
        shape: Sequence[int],
        *,
        dtype: torch.dtype,
        device: torch.device | str,
        max_vectors: int | None = None,
        memory_limit_bytes: int | None = None,
    ) -> None:
        shape = _check_shape(shape)
        self.torch_dtype = torch_dtype(dtype)
        self.device = torch.device(device)
        # explicit dtype: SciPy would otherwise probe with an int8 matvec (a hidden JVP)
        super().__init__(dtype=numpy_dtype(self.torch_dtype), shape=shape)
        self.max_vectors = _check_positive_or_none(max_vectors, "max_vectors")
        self.memory_limit_bytes = _check_positive_or_none(memory_limit_bytes, "memory_limit_bytes")
        self.check_finite = True

    # ----------------------------------------------------------------- subclass hooks
    def _matmat_torch(self, X: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} does not implement _matmat_torch")

    def _rmatmat_torch(self, Y: torch.Tensor) -> torch.Tensor:
        if self.is_symmetric:
            return self._matmat_torch(Y)
        raise NotImplementedError(f"{type(self).__name__} does not implement _rmatmat_torch")

    def bytes_per_vector(self) -> int:
        """Estimated extra memory of one vector in a batched pass (used with the memory limit)."""
        return (self.shape[0] + self.shape[1]) * _itemsize(self.torch_dtype)

    # ----------------------------------------------------------------- the batched fast path
    def vectors_per_pass(self) -> int | None:
        """Number of vectors per batched pass implied by ``max_vectors`` and the memory limit."""
        limits = []
        if self.max_vectors is not None:
            limits.append(self.max_vectors)
        if self.memory_limit_bytes is not None:
            limits.append(max(1, self.memory_limit_bytes // max(1, self.bytes_per_vector())))
        return min(limits) if limits else None

    def _apply(self, X: torch.Tensor, adjoint: bool = False) -> torch.Tensor:
        """Unchecked product with a 2-d tensor on the right device, chunked over columns.

        This is the entry point algorithms use inside their iterations (no validation).
        """
        if X.is_complex() and not self.torch_dtype.is_complex:
            return torch.complex(self._apply(X.real, adjoint), self._apply(X.imag, adjoint))
        hook = self._rmatmat_torch if adjoint else self._matmat_torch
        k = X.shape[1]
        if self.column_major_blocks and k > 1 and X.stride(0) != 1:
            # one transposed copy makes every column, and every parameter-shaped view of one,
            # contiguous (gathering a chunk's columns from a row-major block took 134 ms for
            # 32 columns of 1.1M rows, the copy 50 ms)
            X = X.T.contiguous().T
        chunk = self.vectors_per_pass()
        if chunk is None or k <= chunk:
            return hook(X)
        parts = [hook(X[:, i : i + chunk]) for i in range(0, k, chunk)]
        return torch.cat([part.T for part in parts]).T  # column-major, as a single pass gives

    # ----------------------------------------------------------------- public products
    def matmat(self, X: Any) -> Any:
        """``A @ X`` for a matrix ``X`` of shape ``(n, k)`` (numpy, torch or CuPy)."""
        return self._dispatch(X, adjoint=False, matrix_only=True)

    def matvec(self, x: Any) -> Any:
        """``A @ x`` for a vector of length ``n`` (or an ``(n, 1)`` matrix)."""
        return self._dispatch(x, adjoint=False, vector_only=True)

    def rmatmat(self, Y: Any) -> Any:
        """``A^H @ Y`` for a matrix ``Y`` of shape ``(m, k)``."""
        return self._dispatch(Y, adjoint=True, matrix_only=True)

    def rmatvec(self, y: Any) -> Any:
        """``A^H @ y`` for a vector of length ``m``."""
        return self._dispatch(y, adjoint=True, vector_only=True)

    def _dispatch(
        self, x: Any, *, adjoint: bool, matrix_only: bool = False, vector_only: bool = False
    ) -> Any:
        n = self.shape[0] if adjoint else self.shape[1]
        name = "y" if adjoint else "x"
        t, kind = to_torch(x, dtype=self.torch_dtype, device=self.device)
        if vector_only and not (t.ndim == 1 or (t.ndim == 2 and t.shape[1] == 1)):
            raise ValueError(f"{name}: expected a vector of length {n}, got shape {tuple(t.shape)}")
        if matrix_only and t.ndim != 2:
            raise ValueError(f"{name}: expected a matrix with {n} rows, got shape {tuple(t.shape)}")
        if t.ndim not in (1, 2) or t.shape[0] != n:
            raise ValueError(
                f"{name}: dimension mismatch, expected shape ({n},) or ({n}, k) for an operator "
                f"of shape {self.shape}{' (adjoint)' if adjoint else ''}, got {tuple(t.shape)}"
            )
        self._check_tensor(t, name)
        out = self._apply(t.reshape(n, -1), adjoint)
        out = out.reshape(-1) if t.ndim == 1 else out
        return from_torch(out, kind)

    def _check_tensor(self, t: torch.Tensor, name: str) -> None:
        allowed = (self.torch_dtype, _complex_of(self.torch_dtype))
        if t.dtype not in allowed:
            raise TypeError(f"{name}: expected dtype {self.torch_dtype}, got {t.dtype}")
        if t.device != self.device:
            raise ValueError(f"{name}: expected a tensor on device {self.device}, got {t.device}")
        # a sum is NaN or inf if any entry is (one cheap pass, about 50x faster than an
        # elementwise isfinite on a million entries); only then is the exact test run, so
        # an overflowing sum of finite entries is not mistaken for bad input. cmath on the
        # Python scalar spares the two kernels of torch.isfinite (2.8 against 9.1 us here)
        if (
            self.check_finite
            and t.numel()
            and not cmath.isfinite(t.sum().item())
            and not bool(torch.isfinite(t).all())
        ):
            raise ValueError(f"{name}: contains NaN or inf")

    # SciPy's hooks, used only by SciPy's own composites and helpers
    def _matvec(self, x: Any) -> Any:
        return self.matvec(x)

    def _matmat(self, X: Any) -> Any:
        return self.matmat(X)

    def _rmatvec(self, y: Any) -> Any:
        return self.rmatvec(y)

    def _rmatmat(self, Y: Any) -> Any:
        return self.rmatmat(Y)

    # ----------------------------------------------------------------- composition
    def _adjoint(self) -> TorchLinearOperator:
        return self if self.is_symmetric and not self.torch_dtype.is_complex else _Adjoint(self)

    def _transpose(self) -> TorchLinearOperator:
        if self.torch_dtype.is_complex:
            raise NotImplementedError("transpose of a complex operator: use .H (the adjoint)")
        return self._adjoint()

    def __matmul__(self, other: Any) -> Any:
        if isinstance(other, LinearOperator):
            return _Product([self, aslinearoperator(other)])
        if np.isscalar(other):
            raise ValueError("scalar operands are not allowed with '@', use '*' instead")
        return self._dispatch(other, adjoint=False)

    def __rmatmul__(self, other: Any) -> Any:
        if np.isscalar(other):
            raise ValueError("scalar operands are not allowed with '@', use '*' instead")
        if isinstance(other, LinearOperator):
            return _Product([aslinearoperator(other), self])
        # x @ A = (A^T x^T)^T
        kind = array_kind(other)
        xt = other.T if getattr(other, "ndim", 1) == 2 else other
        out = self.T._dispatch(xt, adjoint=False)
        return out.T if kind != "numpy" or np.ndim(out) == 2 else out

    def dot(self, x: Any) -> Any:
        """SciPy's ``dot``: operator -> product, scalar -> scaled operator, array -> ``A @ x``."""
        if isinstance(x, LinearOperator):
            return self @ x
        if np.isscalar(x) or (isinstance(x, torch.Tensor) and x.ndim == 0):
            return _Scaled(self, x)
        return self._dispatch(x, adjoint=False)

    def __mul__(self, x: Any) -> Any:
        return self.dot(x)

    def __rmul__(self, x: Any) -> Any:
        if np.isscalar(x) or (isinstance(x, torch.Tensor) and x.ndim == 0):
            return _Scaled(self, x)
        return NotImplemented

    def __truediv__(self, x: Any) -> TorchLinearOperator:
        if not np.isscalar(x):
            raise ValueError(f"can only divide an operator by a scalar, got {type(x).__name__}")
        return _Scaled(self, 1.0 / x)

    def __add__(self, other: Any) -> TorchLinearOperator:
        if not isinstance(other, LinearOperator):
            return NotImplemented
        return _Sum([self, aslinearoperator(other)])

    def __radd__(self, other: Any) -> TorchLinearOperator:
        if not isinstance(other, LinearOperator):
            return NotImplemented
        return _Sum([aslinearoperator(other), self])

    def __neg__(self) -> TorchLinearOperator:
        return _Scaled(self, -1.0)

    def __sub__(self, other: Any) -> TorchLinearOperator:
        return self + (-aslinearoperator(other))

    def __rsub__(self, other: Any) -> TorchLinearOperator:
        return aslinearoperator(other) + (-self)

    # ----------------------------------------------------------------- dense forms
    def to_dense(
        self,
        *,
        max_vectors: int | None = None,
        process_group: Any = None,
        checkpoint_dir: Any = None,
    ) -> torch.Tensor:
        """The operator as a dense ``(m, n)`` tensor on its device, built in column chunks.

        Meant for small operators and tests. ``max_vectors`` bounds the columns per pass
        (default: the operator's own bound, else 256). With a ``torch.distributed``
        ``process_group`` the column chunks are split across its ranks and all-gathered; with
        a ``checkpoint_dir`` every chunk is saved as it is computed and a rerun resumes
        (see :func:`linops.distributed.dense_columns`).
        """
        if process_group is not None or checkpoint_dir is not None:
            from linops.distributed import dense_columns

            return dense_columns(
                self, process_group, max_vectors=max_vectors, checkpoint_dir=checkpoint_dir
            )
        m, n = self.shape
        chunk = max_vectors or self.vectors_per_pass() or 256
        eye = torch.eye(n, dtype=self.torch_dtype, device=self.device)
        cols = [self._apply(eye[:, i : i + chunk]) for i in range(0, n, chunk)]
        return torch.cat(cols, dim=1) if cols else torch.zeros(m, 0, dtype=self.torch_dtype)

    def to_scipy(self) -> TorchLinearOperator:
        """The operator as a SciPy ``LinearOperator``: it already is one."""
        return self

    def __repr__(self) -> str:
        return (
            f"<{self.shape[0]}x{self.shape[1]} {type(self).__name__} "
            f"with dtype={self.torch_dtype}, device={self.device}>"
        )


# --------------------------------------------------------------------------- composites
class _Composite(TorchLinearOperator):
    def __init__(self, shape: tuple[int, int], ops: Sequence[TorchLinearOperator]) -> None:
        dtype = ops[0].torch_dtype
        for op in ops[1:]:
            dtype = torch.promote_types(dtype, op.torch_dtype)
        devices = {op.device for op in ops}
        if len(devices) > 1:
            raise ValueError(f"operands live on different devices: {sorted(map(str, devices))}")
        super().__init__(shape, dtype=dtype, device=devices.pop())
        self.ops = list(ops)


class _Sum(_Composite):
    def __init__(self, ops: Sequence[TorchLinearOperator]) -> None:
        flat: list[TorchLinearOperator] = []
        for op in ops:
            flat.extend(op.ops if isinstance(op, _Sum) else [op])
        shapes = {op.shape for op in flat}
        if len(shapes) > 1:
            raise ValueError(f"cannot add operators of shapes {sorted(shapes)}")
        super().__init__(flat[0].shape, flat)
        self.is_symmetric = all(op.is_symmetric for op in flat)

    def _matmat_torch(self, X: torch.Tensor) -> torch.Tensor:
        return sum(op._apply(X.to(op.torch_dtype)).to(self.torch_dtype) for op in self.ops)

    def _rmatmat_torch(self, Y: torch.Tensor) -> torch.Tensor:
        return sum(op._apply(Y.to(op.torch_dtype), True).to(self.torch_dtype) for op in self.ops)


class _Product(_Composite):
    """``ops[0] @ ops[1] @ ... @ ops[-1]``, applied right to left."""

    def __init__(self, ops: Sequence[TorchLinearOperator]) -> None:
        flat: list[TorchLinearOperator] = []
        for op in ops:
            flat.extend(op.ops if isinstance(op, _Product) else [op])
        for left, right in itertools.pairwise(flat):
            if left.shape[1] != right.shape[0]:
                raise ValueError(f"dimension mismatch in product: {left.shape} @ {right.shape}")
        super().__init__((flat[0].shape[0], flat[-1].shape[1]), flat)

    def _matmat_torch(self, X: torch.Tensor) -> torch.Tensor:
        for op in reversed(self.ops):
            X = op._apply(X.to(op.torch_dtype))
        return X.to(self.torch_dtype)

    def _rmatmat_torch(self, Y: torch.Tensor) -> torch.Tensor:
        for op in self.ops:
            Y = op._apply(Y.to(op.torch_dtype), True)
        return Y.to(self.torch_dtype)


class _Scaled(_Composite):
    def __init__(self, op: TorchLinearOperator, alpha: Any) -> None:
        alpha = alpha.item() if isinstance(alpha, torch.Tensor) else alpha
        if isinstance(op, _Scaled):
            op, alpha = op.ops[0], alpha * op.alpha
        super().__init__(op.shape, [op])
        if isinstance(alpha, complex) and not self.torch_dtype.is_complex:
            raise TypeError(f"cannot scale a real operator by the complex number {alpha}")
        self.alpha = alpha
        self.is_symmetric = op.is_symmetric and not isinstance(alpha, complex)

    def _matmat_torch(self, X: torch.Tensor) -> torch.Tensor:
        return self.alpha * self.ops[0]._apply(X)

    def _rmatmat_torch(self, Y: torch.Tensor) -> torch.Tensor:
        alpha = self.alpha.conjugate() if isinstance(self.alpha, complex) else self.alpha
        return alpha * self.ops[0]._apply(Y, True)


class _Adjoint(_Composite):
    def __init__(self, op: TorchLinearOperator) -> None:
        super().__init__((op.shape[1], op.shape[0]), [op])

    def _matmat_torch(self, X: torch.Tensor) -> torch.Tensor:
        return self.ops[0]._apply(X, True)

    def _rmatmat_torch(self, Y: torch.Tensor) -> torch.Tensor:
        return self.ops[0]._apply(Y)

    def _adjoint(self) -> TorchLinearOperator:
        return self.ops[0]


class _Dense(TorchLinearOperator):
    """A dense matrix held as a torch tensor."""

    def __init__(self, A: torch.Tensor) -> None:
        super().__init__(tuple(A.shape), dtype=A.dtype, device=A.device)
        self.A = A

    def _matmat_torch(self, X: torch.Tensor) -> torch.Tensor:
        return self.A @ X

    def _rmatmat_torch(self, Y: torch.Tensor) -> torch.Tensor:
        return self.A.mH @ Y

    def to_dense(self, **_: Any) -> torch.Tensor:
        return self.A


class _FromScipy(TorchLinearOperator):
    """A SciPy ``LinearOperator`` (or sparse matrix) seen through torch; products go via numpy."""

    def __init__(self, A: LinearOperator) -> None:
        super().__init__(A.shape, dtype=torch_dtype(A.dtype), device="cpu")
        self.A = A

    def _matmat_torch(self, X: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self.A.matmat(X.numpy()))).to(self.torch_dtype)

    def _rmatmat_torch(self, Y: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self.A.rmatmat(Y.numpy()))).to(self.torch_dtype)


class IdentityOperator(TorchLinearOperator):
    """The ``n x n`` identity (for shifts such as ``J - I`` of a training Jacobian)."""

    is_symmetric = True

    def __init__(
        self, n: int, *, dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu"
    ) -> None:
        super().__init__((n, n), dtype=dtype, device=device)

    def _matmat_torch(self, X: torch.Tensor) -> torch.Tensor:
        return X


def aslinearoperator(A: Any) -> TorchLinearOperator:
    """View ``A`` as a :class:`TorchLinearOperator`.

    Parameters
    ----------
    A
        A ``TorchLinearOperator`` (returned as is), a dense 2-d torch tensor (stays on its
        device), a dense 2-d numpy or CuPy array, a SciPy sparse matrix, or a SciPy
        ``LinearOperator`` (its products go through numpy on the host).

    Returns
    -------
    TorchLinearOperator

    Raises
    ------
    TypeError
        If ``A`` is none of the above.

    Examples
    --------
    >>> import torch
    >>> A = aslinearoperator(torch.tensor([[2.0, 0.0], [0.0, 3.0]], dtype=torch.float64))
    >>> (A @ torch.ones(2, dtype=torch.float64)).tolist()
    [2.0, 3.0]
    """
    if isinstance(A, TorchLinearOperator):
        return A
    if isinstance(A, torch.Tensor):
        if A.ndim != 2:
            raise ValueError(f"A: expected a 2-d tensor, got shape {tuple(A.shape)}")
        if not (A.is_floating_point() or A.is_complex()):
            A = A.to(torch.get_default_dtype())
        return _Dense(A)
    if array_kind(A) == "cupy":
        return _Dense(torch.from_dlpack(A))
    if isinstance(A, LinearOperator) or hasattr(A, "tocsr"):
        from scipy.sparse.linalg import aslinearoperator as sp_aslinop

        return _FromScipy(sp_aslinop(A))
    if isinstance(A, np.ndarray | list):
        arr = np.asarray(A)
        if arr.ndim != 2:
            raise ValueError(f"A: expected a 2-d array, got shape {arr.shape}")
        if arr.dtype.kind not in "fc":
            arr = arr.astype(np.float64)
        return _Dense(torch.from_numpy(np.ascontiguousarray(arr)))
    raise TypeError(
        "A: expected a TorchLinearOperator, a SciPy LinearOperator or sparse matrix, or a "
        f"2-d torch/numpy/CuPy array, got {type(A).__name__}"
    )


# --------------------------------------------------------------------------- helpers
def _check_shape(shape: Sequence[int]) -> tuple[int, int]:
    shape = tuple(shape)
    if len(shape) != 2 or not all(isinstance(s, int | np.integer) and s >= 0 for s in shape):
        raise ValueError(f"shape: expected two non-negative integers, got {shape!r}")
    return int(shape[0]), int(shape[1])


def _check_positive_or_none(value: int | None, name: str) -> int | None:
    if value is not None and (not isinstance(value, int | np.integer) or value < 1):
        raise ValueError(f"{name}: expected a positive integer or None, got {value!r}")
    return value


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _complex_of(dtype: torch.dtype) -> torch.dtype:
    if dtype.is_complex:
        return dtype
    return torch.complex128 if dtype == torch.float64 else torch.complex64
