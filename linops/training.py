r"""The training Jacobian as an operator.

The object studied in "Understanding Gradient Descent through the Training Jacobian"
(an anonymous submission under double-blind review; its document gives no arXiv id).

For a training run :math:`\theta_T = f(\theta_0)` (a :class:`trainers.functional.TrainingRun`),
the training Jacobian is

.. math::

    J(\theta_0) = \frac{\partial \theta_T}{\partial \theta_0} \in \mathbb{R}^{m \times m},
    \qquad f(\theta) \approx f(\theta_0) + J(\theta_0)(\theta - \theta_0)

(that paper, eq. 1). Products :math:`J V` are forward-mode derivatives through the whole run
(tangents pushed through every step, batched over the columns of :math:`V`), and
:math:`J^\top U` reverse-mode ones through the checkpointed trajectory. The matrix is never
formed unless :meth:`TrainingJacobianOperator.to_dense` is asked for, which builds it in column
chunks with optional atomic, resumable checkpoints on disk and a progress bar.
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from linops._checkpoint import ColumnCheckpoint
from linops._checks import check_finite, check_positive
from linops._types import ProcessGroup
from linops.base import TorchLinearOperator

if TYPE_CHECKING:  # pragma: no cover
    from trainers.functional import TrainingRun

__all__ = ["TrainingJacobianOperator"]


class TrainingJacobianOperator(TorchLinearOperator):
    r"""The ``m x m`` training Jacobian :math:`J = \partial\theta_T / \partial\theta_0` of a run.

    Parameters
    ----------
    run
        The training run (:class:`trainers.functional.TrainingRun`): a pure function of the
        initial parameters with ``jvp`` and ``vjp`` through the whole run.
    theta0
        The initial parameters :math:`\theta_0`, shape ``(m,)``; its dtype and device are the
        operator's.
    max_vectors
        Tangents per batched pass (a chunk of columns). Larger chunks amortise the per-step
        overhead; smaller ones keep the tangent state in cache.
    memory_budget
        Optional bound in bytes on the memory of one batched pass (see
        :class:`TorchLinearOperator`); ``memory_limit_bytes`` is its deprecated former name.

    Attributes
    ----------
    num_matvecs
        Number of vectors pushed through training so far (forward and reverse): the cost unit of
        matrix-free algorithms on this operator.

    Notes
    -----
    A product with ``k`` vectors costs about ``k`` times the work of one forward-over-reverse
    Hessian-vector product per training step, so a dense Jacobian costs ``m`` such products per
    step. The trajectory :math:`\theta_t` is computed once and cached (or checkpointed every
    :math:`\sqrt T` steps and recomputed in segments when storing it would exceed the run's
    memory limit).

    Examples
    --------
    >>> import torch
    >>> from trainers.models import MLP
    >>> from trainers.functional import DataSchedule, SGD, TrainingRun
    >>> g = torch.Generator().manual_seed(0)
    >>> X, y = torch.randn(8, 3, generator=g, dtype=torch.float64), torch.arange(8) % 2
    >>> run = TrainingRun(MLP(3, 2, widths=4).double(), "cross_entropy", DataSchedule(X, y, 4), SGD(0.9), 0.1)
    >>> J = TrainingJacobianOperator(run, run.initial_values())
    >>> J.shape
    (26, 26)
    >>> bool(torch.allclose(J.to_dense(), torch.func.jacrev(run)(run.initial_values())))
    True
    """

    def __init__(
        self,
        run: TrainingRun,
        theta0: torch.Tensor,
        *,
        max_vectors: int | None = 256,
        memory_budget: int | None = None,
        memory_limit_bytes: int | None = None,
    ) -> None:
        for attr in ("dim", "jvp", "vjp", "describe"):
            if not hasattr(run, attr):
                raise TypeError(
                    f"run: expected a trainers.functional.TrainingRun, got {type(run).__name__}"
                )
        if not isinstance(theta0, torch.Tensor) or theta0.shape != (run.dim,):
            shape = (
                tuple(theta0.shape) if isinstance(theta0, torch.Tensor) else type(theta0).__name__
            )
            raise ValueError(f"theta0: expected a tensor of shape ({run.dim},), got {shape}")
        if not theta0.is_floating_point():
            raise TypeError(f"theta0: expected a floating dtype, got {theta0.dtype}")
        check_finite(theta0, "theta0")
        super().__init__(
            (run.dim, run.dim),
            dtype=theta0.dtype,
            device=theta0.device,
            max_vectors=max_vectors,
            memory_budget=memory_budget,
            memory_limit_bytes=memory_limit_bytes,
        )
        self.run = run
        self.theta0 = theta0.detach()
        self.num_matvecs = 0

    #: how products are computed: forward-mode (``J V``) and reverse-mode (``J^T U``) through
    #: the run's own differentiable loop (as the model operators' ``route``)
    route = "training run"

    def _matmat_torch(self, X: torch.Tensor) -> torch.Tensor:
        self.num_matvecs += X.shape[1]
        return self.run.jvp(self.theta0, X)

    def _rmatmat_torch(self, Y: torch.Tensor) -> torch.Tensor:
        self.num_matvecs += Y.shape[1]
        return self.run.vjp(self.theta0, Y)

    def _to(self, dtype: torch.dtype, device: torch.device) -> TrainingJacobianOperator:
        r"""Return the training Jacobian at ``theta0`` cast to ``dtype`` (the run computes in its dtype).

        The run is shared (it is a pure function of :math:`\theta_0`); its model and data stay
        where they are, so another device is refused.
        """
        if device != self.device:
            raise NotImplementedError(
                f"TrainingJacobianOperator.to: expected device {self.device} (where the run's "
                f"model and data live), got {device}; build a TrainingRun on {device} and a new "
                "operator from it"
            )
        return TrainingJacobianOperator(
            self.run,
            self.theta0.to(dtype),
            max_vectors=self.max_vectors,
            memory_budget=self.memory_budget,
        )

    def bytes_per_vector(self) -> int:
        """Tangent state per vector: parameters, optimizer state and one step's activations."""
        states = getattr(getattr(self.run, "optimizer", None), "num_states", 1)
        return (4 + 2 * states) * self.shape[0] * self.theta0.element_size()

    def final_params(self) -> torch.Tensor:
        r""":math:`\theta_T`, the end of the (cached) trajectory."""
        return self.run.trajectory(self.theta0).final

    def fingerprint(self) -> str:
        r"""SHA-256 of the computation (:func:`linops._fingerprint.operator_fingerprint`).

        Covers the run's definition (model architecture, trained parameter names, loss by
        name or by bytecode, data and batch order, optimizer, learning-rate schedule, gradient
        engine), :math:`\theta_0`, the values of the model's untrained parameters and buffers,
        and the dtype; never a memory address, so it is the same in a new process.
        """
        from linops._fingerprint import operator_fingerprint

        return operator_fingerprint(self)

    def to_dense(
        self,
        *,
        max_vectors: int | None = None,
        process_group: ProcessGroup | None = None,
        checkpoint_dir: str | os.PathLike | None = None,
        progress: bool = False,
        on_chunk: Callable[[int, int], None] | None = None,
        workers: int = 1,
    ) -> torch.Tensor:
        """Return the dense ``(m, m)`` training Jacobian, built in column chunks.

        Parameters
        ----------
        max_vectors
            Columns per chunk (default: the operator's ``max_vectors``).
        process_group
            A ``torch.distributed`` process group (as :meth:`TorchLinearOperator.to_dense`):
            the column chunks are split across its ranks and all-gathered, so every rank
            returns the whole matrix (:func:`linops.distributed.dense_columns`, which also
            takes ``checkpoint_dir``). ``progress``, ``on_chunk`` and ``workers`` apply to the
            single-process path and must keep their defaults here.
        checkpoint_dir
            Write each finished chunk atomically to this directory and skip the chunks already
            there, so an interrupted computation resumes where it stopped and gives the same
            matrix. Chunks are tied to :meth:`fingerprint` and the chunking, and checksummed:
            a directory written by a different computation is refused, and a damaged chunk is
            named in a :class:`linops._checkpoint.CheckpointWarning` and recomputed. The
            directory interoperates with :func:`linops.dense_columns` of this operator.
        progress
            Show a progress bar over columns.
        on_chunk
            Called as ``on_chunk(start, stop)`` after each chunk is finished (and saved).
        workers
            Number of forked worker processes (POSIX only), each running one torch thread on its
            share of the chunks; the trajectory is computed once, before forking. On a small
            shared CPU, processes with one thread each scale better than intra-op threads.
            Chunks travel through ``checkpoint_dir`` (or a temporary directory). Workers exit
            when this process dies (Linux ``PR_SET_PDEATHSIG``; elsewhere between chunks).

        Returns
        -------
        torch.Tensor
            :math:`J`, shape ``(m, m)``, on the operator's device.

        Raises
        ------
        ValueError
            If ``max_vectors`` or ``workers`` is not a positive integer, ``checkpoint_dir``
            holds another computation, or ``process_group`` is given with ``progress``,
            ``on_chunk`` or ``workers > 1``.
        RuntimeError
            If a worker process fails.
        """
        m = self.shape[0]
        chunk = max_vectors or self.vectors_per_pass() or 256
        check_positive(chunk, "max_vectors")
        check_positive(workers, "workers")
        if process_group is not None:
            if progress or on_chunk is not None or workers != 1:
                raise ValueError(
                    "process_group: expected progress=False, on_chunk=None and workers=1 with a "
                    f"process group, got progress={progress}, on_chunk={on_chunk!r}, "
                    f"workers={workers}"
                )
            return super().to_dense(
                max_vectors=max_vectors, process_group=process_group, checkpoint_dir=checkpoint_dir
            )
        chunks = [(a, min(a + chunk, m)) for a in range(0, m, chunk)]
        if workers > 1 and checkpoint_dir is None and len(chunks) > 1:
            with tempfile.TemporaryDirectory(prefix="linops-tj-") as tmp:
                return self.to_dense(
                    max_vectors=chunk,
                    checkpoint_dir=tmp,
                    progress=progress,
                    on_chunk=on_chunk,
                    workers=workers,
                )
        ckpt = None
        if checkpoint_dir is not None:
            from linops.distributed import open_column_checkpoint

            ckpt = open_column_checkpoint(self, checkpoint_dir, chunk)
        out = torch.empty(m, m, dtype=self.torch_dtype, device=self.device)
        bar = tqdm(total=m, disable=not progress, desc="training Jacobian", unit="col")
        if ckpt is not None and workers > 1:
            self._fork_workers(
                ckpt, [c for c in chunks if not ckpt.has(*c)], workers, bar, on_chunk
            )
        for start, stop in chunks:
            saved = ckpt.load(start, stop) if ckpt is not None else None
            if saved is not None:
                out[:, start:stop] = torch.from_numpy(saved).to(self.device)
            else:
                out[:, start:stop] = self._matmat_torch(_unit_columns(m, start, stop, out))
                if ckpt is not None:
                    ckpt.save(start, stop, out[:, start:stop].cpu().numpy())
            if workers == 1:
                bar.update(stop - start)
                if on_chunk is not None:
                    on_chunk(start, stop)
        bar.close()
        return out

    def _fork_workers(
        self,
        ckpt: ColumnCheckpoint,
        todo: list[tuple[int, int]],
        workers: int,
        bar: tqdm,
        on_chunk: Callable[[int, int], None] | None,
    ) -> None:
        """Run the missing chunks in ``workers`` forked processes, reporting progress as files land."""
        self.run.trajectory(self.theta0)  # computed once, inherited by the children
        ctx = mp.get_context("fork")
        parent = os.getpid()
        procs = [
            ctx.Process(target=_worker, args=(self, ckpt, todo[w::workers], parent), daemon=True)
            for w in range(workers)
        ]
        for p in procs:
            p.start()
        pending = set(todo)
        bar.update(self.shape[0] - sum(b - a for a, b in todo))
        try:
            while pending:
                ckpt.refresh()
                for c in sorted(c for c in pending if ckpt.has(*c)):
                    pending.discard(c)
                    self.num_matvecs += c[1] - c[0]
                    bar.update(c[1] - c[0])
                    if on_chunk is not None:
                        on_chunk(*c)
                if pending and not any(p.is_alive() for p in procs):
                    break
                time.sleep(0.2)
        finally:
            for p in procs:
                p.join(timeout=None if not pending else 1.0)
                if p.is_alive():
                    p.terminate()
        failed = [p.exitcode for p in procs if p.exitcode]
        if failed or pending:
            raise RuntimeError(
                f"to_dense: {len(failed)} worker process(es) failed (exit codes {failed}); "
                f"{len(pending)} chunk(s) missing. Finished chunks are kept in {ckpt.directory}."
            )


def _unit_columns(m: int, start: int, stop: int, like: torch.Tensor) -> torch.Tensor:
    E = torch.zeros(m, stop - start, dtype=like.dtype, device=like.device)
    E[torch.arange(start, stop), torch.arange(stop - start)] = 1.0
    return E


def _worker(
    op: TrainingJacobianOperator,
    ckpt: ColumnCheckpoint,
    chunks: list[tuple[int, int]],
    parent: int,
) -> None:
    _die_with_parent(parent)
    torch.set_num_threads(1)
    m = op.shape[0]
    for start, stop in chunks:
        if os.getppid() != parent:  # the parent died (where PR_SET_PDEATHSIG is missing)
            os._exit(1)
        cols = op._matmat_torch(_unit_columns(m, start, stop, op.theta0))
        ckpt.save(start, stop, cols.cpu().numpy())


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _die_with_parent(parent: int) -> None:
    """Make this forked worker get SIGKILL when its parent dies (Linux ``prctl``).

    It exits now if the parent is already gone; elsewhere the worker polls ``os.getppid()``
    between chunks. A worker that outlived a killed parent would keep writing into the
    directory.
    """
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):  # pragma: no cover - no libc prctl
            pass
    if os.getppid() != parent:
        os._exit(1)
