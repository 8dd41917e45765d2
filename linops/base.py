r"""The operator core: a SciPy ``LinearOperator`` that speaks torch (and CuPy) natively.

A :class:`TorchLinearOperator` represents a matrix :math:`A \in \mathbb{C}^{m \times n}` through
its products :math:`A X` and :math:`A^H Y`. Subclasses implement two hooks on torch tensors
of shape ``(n, k)`` and ``(m, k)``; the base class does all conversion, validation, chunking of
many-vector products and composition, with SciPy's semantics for every entry point
(``matvec``, ``matmat``, ``rmatvec``, ``rmatmat``, ``dot``, ``@`` on either side, ``*``,
``__call__``, ``**``, ``.H``, ``.T``, ``.args``):

* numpy in -> numpy out (``np.matrix`` stays a matrix through ``matvec``/``matmat``/
  ``rmatvec``/``rmatmat``, as in SciPy), so ``scipy.sparse.linalg.eigsh(op)`` works as is;
* torch in -> torch out on the operator's device, no host copy;
* CuPy in -> CuPy out through DLPack, zero copy.

Dtype policy (the same for numpy, torch and CuPy inputs): a product's dtype is numpy's
promotion of the operator's dtype and the input's dtype (:func:`linops._backend.result_dtype`),
so a float32 operator times a float64 or int64 vector is float64, as SciPy returns it.
Operators backed by data that can be cast (dense matrices, the identity, SciPy operators, and
composites of them) *compute* in that promoted dtype, so a float32 matrix solved against a
float64 right-hand side reaches float64 accuracy. Every other operator (the model operators)
computes in its own dtype and returns the promoted dtype: ``op.to(dtype=torch.float64)`` gives
a new operator that computes in float64. Python scalars are weak in ``alpha * A`` (NEP 50):
``0.5 * A`` keeps a float32 operator float32, ``2j * A`` makes it complex64.

Composition (``@``, ``+``, ``-``, ``*``, ``**``, ``.T``/``.H``) builds lazy torch composites
(:mod:`linops._composites`), never SciPy's (which would turn tensors into numpy arrays);
importing this module also makes ``scipy_op + A``, ``scipy_op @ A``, ``scipy_op * A`` and
``scipy_op.dot(A)`` build them when ``A`` is a :class:`TorchLinearOperator`
(:func:`linops._composites._defer_scipy_composition`). Dense and SciPy-backed operators live in
:mod:`linops._dense`.

This module is over 500 lines for one reason: it is one class, the protocol every operator
inherits, and each of SciPy's entry points it implements (``matvec`` ... ``__pow__``) keeps
its own documented contract; the composites and data-backed operators are already elsewhere.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import Any, cast, overload

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator

from linops._backend import (
    array_kind,
    from_torch,
    numpy_dtype,
    operator_dtype,
    result_dtype,
    tensor_of,
    torch_dtype,
)
from linops._checks import check_finite, check_positive_or_none, check_shape
from linops._types import (
    Array,
    ArrayLike,
    ArrayT,
    OperatorLike,
    ProcessGroup,
    SupportsMatvec,
)
from linops.memory import check_memory_budget

__all__ = ["IdentityOperator", "TorchLinearOperator", "aslinearoperator"]


class TorchLinearOperator(LinearOperator):
    r"""A linear operator whose products are torch computations.

    Parameters
    ----------
    shape
        ``(m, n)``: the operator maps vectors of length ``n`` to vectors of length ``m``.
    dtype
        Torch dtype of the operator (``torch.float32`` or ``torch.float64``, or complex; a
        numpy dtype is accepted too).
    device
        Torch device on which the products run and vectors live.
    max_vectors
        Largest number of vectors pushed through one batched pass; a product with more
        columns is split into chunks of at most this many. ``None``: derived from
        ``memory_budget`` or unbounded.
    memory_budget
        Bound in bytes on the extra memory of one batched pass, turned into ``max_vectors``
        through :meth:`bytes_per_vector` (the model operators measure a pass instead, and
        bound their cached graphs and batches by it too). ``memory_limit_bytes`` is its
        deprecated former name.

    Notes
    -----
    Subclasses implement ``_matmat_torch(X) -> A X`` and ``_rmatmat_torch(Y) -> A^H Y``; a
    subclass that sets ``is_symmetric = True`` (Hermitian, for a complex operator) needs only
    the first. Inputs to the hooks are already validated, on the right device, two-dimensional
    and finite, and in the operator's own dtype, unless the subclass sets
    ``computes_in_promoted_dtype = True``: then they come in the product's promoted dtype
    (real, when the operator is real: complex blocks reach a real operator's hooks as their
    real and imaginary parts side by side). A subclass holding data overrides
    :meth:`_to` so that :meth:`to` can convert it.

    Products take the dtype numpy's promotion gives for the operator's and the input's dtype;
    see the module docstring for the policy.

    Examples
    --------
    >>> import numpy as np
    >>> A = aslinearoperator(np.array([[1, 2, 3], [4, 5, 6]], dtype=np.float32))
    >>> (A @ np.ones(3)).dtype  # float32 operator, float64 vector: float64, computed in float64
    dtype('float64')
    >>> ([[1, 2], [3, 4]] @ A).tolist()  # a nested list on the left is a matrix
    [[9.0, 12.0, 15.0], [19.0, 26.0, 33.0]]
    >>> ((2j * A).T @ np.ones(2)).tolist()  # A^T: the conjugate of the adjoint
    [10j, 14j, 18j]
    """

    is_symmetric: bool = False
    #: whether the hooks compute in the promoted dtype of a product (dense data, identities,
    #: composites) rather than in the operator's own dtype (model operators)
    computes_in_promoted_dtype: bool = False
    #: whether the hooks read each column as parameter-shaped pieces, which a row-major block
    #: would make strided: :meth:`_apply` then hands them column-major blocks
    column_major_blocks: bool = False
    #: SciPy's ``args``: the operands of a composite (``(A, B)`` of ``A + B``, ``(A, alpha)``
    #: of ``alpha * A``, ``(A, p)`` of ``A ** p``, ``(A,)`` of ``A.H``), ``()`` otherwise
    args: tuple[Any, ...] = ()

    def __init__(
        self,
        shape: Sequence[int],
        *,
        dtype: torch.dtype | np.dtype | type,
        device: torch.device | str,
        max_vectors: int | None = None,
        memory_budget: int | None = None,
        memory_limit_bytes: int | None = None,
    ) -> None:
        shape = check_shape(shape)
        self.torch_dtype = torch_dtype(dtype)
        self.device = torch.device(device)
        # explicit dtype: SciPy would otherwise probe with an int8 matvec (a hidden JVP)
        super().__init__(dtype=numpy_dtype(self.torch_dtype), shape=shape)
        self.max_vectors = check_positive_or_none(max_vectors, "max_vectors")
        self.memory_budget = check_memory_budget(memory_budget)
        if memory_limit_bytes is not None:
            check_memory_budget(memory_limit_bytes, "memory_limit_bytes")
            warnings.warn(
                "memory_limit_bytes is deprecated: pass memory_budget= (bytes)",
                DeprecationWarning,
                stacklevel=3,
            )
            if self.memory_budget is None:
                self.memory_budget = int(memory_limit_bytes)
        self.check_finite = True

    @property
    def memory_limit_bytes(self) -> int | None:
        """Deprecated name of :attr:`memory_budget`."""
        return self.memory_budget

    # ----------------------------------------------------------------- subclass hooks
    def _matmat_torch(self, X: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} does not implement _matmat_torch")

    def _rmatmat_torch(self, Y: torch.Tensor) -> torch.Tensor:
        if self.is_symmetric:
            return self._matmat_torch(Y)
        raise NotImplementedError(f"{type(self).__name__} does not implement _rmatmat_torch")

    def _to(self, dtype: torch.dtype, device: torch.device) -> TorchLinearOperator:
        """Return a new operator computing in ``dtype`` on ``device`` (the hook of :meth:`to`).

        ``dtype`` is a floating or complex torch dtype, already checked (a complex operator
        is never asked for a real dtype). Must not modify ``self``.
        """
        raise NotImplementedError(
            f"{type(self).__name__}.to: this operator does not implement the "
            "_to(dtype, device) hook that converts it; build it again from inputs in the "
            "dtype and on the device you want"
        )

    def bytes_per_vector(self) -> int:
        """Estimated extra memory of one vector in a batched pass (used with the memory limit)."""
        return (self.shape[0] + self.shape[1]) * _itemsize(self.torch_dtype)

    # ----------------------------------------------------------------- conversion
    def to(
        self,
        dtype: torch.dtype | np.dtype | type | None = None,
        *,
        device: torch.device | str | None = None,
    ) -> TorchLinearOperator:
        r"""Return a new operator whose products run in ``dtype`` on ``device``; ``self`` is unchanged.

        Dense operators hold a converted copy of their matrix, composites convert every
        operand, model operators rebuild on a converted copy of the model and data (the
        caller's model is never changed) and a training Jacobian recasts :math:`\theta_0` on
        the same run. This is the way to compute in float64 with a float32 model operator,
        whose products otherwise run in its own dtype (see the module docstring's dtype
        policy).

        Parameters
        ----------
        dtype
            Floating or complex dtype (torch or numpy); ``None`` keeps the operator's.
        device
            Torch device; ``None`` keeps the operator's.

        Returns
        -------
        TorchLinearOperator
            ``self`` if neither changes (as ``torch.Tensor.to``), else a new operator.

        Raises
        ------
        TypeError
            For a dtype that is not floating or complex, or a real dtype for a complex
            operator (the imaginary part would be lost).
        NotImplementedError
            For an operator class that does not implement the :meth:`_to` hook.

        Examples
        --------
        >>> import torch
        >>> A = aslinearoperator(torch.eye(2))  # float32
        >>> A.to(torch.float64).dtype
        dtype('float64')
        """
        if dtype is not None:
            kind = dtype if isinstance(dtype, torch.dtype) else None
            if kind is not None and not (kind.is_floating_point or kind.is_complex):
                raise TypeError(f"dtype: expected a floating or complex dtype, got {dtype}")
            if kind is None:
                try:
                    given = np.dtype(cast(Any, dtype))
                except TypeError:
                    given = None  # not a dtype at all: operator_dtype below says so
                if given is not None and given.kind not in "fc":
                    raise TypeError(f"dtype: expected a floating or complex dtype, got {given}")
        new_dtype = self.torch_dtype if dtype is None else torch_dtype(operator_dtype(dtype))
        new_device = self.device if device is None else torch.device(device)
        if self.torch_dtype.is_complex and not new_dtype.is_complex:
            raise TypeError(
                f"dtype: expected a complex dtype for a complex operator, got {new_dtype} "
                "(the imaginary part would be lost)"
            )
        if new_dtype == self.torch_dtype and new_device == self.device:
            return self
        new = self._to(new_dtype, new_device)
        new.max_vectors = self.max_vectors
        if new.memory_budget is None:  # a model operator's _to sets the new device's own
            new.memory_budget = self.memory_budget
        new.check_finite = self.check_finite
        if "is_symmetric" in vars(self):
            new.is_symmetric = self.is_symmetric
        return new

    # ----------------------------------------------------------------- the batched fast path
    def vectors_per_pass(self) -> int | None:
        """Return the number of vectors per batched pass implied by ``max_vectors`` and the budget."""
        limits = []
        if self.max_vectors is not None:
            limits.append(self.max_vectors)
        if self.memory_budget is not None:
            limits.append(max(1, self.memory_budget // max(1, self.bytes_per_vector())))
        return min(limits) if limits else None

    def _visits_data_once_per_block(self) -> bool:
        """Whether a block wider than a pass is known to cost one visit of the data, not one per pass.

        False here; a streamed model operator says True once its first product has shown that
        it rebuilds graphs (:meth:`linops._model.ModelOperator._in_slots`): a caller that
        can hold a wider block (an estimator's probes) then saves a visit per pass.
        """
        return False

    def _apply(self, X: torch.Tensor, adjoint: bool = False) -> torch.Tensor:
        """Unchecked product with a 2-d floating or complex tensor on the right device.

        This is the entry point algorithms use inside their iterations (no validation). The
        result has the promoted dtype of the operator and ``X``; the hooks compute in the
        operator's own dtype or, with ``computes_in_promoted_dtype``, in the promoted one.
        """
        own = self.torch_dtype
        if X.dtype == own:  # the common case, kept free of dtype work (a no-op .to costs ~1 us)
            return self._hooks(X, adjoint)
        out = torch.promote_types(own, X.dtype)
        if self.computes_in_promoted_dtype:
            work = out if own.is_complex else out.to_real()
        else:
            work = own
        if X.is_complex() and not work.is_complex:
            # real and imaginary parts side by side: one batched pass of 2k real columns
            k = X.shape[1]
            Z = self._hooks(torch.cat([X.real, X.imag], dim=1).to(work), adjoint)
            return torch.complex(Z[:, :k], Z[:, k:]).to(out)
        Y = self._hooks(X if X.dtype == work else X.to(work), adjoint)
        return Y if Y.dtype == out else Y.to(out)

    def _column_major(self) -> bool:
        """Whether a row-major block is handed to the hooks column-major (copied)."""
        return self.column_major_blocks

    def _hooks(self, X: torch.Tensor, adjoint: bool) -> torch.Tensor:
        """Return the hooks on a block in their working dtype, chunked over columns."""
        hook = self._rmatmat_torch if adjoint else self._matmat_torch
        k = X.shape[1]
        chunk = self.vectors_per_pass()
        whole = chunk is None or k <= chunk
        if self._column_major() and k > 1 and X.stride(0) != 1:
            # one transposed copy makes every column, and every parameter-shaped view of one,
            # contiguous (gathering a chunk's columns from a row-major block took 134 ms for
            # 32 columns of 1.1M rows, the copy 50 ms); a block of over an eighth of the
            # budget is gathered chunk by chunk instead (a top-5 Lanczos of a 124M-parameter
            # model ran out of memory holding the copy of its five Ritz vectors)
            budget = self.memory_budget
            if whole or budget is None or X.numel() * X.element_size() <= budget // 8:
                X = X.T.contiguous().T
        if whole:
            return hook(X)
        assert chunk is not None
        out: torch.Tensor | None = None
        for i in range(0, k, chunk):
            part = X[:, i : i + chunk]
            if self._column_major() and part.stride(0) != 1:
                part = part.T.contiguous().T
            R = hook(part)
            if out is None:  # column-major, as a single pass gives; filled as chunks come
                out = R.new_empty(k, R.shape[0]).T
            out[:, i : i + R.shape[1]] = R
        assert out is not None
        return out

    # ----------------------------------------------------------------- public products
    @overload
    def matmat(self, X: ArrayT) -> ArrayT: ...
    @overload
    def matmat(self, X: Sequence[float] | Sequence[Sequence[float]]) -> np.ndarray: ...
    def matmat(self, X: ArrayLike) -> Array:
        """Return ``A @ X`` for a matrix ``X`` of shape ``(n, k)`` (numpy, torch or CuPy)."""
        return self._product(X, adjoint=False, form="matrix", keep_matrix=True)

    @overload
    def matvec(self, x: ArrayT) -> ArrayT: ...
    @overload
    def matvec(self, x: Sequence[float] | Sequence[Sequence[float]]) -> np.ndarray: ...
    def matvec(self, x: ArrayLike) -> Array:
        """Return ``A @ x`` for a vector of length ``n`` (or an ``(n, 1)`` matrix)."""
        return self._product(x, adjoint=False, form="vector", keep_matrix=True)

    @overload
    def rmatmat(self, Y: ArrayT) -> ArrayT: ...
    @overload
    def rmatmat(self, Y: Sequence[float] | Sequence[Sequence[float]]) -> np.ndarray: ...
    def rmatmat(self, Y: ArrayLike) -> Array:
        """``A^H @ Y`` for a matrix ``Y`` of shape ``(m, k)``."""
        return self._product(Y, adjoint=True, form="matrix", keep_matrix=True)

    @overload
    def rmatvec(self, y: ArrayT) -> ArrayT: ...
    @overload
    def rmatvec(self, y: Sequence[float] | Sequence[Sequence[float]]) -> np.ndarray: ...
    def rmatvec(self, y: ArrayLike) -> Array:
        """``A^H @ y`` for a vector of length ``m`` (or an ``(m, 1)`` matrix)."""
        return self._product(y, adjoint=True, form="vector", keep_matrix=True)

    def _product(
        self, x: object, *, adjoint: bool, form: str = "array", keep_matrix: bool = False
    ) -> Array:
        """Validate and convert ``x``, multiply, and return the kind ``x`` came as."""
        n = self.shape[0] if adjoint else self.shape[1]
        name = "y" if adjoint else "x"
        t, kind = tensor_of(x, device=self.device, name=name)
        if form == "vector" and not (t.ndim == 1 or (t.ndim == 2 and t.shape[1] == 1)):
            raise ValueError(f"{name}: expected a vector of length {n}, got shape {tuple(t.shape)}")
        if form == "matrix" and t.ndim != 2:
            raise ValueError(f"{name}: expected a matrix with {n} rows, got shape {tuple(t.shape)}")
        if t.ndim not in (1, 2) or t.shape[0] != n:
            raise ValueError(
                f"{name}: dimension mismatch, expected shape ({n},) or ({n}, k) for an operator "
                f"of shape {self.shape}{' (adjoint)' if adjoint else ''}, got {tuple(t.shape)}"
            )
        out = from_torch(self._product_tensor(t, adjoint, name), kind)
        return np.asmatrix(out) if keep_matrix and isinstance(x, np.matrix) else out

    def _product_tensor(self, t: torch.Tensor, adjoint: bool, name: str) -> torch.Tensor:
        """Return ``A t`` (or ``A^H t``) of a 1-d or 2-d tensor in the promoted dtype, checked finite."""
        if t.dtype != self.torch_dtype:
            t = t.to(result_dtype(self.dtype, t.dtype, name))
        self._check_finite(t, name)
        out = self._apply(t.unsqueeze(1) if t.ndim == 1 else t, adjoint)
        return out.squeeze(1) if t.ndim == 1 else out

    def _check_finite(self, t: torch.Tensor, name: str) -> None:
        if self.check_finite:  # one sum first: see linops._checks.check_finite
            check_finite(t, name)

    # SciPy's hooks, used only by SciPy's own composites and helpers
    def _matvec(self, x: ArrayLike) -> Array:
        return self.matvec(x)

    def _matmat(self, X: ArrayLike) -> Array:
        return self.matmat(X)

    def _rmatvec(self, y: ArrayLike) -> Array:
        return self.rmatvec(y)

    def _rmatmat(self, Y: ArrayLike) -> Array:
        return self.rmatmat(Y)

    # ----------------------------------------------------------------- SciPy's operators
    @overload
    def dot(self, x: SupportsMatvec | complex) -> TorchLinearOperator: ...
    @overload
    def dot(self, x: ArrayT) -> ArrayT: ...
    @overload
    def dot(self, x: Sequence[float] | Sequence[Sequence[float]]) -> np.ndarray: ...
    def dot(self, x: SupportsMatvec | complex | ArrayLike) -> TorchLinearOperator | Array:
        """SciPy's ``dot``: operator -> product, scalar -> scaled operator, array -> ``A @ x``.

        Arrays of shape ``(n,)``, ``(n, 1)`` and ``(n, k)`` give ``(m,)``, ``(m, 1)`` and
        ``(m, k)`` (an ``np.matrix`` comes back as an ``ndarray``, as in SciPy).
        """
        if isinstance(x, LinearOperator):
            return _Product(self, x)
        if _is_scalar(x):
            return _Scaled(self, x)
        return self._product(x, adjoint=False)

    def _rdot(self, x: SupportsMatvec | complex | ArrayLike) -> TorchLinearOperator | Array:
        """``x @ A`` for an array ``x`` of shape ``(m,)`` or ``(k, m)``: ``(A^T x^T)^T``."""
        if isinstance(x, LinearOperator):
            return _Product(x, self)
        if _is_scalar(x):
            return _Scaled(self, x)
        t, kind = tensor_of(x, device=self.device, name="x")
        m = self.shape[0]
        if t.ndim not in (1, 2) or t.shape[-1] != m:
            raise ValueError(
                f"x: dimension mismatch, expected shape ({m},) or (k, {m}) on the left of an "
                f"operator of shape {self.shape}, got {tuple(t.shape)}"
            )
        out = self.T._product_tensor(t.mT if t.ndim == 2 else t, False, "x")
        return from_torch(out.mT if out.ndim == 2 else out, kind)

    @overload
    def __mul__(self, x: SupportsMatvec | complex) -> TorchLinearOperator: ...
    @overload
    def __mul__(self, x: ArrayT) -> ArrayT: ...
    @overload
    def __mul__(self, x: Sequence[float] | Sequence[Sequence[float]]) -> np.ndarray: ...
    def __mul__(self, x: SupportsMatvec | complex | ArrayLike) -> TorchLinearOperator | Array:
        """Return ``A * x``: the product with an array, or ``alpha * A`` for a scalar (as SciPy)."""
        return self.dot(x)

    @overload
    def __rmul__(self, x: SupportsMatvec | complex) -> TorchLinearOperator: ...
    @overload
    def __rmul__(self, x: ArrayT) -> ArrayT: ...
    @overload
    def __rmul__(self, x: Sequence[float] | Sequence[Sequence[float]]) -> np.ndarray: ...
    def __rmul__(self, x: SupportsMatvec | complex | ArrayLike) -> TorchLinearOperator | Array:
        """Return ``x * A``: a scalar multiple, or ``x @ A`` for an array (as SciPy)."""
        return self._rdot(x)

    @overload
    def __matmul__(self, other: SupportsMatvec) -> TorchLinearOperator: ...
    @overload
    def __matmul__(self, other: ArrayT) -> ArrayT: ...
    @overload
    def __matmul__(self, other: Sequence[float] | Sequence[Sequence[float]]) -> np.ndarray: ...
    def __matmul__(self, other: SupportsMatvec | ArrayLike) -> TorchLinearOperator | Array:
        """Return ``A @ B`` (a lazy product) or ``A @ x`` (an array of the input's kind)."""
        if isinstance(other, LinearOperator):
            return _Product(self, other)
        if _is_scalar(other):
            raise ValueError("scalar operands are not allowed with '@', use '*' instead")
        return self._product(other, adjoint=False)

    @overload
    def __rmatmul__(self, other: ArrayT) -> ArrayT: ...
    @overload
    def __rmatmul__(self, other: Sequence[float] | Sequence[Sequence[float]]) -> np.ndarray: ...
    def __rmatmul__(self, other: ArrayLike) -> TorchLinearOperator | Array:
        """Return ``x @ A`` for an array ``x`` (rows times the operator); scalars are refused."""
        if _is_scalar(other):
            raise ValueError("scalar operands are not allowed with '@', use '*' instead")
        return self._rdot(other)

    def __truediv__(self, x: complex | torch.Tensor) -> TorchLinearOperator:
        """Return ``A / alpha``: the operator scaled by ``1 / alpha``; only scalars divide."""
        if not _is_scalar(x):
            raise ValueError(f"can only divide an operator by a scalar, got {type(x).__name__}")
        value = _python_scalar(x) if isinstance(x, torch.Tensor) else x
        if value == 0:
            raise ZeroDivisionError(f"divisor: expected a non-zero scalar, got {x!r}")
        return _Scaled(self, 1.0 / value)

    def __pow__(self, p: int) -> TorchLinearOperator:
        """Return ``A ** p``: ``p`` products with the square operator (a non-negative integer)."""
        if not np.isscalar(p):
            return NotImplemented
        return _Power(self, p)

    def __add__(self, other: object) -> TorchLinearOperator:
        """Return ``A + B``: a lazy sum of operators of equal shape."""
        if not isinstance(other, LinearOperator):
            return NotImplemented
        return _Sum(self, other)

    def __radd__(self, other: object) -> TorchLinearOperator:
        """Return ``B + A``: a lazy sum, ``B`` another (SciPy) operator."""
        if not isinstance(other, LinearOperator):
            return NotImplemented
        return _Sum(other, self)

    def __neg__(self) -> TorchLinearOperator:
        """Return ``-A``: the operator scaled by ``-1``."""
        return _Scaled(self, -1)

    def __sub__(self, other: object) -> TorchLinearOperator:
        """Return ``A - B``: the lazy sum ``A + (-B)``."""
        if not isinstance(other, LinearOperator):
            return NotImplemented
        return _Sum(self, -aslinearoperator(other))

    def __rsub__(self, other: object) -> TorchLinearOperator:
        """Return ``B - A``: the lazy sum ``B + (-A)``."""
        if not isinstance(other, LinearOperator):
            return NotImplemented
        return _Sum(other, -self)

    def _adjoint(self) -> TorchLinearOperator:
        return self if self.is_symmetric and not self.torch_dtype.is_complex else _Adjoint(self)

    def _transpose(self) -> TorchLinearOperator:
        # A^T = conj(A^H): the adjoint itself for a real operator
        return _Transposed(self) if self.torch_dtype.is_complex else self._adjoint()

    # ----------------------------------------------------------------- dense forms
    def to_dense(
        self,
        *,
        max_vectors: int | None = None,
        process_group: ProcessGroup | None = None,
        checkpoint_dir: str | os.PathLike[str] | None = None,
    ) -> torch.Tensor:
        """Return the operator as a dense ``(m, n)`` tensor on its device, built in column chunks.

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
        check_positive_or_none(max_vectors, "max_vectors")
        chunk = max_vectors or self.vectors_per_pass() or 256
        eye = torch.eye(n, dtype=self.torch_dtype, device=self.device)
        cols = [self._apply(eye[:, i : i + chunk]) for i in range(0, n, chunk)]
        return torch.cat(cols, dim=1) if cols else torch.zeros(m, 0, dtype=self.torch_dtype)

    def to_scipy(self) -> TorchLinearOperator:
        """Return the operator as a SciPy ``LinearOperator``: it already is one."""
        return self

    def __repr__(self) -> str:
        """Show the shape, class, dtype and device, e.g. ``<3x3 _Dense with dtype=torch.float64, device=cpu>``."""
        return (
            f"<{self.shape[0]}x{self.shape[1]} {type(self).__name__} "
            f"with dtype={self.torch_dtype}, device={self.device}>"
        )


class IdentityOperator(TorchLinearOperator):
    """The ``n x n`` identity (for shifts such as ``J - I`` of a training Jacobian)."""

    is_symmetric = True
    computes_in_promoted_dtype = True

    def __init__(
        self, n: int, *, dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu"
    ) -> None:
        super().__init__((n, n), dtype=dtype, device=device)

    def _matmat_torch(self, X: torch.Tensor) -> torch.Tensor:
        # a copy, not X itself (as SciPy's does): a caller or solver that updates the product
        # in place would otherwise change its own input
        return X.clone()

    def _to(self, dtype: torch.dtype, device: torch.device) -> TorchLinearOperator:
        return IdentityOperator(self.shape[0], dtype=dtype, device=device)


def aslinearoperator(A: OperatorLike) -> TorchLinearOperator:
    """View ``A`` as a :class:`TorchLinearOperator`.

    Parameters
    ----------
    A
        A ``TorchLinearOperator`` (returned as is), a dense 2-d torch tensor (stays on its
        device), a dense 2-d numpy array, ``np.matrix``, nested list or CuPy array, a SciPy
        sparse matrix, a SciPy ``LinearOperator`` or any object with ``shape`` and ``matvec``
        (its products go through numpy on the host). Integer and boolean data are promoted
        to float64.

    Returns
    -------
    TorchLinearOperator

    Raises
    ------
    TypeError
        If ``A`` is none of the above, or holds ``longdouble`` data.
    ValueError
        If a dense ``A`` is not two-dimensional (SciPy reads a 1-d array as a row; this
        refuses it).

    Examples
    --------
    >>> import torch
    >>> A = aslinearoperator(torch.tensor([[2.0, 0.0], [0.0, 3.0]], dtype=torch.float64))
    >>> (A @ torch.ones(2, dtype=torch.float64)).tolist()
    [2.0, 3.0]
    >>> aslinearoperator([[1, 2], [3, 4]]).dtype  # integers are promoted to float64
    dtype('float64')
    """
    if isinstance(A, TorchLinearOperator):
        return A
    if isinstance(A, LinearOperator) or hasattr(A, "tocsr"):
        return _FromScipy(A)
    if isinstance(A, torch.Tensor | np.ndarray | list | tuple) or array_kind(A) == "cupy":
        t, _ = tensor_of(A, device=A.device if isinstance(A, torch.Tensor) else "cpu", name="A")
        if t.ndim != 2:
            raise ValueError(f"A: expected a 2-d array, got shape {tuple(t.shape)}")
        return _Dense(t.to(torch_dtype(operator_dtype(t.dtype, "A"))))
    if hasattr(A, "shape") and hasattr(A, "matvec"):
        return _FromScipy(A)
    raise TypeError(
        "A: expected a TorchLinearOperator, a SciPy LinearOperator or sparse matrix, or a "
        f"2-d torch/numpy/CuPy array, got {type(A).__name__}"
    )


# the composites and data-backed operators subclass TorchLinearOperator, so they are imported
# once it and aslinearoperator exist (their modules import both from here)
from linops._composites import (  # noqa: E402
    _Adjoint,
    _Power,
    _Product,
    _python_scalar,
    _Scaled,
    _Sum,
    _Transposed,
)
from linops._dense import _Dense, _FromScipy  # noqa: E402


# --------------------------------------------------------------------------- helpers
def _is_scalar(x: object) -> bool:
    # arrays first: np.isscalar of a tensor takes about 1 us, a tenth of a small product
    if isinstance(x, torch.Tensor):
        return x.ndim == 0
    return not isinstance(x, np.ndarray) and bool(np.isscalar(x))


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
