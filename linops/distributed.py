r"""Data-parallel operators on ``torch.distributed``: sharding, agreement, failure propagation.

An operator over a dataset :math:`\mathcal{D} = \mathcal{D}_0 \cup \dots \cup \mathcal{D}_{P-1}`
split across the :math:`P` ranks of a process group is a sum of per-rank operators, so its
product is one all-reduce of the local products:

.. math::

    H v = c \sum_{r=0}^{P-1} \sum_{(x, y) \in \mathcal{D}_r} \nabla^2_\theta \ell(f(\theta; x), y)\, v,
    \qquad c = 1/N \text{ (mean, } N = \textstyle\sum_r |\mathcal{D}_r|) \text{ or } 1 \text{ (sum)}.

Operators indexed by data (the Jacobian :math:`J`, with rows owned by the rank that holds the
sample) stay *replicated* on both sides: :math:`J v` is the all-gather of the local rows
:math:`J_r v` (in rank order, so the rows are those of the single-process :math:`J` on the
concatenated shards) and :math:`J^\top y = \sum_r J_r^\top y_r` is an all-reduce of the local
VJPs of each rank's slice :math:`y_r` of :math:`y`. Every product is therefore identical on
every rank, and the algorithms (Lanczos, SVD, randomized SVD, trace estimators), which only
call ``op._apply``, run unchanged on every rank as long as they draw the same random vectors:
pass the same ``seed`` everywhere (:func:`shared_seed`).

Failure handling. Before every payload collective, each rank runs its local work inside a
``try``, then joins one small *header* all-reduce (one row per rank) that carries an error
flag, the dtypes and payload shapes, a per-operator call counter and a checksum of the
(supposedly replicated) input. If any rank failed (a non-finite local product included), or
the ranks disagree, every rank raises :class:`DistributedError` saying what differs and each
rank's value ("dtype (rank 0: torch.float64; rank 1: torch.float32)", the columns of a block,
i.e. an algorithm's ``k``, or input vectors of equal shape but different values, i.e. a
different ``seed``), instead of one rank raising and the others hanging in the next
collective. A rank
that dies or never arrives is caught by the process group's own ``timeout``
(``init_process_group(..., timeout=...)``), which bounds every wait.
The guard itself (header, agreement, shared error messages) is in :mod:`linops._collective`;
this module holds the sharding and the operators' collective products.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from linops._checks import check_positive
from linops._collective import (
    DistributedError,
    dtype_code,
    group_device,
    group_or_world,
    guarded,
    operator_tag,
    world_rank,
)
from linops._types import ProcessGroup

if TYPE_CHECKING:  # pragma: no cover
    from linops._checkpoint import ColumnCheckpoint
    from linops._model import ModelOperator
    from linops.base import TorchLinearOperator

#: what :func:`shard` splits and returns: a tensor, or a tuple or list of tensors
ShardT = TypeVar("ShardT", torch.Tensor, tuple[torch.Tensor, ...], list[torch.Tensor])

__all__ = [
    "DistributedError",
    "dense_columns",
    "is_data_parallel",
    "shard",
    "shard_range",
    "shared_seed",
]


# --------------------------------------------------------------------------- sharding
def shard_range(
    n: int, process_group: ProcessGroup | None = None, *, rank: int | None = None
) -> range:
    r"""Return the contiguous index range of ``n`` items owned by a rank (balanced, in rank order).

    Rank :math:`r` of :math:`P` owns :math:`[\lfloor rn/P \rfloor, \lfloor (r+1)n/P
    \rfloor)`, so the shards concatenated in rank order give ``range(n)`` back: the rows of a
    distributed Jacobian are then exactly those of the single-process one.

    Parameters
    ----------
    n
        Number of items (samples or columns).
    process_group
        The group (``None``: the default group if initialised, else a single process).
    rank
        Override the rank (default: this process's rank in the group).

    Examples
    --------
    >>> [list(shard_range(5, rank=r, process_group=None)) for r in (0,)]
    [[0, 1, 2, 3, 4]]
    """
    world, me = world_rank(process_group)
    me = me if rank is None else rank
    if not isinstance(n, int | np.integer) or n < 0:
        raise ValueError(f"n: expected a non-negative integer, got {n!r}")
    return _split(int(n), world, me)


def _split(n: int, world: int, rank: int) -> range:
    return range(rank * n // world, (rank + 1) * n // world)


def shard(data: ShardT, process_group: ProcessGroup | None = None) -> ShardT:
    """Return this rank's contiguous shard of a tensor or of an ``(X, y)`` pair of tensors.

    Parameters
    ----------
    data
        A tensor (split along its first dimension) or a tuple/list of tensors of equal length.
    process_group
        The group (``None``: the default group if initialised, else a single process).

    Returns
    -------
    The same structure holding rows :func:`shard_range` ``(len(data), process_group)``.

    Raises
    ------
    TypeError
        If ``data`` is not a tensor or a tuple/list of tensors.
    ValueError
        If the tensors of a tuple have different lengths.
    """
    if isinstance(data, torch.Tensor):
        idx = shard_range(len(data), process_group)
        return data[idx.start : idx.stop]
    if isinstance(data, tuple | list) and data and all(isinstance(t, torch.Tensor) for t in data):
        lengths = {len(t) for t in data}
        if len(lengths) != 1:
            raise ValueError(f"data: expected tensors of equal length, got {sorted(lengths)}")
        idx = shard_range(lengths.pop(), process_group)
        return type(data)(t[idx.start : idx.stop] for t in data)
    raise TypeError(
        f"data: expected a tensor or a tuple of tensors, got {type(data).__name__}; "
        "shard iterables of batches yourself (e.g. with a DistributedSampler, shuffle=False)"
    )


def shared_seed(process_group: ProcessGroup | None = None, seed: int | None = None) -> int:
    """Return a seed that every rank agrees on: rank 0's ``seed`` (or fresh entropy), broadcast.

    Random start and probe vectors of ``lanczos``, ``svds``, ``randomized_svd`` and the trace
    estimators come from a ``torch.Generator`` seeded by their ``seed``; with the same seed on
    every rank they draw identical vectors, so a distributed run reproduces the
    single-process run for that seed. Call it on every rank (it is a collective).

    Returns
    -------
    int
        A non-negative 62-bit integer, the same on every rank.
    """
    world, _ = world_rank(process_group)
    if seed is None:
        seed = int.from_bytes(os.urandom(8), "little") >> 2
    if world == 1:
        return int(seed)
    t = torch.tensor([int(seed)], dtype=torch.int64, device=group_device(process_group))
    dist.broadcast(
        t, src=dist.get_global_rank(group_or_world(process_group), 0), group=process_group
    )
    return int(t.item())


def is_data_parallel(op: object) -> bool:
    """Whether ``op`` (or an operand of a composite) runs collectives in its products."""
    if getattr(op, "process_group", None) is not None:
        return True
    children = list(getattr(op, "ops", []))
    children += [getattr(op, name) for name in ("J1", "J2") if hasattr(op, name)]
    return any(is_data_parallel(c) for c in children if c is not op)


# --------------------------------------------------------------------------- operator products
def global_num_samples(op: ModelOperator) -> int:
    """Return the number of samples over all ranks of ``op.process_group`` (forces the local batches)."""
    group = op.process_group
    n = guarded(
        group,
        lambda: op.batches.num_samples,
        device=op.device,
        what=f"{type(op).__name__}: counting samples",
        exact=lambda _: {
            "operator": operator_tag(op),
            "dtype": dtype_code(op.torch_dtype),
            "parameters": op.shape[1],
        },
    )
    t = torch.tensor([n], dtype=torch.int64, device=op.device)
    dist.all_reduce(t, group=group)
    return int(t.item())


def global_sum(op: ModelOperator, local: Callable[[], float], *, what: str) -> float:
    """Return the sum over the ranks of ``op.process_group`` of ``local()`` (e.g. a loss normaliser).

    Guarded like every step here: if ``local`` raises on one rank, every rank raises
    :class:`DistributedError`. Call it outside the local work of a product (from the
    operator's ``prepare_distributed()``, which :func:`data_parallel_apply` calls before each
    product's guarded step): a collective inside a product's local work deadlocks or aborts
    when another rank fails before reaching it.
    """
    group = op.process_group
    value = guarded(
        group,
        lambda: float(local()),
        device=op.device,
        what=f"{type(op).__name__}: {what}",
        exact=lambda _: {"operator": operator_tag(op)},
    )
    t = torch.tensor([value], dtype=torch.float64, device=op.device)
    dist.all_reduce(t, group=group)
    return float(t.item())


def global_tensor_sums(
    op: ModelOperator, local: Callable[[], list[torch.Tensor]], *, what: str
) -> list[torch.Tensor]:
    """Return the entrywise sums over the ranks of the tensors ``local()`` returns.

    For statistics accumulated over each rank's data (KFAC's factors, EKFAC's corrections):
    one all-reduce of their concatenation. Guarded like :func:`global_sum`: a failure of
    ``local`` on one rank, or ranks that hold different shapes, raise
    :class:`DistributedError` on every rank; call it outside a product's local work.
    """
    group = op.process_group
    parts = guarded(
        group,
        local,
        device=op.device,
        what=f"{type(op).__name__}: {what}",
        exact=lambda ts: {
            "operator": operator_tag(op),
            "tensors": len(ts),
            "entries": sum(t.numel() for t in ts),
        },
    )
    if not parts:
        return []
    flat = torch.cat([t.reshape(-1) for t in parts])
    dist.all_reduce(flat, group=group)
    return [
        t.view(p.shape) for t, p in zip(flat.split([p.numel() for p in parts]), parts, strict=True)
    ]


def gather_counts(
    op: ModelOperator, local: Callable[[], tuple[int, dict[str, int]]], *, device: torch.device
) -> list[int]:
    """Every rank's count, in rank order; ``local() -> (count, signature)``.

    Guarded: a failure of ``local`` on one rank, or signatures (e.g. the number of
    parameters) that differ between ranks, raise :class:`DistributedError` on every rank.
    """
    group = op.process_group
    world, me = world_rank(group)
    n, _ = guarded(
        group,
        local,
        device=device,
        what=f"{type(op).__name__}: constructing",
        exact=lambda out: {"operator": operator_tag(op), **out[1]},
    )
    t = torch.zeros(world, dtype=torch.int64, device=device)
    t[me] = n
    dist.all_reduce(t, group=group)
    return [int(v) for v in t.tolist()]


def data_parallel_apply(op: ModelOperator, X: torch.Tensor, adjoint: bool) -> torch.Tensor:
    """Return the product of a data-parallel :class:`linops.base.TorchLinearOperator`, replicated.

    ``op`` sums over data (one all-reduce of the local products) unless it has
    ``row_counts`` (rows owned by ranks): then ``J X`` all-gathers the local rows and
    ``J^T Y`` all-reduces the local VJPs of this rank's slice of ``Y``.
    """
    from linops.base import TorchLinearOperator

    if X.is_complex() and not op.torch_dtype.is_complex:
        return torch.complex(
            data_parallel_apply(op, X.real, adjoint), data_parallel_apply(op, X.imag, adjoint)
        )
    group = op.process_group
    op.num_samples  # noqa: B018 - a collective of its own (once), outside the guarded work
    prepare = getattr(op, "prepare_distributed", None)
    if prepare is not None:
        prepare()  # the operator's own collectives (e.g. global_sum), outside the guarded work
    op._calls = getattr(op, "_calls", 0) + 1
    rows = getattr(op, "row_counts", None)
    X_local = X[op.local_rows.start : op.local_rows.stop] if rows is not None and adjoint else X
    what = f"{type(op).__name__} product #{op._calls}{' (adjoint)' if adjoint else ''}"

    def local() -> torch.Tensor:
        Y = TorchLinearOperator._apply(op, X_local, adjoint)
        if getattr(op, "check_finite", True):
            _check_finite(Y, f"the local product of rank {world_rank(group)[1]}")
        return Y

    out = guarded(
        group,
        local,
        device=op.device,
        what=what,
        exact=lambda Y: {
            "operator": operator_tag(op),
            "dtype": dtype_code(X.dtype),
            "operator rows": op.shape[0],
            "operator columns": op.shape[1],
            "product number": op._calls,
            "input rows": X.shape[0],
            "columns of the block (an algorithm's k or block size)": X.shape[1],
            "output rows": sum(rows) if rows is not None and not adjoint else Y.shape[0],
        },
        checksum_of=X,
    )
    if rows is not None and not adjoint:
        return _gather_rows(out, rows, group)
    out = out.contiguous()
    dist.all_reduce(out, group=group)
    return out


def _gather_rows(local: torch.Tensor, rows: list[int], group: ProcessGroup | None) -> torch.Tensor:
    """Concatenate every rank's rows in rank order (padded to equal size for the backends)."""
    width = max(rows)
    padded = torch.zeros(width, local.shape[1], dtype=local.dtype, device=local.device)
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in rows]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([p[:r] for p, r in zip(parts, rows, strict=True)], dim=0)


# --------------------------------------------------------------------------- dense, by columns
def dense_columns(
    op: TorchLinearOperator,
    process_group: ProcessGroup | None = None,
    *,
    max_vectors: int | None = None,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    gather: bool = True,
    on_chunk: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    r"""Return the dense matrix of ``op``, its column chunks split across the ranks of a process group.

    The ``n`` columns :math:`A e_j` are cut into global chunks of ``max_vectors`` columns;
    rank :math:`r` of :math:`P` computes chunks :math:`\lfloor rC/P \rfloor` to
    :math:`\lfloor (r+1)C/P \rfloor - 1` of the :math:`C` chunks with no communication, then
    one all-reduce of the disjoint column blocks (zeros elsewhere, so the sum is exact) gives
    every rank the whole ``(m, n)`` matrix.

    Parameters
    ----------
    op
        A :class:`linops.base.TorchLinearOperator` whose products are local to each rank
        (replicated model and data, e.g. a training Jacobian). A data-parallel operator is
        refused: its products are already split by data, call ``op.to_dense()``.
    process_group
        The group (``None``: a single process, still useful with ``checkpoint_dir``).
    max_vectors
        Columns per chunk (default: the operator's own bound, else 256).
    checkpoint_dir
        If given, every finished chunk is written there atomically
        (:class:`linops._checkpoint.ColumnCheckpoint`: checksummed ``.npy`` files read with
        ``allow_pickle=False`` and an exclusively created manifest) and chunks already there
        are loaded instead of recomputed, so an interrupted run resumes, also with another
        number of ranks (the chunk grid depends only on ``n`` and ``max_vectors``). Chunks
        belong to a content fingerprint of the computation
        (:func:`linops._fingerprint.operator_fingerprint`: operator options, parameter and
        buffer values, data, loss, dtype, chunking): a directory of another computation is
        refused, and a damaged chunk is named in a warning and recomputed.
    gather
        Whether every rank gets the whole matrix; ``False`` returns only this rank's chunks
        (zeros elsewhere) and skips the all-reduce, e.g. for a checkpoint-writing run.
    on_chunk
        Called as ``on_chunk(start, stop)`` after each of this rank's chunks is finished.

    Returns
    -------
    torch.Tensor
        ``(m, n)`` on the operator's device.

    Raises
    ------
    ValueError
        If ``op`` is data-parallel, ``max_vectors`` is not positive, or the checkpoint
        directory holds another computation.
    FloatingPointError
        If a computed chunk holds a NaN or an infinity (single process; with a process group
        a :class:`DistributedError` on every rank).
    DistributedError
        On every rank, if anything above, or computing a chunk, failed on any rank.
    """
    if is_data_parallel(op):
        raise ValueError(
            "op: expected an operator whose products are local to each rank, got a "
            "data-parallel operator (its products are already split across ranks by data); "
            "call op.to_dense() without process_group"
        )
    m, n = op.shape
    chunk = max_vectors or op.vectors_per_pass() or 256
    check_positive(chunk, "max_vectors")
    world, me = world_rank(process_group) if process_group is not None else (1, 0)
    starts = list(range(0, n, chunk))
    mine = [starts[i] for i in _split(len(starts), world, me)]

    def open_checkpoint() -> ColumnCheckpoint | None:
        if checkpoint_dir is None:
            return None
        return open_column_checkpoint(op, checkpoint_dir, chunk)

    def local(ckpt: ColumnCheckpoint | None) -> torch.Tensor:
        out = torch.zeros(m, n, dtype=op.torch_dtype, device=op.device)
        for start in mine:
            stop = min(n, start + chunk)
            out[:, start:stop] = _chunk(op, start, stop, ckpt)
            if on_chunk is not None:
                on_chunk(start, stop)
        return out

    if world == 1:
        return local(open_checkpoint())
    what = f"{type(op).__name__}.to_dense (column-parallel)"
    sig = {
        "operator": operator_tag(op),
        "dtype": dtype_code(op.torch_dtype),
        "rows": m,
        "columns": n,
        "chunk": chunk,
    }
    # opening the checkpoint is a step of its own: a barrier before any rank writes a chunk
    ckpt = guarded(process_group, open_checkpoint, device=op.device, what=what, exact=lambda _: sig)
    dense = guarded(process_group, lambda: local(ckpt), device=op.device, what=what)
    if gather:
        dist.all_reduce(dense, group=process_group)
    return dense


def open_column_checkpoint(
    op: TorchLinearOperator, directory: str | os.PathLike[str], chunk: int
) -> ColumnCheckpoint:
    """Return the :class:`linops._checkpoint.ColumnCheckpoint` of ``op``'s dense matrix.

    The matrix is stored in chunks of ``chunk`` columns, identified by
    :func:`linops._fingerprint.operator_fingerprint` (the same for :func:`dense_columns` and
    ``TrainingJacobianOperator.to_dense``, so their directories interoperate).
    """
    from linops._checkpoint import ColumnCheckpoint
    from linops._fingerprint import operator_fingerprint

    m, n = op.shape
    dtype = np.dtype(str(op.torch_dtype).removeprefix("torch."))
    fingerprint = f"{operator_fingerprint(op)} chunk={chunk}"
    return ColumnCheckpoint(directory, shape=(m, n), dtype=dtype, fingerprint=fingerprint)


def _chunk(
    op: TorchLinearOperator, start: int, stop: int, ckpt: ColumnCheckpoint | None
) -> torch.Tensor:
    if ckpt is not None:
        saved = ckpt.load(start, stop)  # None if missing, or damaged (warned, deleted)
        if saved is not None:
            return torch.from_numpy(saved).to(op.device)
    E = torch.zeros(op.shape[1], stop - start, dtype=op.torch_dtype, device=op.device)
    E[torch.arange(start, stop), torch.arange(stop - start)] = 1.0
    cols = op._apply(E)
    if getattr(op, "check_finite", True):
        _check_finite(cols, f"columns [{start}, {stop}) of {type(op).__name__}")
    if ckpt is not None:
        ckpt.save(start, stop, cols.detach().cpu().numpy())
    return cols


def _check_finite(Y: torch.Tensor, what: str) -> None:
    """Raise if ``Y`` holds a NaN or an infinity (one reduction: a NaN or inf propagates)."""
    if Y.numel() and not math.isfinite(float(Y.detach().abs().sum().real)):
        bad = int((~torch.isfinite(Y)).sum())
        raise FloatingPointError(
            f"{what}: expected finite values, got {bad} NaN or infinite entries of {Y.numel()}; "
            "check this rank's data, weights and targets"
        )
