"""Host memory reuse: fewer page faults for the temporaries of batched products."""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable

# mallopt parameters of glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def retain_freed_memory(limit_bytes: int = 2**30) -> bool:
    """Let the C allocator keep freed host memory for reuse instead of returning it at once.

    A batched product allocates temporaries of several to hundreds of MB (tangents of
    ``n K width`` entries, K weight tangents side by side). glibc's ``malloc`` serves blocks
    above its mmap threshold (adaptive, at most 32 MiB) with fresh mappings and returns the
    top of its heap beyond its trim threshold to the system, so each product faults its
    temporaries in again, page by page. On the 2-core machine of ``bench/operators.py`` a
    fresh 4 KiB page cost about 1 microsecond: filling a fresh 64 MB tensor took 16-19 ms,
    refilling it 3 ms, and a 32-vector ``H V`` of the bench's 10k-parameter MLP page-faulted
    50 MB per call, 13-19 ms of its 70.

    This sets both thresholds to ``limit_bytes`` (``mallopt(M_MMAP_THRESHOLD)`` and
    ``mallopt(M_TRIM_THRESHOLD)``, as ``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_``
    in the environment do at start-up): blocks up to that size come from the heap and freed
    memory stays there for the next product. It acts on the whole process, for the rest of its
    life, like a caching allocator: the resident size stays near its peak instead of shrinking
    after each product. Nothing is computed differently.

    Parameters
    ----------
    limit_bytes
        Both thresholds, at most ``2**31 - 1`` (mallopt takes a C int).

    Returns
    -------
    bool
        Whether the C library took both settings; False where it has no ``mallopt`` (not
        glibc: macOS, Windows, musl), which changes nothing.

    Raises
    ------
    ValueError
        If ``limit_bytes`` is not an integer in ``[1, 2**31 - 1]``.
    """
    if isinstance(limit_bytes, bool) or not isinstance(limit_bytes, int):
        raise ValueError(f"limit_bytes: expected an integer, got {limit_bytes!r}")
    if not 1 <= limit_bytes <= 2**31 - 1:
        raise ValueError(f"limit_bytes: expected a value in [1, 2**31 - 1], got {limit_bytes}")
    mallopt = _mallopt()
    if mallopt is None:
        return False
    value = ctypes.c_int(limit_bytes)
    took_mmap = mallopt(_M_MMAP_THRESHOLD, value) == 1
    took_trim = mallopt(_M_TRIM_THRESHOLD, value) == 1
    return took_mmap and took_trim


def _mallopt() -> Callable[[int, ctypes.c_int], int] | None:
    """Glibc's ``mallopt``, or None where the C library has none."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        fn = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn
