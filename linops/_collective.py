"""The collective guard of data-parallel products: every rank agrees before a payload moves.

Each rank runs its local work inside a ``try``, then joins one small *header* all-reduce (one
row per rank: an error flag, named integers that must agree such as dtypes, shapes and a call
counter, and a checksum of the supposedly replicated input). If any rank failed or the ranks
disagree, every rank raises :class:`DistributedError` naming what differs and each rank's value
(:func:`guarded`), instead of one rank raising and the others hanging in the next collective.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
import torch.distributed as dist

from linops._types import ProcessGroup

__all__ = [
    "DistributedError",
    "checksum",
    "dtype_code",
    "group_device",
    "group_or_world",
    "guarded",
    "operator_tag",
    "world_rank",
]

T = TypeVar("T")

#: The header of a guarded step has a fixed length (so two headers always pair up in one
#: all-reduce): error flag, up to twelve named integers that must agree, an input checksum and
#: its tolerance.
_SLOTS = 12
_MESSAGE_BYTES = 512


class DistributedError(RuntimeError):
    """Raised on every rank when a collective operation failed or the ranks disagree.

    Attributes
    ----------
    failed_ranks
        Ranks whose local work raised (empty for a disagreement between ranks).
    """

    def __init__(self, message: str, failed_ranks: Sequence[int] = ()) -> None:
        super().__init__(message)
        self.failed_ranks = list(failed_ranks)


def world_rank(process_group: ProcessGroup | None) -> tuple[int, int]:
    if process_group is None and not (dist.is_available() and dist.is_initialized()):
        return 1, 0
    return dist.get_world_size(process_group), dist.get_rank(process_group)


def group_or_world(process_group: ProcessGroup | None) -> ProcessGroup:
    # dist.group.WORLD is typed optional: it is None only before init_process_group, and
    # callers run collectives (a default group exists)
    return process_group if process_group is not None else dist.group.WORLD  # type: ignore[return-value]


def group_device(process_group: ProcessGroup | None) -> torch.device:
    backend = dist.get_backend(process_group)
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def operator_tag(op: object) -> int:
    """Return a small integer naming the operator's class (equal across ranks)."""
    return zlib.crc32(type(op).__name__.encode()) % (1 << 31)


def checksum(X: torch.Tensor | None) -> tuple[float, float]:
    """Return a weighted sum of ``X`` and the tolerance within which replicas must agree."""
    if X is None or X.numel() == 0:
        return 0.0, 0.0
    Xd = X.detach().to(torch.float64)
    w = torch.cos(torch.arange(Xd.numel(), dtype=torch.float64, device=Xd.device))
    value = float(Xd.reshape(-1) @ w)
    eps = torch.finfo(X.dtype).eps if X.dtype.is_floating_point else 0.0
    return value, math.sqrt(eps) * float(Xd.abs().sum()) + 1e-300


#: dtypes sent through the header as small integer codes (0: another dtype)
_DTYPES = (
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
    torch.complex64,
    torch.complex128,
    torch.int32,
    torch.int64,
    torch.bool,
)


def dtype_code(dtype: torch.dtype) -> int:
    return _DTYPES.index(dtype) + 1 if dtype in _DTYPES else 0


def _show(name: str, value: float) -> str:
    if "dtype" in name:
        code = int(value)
        return str(_DTYPES[code - 1]) if 0 < code <= len(_DTYPES) else "another dtype"
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.6g}"


def _per_rank(name: str, values: list[float]) -> str:
    """``"rank 0: 3; ranks 1, 2: 4"``: each distinct value with the ranks that hold it."""
    groups: dict[float, list[int]] = {}
    for rank, v in enumerate(values):
        groups.setdefault(v, []).append(rank)
    parts = [
        f"rank{'s' if len(r) > 1 else ''} {', '.join(map(str, r))}: {_show(name, v)}"
        for v, r in groups.items()
    ]
    return "; ".join(parts)


def guarded(
    group: ProcessGroup | None,
    local: Callable[[], T],
    *,
    device: torch.device,
    what: str,
    exact: Callable[[T], dict[str, int]] = lambda _: {},
    checksum_of: torch.Tensor | None = None,
) -> T:
    """Run ``local()`` on this rank, then agree with every rank of ``group`` in one all-reduce.

    Raises :class:`DistributedError` on every rank if any rank's ``local()`` raised, or if the
    ranks' ``exact`` signatures (operator, dtypes, call counter, shapes) or input checksums
    differ, naming what differs and each rank's value; and on this rank if the all-reduce
    itself fails (a rank died or did not arrive within the process group's timeout).
    """
    error: BaseException | None = None
    try:
        out = local()
        sig = exact(out)
        check, tol = checksum(checksum_of)
    except Exception as exc:  # reported on every rank below
        error, out, sig, check, tol = exc, None, {}, 0.0, 0.0
    world, me = world_rank(group)
    values = [float(v) for v in sig.values()] + [0.0] * (_SLOTS - len(sig))
    table = torch.zeros(world, 3 + _SLOTS, dtype=torch.float64)
    table[me] = torch.tensor([1.0 if error else 0.0, *values, check, tol], dtype=torch.float64)
    table = table.to(device)
    try:
        dist.all_reduce(table, op=dist.ReduceOp.SUM, group=group)  # each rank fills its row
    except Exception as exc:
        raise DistributedError(
            f"{what}: a rank did not join the collective (it died, or did not arrive within the "
            f"process group's timeout): {exc}"
        ) from (error or exc)
    rows = table.cpu().tolist()
    if any(row[0] > 0 for row in rows):
        _raise_failure(group, error, what, device)
    bad = [
        f"{name} ({_per_rank(name, [row[1 + i] for row in rows])})"
        for i, name in enumerate(sig)
        if len({row[1 + i] for row in rows}) > 1
    ]
    checks = [row[-2] for row in rows]
    if not bad and max(checks) - min(checks) > max(row[-1] for row in rows):
        bad.append(
            f"the values of the input vectors, which must be replicated (same shape and dtype "
            f"on every rank, checksums {_per_rank('checksum', checks)}): the ranks drew different "
            "random vectors (pass the same seed on every rank: "
            "linops.distributed.shared_seed) or called the algorithm with different arguments"
        )
    if bad:
        raise DistributedError(f"{what}: the ranks disagree on " + "; and on ".join(bad))
    return out  # type: ignore[return-value]


def _raise_failure(
    group: ProcessGroup | None, error: BaseException | None, what: str, device: torch.device
) -> None:
    """Share every rank's error message (fixed-size byte rows summed in one all-reduce)."""
    world, me = world_rank(group)
    text = f"{type(error).__name__}: {error}".encode()[:_MESSAGE_BYTES] if error else b""
    rows = torch.zeros(world, _MESSAGE_BYTES, dtype=torch.int32)
    rows[me, : len(text)] = torch.tensor(list(text), dtype=torch.int32)
    rows = rows.to(device)
    dist.all_reduce(rows, op=dist.ReduceOp.SUM, group=group)
    messages = {
        r: bytes(rows[r].cpu().to(torch.uint8).tolist()).rstrip(b"\0").decode(errors="replace")
        for r in range(world)
    }
    failed = [r for r, m in messages.items() if m]
    detail = "; ".join(f"rank {r}: {messages[r]}" for r in failed)
    message = f"{what} failed on rank(s) {failed} of {world}: {detail}"
    raise DistributedError(message, failed) from error
