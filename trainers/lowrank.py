r"""Backprop-free training with a stored low-rank Jacobian.

Section 3.3 and Algorithm 1 of "Leveraging Low Rank Structure in the Lazy Regime" (an anonymous
ICLR 2025 submission, no arXiv id given; "the paper" below); its reviewers' questions (the
refresh below) come from the OpenReview discussion. About 560 lines for one concept, the
trainer and its factors (the preprocessing is most of it).

Notation (the paper's section 1.1): ``n`` training samples, ``d`` outputs, ``m`` parameters,
:math:`J \in \mathbb{R}^{nd \times m}` the Jacobian at the reference point :math:`w_0`
(sample-major rows ``i * d + j``, as :class:`linops.JacobianOperator`), :math:`J_j` its
``n x m`` slice for output unit ``j`` and :math:`a_t = \partial \ell / \partial f` the loss
gradient with respect to the outputs (zero outside the batch :math:`S`). The true gradient of
the linearized model is equation 5, :math:`g = J^\top a_t = \sum_j J_j^\top a_{t,:,j}`.

**Preprocessing** (Algorithm 1, once per refresh), for each unit ``j`` (``per_unit=True``) or
once for all outputs jointly (``per_unit=False``, then :math:`J_j` below reads :math:`J`):

1. a reference set :math:`\mathcal{R}` of ``r`` weights (:func:`estimators.reference.select_reference_set`,
   any strategy there);
2. :math:`A = [J_j]_{:, \mathcal{R}}` by JVPs on unit tangents, optionally row-centred
   (:func:`estimators.reference.reference_jacobian`);
3. :math:`V_j` = the leading eigenvectors of :math:`A A^\top` from the ``r x r`` Gram
   :math:`A^\top A` (Proposition 3.1, :func:`estimators.reference.reference_gram_eigh`);
4. :math:`P_j = J_j^\top V_j` by batched VJPs (the Jacobian is never formed).

Stacking the units, :math:`V \in \mathbb{R}^{nd \times k}` (block ``j`` lives on the rows of
unit ``j``), :math:`P = J^\top V \in \mathbb{R}^{m \times k}`, ``k = sum_j rank_j``.

**Training**, with no backward pass through the network. Two readings of "reconstruct the
Jacobian" (the paper is ambiguous; both train the linear model :math:`f_0 + \hat J \delta`):

* ``projection="sample"`` (the paper's Algorithm 1 and its "justification"):
  :math:`\hat J = V V^\top J = V P^\top`, so the update is
  :math:`\hat g = P\, V_S^\top a_S = J^\top \Pi_V a` -- the exact gradient of the projected
  output residual :math:`\Pi_V a`. Unless :math:`V` is an invariant subspace of
  :math:`J J^\top` (reference set = all weights) :math:`\hat g` is *not* the best
  approximation of :math:`g` inside the stored subspace.
* ``projection="parameter"`` (default, the sound version): :math:`\hat J = J \Pi_P` with
  :math:`\Pi_P` the orthogonal projector onto :math:`\mathrm{span}(P)`, stored as an orthonormal
  basis :math:`B` (from the ``k x k`` Gram :math:`P^\top P`) and :math:`JB` (``k`` JVPs):
  :math:`\hat g = B\,(JB)_S^\top a_S = \Pi_P\, g`, the orthogonal projection of the true
  linearized gradient onto the stored subspace (its error is orthogonal to the subspace).
  Every update of both variants lies in :math:`\mathrm{span}(P)`; this one is the closest
  to :math:`g` there. The two coincide when :math:`V` is :math:`JJ^\top`-invariant.

With every eigenvector kept and ``center=False`` both equal :math:`g` exactly
(:math:`J_j^\top V_j V_j^\top = J_j^\top` once :math:`V_j` spans the range of :math:`J_j`).
Centring (``center=True``, the paper's PCA of the weights' ``n``-dimensional
representations) only changes the subspace :math:`V`; :math:`P = J^\top V` always uses the
uncentred Jacobian, because :math:`\tilde J^\top a = g - \bar g \mathbf{1}` is not a gradient.

The outputs that give :math:`a_t` come from a forward pass (``outputs="forward"``, the
paper: the network itself is trained) or from the stored linearization
(``outputs="linearized"``: :math:`f_S = f_0 + \hat J_S (w - w_0)`, no forward pass at all).
Per step the update costs :math:`O(mk + |S| d k)` time and :math:`O(mk + ndk)` memory,
independent of how often the architecture reuses each parameter; a forward pass adds its own
cost in ``outputs="forward"``.

**Refresh** (reviewers' third question): the factors are recomputed at the current weights
every ``refresh_every`` steps, or when the drift estimate
:math:`\|f(w; x_S) - f_{\text{stored}}\| / \|f(w; x_S) - f_0(x_S)\|` (relative error of the
stored model's predicted output change, one forward pass) exceeds ``refresh_tol``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from estimators.reference import eigenvalue_threshold, reference_gram_eigh, reference_jacobian
from estimators.seeding import Seed, make_generator
from estimators.selection import select_reference_set
from linops import Params
from linops.jacobian import JacobianOperator
from trainers._base import Direction, LossFn, Trainer

__all__ = ["LowRankFactors", "LowRankJacobianTrainer", "LowRankUpdate", "lowrank_factors"]

PROJECTIONS = ("parameter", "sample")
OUTPUTS = ("forward", "linearized")


class LowRankFactors(NamedTuple):
    r"""What Algorithm 1's preprocessing stores (module docstring for the algebra).

    Attributes
    ----------
    w_ref
        ``(m,)`` the linearization point :math:`w_0`.
    f0
        ``(n, d)`` outputs at ``w_ref`` on the training inputs.
    V
        ``(n d, k)`` sample-space basis (unit ``j``'s block on rows ``i * d + j``).
    P
        ``(m, k)`` :math:`J^\top V` (``projection="sample"``; ``None`` otherwise).
    B
        ``(m, k')`` orthonormal basis of :math:`\mathrm{span}(P)` (``"parameter"``; else ``None``).
    JB
        ``(n d, k')`` :math:`J B` (``"parameter"``; else ``None``).
    ranks
        Eigenvectors kept per unit (one entry when joint).
    reference
        The reference index sets, one per unit (or one when joint).
    seconds
        Wall-clock time of the preprocessing.
    """

    w_ref: torch.Tensor
    f0: torch.Tensor
    V: torch.Tensor
    P: torch.Tensor | None
    B: torch.Tensor | None
    JB: torch.Tensor | None
    ranks: list[int]
    reference: list[torch.Tensor]
    seconds: float


class LowRankUpdate(NamedTuple):
    r"""What :meth:`LowRankJacobianTrainer.approximate_gradient` returns.

    Attributes
    ----------
    loss
        The batch loss (0-d, detached).
    update
        The flat low-rank update :math:`\hat g`, ``(m,)``.
    outputs
        The outputs the loss was computed from, the model's shape.
    """

    loss: torch.Tensor
    update: torch.Tensor
    outputs: torch.Tensor


def _check_choice(value: str, name: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{name}: expected one of {allowed}, got {value!r}")
    return value


def _check_int(value: object, name: str, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}: expected an integer >= {low}, got {value!r}")
    return value


def _reference_blocks(
    model: torch.nn.Module,
    X: torch.Tensor,
    values: dict[str, torch.Tensor],
    d: int,
    *,
    reference_size: int,
    strategy: str | Sequence[int] | torch.Tensor,
    per_unit: bool,
    center: bool,
    gen: torch.Generator,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Return reference matrices ``A`` (one per unit, or one joint) and their index sets."""
    kw: dict[str, Any] = {"params": values}
    units: list[int | None] = list(range(d)) if per_unit else [None]
    shared = not isinstance(strategy, str) or strategy in ("random", "magnitude")
    if shared:  # one reference set for every unit: one joint JVP pass, sliced per unit
        idx = select_reference_set(model, X, reference_size, strategy, seed=gen, **kw)
        A = reference_jacobian(model, X, idx, center=False, **kw)
        if not per_unit:
            return [_center(A) if center else A], [idx]
        blocks = [A.reshape(len(X), d, -1)[:, j] for j in range(d)]
        return [_center(a) if center else a for a in blocks], [idx] * d
    As, sets = [], []
    for j in units:
        idx = select_reference_set(
            model, X, reference_size, strategy, output_index=j, seed=gen, **kw
        )
        As.append(reference_jacobian(model, X, idx, output_index=j, center=center, **kw))
        sets.append(idx)
    return As, sets


def _center(A: torch.Tensor) -> torch.Tensor:
    return A - A.mean(dim=1, keepdim=True)


def _orthonormal_basis(P: torch.Tensor, rtol: float | None) -> torch.Tensor:
    r"""``B = P U_k S_k^{-1/2}`` from ``P^T P = U S U^T`` (eigenvalues above ``rtol * s_1``)."""
    M = (P.T @ P).double()
    s, U = torch.linalg.eigh(M)
    s, U = s.flip(0), U.flip(1)
    keep = s > eigenvalue_threshold(s, P.dtype, rtol=rtol)  # the reference Gram's rule
    return P @ (U[:, keep] / s[keep].sqrt()).to(P.dtype)


def lowrank_factors(
    model: torch.nn.Module,
    X: torch.Tensor,
    rank: int,
    *,
    values: dict[str, torch.Tensor] | None = None,
    reference_size: int | None = None,
    strategy: str | Sequence[int] | torch.Tensor = "random",
    per_unit: bool = True,
    center: bool = False,
    projection: str = "parameter",
    rtol: float | None = None,
    batch_size: int | None = None,
    seed: Seed = 0,
) -> LowRankFactors:
    r"""Algorithm 1's preprocessing at ``values`` (default: the model's current parameters).

    Parameters
    ----------
    model
        The network.
    X
        ``(n, ...)`` training inputs (all of them: the stored rows are indexed by sample).
    rank
        Eigenvectors kept per unit (or jointly): at most ``rank``, fewer when the reference
        Gram has fewer eigenvalues above the threshold of
        :func:`estimators.reference.reference_gram_eigh` (``rtol``).
    values
        Parameter values by name (the linearization point); default the model's.
    reference_size
        Size ``r`` of the reference set; default ``rank`` (the paper uses one ``r``).
    strategy
        A strategy of :func:`estimators.reference.select_reference_set` or explicit indices.
    per_unit
        One reference set and basis per output unit (the paper) or one joint basis.
    center
        Row-centre the reference matrix before its eigendecomposition (the paper's PCA).
    projection
        ``"parameter"`` (sound, default) or ``"sample"`` (the paper); module docstring.
    rtol
        Relative eigenvalue threshold for the reference Gram and for :math:`P^\top P`.
    batch_size
        Samples per batch of the JVP/VJP passes (bounds the memory of the retained graphs).
    seed
        Randomness of the ``"random"`` and ``"leverage"`` strategies.

    Returns
    -------
    LowRankFactors

    Raises
    ------
    ValueError
        For a bad ``rank``, ``reference_size`` or ``projection``.
    """
    start = time.perf_counter()
    _check_choice(projection, "projection", PROJECTIONS)
    rank = _check_int(rank, "rank")
    reference_size = _check_int(reference_size or rank, "reference_size")
    if reference_size < rank:
        raise ValueError(f"reference_size: expected >= rank = {rank}, got {reference_size}")
    gen = make_generator(seed)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    values = {n: p.detach() for n, p in (values or dict(model.named_parameters())).items()}
    names = [n for n in names if n in values]
    values = {n: values[n] for n in names}
    w_ref = torch.cat([values[n].reshape(-1) for n in names])
    X = X.to(dtype=w_ref.dtype, device=w_ref.device)
    with torch.no_grad():
        f0 = torch.cat(
            [
                torch.func.functional_call(model, values, (X[i : i + (batch_size or len(X))],))
                for i in range(0, len(X), batch_size or len(X))
            ]
        ).reshape(len(X), -1)
    n, d = f0.shape
    rows = n * d if not per_unit else n
    reference_size = min(reference_size, w_ref.numel())
    As, sets = _reference_blocks(
        model,
        X,
        values,
        d,
        reference_size=reference_size,
        strategy=strategy,
        per_unit=per_unit,
        center=center,
        gen=gen,
    )
    Vs = [reference_gram_eigh(A, rtol=rtol).left_vectors[:, :rank] for A in As]
    V = _stack_units(Vs, n, d, per_unit, rows)
    J = JacobianOperator(model, X, values, batch_size=batch_size)
    # every reference column can be zero (dead weights): then the stored subspace is {0}
    P = J._apply(V, adjoint=True) if V.shape[1] else V.new_zeros(w_ref.numel(), 0)
    B = JB = None
    if projection == "parameter":
        B = _orthonormal_basis(P, rtol) if P.shape[1] else P
        JB = J._apply(B) if B.shape[1] else V.new_zeros(V.shape[0], 0)
    J.clear_cache()
    ranks = [v.shape[1] for v in Vs]
    stored_P = None if projection == "parameter" else P
    return LowRankFactors(w_ref, f0, V, stored_P, B, JB, ranks, sets, time.perf_counter() - start)


def _stack_units(Vs: list[torch.Tensor], n: int, d: int, per_unit: bool, rows: int) -> torch.Tensor:
    """Stack unit bases ``V_j (n, k_j)`` into one ``(n d, k)`` block matrix, sample-major rows."""
    if not per_unit:
        return Vs[0]
    k = sum(v.shape[1] for v in Vs)
    V = Vs[0].new_zeros(n, d, k)
    col = 0
    for j, v in enumerate(Vs):
        V[:, j, col : col + v.shape[1]] = v
        col += v.shape[1]
    return V.reshape(n * d, k)


class _RowIndex:
    """Exact lookup of batch rows among the training inputs.

    Fast path: a float64 random projection of each row, ``searchsorted`` on the sorted keys,
    then an exact comparison of the rows found; rows that fail it are looked up byte-wise.
    """

    def __init__(self, X: torch.Tensor) -> None:
        self.X = X.detach().reshape(len(X), -1)
        g = torch.Generator().manual_seed(12345)
        self.u = torch.randn(self.X.shape[1], generator=g, dtype=torch.float64).to(X.device)
        keys = self._proj(self.X)
        self.sorted_keys, self.key_order = torch.sort(keys)
        self.bytes = self._bytes(self.X)
        self.byte_order = np.argsort(self.bytes, kind="stable")
        self.sorted_bytes = self.bytes[self.byte_order]

    def _proj(self, x: torch.Tensor) -> torch.Tensor:
        return (x.to(torch.float64) * self.u).sum(1)

    @staticmethod
    def _bytes(x: torch.Tensor) -> np.ndarray:
        a = np.ascontiguousarray(x.detach().reshape(len(x), -1).cpu().numpy())
        return a.view(np.dtype((np.void, a.dtype.itemsize * a.shape[1]))).ravel()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.detach().reshape(len(x), -1)
        if flat.shape[1] != self.X.shape[1] or flat.dtype != self.X.dtype:
            raise ValueError(
                "x: expected inputs from the training set given to the trainer, got rows of "
                f"another size or dtype ({x.dtype}, shape {tuple(x.shape)})"
            )
        pos = torch.searchsorted(self.sorted_keys, self._proj(flat))
        idx = self.key_order[pos.clamp_max(len(self.X) - 1)]
        bad = (self.X[idx] != flat).any(dim=1)
        if bool(bad.any()):
            q = self._bytes(flat[bad])
            p = np.clip(np.searchsorted(self.sorted_bytes, q), 0, len(self.sorted_bytes) - 1)
            if not np.array_equal(self.sorted_bytes[p], q):
                raise ValueError(
                    "x: expected inputs from the training set given to the trainer, got rows "
                    "that are not in it"
                )
            idx[bad] = torch.as_tensor(self.byte_order[p], dtype=torch.long).to(idx.device)
        return idx.cpu()


class LowRankJacobianTrainer(Trainer):
    r"""The paper's Algorithm 1: training without backpropagation from stored Jacobian factors.

    Parameters
    ----------
    model
        The network; preprocessing happens at its current parameters.
    loss_fn
        ``loss_fn(outputs, targets) -> scalar``.
    X_train
        ``(n, ...)`` the training inputs; batches handed to :meth:`direction` must be rows of
        it (they are located by exact lookup).
    rank
        Eigenvectors kept per output unit (or jointly), ``r`` in the paper.
    reference_size
        Reference-set size (default ``rank``).
    strategy
        Reference-set strategy of :func:`estimators.reference.select_reference_set`
        (``"random"``, ``"magnitude"``, ``"gradient"``, ``"leverage"``) or explicit indices.
    per_unit
        Per output unit (the paper, default) or jointly over the outputs.
    center
        Row-centre the reference matrix (the paper); default false.
    projection
        ``"parameter"`` (default, sound) or ``"sample"`` (the paper); see the module docstring.
    outputs
        ``"forward"`` (a forward pass gives :math:`a_t`) or ``"linearized"`` (stored model).
    refresh_every
        Recompute the factors every this many steps (``None``: never).
    refresh_tol
        Recompute them when the drift estimate exceeds this (``None``: never).
    rtol, batch_size
        Passed to :func:`lowrank_factors`.
    seed
        Randomness of the reference-set selection (one generator, so each refresh draws
        anew).
    optimizer, params, **optimizer_kw
        As for every :class:`trainers.Trainer`.

    Attributes
    ----------
    factors
        The current :class:`LowRankFactors` (``None`` before the first step or
        :meth:`preprocess`).
    seconds_preprocess
        Wall-clock time of every preprocessing, in order.
    refresh_steps
        Steps at which the factors were (re)computed.

    Examples
    --------
    >>> import torch
    >>> from trainers.models import MLP
    >>> g = torch.Generator().manual_seed(0)
    >>> X, y = torch.randn(32, 4, generator=g), torch.randint(0, 3, (32,), generator=g)
    >>> net = MLP(4, 3, 64, seed=g)
    >>> t = LowRankJacobianTrainer(net, torch.nn.functional.cross_entropy, X, rank=8, lr=0.5)
    >>> h = t.fit(X, y, epochs=20, progress=False)
    >>> h.loss[-1] < h.loss[0]
    True
    """

    def __init__(
        self,
        model: torch.nn.Module,
        loss_fn: LossFn,
        X_train: torch.Tensor,
        *,
        rank: int,
        reference_size: int | None = None,
        strategy: str | Sequence[int] | torch.Tensor = "random",
        per_unit: bool = True,
        center: bool = False,
        projection: str = "parameter",
        outputs: str = "forward",
        refresh_every: int | None = None,
        refresh_tol: float | None = None,
        rtol: float | None = None,
        batch_size: int | None = None,
        seed: Seed = 0,
        optimizer: str | Callable[..., torch.optim.Optimizer] = "sgd",
        params: Params | None = None,
        **optimizer_kw: Any,  # forwarded to the optimizer (see Trainer)
    ) -> None:
        if not isinstance(X_train, torch.Tensor) or X_train.ndim < 1 or len(X_train) == 0:
            raise TypeError(
                "X_train: expected a non-empty tensor of training inputs, got "
                f"{type(X_train).__name__}"
            )
        super().__init__(model, loss_fn, optimizer=optimizer, params=params, **optimizer_kw)
        self.rank = _check_int(rank, "rank")
        if reference_size is not None:
            _check_int(reference_size, "reference_size")
        self.projection = _check_choice(projection, "projection", PROJECTIONS)
        self.outputs = _check_choice(outputs, "outputs", OUTPUTS)
        if refresh_every is not None:
            _check_int(refresh_every, "refresh_every")
        if refresh_tol is not None and not (math.isfinite(refresh_tol) and refresh_tol > 0):
            raise ValueError(f"refresh_tol: expected a positive number, got {refresh_tol!r}")
        self.refresh_every, self.refresh_tol = refresh_every, refresh_tol
        self.options: dict[str, Any] = {  # lowrank_factors keywords
            "reference_size": reference_size,
            "strategy": strategy,
            "per_unit": bool(per_unit),
            "center": bool(center),
            "projection": projection,
            "rtol": rtol,
            "batch_size": batch_size,
        }
        self.X_train = X_train.to(dtype=self.space.dtype, device=self.space.device)
        self._rows = _RowIndex(self.X_train)
        self._generator = make_generator(seed)
        self.factors: LowRankFactors | None = None
        self.seconds_preprocess: list[float] = []
        self.refresh_steps: list[int] = []
        self._since_refresh = 0
        self._drift = 0.0

    # ----------------------------------------------------------------- preprocessing
    def preprocess(self) -> LowRankFactors:
        """Run (or rerun) Algorithm 1's preprocessing at the current parameters."""
        self.factors = lowrank_factors(
            self.model,
            self.X_train,
            self.rank,
            values=self.values,
            seed=self._generator,
            **self.options,
        )
        self.seconds_preprocess.append(self.factors.seconds)
        self.refresh_steps.append(self.steps_done)
        self._since_refresh, self._drift = 0, 0.0
        return self.factors

    def _maybe_refresh(self) -> None:
        due = self.factors is None
        due |= self.refresh_every is not None and self._since_refresh >= self.refresh_every
        due |= self.refresh_tol is not None and self._drift > self.refresh_tol
        if due:
            self.preprocess()

    # ----------------------------------------------------------------- the algebra
    def _flat_params(self) -> torch.Tensor:
        return torch.cat([self.values[n].detach().reshape(-1) for n in self.space.names])

    def _stored(self) -> LowRankFactors:
        """Return the factors, computed first if :meth:`preprocess` has not run yet."""
        return self.factors if self.factors is not None else self.preprocess()

    def _rows_of(self, idx: torch.Tensor) -> torch.Tensor:
        f0 = self._stored().f0
        d = f0.shape[1]
        return (idx[:, None] * d + torch.arange(d)).reshape(-1).to(f0.device)

    def _update(self, F: LowRankFactors, rows: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        r""":math:`\hat g` for output-gradient ``a`` on ``rows`` (module docstring)."""
        if F.B is not None and F.JB is not None:
            return F.B @ (F.JB[rows].T @ a)
        assert F.P is not None  # projection="sample" stores P
        return F.P @ (F.V[rows].T @ a)

    def stored_outputs(self, idx: torch.Tensor) -> torch.Tensor:
        r"""Evaluate the stored model :math:`f_0 + \hat J (w - w_0)` on training rows ``idx``."""
        F = self._stored()
        delta = self._flat_params() - F.w_ref
        rows = self._rows_of(idx)
        if F.B is not None and F.JB is not None:
            change = F.JB[rows] @ (F.B.T @ delta)
        else:
            assert F.P is not None  # projection="sample" stores P
            change = F.V[rows] @ (F.P.T @ delta)
        return F.f0[idx.to(F.f0.device)] + change.reshape(len(idx), -1)

    def approximate_gradient(
        self, idx: torch.Tensor, y: torch.Tensor, x: torch.Tensor | None = None
    ) -> LowRankUpdate:
        r"""Loss, flat update :math:`\hat g` and outputs on training rows ``idx`` (no side effects).

        ``x`` (the inputs of those rows) is needed with ``outputs="forward"``.
        """
        F = self._stored()
        if self.outputs == "forward":
            x = self.X_train[idx] if x is None else x
            with torch.no_grad():
                out = self.forward(x)
        else:
            out = self.stored_outputs(idx)
        out = out.detach().reshape(len(idx), *self._out_shape()).requires_grad_(True)
        with torch.enable_grad():
            loss = self.loss_fn(out, y)
            (a,) = torch.autograd.grad(loss, out)
        a = a.reshape(-1)
        rows = self._rows_of(idx)
        return LowRankUpdate(loss.detach(), self._update(F, rows, a), out.detach())

    def _out_shape(self) -> torch.Size:
        shape = getattr(self, "_shape", None)
        if shape is None:
            with torch.no_grad():
                shape = self.forward(self.X_train[:1]).shape[1:]
            self._shape = shape
        return shape

    # ----------------------------------------------------------------- the trainer interface
    def direction(self, x: torch.Tensor, y: torch.Tensor) -> Direction:
        r"""Loss on the batch and the low-rank update :math:`\hat g` (refreshing if due)."""
        self._maybe_refresh()
        idx = self._rows(x)
        loss, g, out = self.approximate_gradient(idx, y, x)
        if self.refresh_tol is not None:
            self._drift = self.drift(idx, out if self.outputs == "forward" else None)
            self.history.log(drift=self._drift)
        self._since_refresh += 1
        return Direction(float(loss), self.space.unflatten(g))

    def drift(self, idx: torch.Tensor, network_outputs: torch.Tensor | None = None) -> float:
        r"""Relative error of the stored model's predicted output change on rows ``idx``.

        :math:`\|f(w; x) - f_{\text{stored}}(x)\| / \|f(w; x) - f_0(x)\|` (0 at the reference
        point); one forward pass unless ``network_outputs`` are given.
        """
        F = self._stored()
        if network_outputs is None:
            with torch.no_grad():
                network_outputs = self.forward(self.X_train[idx])
        net = network_outputs.reshape(len(idx), -1)
        f0 = F.f0[idx.to(F.f0.device)]
        moved = float((net - f0).norm())
        if moved == 0.0:
            return 0.0
        return float((net - self.stored_outputs(idx)).norm()) / moved
