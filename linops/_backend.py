"""Array conversion between numpy, torch and CuPy: the one place the toolkit crosses frameworks.

Everything else in the package works on torch tensors. Inputs arrive here as numpy arrays,
torch tensors or CuPy arrays; they leave as the same kind they came in as.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch

ArrayKind = Literal["numpy", "torch", "cupy"]

_TORCH_TO_NUMPY = {
    torch.float16: np.float16,
    torch.float32: np.float32,
    torch.float64: np.float64,
    torch.complex64: np.complex64,
    torch.complex128: np.complex128,
}


def numpy_dtype(dtype: torch.dtype) -> np.dtype:
    """The numpy dtype that corresponds to a floating or complex torch dtype."""
    try:
        return np.dtype(_TORCH_TO_NUMPY[dtype])
    except KeyError:
        raise TypeError(f"expected a floating or complex torch dtype, got {dtype}") from None


def torch_dtype(dtype: Any) -> torch.dtype:
    """The torch dtype that corresponds to a numpy dtype (or a torch dtype, returned as is)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    npd = np.dtype(dtype)
    for t, n in _TORCH_TO_NUMPY.items():
        if np.dtype(n) == npd:
            return t
    raise TypeError(f"expected a floating or complex dtype, got {npd}")


def array_kind(x: Any) -> ArrayKind:
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

        return cupy.from_dlpack(t.contiguous())
    return t.detach().cpu().numpy()


def _complex_of(dtype: torch.dtype) -> torch.dtype:
    return torch.complex128 if dtype == torch.float64 else torch.complex64
