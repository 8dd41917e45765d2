r"""Training as a pure function of the initial parameters, and its derivatives.

Section 2 of "Understanding Gradient Descent through the Training Jacobian" (an anonymous submission under double-blind review, no arXiv id given); "the paper" below.

A :class:`TrainingRun` fixes a model, a loss, a data schedule (which mini-batch each step sees),
a functional optimizer and a learning-rate schedule, so that

.. math::

    \theta_T = f(\theta_0), \qquad \theta_{t+1}, s_{t+1} = U_t(\theta_t, s_t, \nabla L_t(\theta_t))

is a deterministic function of :math:`\theta_0` alone. Its Jacobian
:math:`J = \partial \theta_T / \partial \theta_0` is the *training Jacobian* of the paper.

* ``run(theta0)`` is the plain differentiable loop (``torch.func`` gradients), which
  ``torch.func.jacrev`` / ``jvp`` can differentiate directly;
* :meth:`TrainingRun.jvp` pushes many tangents forward through the stored or recomputed
  trajectory: :math:`J V`, batched (``(m, K)`` columns);
* :meth:`TrainingRun.vjp` pulls cotangents back through it: :math:`J^\top U`. The trajectory
  is kept at checkpoints every ``c`` steps and each segment is recomputed when it is needed, so
  memory is :math:`O((T/c + c)\,m)`, :math:`O(\sqrt T\, m)` with the default ``c``.

The per-step derivatives are the optimizer's elementwise tangent / cotangent maps
(``trainers._optim``) around batched Hessian-vector products (``trainers._hvp``).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from estimators.seeding import Seed, make_generator
from linops import Params
from linops._data import random_layers
from linops.params import ParamSpace
from trainers._hvp import ChainEngine, FuncEngine, make_engine, resolve_loss
from trainers._optim import SGD, Adam, AdamW, FunctionalOptimizer
from trainers._schedules import ConstantLR, CosineLR, Schedule, WarmupLR, as_schedule

__all__ = [
    "SGD",
    "Adam",
    "AdamW",
    "ConstantLR",
    "CosineLR",
    "DataSchedule",
    "FunctionalOptimizer",
    "Schedule",
    "TrainingRun",
    "WarmupLR",
]

Tensor = torch.Tensor


class DataSchedule:
    """Which examples each step sees: a fixed (optionally reshuffled-by-seed) batch order.

    Parameters
    ----------
    X, y
        Inputs and targets (first dimension: examples).
    batch_size
        Examples per step; the last batch of an epoch may be smaller unless ``drop_last``.
    epochs
        Passes over the data.
    shuffle
        Reshuffle every epoch with ``torch.randperm`` from a generator seeded with ``seed`` (the
        same order as :meth:`trainers.Trainer.fit` with that seed); otherwise the stored order.
    seed
        Seed of the reshuffling.
    drop_last
        Drop an incomplete last batch.
    """

    def __init__(
        self,
        X: Tensor,
        y: Tensor,
        batch_size: int,
        *,
        epochs: int = 1,
        shuffle: bool = False,
        seed: Seed = 0,
        drop_last: bool = False,
    ) -> None:
        if not isinstance(X, Tensor) or not isinstance(y, Tensor):
            raise TypeError(
                f"X, y: expected torch tensors, got {type(X).__name__}, {type(y).__name__}"
            )
        if len(X) != len(y) or len(X) == 0:
            raise ValueError(f"X, y: expected equal non-zero lengths, got {len(X)} and {len(y)}")
        for name, v in (("batch_size", batch_size), ("epochs", epochs)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected a positive integer, got {v!r}")
        self.X, self.y = X, y
        self.batch_size, self.epochs, self.shuffle, self.seed = batch_size, epochs, shuffle, seed
        n = len(X)
        g = make_generator(seed)
        self.indices: list[Tensor] = []
        for _ in range(epochs):
            order = torch.randperm(n, generator=g) if shuffle else torch.arange(n)
            for i in range(0, n, batch_size):
                if drop_last and i + batch_size > n:
                    break
                self.indices.append(order[i : i + batch_size])
        if not self.indices:
            raise ValueError(
                f"batch_size: {batch_size} > {n} examples with drop_last leaves no step"
            )

    @property
    def num_steps(self) -> int:
        """Number of optimizer steps :math:`T`."""
        return len(self.indices)

    def batch(self, t: int, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
        """Return the ``(X, y)`` batch of step ``t`` (floating inputs cast to ``dtype``)."""
        idx = self.indices[t]
        X, y = self.X[idx], self.y[idx]
        if dtype is not None and X.is_floating_point():
            X = X.to(dtype)
        if dtype is not None and y.is_floating_point():
            y = y.to(dtype)
        return X, y

    def describe(self) -> str:
        """Return a stable fingerprint of the data and the order."""
        h = hashlib.sha256()
        for t in (self.X, self.y):
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        h.update(torch.cat(self.indices).numpy().tobytes())
        return f"DataSchedule(n={len(self.X)}, batch_size={self.batch_size}, steps={self.num_steps}, sha256={h.hexdigest()[:16]})"


@dataclass
class _Step:
    t: int
    lr: float
    theta: Tensor
    state: tuple[Tensor, ...]
    cache: dict[str, Any]

    def blocks(
        self, sizes: list[int]
    ) -> tuple[list[Tensor], list[tuple[Tensor, ...]], list[Tensor]]:
        """Per-parameter views of ``theta``, the state and the gradient."""
        th = torch.split(self.theta, sizes)
        st = [torch.split(s, sizes) for s in self.state]
        g = torch.split(self.cache["g"], sizes)
        return list(th), [tuple(s[i] for s in st) for i in range(len(sizes))], list(g)


class TrainingRun:
    r"""A training run as a pure, differentiable function ``theta_T = run(theta_0)``.

    Parameters
    ----------
    model
        The network (its parameters are never modified; only its architecture and the values of
        parameters outside ``params`` are used).
    loss
        ``"cross_entropy"`` (mean), ``"mse"`` (mean) or ``loss_fn(outputs, targets)``.
    data
        The :class:`DataSchedule`.
    optimizer
        A functional optimizer: :class:`SGD`, :class:`Adam` or :class:`AdamW`.
    lr
        Learning rate: a number or a :class:`Schedule` (``ConstantLR``, ``CosineLR``, ``WarmupLR``).
    params
        Which parameters are trained and differentiated (see :class:`linops.ParamSpace`).
    engine
        Gradient engine for the derivatives: ``"auto"`` (linops' hand-derived chain products
        when the model is a chain, :mod:`linops.chain`, else ``torch.func``), ``"chain"`` (those
        products, required) or ``"func"``.
    checkpoint_every
        Keep the trajectory every this many steps and recompute segments in between. ``None``:
        store every step when that takes at most ``memory_limit_bytes``, else
        :math:`\lceil\sqrt T\,\rceil`.
    memory_limit_bytes
        Bound used to choose ``checkpoint_every`` automatically (default 1 GiB).

    Examples
    --------
    >>> import torch
    >>> from trainers.models import MLP
    >>> g = torch.Generator().manual_seed(0)
    >>> X, y = torch.randn(8, 3, generator=g, dtype=torch.float64), torch.arange(8) % 2
    >>> net = MLP(3, 2, widths=4, activation="tanh").double()
    >>> run = TrainingRun(net, "cross_entropy", DataSchedule(X, y, 4, epochs=2), SGD(0.9), 0.1)
    >>> theta0 = run.initial_values()
    >>> J = torch.func.jacrev(run)(theta0)
    >>> V = torch.randn(run.dim, 3, generator=g, dtype=torch.float64)
    >>> bool(torch.allclose(run.jvp(theta0, V), J @ V)), bool(torch.allclose(run.vjp(theta0, V), J.T @ V))
    (True, True)
    """

    def __init__(
        self,
        model: torch.nn.Module,
        loss: str | Callable[[Tensor, Tensor], Tensor],
        data: DataSchedule,
        optimizer: FunctionalOptimizer,
        lr: Schedule | float = 0.1,
        *,
        params: Params | None = None,
        engine: str = "auto",
        checkpoint_every: int | None = None,
        memory_limit_bytes: int = 1 << 30,
    ) -> None:
        if not isinstance(data, DataSchedule):
            raise TypeError(f"data: expected a DataSchedule, got {type(data).__name__}")
        if not isinstance(optimizer, FunctionalOptimizer):
            raise TypeError(
                f"optimizer: expected a functional optimizer (SGD, Adam, AdamW), got {type(optimizer).__name__}"
            )
        if checkpoint_every is not None and (
            not isinstance(checkpoint_every, int) or checkpoint_every < 1
        ):
            raise ValueError(
                f"checkpoint_every: expected a positive integer or None, got {checkpoint_every!r}"
            )
        random = random_layers(model)
        if random:  # BatchNorm in training mode is deterministic: how such a net trains
            raise ValueError(
                f"model: contains {random} in training mode, whose forward pass is random, so "
                "the run would not be a function of theta0; call .eval() on them (or set p=0)"
            )
        self.space = ParamSpace(model, params)
        self.loss_name, self.loss_fn = resolve_loss(loss)
        self.data, self.optimizer, self.schedule = data, optimizer, as_schedule(lr)
        self.engine: FuncEngine | ChainEngine = make_engine(self.space, loss, engine)
        #: the loss as the torch.func loops call it (see :func:`_forward_mode_safe`)
        self._loss_fn = _forward_mode_safe(self.loss_fn)
        if isinstance(self.engine, FuncEngine):
            self.engine = FuncEngine(self.space, self._loss_fn)
        self.checkpoint_every = checkpoint_every
        self.memory_limit_bytes = memory_limit_bytes
        self._traj_key: tuple[int, str, tuple[int, ...]] | None = None
        self._traj: _Trajectory | None = None

    # ------------------------------------------------------------------ basics
    @property
    def dim(self) -> int:
        """Number of trained parameters :math:`m`."""
        return self.space.dim

    @property
    def num_steps(self) -> int:
        """Number of optimizer steps :math:`T`."""
        return self.data.num_steps

    def initial_values(self) -> Tensor:
        r"""Return the current parameter values as a flat vector (a natural :math:`\theta_0`)."""
        return self.space.flat_values().clone()

    def describe(self) -> str:
        """Describe stably everything that defines the function (for checkpoint fingerprints)."""
        return (
            f"TrainingRun(model={self.space.model!r}, params={self.space.names}, "
            f"loss={self.loss_name or repr(self.loss_fn)}, data={self.data.describe()}, "
            f"optimizer={self.optimizer.describe()}, lr={self.schedule.describe()})"
        )

    def _check_theta(self, theta0: Tensor) -> Tensor:
        if not isinstance(theta0, Tensor) or theta0.shape != (self.dim,):
            shape = tuple(theta0.shape) if isinstance(theta0, Tensor) else type(theta0).__name__
            raise ValueError(f"theta0: expected a tensor of shape ({self.dim},), got {shape}")
        if not theta0.is_floating_point():
            raise TypeError(f"theta0: expected a floating dtype, got {theta0.dtype}")
        return theta0

    # ------------------------------------------------------------------ the function itself
    def __call__(self, theta0: Tensor) -> Tensor:
        r""":math:`\theta_T` by the plain loop; differentiable by ``torch.autograd``/``torch.func``."""
        self._check_theta(theta0)
        space, loss_fn = self.space, self._loss_fn

        def batch_loss(theta: Tensor, X: Tensor, y: Tensor) -> Tensor:
            return loss_fn(space.functional_call(space.unflatten(theta), X), y)

        g_fn = torch.func.grad(batch_loss)
        theta, state = theta0, self.optimizer.init(theta0)
        for t in range(self.num_steps):
            X, y = self.data.batch(t, theta0.dtype)
            theta, state = self.optimizer.update(
                t, self.schedule(t), theta, state, g_fn(theta, X, y)
            )
        return theta

    @torch.no_grad()
    def final(self, theta0: Tensor) -> Tensor:
        r""":math:`\theta_T` through the gradient engine (fast, not differentiable)."""
        self._check_theta(theta0)
        theta, state = theta0, self.optimizer.init(theta0)
        for t in range(self.num_steps):
            X, y = self.data.batch(t, theta0.dtype)
            g = self.engine.prepare(theta, X, y)["g"]
            theta, state = self.optimizer.update(t, self.schedule(t), theta, state, g)
        return theta

    # ------------------------------------------------------------------ derivatives
    def trajectory(self, theta0: Tensor) -> _Trajectory:
        """Return the (cached) checkpointed trajectory from ``theta0``."""
        self._check_theta(theta0)
        # the values outside params are read from the live model: their in-place changes
        # (version counters) invalidate the trajectory too (a stale one was reused, 0.17 off)
        key = (
            theta0.data_ptr(),
            hashlib.sha256(theta0.detach().cpu().numpy().tobytes()).hexdigest(),
            tuple(p._version for p in self.space.model.parameters()),
        )
        if self._traj is None or self._traj_key != key:
            self._traj = _Trajectory(self, theta0.detach())
            self._traj_key = key
        return self._traj

    @torch.no_grad()
    def jvp(self, theta0: Tensor, V: Tensor) -> Tensor:
        """Forward mode: :math:`J V` for ``V`` of shape ``(m, K)`` (or ``(m,)``)."""
        traj = self.trajectory(theta0)
        dth = self._blocks(V, theta0)
        dstate = [tuple(torch.zeros_like(d) for _ in range(self.optimizer.num_states)) for d in dth]
        opt, sizes = self.optimizer, self.engine.sizes
        for seg in traj.segments():
            for s in seg:
                th, st, g = s.blocks(sizes)
                hvp = functools.partial(self.engine.hvp, s.cache)
                dth, dstate = opt.tangent_step(s.t, s.lr, th, st, g, dth, dstate, hvp)
        return self._unblocks(dth, V)

    @torch.no_grad()
    def vjp(self, theta0: Tensor, U: Tensor) -> Tensor:
        r"""Reverse mode: :math:`J^\top U` for ``U`` of shape ``(m, K)`` (or ``(m,)``)."""
        traj = self.trajectory(theta0)
        bth = self._blocks(U, theta0)
        bstate = [tuple(torch.zeros_like(b) for _ in range(self.optimizer.num_states)) for b in bth]
        opt, sizes = self.optimizer, self.engine.sizes
        for seg in traj.segments(reverse=True):
            for s in reversed(seg):
                th, st, g = s.blocks(sizes)
                hvp = functools.partial(self.engine.hvp, s.cache)
                bth, bstate = opt.cotangent_step(s.t, s.lr, th, st, g, bth, bstate, hvp)
        return self._unblocks(bth, U)

    def _blocks(self, V: Tensor, theta0: Tensor) -> list[Tensor]:
        """``(m, K)`` columns (or ``(m,)``) -> contiguous row blocks ``(K, n_i)`` per parameter."""
        if not isinstance(V, Tensor) or V.ndim not in (1, 2) or V.shape[0] != self.dim:
            shape = tuple(V.shape) if isinstance(V, Tensor) else type(V).__name__
            raise ValueError(
                f"V: expected a tensor of shape ({self.dim},) or ({self.dim}, K), got {shape}"
            )
        V = V.to(theta0.dtype)
        V = V[:, None] if V.ndim == 1 else V
        # copies: the optimizers update tangents in place, never the caller's tensor
        return [
            b.T.clone(memory_format=torch.contiguous_format)
            for b in torch.split(V, self.engine.sizes, dim=0)
        ]

    @staticmethod
    def _unblocks(blocks: list[Tensor], like: Tensor) -> Tensor:
        out = torch.cat([b.T for b in blocks], dim=0)
        return out[:, 0].contiguous() if like.ndim == 1 else out


class _MeanMSEMode(TorchFunctionMode):
    """Route ``F.mse_loss(input, target)`` with the mean reduction through the sum reduction.

    In torch 2.13 the forward-mode derivative of ``mse_loss``'s backward with
    ``reduction="mean"`` writes into an immutable zero tangent, so ``torch.func.jvp`` of
    ``torch.func.grad`` through it (the Hessian-vector products of the ``func`` engine) raises
    "ZeroTensors are immutable". ``mse_loss(input, target, reduction="sum") / n``, with ``n``
    the number of broadcast elements, is the same function with the same derivatives.
    """

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Iterable[type],
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:  # whatever the intercepted torch function returns
        kwargs = kwargs or {}
        if (
            func is torch.nn.functional.mse_loss
            and len(args) == 2
            and kwargs.get("reduction", "mean") == "mean"
            and all(kwargs.get(k) is None for k in ("size_average", "reduce", "weight"))
        ):
            out, target = args
            n = torch.broadcast_shapes(out.shape, target.shape).numel()
            return torch.nn.functional.mse_loss(out, target, reduction="sum") / n
        return func(*args, **kwargs)


def _forward_mode_safe(loss_fn: Callable[[Tensor, Tensor], Tensor]) -> Callable:
    """Wrap ``loss_fn`` so that its ``F.mse_loss`` calls are differentiable in forward mode.

    Uses :class:`_MeanMSEMode`; ``nn.MSELoss()`` and user losses that call it included.
    """

    def loss(out: Tensor, target: Tensor) -> Tensor:
        with _MeanMSEMode():
            return loss_fn(out, target)

    return loss


class _Trajectory:
    """Checkpoints of ``(theta_t, s_t)`` every ``c`` steps; segments recomputed on demand."""

    def __init__(self, run: TrainingRun, theta0: Tensor) -> None:
        self.run = run
        T, m = run.num_steps, run.dim
        per_step = m * theta0.element_size() * (2 + run.optimizer.num_states) + _cache_bytes(
            run, theta0
        )
        c = run.checkpoint_every
        if c is None:
            c = T if T * per_step <= run.memory_limit_bytes else max(1, math.ceil(math.sqrt(T)))
        self.every = min(c, T)
        self.checkpoints: list[tuple[Tensor, tuple[Tensor, ...]]] = []
        theta, state = theta0, run.optimizer.init(theta0)
        self._stored: list[_Step] | None = None
        steps: list[_Step] = []
        with torch.no_grad(), _threads(1 if isinstance(run.engine, ChainEngine) else None):
            for t in range(T):
                if t % self.every == 0:
                    self.checkpoints.append((theta, state))
                s = self._step(t, theta, state)
                if self.every >= T:
                    steps.append(s)
                theta, state = run.optimizer.update(t, s.lr, theta, state, s.cache["g"])
        self.final = theta
        if self.every >= T:
            self._stored = steps

    def _step(self, t: int, theta: Tensor, state: tuple[Tensor, ...]) -> _Step:
        run = self.run
        X, y = run.data.batch(t, theta.dtype)
        return _Step(t, run.schedule(t), theta, state, run.engine.prepare(theta, X, y))

    @torch.no_grad()
    def segment(self, k: int) -> list[_Step]:
        """Recompute steps ``[k c, (k + 1) c)`` from checkpoint ``k``."""
        if self._stored is not None:
            return self._stored
        theta, state = self.checkpoints[k]
        out = []
        for t in range(k * self.every, min((k + 1) * self.every, self.run.num_steps)):
            s = self._step(t, theta, state)
            out.append(s)
            theta, state = self.run.optimizer.update(t, s.lr, theta, state, s.cache["g"])
        return out

    def segments(self, reverse: bool = False) -> Iterator[list[_Step]]:
        """Yield the segments in order (or reversed), each recomputed as it is reached."""
        ks = range(len(self.checkpoints))
        for k in reversed(ks) if reverse else ks:
            yield self.segment(k)


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    """Run a block with ``n`` intra-op threads.

    The MLP primal steps are tiny ops for which thread synchronisation costs more than it saves
    on a small, shared CPU.
    """
    if n is None or n == torch.get_num_threads():
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _cache_bytes(run: TrainingRun, theta0: Tensor) -> int:
    """Rough size of one step's engine cache (activations of one batch for the chain path)."""
    X, _ = run.data.batch(0, theta0.dtype)
    width = getattr(run.engine, "widths", 0) or X[0].numel()
    return 6 * X.shape[0] * (X[0].numel() + width) * theta0.element_size()
