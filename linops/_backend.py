"""Array conversion between numpy, torch and CuPy: the one place the toolkit crosses frameworks.

Everything else in the package works on torch tensors. Inputs arrive here as numpy arrays,
torch tensors or CuPy arrays; they leave as the same kind they came in as.

The dtype policy of products lives here too (:func:`result_dtype`): a product's dtype is what
numpy's promotion rules give for the operator's dtype and the input's dtype, whichever
framework the input comes from (``torch.int64`` counts as ``numpy.int64``), so a float32
operator times a float64 or int64 vector is float64, as ``scipy.sparse.linalg`` returns it.
"""

from __future__ import annotations

import numbers
from typing import Any, Literal, cast

import numpy as np
import numpy.typing as npt
import torch

ArrayKind = Literal["numpy", "torch", "cupy"]

_TORCH_TO_NUMPY = {
    torch.float16: np.float16,
    torch.float32: np.float32,
    torch.float64: np.float64,
    torch.complex64: np.complex64,
    torch.complex128: np.complex128,
}


#: torch dtypes with a numpy counterpart (for promotion); others (bfloat16, float8) promote as
#: torch promotes them
_TORCH_TO_NUMPY_ANY = {
    **_TORCH_TO_NUMPY,
    torch.bool: np.bool_,
    torch.uint8: np.uint8,
    torch.int8: np.int8,
    torch.int16: np.int16,
    torch.int32: np.int32,
    torch.int64: np.int64,
    torch.uint16: np.uint16,
    torch.uint32: np.uint32,
    torch.uint64: np.uint64,
}


_NUMPY_SUPPORTED = frozenset(np.dtype(d) for d in _TORCH_TO_NUMPY.values())


def numpy_dtype(dtype: torch.dtype) -> np.dtype:
    """Return the numpy dtype that corresponds to a floating or complex torch dtype."""
    try:
        return np.dtype(_TORCH_TO_NUMPY[dtype])
    except KeyError:
        if dtype in (torch.bfloat16, torch.float16):
            raise TypeError(
                f"expected float32 or float64 (or complex64/128), got {dtype}: half-precision "
                "operators are not supported (8 or 11 significant bits: too few for Krylov "
                "methods); convert the model with .float() or pass dtype=torch.float32"
            ) from None
        raise TypeError(f"expected a floating or complex torch dtype, got {dtype}") from None


def torch_dtype(dtype: npt.DTypeLike | torch.dtype) -> torch.dtype:
    """Return the torch dtype that corresponds to a numpy dtype (or a torch dtype, returned as is)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    npd = np.dtype(dtype)
    for t, n in _TORCH_TO_NUMPY.items():
        if np.dtype(n) == npd:
            return t
    raise TypeError(f"expected a floating or complex dtype, got {npd}")


def operator_dtype(dtype: npt.DTypeLike | torch.dtype, name: str = "dtype") -> np.dtype:
    """Return the floating or complex numpy dtype an operator of (numpy or torch) ``dtype`` computes in.

    Integer and boolean dtypes (an integer matrix, a SciPy operator whose dtype SciPy inferred
    as int8) are promoted to float64; ``longdouble`` is refused (torch has no such dtype).

    Raises
    ------
    TypeError
        For a dtype that is neither numeric nor one torch can hold.
    """
    if isinstance(dtype, torch.dtype):
        if dtype not in _TORCH_TO_NUMPY_ANY:
            raise TypeError(f"{name}: expected a floating or complex dtype, got {dtype}")
        dtype = _TORCH_TO_NUMPY_ANY[dtype]
    try:
        npd = np.dtype(dtype)
    except TypeError:
        raise TypeError(
            f"{name}: expected a floating or complex numpy or torch dtype, got {dtype!r}"
        ) from None
    if npd.kind in "biu":
        return np.dtype(np.float64)
    return _supported(npd, name)


def result_dtype(
    op_dtype: np.dtype, x_dtype: npt.DTypeLike | torch.dtype, name: str
) -> torch.dtype:
    """Torch dtype of a product: numpy's promotion of the operator's and the input's dtype.

    ``x_dtype`` is a numpy or torch dtype. Torch dtypes without a numpy counterpart
    (``bfloat16``) promote as torch promotes them.

    Raises
    ------
    TypeError
        If the promoted dtype is one torch cannot hold (``longdouble``).
    """
    if isinstance(x_dtype, torch.dtype):
        if x_dtype not in _TORCH_TO_NUMPY_ANY:
            return torch.promote_types(torch_dtype(op_dtype), x_dtype)
        x_dtype = np.dtype(_TORCH_TO_NUMPY_ANY[x_dtype])
    return torch_dtype(_supported(np.result_type(op_dtype, x_dtype), name))


def scalar_dtype(op_dtype: np.dtype, alpha: object) -> np.dtype:
    """Dtype of ``alpha * A``: numpy's promotion, Python scalars weak (NEP 50), numpy's strong.

    Raises
    ------
    TypeError
        If ``alpha`` is not a number, or the promoted dtype is ``longdouble``.
    """
    if isinstance(alpha, str | bytes) or not isinstance(alpha, numbers.Number | np.bool_):
        raise TypeError(f"alpha: expected a real or complex number, got {alpha!r}")
    return _supported(np.result_type(op_dtype, cast(Any, alpha)), "alpha")


def _supported(npd: np.dtype, name: str) -> np.dtype:
    if npd in _NUMPY_SUPPORTED:
        return npd
    if npd.kind in "fc":
        raise TypeError(
            f"{name}: expected float16, float32, float64, complex64 or complex128, got {npd} "
            "(torch has no long double; cast to float64 first)"
        )
    raise TypeError(f"{name}: expected a floating or complex dtype, got {npd}")


def tensor_of(x: Any, *, device: torch.device | str, name: str) -> tuple[torch.Tensor, ArrayKind]:
    """``x`` as a torch tensor on ``device`` in its own dtype, and the kind it came as.

    Torch tensors must already be on ``device`` (no hidden host-device copies); CuPy arrays
    come through DLPack without a copy; anything else (numpy arrays, ``np.matrix``, nested
    lists, numpy scalars) goes through ``numpy.asarray``.

    Raises
    ------
    TypeError
        For non-numeric input (strings, objects, SciPy sparse matrices).
    ValueError
        For a tensor on another device.
    """
    kind = array_kind(x)
    if kind == "torch":
        if x.device != device:
            raise ValueError(f"{name}: expected a tensor on device {device}, got {x.device}")
        return x, kind
    if kind == "cupy":
        return torch.from_dlpack(x), kind
    if hasattr(x, "tocsr"):
        raise TypeError(
            f"{name}: expected a dense array, got a SciPy sparse {type(x).__name__} "
            "(wrap it with linops.aslinearoperator to compose it instead)"
        )
    arr = np.asarray(x)
    if arr.dtype.kind not in "biufc":
        raise TypeError(f"{name}: expected a numeric array, got dtype {arr.dtype}")
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))  # torch reads native byte order only
    if arr.dtype.kind in "fc":
        _supported(arr.dtype, name)  # refuses longdouble
    if not arr.flags.writeable:
        arr = arr.copy()  # torch.from_numpy warns about (and cannot protect) read-only memory
    return torch.from_numpy(np.ascontiguousarray(arr)).to(device), kind


def array_kind(x: object) -> ArrayKind:
    """Which framework an array belongs to: ``"torch"``, ``"cupy"`` or ``"numpy"`` (the fallback)."""
    if isinstance(x, torch.Tensor):
        return "torch"
    if type(x).__module__.split(".")[0] == "cupy":
        return "cupy"
    return "numpy"


def to_torch(x: Any, *, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, ArrayKind]:
    """Convert ``x`` to a torch tensor on ``device``; return it and the kind it came as.

    Torch tensors are returned as they are (the caller checks dtype and device); CuPy arrays
    go through DLPack without a copy; anything else goes through ``numpy.asarray`` and is cast
    to ``dtype`` (SciPy solvers pass float64 vectors to float32 operators, and integer vectors).
    """
    kind = array_kind(x)
    if kind == "torch":
        return x, kind
    if kind == "cupy":
        return torch.from_dlpack(x), kind
    arr = np.asarray(x)
    if arr.dtype.kind not in "biufc":
        raise TypeError(f"expected a numeric array, got dtype {arr.dtype}")
    if arr.dtype.kind == "c" and not dtype.is_complex:
        t = torch.from_numpy(np.ascontiguousarray(arr))
        return t.to(device=device, dtype=_complex_of(dtype)), kind
    if arr.dtype.kind in "biu":
        arr = arr.astype(numpy_dtype(dtype))
    return torch.from_numpy(np.ascontiguousarray(arr)).to(device=device, dtype=dtype), kind


def from_torch(t: torch.Tensor, kind: ArrayKind) -> Any:
    """Return ``t`` as the array kind the input came as (numpy copies to host, CuPy via DLPack)."""
    if kind == "torch":
        return t
    if kind == "cupy":
        import cupy

        return cupy.from_dlpack(t.resolve_conj().resolve_neg().contiguous())
    return t.detach().resolve_conj().resolve_neg().cpu().numpy()


def _complex_of(dtype: torch.dtype) -> torch.dtype:
    return torch.complex128 if dtype == torch.float64 else torch.complex64
