r"""Curvature operators: loss Hessian, generalized Gauss-Newton, Hessian of one model output.

For a dataset :math:`\{(x_n, y_n)\}_{n=1}^N`, a loss :math:`\ell` and a model
:math:`f(\theta; x)`, the empirical risk is :math:`L(\theta) = c \sum_n \ell(f(\theta; x_n), y_n)`
with :math:`c = 1/N` for a mean reduction and :math:`c = 1` for a sum, and

.. math::

    H = \nabla^2_\theta L, \qquad
    G = c \sum_n J_n^\top \, \nabla^2_f \ell(f_n, y_n) \, J_n \quad (\text{GGN}), \qquad
    H_j(x) = \nabla^2_\theta f_j(\theta; x) \quad (\text{output Hessian}).

The output Hessian is the laziness numerator of section 3.2 of "Leveraging Low Rank Structure in the Lazy Regime"
(an anonymous ICLR 2025 submission, no arXiv id given).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from linops._autodiff import (
    GradientGraph,
    LossFn,
    OutputGraph,
    forward_ad_jvp,
    forward_mode_jvp,
)
from linops._chain import ChainGradientGraph, ChainOutputGraph
from linops._checks import check_loss_fn, check_output_index
from linops._loss import OutputLoss
from linops._model import ModelOperator, forward_checked, tensor_in
from linops._reduction import (
    Reduction,
    _describe,
    _name,
    check_reduction,
    loss_reduction,
    torch_forward,
)
from linops._types import Data, OutputSelector, Params, ProcessGroup
from linops.params import listed

if TYPE_CHECKING:  # pragma: no cover
    from linops._data import Batches
    from linops.params import ParamSpace

__all__ = ["GGNOperator", "HessianOperator", "OutputHessianOperator"]


class _LossOperator(ModelOperator):
    """An ``m x m`` symmetric operator defined by a loss summed or averaged over batches."""

    is_symmetric = True

    def __init__(
        self,
        model: torch.nn.Module,
        loss_fn: LossFn,
        data: Data,
        params: Params | None = None,
        *,
        reduction: str | Callable[[torch.Tensor, torch.Tensor], float | torch.Tensor] | None = None,
        output: OutputSelector | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        batch_size: int | None = None,
        cache: bool | None = None,
        allow_train_mode: bool = False,
        allow_reshuffle: bool = False,
        max_vectors: int | None = None,
        memory_limit_bytes: int | None = None,
        process_group: ProcessGroup | None = None,
        route: str = "auto",
        memory_budget: int | None = None,
        label_key: str | None = None,
    ) -> None:
        check_loss_fn(loss_fn)
        check_reduction(reduction)
        super().__init__(
            model,
            data,
            params,
            shape=lambda _, space: (space.dim, space.dim),
            targets=True,
            dtype=dtype,
            device=device,
            batch_size=batch_size,
            cache=cache,
            allow_train_mode=allow_train_mode,
            allow_reshuffle=allow_reshuffle,
            max_vectors=max_vectors,
            memory_limit_bytes=memory_limit_bytes,
            process_group=process_group,
            route=route,
            output=output,
            memory_budget=memory_budget,
            label_key=label_key,
        )
        self._given_loss = loss_fn
        self.loss_fn, self._reduction = _loss_in(loss_fn, self.torch_dtype, self.device), reduction
        self._loss_reduction: Reduction | None = None
        self._own_reduction: Reduction | None = None  # the loss's own (_batch_normaliser)
        self._batch_weights: list[float] | None = None

    @property
    def reduction(self) -> str:
        """``"mean"`` or ``"sum"``: given, or read from the loss (:mod:`linops._reduction`)."""
        return self._reduce().kind

    def _reduce(self) -> Reduction:
        if self._loss_reduction is None:
            several = len(self.batches) > 1 or self.process_group is not None
            self._loss_reduction = loss_reduction(
                self.loss_fn, self._reduction, several_batches=several
            )
        return self._loss_reduction

    def _batch_normaliser(self, out: torch.Tensor, y: torch.Tensor | None) -> float:
        r"""Return the batch loss's own :math:`W_b`: torch's loss is the per-sample sum over it.

        The Fisher family's per-sample scale. A ``reduction=`` given for one of torch's losses
        sets only how the batches are weighted (:meth:`_weights`), as for the GGN; taking
        :math:`W_b` from it made the Fisher and KFAC of ``MSELoss()`` 3x the GGN with a
        callable counting samples (``C = 3`` outputs). A plain function has only the given one.
        """
        if self._own_reduction is None:  # read once, like _reduce()
            self._own_reduction = (
                self._reduce()
                if _describe(self.loss_fn)[0] is None
                else loss_reduction(self.loss_fn, None, several_batches=False)
            )
        own = self._own_reduction
        if own.kind == "sum":
            return 1.0
        normaliser: Any = own.normaliser
        return float(normaliser(out, y))

    def _weights(self) -> list[float]:
        r"""Weight of each batch's loss in the dataset loss: :math:`W_b / \sum_{b'} W_{b'}`.

        With a mean reduction :math:`W_b` is the batch's normaliser (samples, entries,
        non-ignored targets or their class weights: :mod:`linops._reduction`), so the operator
        over batches is the one of the loss on the concatenated data. Computed once, from one
        forward pass per batch, also for a sum (whose weights are all 1): that pass checks every
        batch's inputs (:func:`linops._model.forward_checked`), so a bad batch is named as such
        before any graph is built, not met as a raw shape error inside a product.
        """
        if self._batch_weights is None:
            local: dict[str, Any] = {}

            def normalisers() -> float:  # everything a rank can fail at, before the collective
                reduction = local["reduction"] = self._reduce()
                w = local["w"] = reduction.normalisers(self._batch_outputs())
                if reduction.kind == "sum" or reduction.normaliser is None:
                    return 0.0
                return sum(w, 0.0)

            total = None
            if self.process_group is None:
                normalisers()
            else:
                from linops.distributed import global_sum

                total = global_sum(self, normalisers, what="loss normaliser")
            self._batch_weights = local["reduction"].weights_of(local["w"], total)
        return self._batch_weights

    def _batch_outputs(self) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """Each batch's model outputs and targets (no graph), the loss checked to be scalar.

        A generator: one batch's outputs at a time (a streamed dataset's are never all kept).
        """
        for i, (x, y) in enumerate(self.batches):
            with torch.no_grad():
                out = forward_checked(self.space, x)
            if i == 0:
                _check_scalar_loss(self.loss_fn, out, y)
            yield out, y

    def _reset_derived(self) -> None:
        self._batch_weights = None

    def _to(self, dtype: torch.dtype, device: torch.device) -> Any:
        new = super()._to(dtype, device)
        new.loss_fn = _loss_in(self._given_loss, dtype, device)
        return new

    def prepare_distributed(self) -> None:
        """Return the collectives a product needs first (the loss normaliser's sum over the ranks)."""
        self._weights()

    _slotted_directions: tuple[bool, ...] = (False,)

    def _accumulate(self, X: torch.Tensor, product: Any) -> torch.Tensor:
        """Return ``sum_b w_b product(graph_b, X)`` over the batches, a running sum per slot.

        One slot holds the whole block (batched when ``k > 1``). Taken in slots
        (:meth:`ModelOperator._in_slots`: a block split into passes while graphs are
        rebuilt), each slot of columns sums into its columns of the output, so every slot goes
        through each batch's graph before the next batch is built; each slot's sum is then
        the one its own product makes (bit for bit; 0 + x is x).

        Over several batches the running sums are made before any batch's graph and updated
        in place, and each batch's product is dropped before the next graph is built: made
        amid a graph's temporaries, such tensors outlive it and split glibc's heap, so the
        next graph's large blocks no longer fit there (a streamed ResNet's peak resident
        memory over 40 batches 1.64x one batch's before, 1.37x after, ``bench/streaming.py``;
        1.09-1.14x with :func:`linops.memory.streamed_pass_allocation` as well).
        """
        weights = self._weights()
        out: torch.Tensor | None = None
        slots: list[tuple[list[torch.Tensor], bool, list[torch.Tensor] | None]]
        if self._slot_width is not None:
            out, parts = self._slot_sums(X, X.shape[1])
            slots = [(self._split_params(X[:, c])[0], b, s) for c, b, s in parts]
        else:
            tangents, batched = self._split_params(X)
            total = self._zero_sums(X, X.shape[1], batched) if len(weights) > 1 else None
            slots = [(tangents, batched, total)]
        for w, graph in zip(weights, self._graphs(), strict=True):
            if w == 0.0:  # a mean's batch of zero weight (only zero-weight classes) adds nothing;
                continue  # torch's loss on it alone is 0 / 0
            for i, (tangents, batched, total) in enumerate(slots):
                part = product(graph, tangents, batched)
                if total is None:
                    # one batch: no scaled copy per parameter tensor unless its weight is not 1
                    # (65 muls and allocations a product on a ResNet-20)
                    result = [w * t for t in part] if w != 1.0 else listed(part)
                    slots[i] = (tangents, batched, result)
                else:
                    for a, t in zip(total, part, strict=True):
                        a.add_(t, alpha=w)
                del part
        if out is not None:
            return out
        _, batched, total = slots[0]
        assert total is not None  # the weights sum to 1
        return self._join_params(total, batched)


def _loss_in(loss_fn: LossFn, dtype: torch.dtype, device: torch.device) -> LossFn:
    """Return the loss with its floating tensors in the operator's dtype and on its device.

    Class weights and ``pos_weight`` of a loss module: converted in a copy, the caller's loss
    unchanged.
    """
    if not isinstance(loss_fn, nn.Module):
        return loss_fn
    if all(tensor_in(t, dtype, device) for t in [*loss_fn.parameters(), *loss_fn.buffers()]):
        return loss_fn
    return copy.deepcopy(loss_fn).to(device=device, dtype=dtype)


#: torch's losses that broadcast targets of another shape with only a warning
_BROADCASTING = (nn.MSELoss, nn.L1Loss, nn.SmoothL1Loss, nn.HuberLoss)
_BROADCASTING_FUNCTIONS = (
    nn.functional.mse_loss,
    nn.functional.l1_loss,
    nn.functional.smooth_l1_loss,
    nn.functional.huber_loss,
)


def _unwrapped(loss_fn: object) -> object:
    return loss_fn.func if isinstance(loss_fn, functools.partial) else loss_fn


def _broadcasting_loss(loss_fn: object) -> bool:
    if isinstance(loss_fn, _BROADCASTING):
        return torch_forward(loss_fn)  # a subclass's own forward may reshape on purpose
    return any(_unwrapped(loss_fn) is f for f in _BROADCASTING_FUNCTIONS)


def _check_scalar_loss(loss_fn: LossFn, out: torch.Tensor, y: torch.Tensor | None) -> None:
    """Call the loss on the first batch: a scalar, and no broadcast of targets to outputs.

    torch's ``mse_loss``, ``l1_loss``, ``smooth_l1_loss`` and ``huber_loss`` only warn when
    targets of another shape broadcast (outputs ``(N, 1)``, targets ``(N,)``: an ``N x N``
    loss); its normaliser is then not the batch's, so the operator over several batches
    matched neither the intended loss nor the broadcast one. Refused for those losses (as
    modules or functions); a user's own function may broadcast on purpose.
    """
    if y is not None and _broadcasting_loss(loss_fn) and tuple(y.shape) != tuple(out.shape):
        raise ValueError(
            f"loss_fn: targets of shape {tuple(y.shape)} would broadcast against outputs of "
            f"shape {tuple(out.shape)} in {_name(_unwrapped(loss_fn))} (torch only warns); give "
            "targets of the outputs' shape (e.g. y[:, None] or y.reshape(outputs.shape))"
        )
    try:
        value = loss_fn(out, y)
    except TypeError as err:
        raise TypeError(
            f"loss_fn: expected a callable loss_fn(outputs, targets), calling it raised: {err}"
        ) from None
    except (RuntimeError, ValueError, IndexError) as err:
        raise ValueError(
            f"loss_fn: raised on outputs of shape {tuple(out.shape)} and targets of shape "
            f"{tuple(y.shape) if y is not None else None} (dtype "
            f"{y.dtype if y is not None else None}): {str(err).splitlines()[0][:300]}"
        ) from None
    if not isinstance(value, torch.Tensor) or value.dim() != 0:
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(
            f"loss_fn: expected a scalar loss (reduction 'mean' or 'sum'), got {shape}; a loss "
            "without a reduction does not define a Hessian"
        )


class HessianOperator(_LossOperator):
    r"""The Hessian :math:`H = \nabla^2_\theta L` of the empirical risk over a dataset.

    Parameters
    ----------
    model
        The network (evaluated at its current parameters).
    loss_fn
        ``loss_fn(outputs, targets) -> scalar`` with a mean or sum reduction (a loss
        returning per-sample values is refused): any torch loss module or functional
        (class weights, ``ignore_index``, label smoothing, soft targets, ``KLDivLoss``
        with ``"batchmean"``, ``pos_weight``, sequence losses on ``(N, C, T)`` logits), or a
        plain function (then, over several batches, say how it reduces with ``reduction``).
    data
        An ``(X, y)`` pair of tensors or an iterable of ``(x, y)`` batches.
    params
        Which parameters (see :class:`linops.ParamSpace`).
    reduction
        How the loss reduces over the dataset. Default: read from torch's loss (its
        ``reduction`` and, for a mean, the normaliser :math:`W_b` of each batch: samples,
        entries, non-ignored targets or their class weights), so that the operator over
        batches equals the one on the concatenated data. ``"sum"``; ``"mean"`` (for a plain
        function: a mean over samples); or a callable ``(outputs, targets) -> W_b`` (batch
        ``b`` weighted :math:`W_b / \sum W`). A plain function over several batches without
        it is refused.
    output
        Selects the tensor to differentiate from the model's return value
        (``lambda out: out.logits``); see :class:`linops.ParamSpace`.
    process_group
        A ``torch.distributed`` process group: each rank passes its own shard of the data,
        a product is the all-reduce of the local products (replicated on every rank) and
        ``N`` counts the samples of all ranks, so the operator is the single-process one on
        the concatenated shards (see :mod:`linops.distributed`). Every product is a
        collective: all ranks must call them in the same order.
    **kwargs
        ``dtype``, ``device``, ``batch_size``, ``cache``, ``allow_train_mode``,
        ``allow_reshuffle``, ``max_vectors``, ``memory_budget``, ``label_key``, ``route`` as in
        :class:`linops.JacobianOperator` (the chain route takes the loss's output gradient and
        output-Hessian products from autograd, so any loss works on it).

    Examples
    --------
    >>> import torch
    >>> lin = torch.nn.Linear(2, 1, bias=False).double()
    >>> X = torch.tensor([[1.0, 0.0], [1.0, 2.0]], dtype=torch.float64)
    >>> y = torch.zeros(2, 1, dtype=torch.float64)
    >>> loss = torch.nn.MSELoss(reduction="sum")
    >>> HessianOperator(lin, loss, (X, y)).to_dense().tolist()  # 2 X^T X
    [[4.0, 4.0], [4.0, 8.0]]
    """

    def _build_graph(self, x: torch.Tensor, y: torch.Tensor | None) -> Any:
        return self._route_graph(
            lambda chain: ChainGradientGraph(chain, self.loss_fn, x, y),
            lambda: GradientGraph(self.space, self.loss_fn, x, y),
        )

    def _matmat_torch(self, X: torch.Tensor) -> torch.Tensor:
        return self._accumulate(X, lambda g, t, b: g.hvp(t, b))


class GGNOperator(_LossOperator):
    r"""The generalized Gauss-Newton matrix :math:`G = c \sum_n J_n^\top \nabla^2_f \ell_n J_n`.

    Parameters are those of :class:`HessianOperator`. The product is ``J`` (JVP), then the
    loss Hessian w.r.t. the outputs, then ``J^T`` (VJP), all on retained graphs. :math:`G` is
    positive semi-definite for convex losses (MSE, cross-entropy).
    """

    def _build_graph(self, x: torch.Tensor, y: torch.Tensor | None) -> Any:
        outputs = self._route_graph(
            lambda chain: ChainOutputGraph(chain, x, None),
            lambda: OutputGraph(self.space, x, None),
        )
        return outputs, OutputLoss(outputs.out, self.loss_fn, y, outputs.model_shape), x

    def _matmat_torch(self, X: torch.Tensor) -> torch.Tensor:
        def product(graphs: Any, tangents: list[torch.Tensor], batched: bool) -> Any:
            outputs, loss, x = graphs
            if batched and self._forward_mode:
                return self._forward_mode_product(outputs, loss, x, tangents)
            if not batched and self._single_forward_mode:
                jv = forward_ad_jvp(self.space, x, None, tangents).reshape(outputs.out.shape)
            else:
                jv = outputs.jvp(tangents, batched)
            return outputs.vjp(loss.hvp(jv, batched), batched)

        if X.shape[1] == 1 and not self._probing and self._single_forward_mode is None:
            return self._first_single(X, product)
        return self._accumulate(X, product)

    #: whether single products take ``J v`` by forward AD (``None``: not decided yet)
    _single_forward_mode: bool | None = None

    def _single_way_undecided(self, adjoint: bool) -> bool:
        return self._single_forward_mode is None

    def _first_single(self, X: torch.Tensor, product: Any) -> torch.Tensor:
        """First single product; decides whether ``J v`` inside it takes forward AD.

        As for :class:`linops.JacobianOperator`'s single products: on the autograd route, for
        models with convolutions, ``J v`` by forward AD (:func:`linops._autodiff.forward_ad_jvp`)
        instead of the retained graph's double backward, kept only if this first product
        matches the retained graph's to rounding (``op.route`` then ends in
        ``", forward AD for single vectors"``).
        """
        self._single_forward_mode = False
        ref = self._accumulate(X, product)

        def forward() -> torch.Tensor:
            self._single_forward_mode = True
            return self._accumulate(X, product)

        out = self._try_forward_ad(ref, forward)
        self._single_forward_mode = out is not None
        return ref if out is None else out

    def _reset_derived(self) -> None:
        super()._reset_derived()
        self._single_forward_mode = None

    def _forward_mode_product(
        self, outputs: Any, loss: Any, x: torch.Tensor, tangents: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        """``J^T H J V`` with ``J V`` by batched forward mode, then a batched ``J^T``.

        The forward pass is batched by torch (:func:`linops._autodiff.forward_mode_jvp`), the
        loss Hessian on the outputs is small, and ``J^T`` replays the retained graph under
        vmap, or once per vector through a convolution, whose batching rule folds the vectors
        into the kernel (:data:`linops._model.FOLDING_KERNELS`).
        """
        jv = forward_mode_jvp(self.space, x, None, tangents)  # (K, n_b, d)
        hv = loss.hvp(jv.reshape(jv.shape[0], *outputs.out.shape), True)
        if not outputs.convolutional:
            return outputs.vjp(hv, True)
        cols = [outputs.vjp(hv[i], False) for i in range(hv.shape[0])]
        return [torch.stack(parts) for parts in zip(*cols, strict=True)]

    def _has_forward_mode(self, adjoint: bool) -> bool:
        return True  # symmetric: both directions are the same product


class OutputHessianOperator(ModelOperator):
    r"""Hessian :math:`\nabla^2_\theta f_j(\theta; x)` of one model output (section 3.2 of the lazy-regime paper).

    The numerator of the laziness ratio
    :math:`\|\nabla^2_\theta f_j(x)\| / \|\nabla_\theta f_j(x)\|^2`.

    Parameters
    ----------
    model
        The network.
    x
        One input (with or without a leading batch dimension of 1). A batch of several inputs
        gives the Hessian of :math:`\sum_i f_j(\theta; x_i)`.
    output_index
        The output unit :math:`j`.
    method
        ``"exact"``: forward-over-reverse second derivatives (a backward pass through the
        retained gradient graph). ``"finite_difference"``: the paper's central difference
        :math:`H v \approx (\nabla f_j(\theta + h v) - \nabla f_j(\theta - h v)) / (2h)`.
    eps
        Relative step of the finite difference: :math:`h = \epsilon \max(1, \|\theta\|)/\|v\|`.
        Default :math:`\epsilon_{\text{mach}}^{1/3}` (about 6e-6 in float64), which balances
        the :math:`O(h^2)` truncation against :math:`O(\epsilon_{\text{mach}}/h)` rounding.
    params, **kwargs
        As in :class:`linops.JacobianOperator`.

    Notes
    -----
    The finite-difference variant is not exactly linear in ``v`` (its error depends on ``v``)
    and is only as symmetric as its truncation error allows; use it to reproduce the paper.
    """

    is_symmetric = True

    def __init__(
        self,
        model: torch.nn.Module,
        x: torch.Tensor,
        output_index: int = 0,
        *,
        method: str = "exact",
        eps: float | None = None,
        params: Params | None = None,
        **kwargs: Any,  # the model operators' keywords (dtype, device, ...), forwarded
    ) -> None:
        if method not in ("exact", "finite_difference"):
            raise ValueError(f"method: expected 'exact' or 'finite_difference', got {method!r}")
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x: expected a tensor, got {type(x).__name__}")
        if eps is not None and not (isinstance(eps, int | float) and 0 < eps < 1):
            raise ValueError(f"eps: expected a relative step in (0, 1), got {eps!r}")
        self.method, self.output_index = method, output_index
        kwargs.setdefault("dtype", None)
        kwargs.setdefault("device", None)
        super().__init__(
            model,
            x,
            params,
            shape=self._infer_shape,
            targets=False,
            batch_size=None,
            cache=kwargs.pop("cache", None),
            allow_train_mode=kwargs.pop("allow_train_mode", False),
            allow_reshuffle=False,
            max_vectors=kwargs.pop("max_vectors", None),
            memory_limit_bytes=kwargs.pop("memory_limit_bytes", None),
            **kwargs,
        )
        self._eps = eps
        self.eps = eps if eps is not None else torch.finfo(self.torch_dtype).eps ** (1 / 3)

    def _reset_derived(self) -> None:
        self.eps = (
            self._eps if self._eps is not None else torch.finfo(self.torch_dtype).eps ** (1 / 3)
        )

    def _infer_shape(self, batches: Batches, space: ParamSpace) -> tuple[int, int]:
        x = batches.first()[0]
        d_out = forward_checked(space, x[:1]).reshape(1, -1).shape[1]
        self.output_index = check_output_index(self.output_index, d_out, optional=False)
        return space.dim, space.dim

    def _select(self, out: torch.Tensor, _: object = None) -> torch.Tensor:
        r""":math:`\sum_i f_j(\theta; x_i)` from the model outputs."""
        return out.reshape(out.shape[0], -1)[:, self.output_index].sum()

    def _scalar_output(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        x = self.batches.first()[0]
        return self._select(self.space.functional_call(params, x))

    def _build_graph(self, x: torch.Tensor, y: torch.Tensor | None) -> Any:
        return self._route_graph(
            lambda chain: ChainGradientGraph(chain, self._select, x, None),
            lambda: GradientGraph(self.space, self._select, x, None),
        )

    def gradient(self) -> torch.Tensor:
        r"""Return the flat gradient :math:`\nabla_\theta f_j(\theta; x)` (the laziness denominator)."""
        return self.space.flatten(self._grad_at(self.space.flat_values()))

    def _grad_at(self, theta: torch.Tensor) -> list[torch.Tensor]:
        leaves = [t.detach().requires_grad_(True) for t in self.space.unflatten(theta).values()]
        with torch.enable_grad():
            f = self._scalar_output(dict(zip(self.space.names, leaves, strict=True)))
            grads = torch.autograd.grad(f, leaves, allow_unused=True)
        return [
            g if g is not None else torch.zeros_like(x) for g, x in zip(grads, leaves, strict=True)
        ]

    def _matmat_torch(self, X: torch.Tensor) -> torch.Tensor:
        if self.method == "exact":
            tangents, batched = self._split_params(X)
            for graph in self._graphs():  # one batch; in the loop, as a graph not kept is freed
                out = self._join_params(graph.hvp(tangents, batched), batched)
            return out
        theta = self.space.flat_values()
        scale = max(1.0, float(theta.norm()))
        cols = []
        for v in X.T:
            h = self.eps * scale / max(float(v.norm()), torch.finfo(X.dtype).tiny)
            plus = self.space.flatten(self._grad_at(theta + h * v))
            minus = self.space.flatten(self._grad_at(theta - h * v))
            cols.append((plus - minus) / (2 * h))
        return torch.stack(cols, dim=1)
