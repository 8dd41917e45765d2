r"""Memory: the one budget that bounds what an operator keeps, and host memory reuse.

Every model operator takes ``memory_budget`` (bytes). It bounds, on the operator's device,

* the **caches**: the batches moved to the device and their retained autodiff graphs are kept
  while their total stays within :data:`CACHE_FRACTION` of the budget, first come first
  served in batch order (the batches while the data are first drawn, then each graph as it
  is built); a batch or graph beyond that is streamed: drawn from the loader again, or
  rebuilt, at every product, and freed after it;
* the **blocks**: the vectors of one batched pass. The peak memory of a one-vector pass is
  measured once (at the first many-vector product, one extra single-vector product) and a
  pass takes at most ``(budget - cached bytes) // peak`` vectors (at least 1, and at most
  ``max_vectors``, default :data:`linops._model.DEFAULT_MAX_VECTORS`). An explicit
  ``max_vectors`` is taken as given, and a block known to go one vector per pass before
  any pass (a convolutional graph) is not measured: its passes take one vector whatever the
  budget.

A streamed batch's graph is released before the next batch's is built, so a streamed pass
holds one batch's graph at a time; its products are the cached operator's bit for bit (the
same batches, prepared and differentiated by the same code) when both take the same vectors
per pass (the same ``max_vectors``): a wider block may round differently.

The default budget is :data:`DEFAULT_BUDGET_FRACTION` of the memory free on the device when
the operator is made (:func:`available_memory`: ``torch.cuda.mem_get_info`` on CUDA; on the
host ``psutil.virtual_memory().available`` where psutil is installed, else ``MemAvailable``
of ``/proc/meminfo``, else the free physical pages of ``os.sysconf``).

How memory is measured (:class:`PeakMemory`): a ``TorchDispatchMode`` sees every tensor that
an operation (forward or backward) returns, adds the bytes of each new storage and subtracts
them when the storage is freed (a weak reference). Its peak is the largest total of tensor
storage alive at once that the measured code allocated; its ``current`` at the end is what
that code left alive (a retained graph's size). It is exact for torch's tensors on any device
and does not depend on the allocator: ``tracemalloc`` does not see torch's allocations, the
resident set size (RSS) moves with glibc's caching of freed memory (and with
:func:`retain_freed_memory`), and CUDA's allocator statistics exist only on CUDA. It does not
see memory a kernel uses internally without returning it as a tensor (e.g. a convolution's
workspace), nor allocator rounding.

Host memory reuse: :func:`prime_host_allocator` (called when a model operator is made) frees
one 31 MiB block so that glibc's adaptive thresholds start near their top (its heap keeps up
to 62 MiB of freed blocks for the next pass instead of a few MiB); a pass that rebuilds graphs
(a streamed dataset) lowers the mmap threshold to :data:`STREAMED_MMAP_THRESHOLD` while it
runs and puts it back after (:func:`streamed_pass_allocation`); :func:`retain_freed_memory`
(faster, the resident size kept near its peak) and :func:`return_freed_memory` (smaller,
slower) fix them for the whole process, on request only.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import math
import numbers
import os
import sys
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = [
    "CACHE_FRACTION",
    "DEFAULT_BUDGET_FRACTION",
    "CacheInfo",
    "MemoryBudget",
    "PeakMemory",
    "available_memory",
    "default_memory_budget",
    "prime_host_allocator",
    "retain_freed_memory",
    "return_freed_memory",
    "streamed_pass_allocation",
]

#: fraction of the device's free memory an operator may use by default (``memory_budget=None``)
DEFAULT_BUDGET_FRACTION = 0.5
#: fraction of the budget that cached batches and graphs may take; the rest is for the passes
CACHE_FRACTION = 0.5

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
    global _thresholds_set
    _thresholds_set = True
    value = ctypes.c_int(limit_bytes)
    took_mmap = mallopt(_M_MMAP_THRESHOLD, value) == 1
    took_trim = mallopt(_M_TRIM_THRESHOLD, value) == 1
    return took_mmap and took_trim


#: a block just below glibc's largest adaptive mmap threshold (32 MiB on 64-bit systems)
_PRIME_BYTES = 31 * 2**20
_primed = False


def prime_host_allocator() -> None:
    """Free one 31 MiB host block, once per process; every model operator calls it when made.

    glibc raises its mmap threshold to the size of a mapped block when that block is freed (up
    to 32 MiB) and its trim threshold to twice that. A process whose largest freed block was a
    few MiB gives back every freed stretch of more than twice that at the top of its heap, and
    faults it in again, page by page, at the next pass that needs it: a backward pass whose
    temporaries are a few MiB each but tens of MiB together pays that at every product. This
    frees one block of 31 MiB, as any program does sooner or later, so that the adaptive
    thresholds start near their top: blocks up to 31 MiB come from the heap, and up to 62 MiB
    of freed heap is kept for the next pass. Nothing is set (``mallopt`` is not
    called, the heuristic stays glibc's and adaptive; after :func:`retain_freed_memory`,
    :func:`return_freed_memory` or the ``MALLOC_*`` variables it changes nothing). On the
    CIFAR ResNet-20 of ``bench/pyhessian.py`` (128 images, float32), Hessian products faulted
    35-43 thousand pages each instead of 95-135 thousand and took 0.58-0.61 s instead of
    0.64-0.68 s (100 products, fresh processes). Other C libraries (musl, macOS) just allocate
    and free the block. ``LINOPS_NO_PRIME=1`` in the environment skips it.
    """
    global _primed
    if _primed or os.environ.get("LINOPS_NO_PRIME"):
        return
    _primed = True
    torch.empty(_PRIME_BYTES, dtype=torch.uint8)


def return_freed_memory(threshold_bytes: int = 128 * 1024) -> bool:
    """Let the C allocator give freed blocks above ``threshold_bytes`` back to the system.

    The opposite trade of :func:`retain_freed_memory`, for streamed datasets: glibc's
    ``malloc`` raises its mmap threshold after each large free (up to 32 MiB) and keeps
    freed blocks below it in its heap, where the graphs a streamed pass builds and frees batch
    after batch fragment it. Measured on the ResNet-ish model of ``bench/streaming.py``
    (batches of 32, float64, peak resident size above the start of one Hessian product): 6
    streamed batches 162.7 MB against 97.7 MB for one cached batch with glibc's default
    (1.67x), 37.9 against 37.1 MB (1.02x) with ``MALLOC_MMAP_THRESHOLD_=131072``, the
    setting this makes; 40 streamed batches 138.6 MB against 86.5 MB (1.60x, medians of 2)
    by default, 37.6 against 37.3 MB (1.01x, one run) with it. This fixes the threshold
    (``mallopt(M_MMAP_THRESHOLD)``, as ``MALLOC_MMAP_THRESHOLD_`` in the environment does),
    for the whole process; larger blocks are then faulted in afresh at each allocation
    (slower, see :func:`retain_freed_memory`). Nothing is computed differently.

    Parameters
    ----------
    threshold_bytes
        Blocks above this many bytes are mapped and unmapped, at most ``2**31 - 1``.

    Returns
    -------
    bool
        Whether the C library took the setting (False without glibc's ``mallopt``).

    Raises
    ------
    ValueError
        If ``threshold_bytes`` is not an integer in ``[1, 2**31 - 1]``.
    """
    if isinstance(threshold_bytes, bool) or not isinstance(threshold_bytes, int):
        raise ValueError(f"threshold_bytes: expected an integer, got {threshold_bytes!r}")
    if not 1 <= threshold_bytes <= 2**31 - 1:
        raise ValueError(
            f"threshold_bytes: expected a value in [1, 2**31 - 1], got {threshold_bytes}"
        )
    mallopt = _mallopt()
    if mallopt is None:
        return False
    global _thresholds_set
    _thresholds_set = True
    return mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(threshold_bytes)) == 1


#: whether :func:`retain_freed_memory` or :func:`return_freed_memory` has set glibc's thresholds
_thresholds_set = False
#: glibc's mmap threshold while a pass rebuilds graphs (:func:`streamed_pass_allocation`);
#: 0 leaves the thresholds alone
STREAMED_MMAP_THRESHOLD = 16 * 2**20
#: the adaptive thresholds' ceiling on 64-bit glibc (mmap; trim is twice it), near which
#: :func:`prime_host_allocator` puts them
_ADAPTIVE_MMAP_MAX = 32 * 2**20
_MALLOC_VARIABLES = (
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_TOP_PAD_",
    "MALLOC_MMAP_MAX_",
)
_streamed_depth = 0


def _thresholds_are_primed() -> bool:
    """Whether glibc's thresholds are where :func:`prime_host_allocator` left them."""
    return (
        _primed
        and not _thresholds_set
        and "glibc.malloc" not in os.environ.get("GLIBC_TUNABLES", "")
        and not any(name in os.environ for name in _MALLOC_VARIABLES)
    )


@contextmanager
def streamed_pass_allocation() -> Iterator[None]:
    """Map large blocks afresh during a pass that rebuilds graphs; restore the thresholds after.

    A pass over a streamed dataset builds, differentiates and frees each batch's graph in
    turn, and so allocates the same large temporaries (activations, the column buffers of a
    float64 convolution) batch after batch. With glibc's thresholds where
    :func:`prime_host_allocator` puts them (blocks up to 31 MiB from the heap, up to 62 MiB
    of freed heap kept), a batch's large blocks land on other stretches of the heap than the
    last batch's, amid what is still alive, and the heap grows: the Hessian of
    ``bench/streaming.py`` (a CIFAR-shaped ResNet of 28,698 parameters, float64, 40 batches
    of 64, nothing cached, 2 products; its convolutions' column buffers are 18 MiB) peaked at
    270-304 MB above the start (seven processes, median 289.5), 1.42x the median of the same
    operator over one cached batch (204.5 MB). Inside this context the mmap threshold is
    :data:`STREAMED_MMAP_THRESHOLD` (16 MiB) and the trim threshold twice that: a block above
    16 MiB that the heap's free space cannot hold is mapped on its own and unmapped when
    freed. There the streamed pass peaked at 219-225 MB (median 222.2: 1.09x), at 1.05-1.12x
    the time (faulting the mapped blocks in afresh; three alternating processes each with
    the threshold at 0 and at 16 MiB: 24.7 against 25.9 s, medians). A ``malloc_trim(0)`` at
    the start of each pass as well gave 215-240 MB (seven processes) at 1.08-1.13x the time,
    and costs a walk of the whole heap per product: not done. 8 MiB gave 178-205 MB at 1.15x
    the time; on a CIFAR ResNet-20 streamed in float32 batches of 128 (largest blocks 8 MiB of
    activations and 19-75 MiB of column buffers) 8 MiB cost 1.20-1.27x the time for 6-7% less
    memory, and 16 MiB changed neither. At the end both thresholds are set to the adaptive
    scheme's ceiling (32 and 64 MiB, ``mallopt``), where priming left them: glibc no longer
    adapts them after the first such pass, which would have moved them from 31 to at most
    32 MiB.

    Entered by host (CPU) operators' passes only, from the first batch whose graph is not
    kept. Acts once for nested passes (and for passes in several threads at once: the one
    that lowered the thresholds restores them when it ends), on glibc only, and only where the thresholds are linops's own:
    not before :func:`prime_host_allocator` ran (``LINOPS_NO_PRIME``), nor after
    :func:`retain_freed_memory` or :func:`return_freed_memory` (also when called during the
    pass: then nothing is restored), nor with ``MALLOC_*`` variables or ``glibc.malloc``
    tunables in the environment. A threshold the program set with its own ``mallopt`` call
    is not seen, and is replaced at the end of such a pass. Set
    :data:`STREAMED_MMAP_THRESHOLD` to 0 to leave the thresholds alone. Nothing is computed
    differently.
    """
    global _streamed_depth
    acting = STREAMED_MMAP_THRESHOLD > 0 and _streamed_depth == 0 and _thresholds_are_primed()
    mallopt = _mallopt() if acting else None
    _streamed_depth += 1
    try:
        if mallopt is not None:
            mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(STREAMED_MMAP_THRESHOLD))
            mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(2 * STREAMED_MMAP_THRESHOLD))
        yield
    finally:
        _streamed_depth -= 1
        # not if the program set them meanwhile (retain_freed_memory in a hook, a thread)
        if mallopt is not None and _thresholds_are_primed():
            mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(_ADAPTIVE_MMAP_MAX))
            mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(2 * _ADAPTIVE_MMAP_MAX))


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """Return the C library, or None (looked up once: ``find_library`` runs ``ldconfig``)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None


def _mallopt() -> Callable[[int, ctypes.c_int], int] | None:
    """Glibc's ``mallopt``, or None where the C library has none."""
    fn = getattr(_libc(), "mallopt", None)
    if fn is None:
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def available_memory(device: torch.device | str = "cpu") -> int:
    """Return the bytes of memory free on ``device`` now.

    CUDA: the free memory of ``torch.cuda.mem_get_info``. Host (any other device):
    ``psutil.virtual_memory().available`` where psutil is installed, else ``MemAvailable`` of
    ``/proc/meminfo`` (Linux), else the free physical pages of ``os.sysconf``.

    Raises
    ------
    RuntimeError
        If the free host memory cannot be read by any of these means (then pass
        ``memory_budget=`` explicitly).
    """
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        raise RuntimeError(
            "memory_budget: the free host memory could not be read (no psutil, no "
            "/proc/meminfo, no os.sysconf); pass memory_budget= in bytes"
        ) from None


def default_memory_budget(device: torch.device | str = "cpu") -> int:
    """Return the default budget: :data:`DEFAULT_BUDGET_FRACTION` of the memory free on ``device``."""
    return max(1, int(DEFAULT_BUDGET_FRACTION * available_memory(device)))


def check_memory_budget(value: Any, name: str = "memory_budget") -> int | None:
    """Return ``value`` if it is a positive number of bytes or None, else raise ValueError."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not float(value) > 0:
        raise ValueError(f"{name}: expected a positive number of bytes or None, got {value!r}")
    number = float(value)  # numpy integers and floats included
    if not math.isfinite(number):
        raise ValueError(f"{name}: expected a finite number of bytes, got {value!r}")
    if number < 1:  # int() would make it 0, and a later message name 0 instead of the value
        raise ValueError(f"{name}: expected at least 1 byte, got {value!r}")
    return int(value) if isinstance(value, numbers.Integral) else int(number)


def tensor_leaves(obj: Any) -> list[torch.Tensor]:
    """Return the tensors of a nested structure, looking into keyword inputs' ``values``."""
    leaves = [
        v
        for t in tree_flatten(obj)[0]
        for v in (
            tree_flatten(t.values)[0] if isinstance(getattr(t, "values", None), dict) else [t]
        )
    ]
    return [t for t in leaves if isinstance(t, torch.Tensor)]


def storage_bytes(obj: Any) -> int:
    """Return the bytes of the distinct tensor storages in a nested structure of tensors.

    :class:`linops.params.KeywordInputs` are looked into (their ``values``).
    """
    seen: set[tuple[str, int]] = set()
    total = 0
    for t in tensor_leaves(obj):
        if t.device.type != "meta":
            try:
                st = t.untyped_storage()
                key = (str(t.device), st.data_ptr())
            except RuntimeError:  # forward AD's efficient zero tensors: no storage, no memory
                continue
            if key not in seen:
                seen.add(key)
                total += st.nbytes()
    return total


class LightDispatchMode(TorchDispatchMode):
    """A ``TorchDispatchMode`` that does not import ``torch._dynamo`` when nothing else has.

    torch 2.13 wraps every mode's ``__torch_dispatch__`` in ``torch._disable_dynamo``, whose
    first call imports ``torch._dynamo``: 1.3-1.8 s added to an operator's first product on
    this machine. The wrap only matters to code compiled by dynamo, so it is kept when
    ``torch._dynamo`` was imported before linops (and skipped otherwise).
    """

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return "torch._dynamo" in sys.modules


def _storage_key(t: object) -> tuple[str, int] | None:
    """``(device, data pointer)`` of a tensor's storage; None for non-tensors and no storage."""
    if not isinstance(t, torch.Tensor) or t.device.type == "meta":
        return None
    try:
        return (str(t.device), t.untyped_storage().data_ptr())
    except RuntimeError:  # forward AD's efficient zero tensors: no storage, no memory
        return None


class PeakMemory(LightDispatchMode):
    """Context manager measuring the tensor memory allocated by the code it runs.

    Attributes
    ----------
    peak
        The largest number of bytes of tensor storage allocated inside the context and alive at
        once (forward and backward passes, on any device).
    current
        The bytes allocated inside the context that are still alive (read after it ends:
        what a built object retains).

    Notes
    -----
    See the module docstring for the method and what it does not see. Running under it costs
    a Python call per torch operation; it is used once per operator, never inside an
    iteration.

    Examples
    --------
    >>> import torch
    >>> with PeakMemory() as m:
    ...     x = torch.ones(1000, dtype=torch.float64)
    ...     y = 2 * x
    ...     del y
    >>> m.peak, m.current
    (16000, 8000)
    """

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._live: dict[tuple[str, int], Any] = {}

    def _on_free(self, key: tuple[str, int], nbytes: int, _: Any) -> None:
        self._freed(key, nbytes)

    def _freed(self, key: tuple[str, int], nbytes: int) -> None:
        if self._live.pop(key, None) is not None:
            self.current -= nbytes

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        """Run ``func`` and count the storages of the tensors it returns.

        Not those of its inputs: a view (``w.t()``, ``p.detach()``) or an in-place result of
        a tensor made before the context allocates nothing (a linear layer's ``weight.t()``
        made every parameter count as allocated by the pass).
        """
        # keyed before the op: one that resizes an input (out=, resize_) allocates anew
        given = {_storage_key(t) for t in tree_flatten((args, kwargs))[0]}
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            key = _storage_key(t)
            if key is None or key in given:
                continue
            st = t.untyped_storage()
            nbytes = st.nbytes()
            if nbytes == 0 or key in self._live:
                continue
            self._live[key] = weakref.ref(st, functools.partial(self._on_free, key, nbytes))
            self.current += nbytes
            self.peak = max(self.peak, self.current)
        return out


class CacheInfo(NamedTuple):
    """What a model operator keeps (``op.cache_info()``), in bytes as measured."""

    #: the operator's memory budget
    bytes_budget: int
    #: batches in the dataset (``None`` until one pass has been drawn)
    num_batches: int | None
    #: batches kept on the device (the others are drawn from the loader at every product)
    batches_cached: int
    #: retained graphs kept (the others are rebuilt at every product)
    graphs_cached: int
    #: bytes of the kept batches (0 for views of tensors already on the device in the dtype)
    bytes_batches: int
    #: bytes the kept graphs retain
    bytes_graphs: int
    #: measured peak of a one-vector pass (``None`` until measured)
    bytes_per_pass: int | None
    #: vectors per batched pass these give
    vectors_per_pass: int | None
    #: batch graphs built so far, kept or not (a product that streams builds each batch's
    #: graph once, however many passes of vectors its block takes)
    graphs_built: int = 0


class MemoryBudget:
    """A ledger of the bytes an operator keeps against its budget.

    Parameters
    ----------
    total
        The budget in bytes.

    Notes
    -----
    Caches (batches, graphs) reserve their measured bytes with :meth:`reserve`, which refuses
    once they would exceed :data:`CACHE_FRACTION` of ``total``; a refused item is streamed.
    """

    def __init__(self, total: int) -> None:
        self.total = int(total)
        self.kept: dict[str, int] = {"batches": 0, "graphs": 0}
        self.counts: dict[str, int] = {"batches": 0, "graphs": 0}

    @property
    def cache_limit(self) -> int:
        """Return the bytes the caches may take."""
        return int(CACHE_FRACTION * self.total)

    @property
    def cached_bytes(self) -> int:
        """Return the bytes the caches take now."""
        return sum(self.kept.values())

    def reserve(self, nbytes: int, what: str) -> bool:
        """Keep ``nbytes`` more of ``what`` (``"batches"`` or ``"graphs"``) if they fit."""
        if self.cached_bytes + nbytes > self.cache_limit:
            return False
        self.kept[what] += nbytes
        self.counts[what] += 1
        return True

    def release(self, what: str) -> None:
        """Forget everything kept of ``what``."""
        self.kept[what], self.counts[what] = 0, 0

    def free_for_passes(self) -> int:
        """Return the bytes left for the passes: the budget less the caches."""
        return max(0, self.total - self.cached_bytes)

    def __repr__(self) -> str:
        """Return the budget and what is cached against it."""
        return (
            f"MemoryBudget(total={_mb(self.total)}, batches cached={self.counts['batches']} "
            f"({_mb(self.kept['batches'])}), graphs cached={self.counts['graphs']} "
            f"({_mb(self.kept['graphs'])}))"
        )


def _mb(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MiB"
