"""Shared plumbing of operators defined by a model, its parameters and a dataset.

It is over 500 lines for one concept, the base every model operator shares: data, routes,
the memory budget and the many-vector pass choice all act on the same cached graphs, and
splitting them would pass that state between modules.
"""

from __future__ import annotations

import cmath
import contextlib
import copy
import math
import re
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch

from linops._chain import Chain, ChainMismatch
from linops._checks import check_device, check_dtype, check_finite
from linops._data import Batches, check_model_mode
from linops._defects import REENTRANT_ERROR, REENTRANT_REFUSAL
from linops._double_backward import has_convolution
from linops._types import Data, OutputSelector, Params, ProcessGroup
from linops.base import TorchLinearOperator
from linops.memory import (
    CacheInfo,
    LightDispatchMode,
    MemoryBudget,
    PeakMemory,
    check_memory_budget,
    default_memory_budget,
    prime_host_allocator,
    streamed_pass_allocation,
)
from linops.params import BlockViews, KeywordInputs, ParamSpace

#: Vectors per batched pass (at most; the memory budget may allow fewer, see
#: :meth:`ModelOperator.vectors_per_pass`). With blocks through ``torch.func.vmap`` (truly
#: batched on norms and attention), ``bench/models.py --quick`` gave 32-vector products per
#: vector over one vector of 0.30-0.60 in passes of 32 against 0.45-0.64 in passes of 8 on
#: the residual LayerNorm MLP and the transformer (one run each, same machine, load below 1):
#: a forward-mode block recomputes the forward pass once per pass, so wider passes amortise it.
DEFAULT_MAX_VECTORS = 32

#: how products are computed: hand-derived for chains (MLPs, plain CNNs) when possible, or
#: autograd
ROUTES = ("auto", "chain", "autograd")

#: a slot of a block taken in slots (:meth:`ModelOperator._slot_sums`): its columns, whether its
#: pass is batched, and the parameter-shaped running sums of its columns
ColumnSlot = tuple[slice, bool, list[torch.Tensor]]


class ModelOperator(TorchLinearOperator):
    """Base of the model operators: parameter space, batches, graph cache, memory budget.

    Subclasses call :meth:`_graphs` to get one retained autodiff graph per batch (built at the
    first product and kept while it fits in the memory budget, see below) and use
    :meth:`_split_params` / :meth:`_join_params` to move between flat ``(m, k)`` blocks and
    parameter-shaped tensors.

    One memory budget (``memory_budget``, bytes; default
    :func:`linops.memory.default_memory_budget`: half the memory free on the device when the
    operator is made) bounds what the operator keeps (:mod:`linops.memory`): batches on the
    device and their retained graphs are cached, in batch order, while they take at most half
    of it (measured: the bytes of each batch moved to the device, the tensor storage each
    graph retains), and the rest are streamed from the loader and rebuilt at every product;
    a batched pass takes at most ``(budget - cached) // p`` vectors, where ``p`` is the peak
    of a one-vector pass measured once (:class:`linops.memory.PeakMemory`; not where a block
    is known to go one vector per pass, see :class:`_PerVector`), and at most
    ``max_vectors`` (default :data:`DEFAULT_MAX_VECTORS`). ``op.cache_info()`` says what is
    cached; ``cache=True`` keeps every graph whatever the budget, ``cache=False`` none.
    """

    column_major_blocks = True  # columns are split into parameter-shaped tangents
    #: options that change how products are computed or kept, not their values
    fingerprint_exclude = ("memory_budget", "memory", "label_key")

    def __init__(
        self,
        model: torch.nn.Module,
        data: Data,
        params: Params | None,
        *,
        shape: tuple[int, int] | Callable[[Batches, ParamSpace], tuple[int, int]],
        targets: bool,
        dtype: torch.dtype | None,
        device: torch.device | str | None,
        batch_size: int | None,
        cache: bool | None,
        allow_train_mode: bool,
        allow_reshuffle: bool,
        max_vectors: int | None,
        memory_limit_bytes: int | None,
        process_group: ProcessGroup | None = None,
        route: str = "auto",
        output: OutputSelector | None = None,
        memory_budget: int | None = None,
        label_key: str | None = None,
    ) -> None:
        if cache is not None and not isinstance(cache, bool):
            raise TypeError(f"cache: expected True, False or None, got {cache!r}")
        memory_budget = check_memory_budget(memory_budget)
        prime_host_allocator()
        if memory_limit_bytes is not None:
            check_memory_budget(memory_limit_bytes, "memory_limit_bytes")
            warnings.warn(
                "memory_limit_bytes is deprecated: pass memory_budget= (bytes), the one budget "
                "that bounds the cached batches and graphs and the vectors per pass",
                DeprecationWarning,
                stacklevel=3,
            )
            memory_budget = memory_budget if memory_budget is not None else memory_limit_bytes
        if route not in ROUTES:
            raise ValueError(f"route: expected one of {list(ROUTES)}, got {route!r}")
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        self._allow_train_mode = allow_train_mode
        _check_process_group(process_group)
        self.process_group = process_group
        self._num_samples: int | None = None
        space = ParamSpace(model, params, output=output)
        selected = dict(model.named_parameters())
        check_model_mode(
            model,
            allow_train_mode=allow_train_mode,
            selected=[selected[n] for n in space.names if n in selected],
        )
        complex_params = [n for n, v in space.values().items() if v.is_complex()]
        if complex_params:
            raise ValueError(
                f"params: expected real parameters, got complex ones ({complex_params[:3]}): "
                "a loss of complex parameters is not holomorphic, so its derivatives are "
                "those of the real and imaginary parts; pass them as real tensors (e.g. "
                "torch.view_as_real) and rebuild the complex values inside forward()"
            )
        dtype = check_dtype(dtype) if dtype is not None else space.dtype
        device = check_device(device) if device is not None else space.device
        _check_finite_model(space)
        self._given_space = space  # the user's model and selection, for .to()
        self.space = _converted(space, dtype, device)
        #: the budget in bytes (given, or the default for the device), and its ledger
        budget = memory_budget if memory_budget is not None else default_memory_budget(device)
        self._budget_given = memory_budget is not None
        self.memory = MemoryBudget(budget)
        self.label_key = label_key
        self.batches = Batches(
            data,
            dtype=dtype,
            device=device,
            targets=targets,
            batch_size=batch_size,
            allow_reshuffle=allow_reshuffle,
            budget=self.memory,
            label_key=label_key,
        )
        shape = shape(self.batches, self.space) if callable(shape) else shape
        super().__init__(
            shape, dtype=dtype, device=device, max_vectors=max_vectors, memory_budget=budget
        )
        self.model, self.cache = model, cache
        self._versions = _versions(self.space)
        #: retained graphs of the first batches (all of them unless some did not fit)
        self._graph_cache: list[Any] = []
        self._graphs_full = False  # a graph did not fit: it and every later one are rebuilt
        #: per batch rebuilt at each product, its first forward pass's output (sum, sum |.|)
        self._forward_prints: dict[int, tuple[float, float]] = {}
        self._building_batch = 0  # index of the batch whose graph is being built
        #: measured peak bytes of a one-vector pass, per direction (``None``: not yet)
        self._pass_bytes: dict[bool, int | None] = {False: None, True: None}
        self._route_request = route
        self._chain: Chain | bool | None = False  # False: not looked for yet
        #: the route the products take, ``"chain"`` or ``"autograd"`` (known after the first)
        self.route: str | None = None
        #: whether a pass takes several vectors at once, per direction (``None``: not yet
        #: verified; ``False``: one vector per pass, see :meth:`_apply`)
        self.batched: dict[bool, bool | None] = {False: None, True: None}
        #: why a direction computes one vector per pass (``None``: it does not)
        self.unbatched_reason: dict[bool, str | None] = {False: None, True: None}

    def _route_graph(self, chained: Callable[[Chain], Any], autograd: Callable[[], Any]) -> Any:
        """One batch's graph by the chain route (:mod:`linops._chain`) when it applies.

        ``route="auto"`` takes the chain route when the model is a recognised chain whose
        forward pass reproduces the model's outputs, else autograd; ``"chain"`` requires it and
        ``"autograd"`` never takes it.
        """
        self._find_chain()
        if isinstance(self._chain, Chain):
            try:
                graph = chained(self._chain)
                self.route = self.route or "chain"
                return graph
            except ChainMismatch as err:
                if self._route_request == "chain":
                    raise ValueError(
                        f"route: the chain does not reproduce the model: {err}"
                    ) from None
                self._chain = None
        if not (self.route or "").startswith("autograd"):  # keep what a product appended
            self.route = "autograd"
        return autograd()

    def _find_chain(self) -> None:
        """Look for the model's chain once (:meth:`_route_graph`): a Chain, or None."""
        if self._chain is False:
            keywords = self.batches.keyword_inputs
            found = None if self._route_request == "autograd" or keywords else Chain.of(self.space)
            if keywords and self._route_request == "chain":
                raise ValueError(
                    "route: 'chain' needs tensor inputs; the data are keyword inputs (dict "
                    "batches), which take route='auto' or 'autograd'"
                )
            if found is None and self._route_request == "chain":
                raise ValueError(
                    "route: 'chain' needs a model that is a chain of nn.Linear, nn.Conv2d "
                    "(one group, zero padding), nn.MaxPool2d, nn.AvgPool2d and supported "
                    "elementwise modules (an nn.Sequential, or one declaring "
                    f"linops_chain()), got {type(self.model).__name__}"
                )
            self._chain = found

    def _build_graph(self, x: torch.Tensor, y: torch.Tensor | None) -> Any:
        raise NotImplementedError

    def _graphs(self, inputs: bool = False) -> Any:
        """One graph per batch, in batch order (a generator: graphs not kept are freed).

        The first batches' graphs are kept while the budget allows (``cache=None``), all of
        them (``cache=True``) or none (``cache=False``); the size of each graph is measured
        as it is built (:class:`linops.memory.PeakMemory`: the tensor storage it retains).
        With ``inputs``, each item is a list ``[x, graph]`` of the batch's inputs and its
        graph, emptied when the next batch is drawn.
        """
        cache = self._graph_cache
        with contextlib.ExitStack() as scope:  # the streamed part's allocation, if any
            entered = self.device.type != "cpu"  # host passes only: never entered on a device

            def stream() -> None:
                nonlocal entered
                if not entered:
                    entered = True
                    scope.enter_context(streamed_pass_allocation())

            for i, (x, y) in enumerate(self.batches):
                if i < len(cache):
                    g = cache[i]
                else:
                    if self._streams(i):  # known before the build
                        stream()
                    g = self._built(i, x, y)
                    if i >= len(cache):  # not kept: the first graph the budget refused
                        stream()
                del y
                if inputs:
                    item = [x, g]
                    del x
                    yield item
                    item.clear()
                else:
                    del x
                    yield g
                if not (i < len(cache) and cache[i] is g):
                    if i == 0 and self._first_convolutional is None:
                        self._first_convolutional = _convolutional(g)  # read before it is freed
                    # a graph not kept is freed before the next is built, even though the
                    # caller's loop (and zip's or enumerate's reused result tuple) still
                    # refers to it: a streamed pass holds one graph at a time
                    _release(g)
                del g

    def _streams(self, i: int) -> bool:
        """Whether batch ``i``'s graph, not cached, will not be kept when built."""
        return self.cache is False or self._graphs_full or i != len(self._graph_cache)

    def _built(self, i: int, x: torch.Tensor, y: torch.Tensor | None) -> Any:
        """Build batch ``i``'s graph and keep it if the cache setting and the budget allow."""
        cache = self._graph_cache
        self._building_batch = i  # for subclasses whose graphs depend on the batch index
        if self._streams(i):
            return self._build_recorded(i, x, y)
        if self.cache:
            g = self._build_recorded(i, x, y)
            cache.append(g)
            return g
        with PeakMemory() as measured:
            g = self._build_recorded(i, x, y)
        if self.memory.reserve(measured.current, "graphs"):
            cache.append(g)
        else:
            self._graphs_full = True
        return g

    def _build_recorded(self, i: int, x: torch.Tensor, y: torch.Tensor | None) -> Any:
        """Build batch ``i``'s graph and check its forward pass against its first one.

        A graph that is not kept is rebuilt at every product; if the model's output on the
        batch then differs from the first pass's, the operator would be a different matrix at
        every product (a random forward pass, or a model changed in place): refused. The
        first batch's first pass is also repeated once without a graph, so that a random
        forward pass is refused when its graph is kept too (:meth:`_check_repeatable`).
        """
        self._find_chain()  # before the hook below, which a chain must not have
        self._graphs_built += 1
        g, seen = self._recorded(lambda: self._build_graph(x, y))
        if seen:
            new = i not in self._forward_prints
            first = self._forward_prints.setdefault(i, seen[0])
            total = seen[0][0]
            if new and i == 0 and not self._allow_train_mode:
                self._check_repeatable(x, first)
            elif not self._same_print(seen[0], first):
                raise RuntimeError(
                    f"{type(self).__name__}: the model's output on batch {i} differs from the "
                    f"first pass's (sum {total:.17g} against {first[0]:.17g}) when its graph, "
                    "not kept within the memory budget, is rebuilt for this product: the "
                    "operator would be a different matrix at every product. Make the forward "
                    "pass deterministic (no dropout, noise or sampling in it) and the data "
                    "fixed (a loader that gives the same batches at every pass), keep the graphs "
                    "(cache=True or a larger memory_budget), or, if the model's parameters "
                    "were changed on purpose, call clear_cache() first"
                )
        return g

    def _recorded(self, build: Callable[[], Any]) -> tuple[Any, list[tuple[float, float]]]:
        """Return ``build()`` and the prints (:func:`_output_print`) of the model's outputs in it."""
        seen: list[tuple[float, float]] = []

        def record(_m: Any, _a: Any, out: Any) -> None:
            with contextlib.suppress(RuntimeError):  # an output of a transform (vmap, jvp)
                seen.append(_output_print(out))

        hook = self.space.model.register_forward_hook(record)
        try:
            return build(), seen
        finally:
            hook.remove()

    def _check_repeatable(self, x: Any, first: tuple[float, float]) -> None:
        """Refuse a forward pass that gives another output on the same batch (one more pass).

        Functional dropout (``F.dropout(h, training=self.training)``), noise or sampling in
        ``forward()`` escape the check of dropout modules in training mode: a kept graph made
        the operator the matrix of one random draw, without a word.
        """
        with torch.no_grad():
            _, seen = self._recorded(lambda: self.space.functional_call(self.space.values(), x))
        if not seen or self._same_print(seen[0], first):
            return
        raise RuntimeError(
            f"{type(self).__name__}: two forward passes of the model on the first batch give "
            f"different outputs (sum {seen[0][0]:.17g} against {first[0]:.17g}): the operator "
            "would be the matrix of one random draw. Make the forward pass deterministic "
            "(model.eval(); no functional dropout, noise or sampling in forward()), or pass "
            "allow_train_mode=True to accept one draw"
        )

    def _same_print(self, a: tuple[float, float], b: tuple[float, float]) -> bool:
        """Whether two forward passes' prints agree to 1000 eps of their magnitudes.

        Equal sums agree, infinite or NaN ones included (an output the loss does not use,
        such as attention scores masked with -inf, makes the sum -inf at every pass).
        """
        if a[0] == b[0] or (math.isnan(a[0]) and math.isnan(b[0])):
            return True
        return abs(a[0] - b[0]) <= 1000 * torch.finfo(self.torch_dtype).eps * max(a[1], b[1])

    @property
    def num_samples(self) -> int:
        """Samples in the dataset; with a ``process_group``, over all its ranks (a collective)."""
        if self._num_samples is None:
            if self.process_group is None:
                self._num_samples = self.batches.num_samples
            else:
                from linops.distributed import global_num_samples

                self._num_samples = global_num_samples(self)
        return self._num_samples

    def _apply(self, X: torch.Tensor, adjoint: bool = False) -> torch.Tensor:
        if _versions(self.space) != self._versions:
            raise RuntimeError(
                f"{type(self).__name__}: the model's parameters were changed in place since "
                "the operator was made (an optimizer step, a .mul_() or load_state_dict), and "
                "its cached graphs hold the old values while the live model has the new ones: "
                "its products would be a mixture of the two. Call clear_cache() to use the "
                "new values, or make a new operator"
            )
        try:
            out = self._apply_model(X, adjoint)
            self._versions = _versions(self.space)  # what its own passes did is its own
            return out
        except RuntimeError as err:  # NotImplementedError included
            if REENTRANT_ERROR in str(err):
                raise NotImplementedError(f"{type(self).__name__}: {REENTRANT_REFUSAL}") from err
            missing = _missing_derivative(err)
            if missing is None:
                name = type(self).__name__
                if isinstance(err, NotImplementedError) and not str(err).startswith(name):
                    raise NotImplementedError(f"{name}: {err}") from err
                raise
            kind = "forward-mode derivative" if "forward AD" in str(err) else "derivative"
            raise NotImplementedError(
                f"{type(self).__name__}: torch {torch.__version__} has no {kind} for "
                f"{missing}, which the model or the loss runs and this "
                f"{'adjoint ' if adjoint else ''}product differentiates through (Hessian, "
                "GGN, Fisher and J v products need the second derivative of every operation "
                "on the path, J^T v only the first). Compute that step from differentiable "
                "primitives, as the operators do for weight norm, cdist, pdist and "
                "embedding_bag (linops.KNOWN_DEFECTS), or differentiate with respect to "
                "parameters it does not depend on (params=)"
            ) from err

    def _apply_model(self, X: torch.Tensor, adjoint: bool) -> torch.Tensor:
        if X.shape[1] == 0:  # no vector: no pass through the model
            rows = self.shape[1] if adjoint else self.shape[0]
            return X.new_zeros((rows, 0), dtype=torch.promote_types(self.torch_dtype, X.dtype))
        if self.process_group is not None:
            from linops.distributed import data_parallel_apply

            return data_parallel_apply(self, X, adjoint)
        apply = super()._apply
        loop = self._first_loop(X, adjoint)
        # block sizes from a measured pass (once; not for a loop, whose passes take one vector
        # whatever the budget); its product is the first column's
        single = self._measure_pass(X, adjoint) if X.shape[1] > 1 and loop is None else None
        if X.shape[1] > 1 and self.batched[adjoint] is None:  # decided once per direction
            if self._has_forward_mode(adjoint):
                out = self._forward_mode_first(X, adjoint, single)
            else:
                out = self._first_batched(X, adjoint, single, loop)
        elif self.batched[adjoint] is False and X.shape[1] > 1:
            out = self._one_vector_per_pass(X, adjoint)
        else:  # a strided column (of a row-major block) would make the product about 2x slower
            out = apply(X if X.shape[1] > 1 or X.stride(0) == 1 else X.contiguous(), adjoint)
        if self.check_finite and out.numel() and not cmath.isfinite(out.sum().item()):
            if not bool(torch.isfinite(out).all()):
                raise FloatingPointError(
                    f"{type(self).__name__}: the product contains NaN or inf although its input "
                    "was finite (an overflow in the model or the loss at these parameters; "
                    "float64 may help: op.to(torch.float64))"
                )
        return out

    #: batch graphs built so far (``cache_info().graphs_built``)
    _graphs_built = 0

    #: the directions (``adjoint``) in which the subclass's hooks can take a block in slots of
    #: ``_slot_width`` columns inside their loop over the batches (:meth:`_in_slots`)
    _slotted_directions: tuple[bool, ...] = ()
    #: set during a product taken in slots: the columns each pass through a batch's graph takes
    _slot_width: int | None = None

    def _hooks(self, X: torch.Tensor, adjoint: bool) -> torch.Tensor:
        if X.shape[1] > 1 and adjoint in self._slotted_directions:  # not on a single's path
            width = self.vectors_per_pass()
            if width is not None and width < X.shape[1] and self._slots_pay(X, adjoint, width):
                return self._in_slots(X, adjoint, width)
        return super()._hooks(X, adjoint)

    def _slots_pay(self, X: torch.Tensor, adjoint: bool, width: int) -> bool:
        """Whether a block split into passes is better taken in slots (:meth:`_in_slots`).

        Only where a first pass has shown that graphs are rebuilt: where every batch's graph
        is kept, a loop over the chunks costs nothing more, and the first products, which
        decide the routes, go as before. Not while probing the batched pass (one column, which
        a complex vector makes two), nor where a slot of one vector would be taken before the
        way of single products is decided (:meth:`_single_way_undecided`). A block that the
        chunk loop would gather chunk by chunk (over an eighth of the budget, row-major, see
        :meth:`TorchLinearOperator._hooks`) is not copied whole for the slots either.
        """
        if self._probing or not self._known_to_rebuild_graphs():
            return False
        single = width == 1 or X.shape[1] % width == 1  # a slot of one vector
        if single and self._single_way_undecided(adjoint):
            return False
        budget = self.memory_budget
        fits = budget is None or X.numel() * X.element_size() <= budget // 8
        return fits or X.stride(0) == 1 or not self._column_major()

    def _in_slots(self, X: torch.Tensor, adjoint: bool, width: int) -> torch.Tensor:
        """Return a block's product with ``width`` columns per pass, in one pass over the data.

        The hooks take the whole block; inside their loop over the batches each slot of
        ``width`` columns goes through the batch's graph and adds into its columns of the
        output, so each batch (drawn from the loader, its graph built) is visited once per
        block, not once per chunk of columns. Each slot computes what the same chunk as a
        product of its own computes, summed over the batches in the same order: the result is
        the chunk loop's, bit for bit, at the memory of one pass of ``width`` vectors.
        """
        with self._slots_of(width):
            return super()._hooks(X, adjoint)  # vectors_per_pass() is None meanwhile: whole

    @contextlib.contextmanager
    def _slots_of(self, width: int) -> Iterator[None]:
        """Within: the hooks take their block in slots of ``width`` columns (``_slot_width``)."""
        self._slot_width = width
        try:
            yield
        finally:
            self._slot_width = None

    def _column_major(self) -> bool:
        # the chain's own block products read a row-major block where it lies (the layers
        # that need each vector's tangents contiguous copy their own, :class:`Tangent`): no
        # transposed copy of the whole block (110 ms for 32 columns of 1.1M rows here)
        if self.route is not None and self.route.startswith("chain") and not self._forward_mode:
            return False
        return super()._column_major()

    def _zero_sums(self, like: torch.Tensor, k: int, batched: bool) -> list[torch.Tensor]:
        """Return parameter-shaped views of a new column-major ``(m, k)`` block of zeros.

        A running sum over batches, made before any batch's graph; batched, a
        :class:`~linops.params.BlockViews`, whose join is the block itself.
        """
        block = like.new_zeros(k, self.space.dim).T
        return BlockViews(self.space, block) if batched else self._split_params(block)[0]

    def _slot_columns(self, k: int) -> list[tuple[slice, bool]]:
        """Return the slots of a ``k``-column block (:meth:`_in_slots`): columns, batched."""
        assert self._slot_width is not None
        cols = [slice(a, min(a + self._slot_width, k)) for a in range(0, k, self._slot_width)]
        return [(c, c.stop - c.start > 1) for c in cols]

    def _slot_sums(self, like: torch.Tensor, k: int) -> tuple[torch.Tensor, list[ColumnSlot]]:
        """Return a new column-major ``(m, k)`` block of zeros and its slots (:meth:`_in_slots`).

        Each slot: its columns, whether its pass is batched (more than one column), and the
        parameter-shaped views of its columns of the block, its running sums.
        """
        out = like.new_zeros(k, self.space.dim).T
        slots = []
        for cols, batched in self._slot_columns(k):
            part = out[:, cols]
            sums = BlockViews(self.space, part) if batched else self._split_params(part)[0]
            slots.append((cols, batched, sums))
        return out, slots

    def _single_way_undecided(self, adjoint: bool) -> bool:
        """Whether single products of this direction have a way still to be decided at the first.

        (Forward AD or the retained graph, in subclasses that choose.) A slot of one vector
        must take the way the single product takes, so it waits for that decision.
        """
        return False

    def _known_to_rebuild_graphs(self) -> bool:
        """Whether a first pass has shown that products rebuild some batch's graph."""
        return self.batches._num_batches is not None and self._rebuilds_graphs()

    def _visits_data_once_per_block(self) -> bool:
        # also only once the block pass is decided: a wider group would otherwise be the first
        # many-vector product, which probes the batched pass (a repeated 2-probe estimate at
        # max_vectors=1 built 12 graphs instead of 8)
        return (
            self._known_to_rebuild_graphs()
            and False in self._slotted_directions
            and self.process_group is None
            and self.batched[False] is not None
        )

    def _rebuilds_graphs(self) -> bool:
        """Whether a product builds some batch's graph again (not all of them are kept)."""
        count = self.batches._num_batches
        return count is None or len(self._graph_cache) < count

    #: whether many-vector products take the subclass's forward-mode formulation (set by
    #: :meth:`_forward_mode_first`; subclasses that have one read it in their hooks)
    _forward_mode = False

    def _has_forward_mode(self, adjoint: bool) -> bool:
        """Whether a many-vector product of this direction has a forward-mode formulation."""
        return False

    def _forward_mode_first(
        self, X: torch.Tensor, adjoint: bool, single: torch.Tensor | None = None
    ) -> torch.Tensor:
        """First many-vector product, by the subclass's forward-mode formulation if it holds.

        On the autograd route the product is first computed with ``_forward_mode`` set. It is
        kept if it ran without any kernel vmap loops over and its first column matches a
        single-vector product of the retained graph (``op.route`` then ends in
        ``", forward mode for many vectors"``); otherwise :meth:`_first_batched` decides.
        """
        if self.process_group is not None:
            return self._first_batched(X, adjoint, single)
        if self.route is None:
            for _ in self._graphs():  # learn the route (and keep the graphs when caching)
                pass
        if not (self.route or "").startswith("autograd"):
            return self._first_batched(X, adjoint, single)
        apply = super()._apply
        self._forward_mode = True
        try:  # a batch of one vector first: a formulation vmap loops over is never run wide
            out, failure, loops = self._probe_batched(X, adjoint)
            if failure is None and not loops:
                out, failure, loops = attempt_batched(apply, X, adjoint)
        finally:
            self._forward_mode = False
        if out is not None and failure is None and not loops:
            if single is None:
                single = apply(X[:, :1], adjoint)
            diff = float((out[:, :1] - single).abs().max())
            if diff <= self._agreement_tol(single):
                self._forward_mode = True
                self.batched[adjoint] = True
                if "forward mode" not in (self.route or ""):
                    self.route = f"{self.route}, forward mode for many vectors"
                return out
        return self._first_batched(X, adjoint, single)

    #: while true, a one-column block goes through the batched code path (:meth:`_probe_batched`)
    _probing = False

    def _probe_batched(
        self, X: torch.Tensor, adjoint: bool, kernels: set[str] | None = None
    ) -> tuple[torch.Tensor | None, BaseException | None, list[str]]:
        """Run the batched pass on the first column alone, as a batch of one vector.

        vmap's fallback for a kernel without a batching rule fires whatever the batch size, so
        this finds the kernels a wide pass would loop over at the memory and time of one
        product. Returns what :func:`attempt_batched` returns (``kernels`` as there).
        """
        self._probing = True
        try:
            return attempt_batched(super()._apply, X[:, :1], adjoint, kernels)
        finally:
            self._probing = False

    def _first_batched(
        self,
        X: torch.Tensor,
        adjoint: bool,
        single: torch.Tensor | None = None,
        loop: _PerVector | None = None,
    ) -> torch.Tensor:
        """Return the first many-vector product of a direction, verified against a single-vector one.

        A block goes through ``torch.func.vmap`` over a backward pass of the retained graph
        (:func:`linops._autodiff._grad`). Its batching rules can be missing (vmap then loops
        over the vectors inside the pass), slow, or wrong. On the autograd route a batched
        pass over a batch of *one* vector (:meth:`_probe_batched`) first finds the kernels
        the pass runs (unless the cached graph already shows a convolution backward,
        :meth:`_first_graph_convolutional`), and the first column of the first batched
        product is checked against a single-vector product:

        * if vmap would loop over some kernel (torch 2.13: ``mish_backward``, the oneDNN
          LSTM's backward in float32), or if the pass runs a kernel of
          :data:`FOLDING_KERNELS` (convolutions, whose rules fold the K vectors into the
          convolution's batch or groups: a CIFAR ResNet-20's 8-vector Hessian block cost
          0.99x the time of 8 single products at 8.8x one product's peak memory,
          ``bench/batching.py --resnet20``), the operator computes one vector per pass, with
          no warning, and the wide pass is never run, not even once;
        * if the batched pass raised or disagrees, it computes one vector per pass from then
          on and warns once.

        The choice depends only on the model's kernels, never on a timing, so the same
        operator always takes the same route.

        ``op.batched`` says what was chosen per direction, ``op.route`` ends in
        ``", one vector per pass"`` and ``op.unbatched_reason`` says why.
        """
        apply = super()._apply
        failure: BaseException | str | None
        loops: list[str] = []
        out, failure = None, None
        kernels: set[str] = set()
        if self.route != "chain" and self._first_graph_convolutional():
            kernels.add("aten.convolution_backward")  # known from the graph: no probe needed
        elif self.route != "chain":  # a batch of one vector: which kernels vmap would loop over
            out, failure, loops = self._probe_batched(X, adjoint, kernels)
            out = None  # one column; the block is computed below unless vmap would loop
        folding = sorted(kernels.intersection(FOLDING_KERNELS))
        if self.route == "chain":  # learned by the probe: the chain's own block products
            loops, folding = [], []
        if failure is None and not loops and not folding:
            out, failure, loops = attempt_batched(apply, X, adjoint)
        if self.route == "chain" and failure is None:
            self.batched[adjoint] = True
            return out  # type: ignore[return-value]
        if single is None and loop is not None:  # column 0's product kept in the loop's block
            single = loop.put_first(apply(_column(X, 0), adjoint))
        elif single is None:  # the product of the first column, unless the caller has it
            single = apply(_column(X, 0), adjoint)  # raises if products fail altogether
        reason = None
        if out is not None:
            diff = float((out[:, :1] - single).abs().max())
            if diff > self._agreement_tol(single):
                failure = f"its first column differs from a single-vector product by {diff:.3g}"
            elif not loops:
                self.batched[adjoint] = True
                return out
        if failure is None and loops:
            reason = f"vmap has no batching rule for {', '.join(loops)}"
        elif failure is None and folding:
            reason = (
                f"vmap's batching rule for {', '.join(folding)} folds the vectors into the "
                "kernel: no faster than one pass per vector, at K times the memory"
            )
        if failure is not None:
            reason = f"the batched pass failed: {str(failure).splitlines()[0][:200]}"
            warnings.warn(
                f"{type(self).__name__}: torch's batched {'adjoint ' if adjoint else ''}product "
                f"failed on this model ({str(failure).splitlines()[0][:200]}); computing one "
                "vector per pass instead (exact, slower)",
                RuntimeWarning,
                stacklevel=4,
            )
        self.batched[adjoint] = False
        self.unbatched_reason[adjoint] = reason
        self.route = f"{self.route}, one vector per pass"
        return self._one_vector_per_pass(X, adjoint, single, loop)

    def _one_vector_per_pass(
        self,
        X: torch.Tensor,
        adjoint: bool,
        first: torch.Tensor | None = None,
        loop: _PerVector | None = None,
    ) -> torch.Tensor:
        """Return a block's product one vector per pass (``first``: column 0's, if known).

        Where graphs are rebuilt (streamed) and the subclass can in this direction
        (``_slotted_directions``), the block is taken in slots of one column
        (:meth:`_in_slots`): the graphs are built once per block, not once per column.
        """
        apply = super()._apply
        if not self._in_slots_per_vector(adjoint):
            if loop is None:
                loop = self._per_vector(X, adjoint)
            if first is not None and loop.done == 0:
                loop.put_first(first)
            return loop.run(apply, adjoint)
        rest = X if first is None else X[:, 1:]
        if rest.stride(0) != 1:  # one strided column left: contiguous, as a single product's
            rest = rest.T.contiguous().T
        with self._slots_of(1):
            out = apply(rest, adjoint)
        return out if first is None else torch.cat([first, out], dim=1)

    def _in_slots_per_vector(self, adjoint: bool) -> bool:
        """Whether a block taken one vector per pass goes through slots (streamed graphs)."""
        return adjoint in self._slotted_directions and self._rebuilds_graphs()

    def _per_vector(self, X: torch.Tensor, adjoint: bool) -> _PerVector:
        """Return a loop of one vector per pass over ``X``, its buffers allocated now."""
        rows = self.shape[1] if adjoint else self.shape[0]
        return _PerVector(X, rows, torch.promote_types(self.torch_dtype, X.dtype))

    def _first_loop(self, X: torch.Tensor, adjoint: bool) -> _PerVector | None:
        """Return the loop of a first block known to go one vector per pass, else None.

        Known before any pass where the cached graph runs a convolution and the direction has
        no forward-mode formulation to try first (:meth:`_first_batched`). The loop's buffers
        are then allocated before the measured pass, not amid its freed temporaries
        (:class:`_PerVector`).
        """
        if (
            X.shape[1] < 2
            or self.batched[adjoint] is not None
            or self.route in (None, "chain")
            or self._has_forward_mode(adjoint)
            or self._in_slots_per_vector(adjoint)
            or not self._first_graph_convolutional()
        ):
            return None
        return self._per_vector(X, adjoint)

    def _first_graph_convolutional(self) -> bool:
        """Whether the first batch's cached graph runs a convolution backward (False if unknown).

        Read from the graph's nodes, it spares a ResNet's first block the probe pass (one
        product's time, and a batched pass's memory; streamed, one more pass over the loader)
        that would find the same.
        """
        if not self._graph_cache:  # streamed: as read from the first graph built, if any
            return bool(self._first_convolutional)
        return _convolutional(self._graph_cache[0])

    #: whether the first batch's graph ran a convolution, read when a graph not kept is freed
    _first_convolutional: bool | None = None

    def _try_forward_ad(
        self, ref: torch.Tensor, forward: Callable[[], torch.Tensor]
    ) -> torch.Tensor | None:
        """Return ``forward()`` if single products should take forward AD, else ``None``.

        Only on the autograd route of a non-distributed model with convolutions, whose
        retained graph's double backward costs more than a forward-mode pass; ``forward()``
        is kept only if it runs and matches the retained graph's product ``ref`` to rounding,
        and ``op.route`` then ends in ``", forward AD for single vectors"``.
        """
        if (
            self.process_group is not None
            or not (self.route or "").startswith("autograd")
            or not has_convolution(self.space.model)
        ):
            return None
        try:
            out = forward()
        except (RuntimeError, NotImplementedError):  # e.g. a Function without a forward rule
            return None
        if not float((out - ref).abs().max()) <= self._agreement_tol(ref):
            return None
        self.route = f"{self.route}, forward AD for single vectors"
        return out

    def _agreement_tol(self, single: torch.Tensor) -> float:
        """How far a batched pass's first column may be from the single product ``single``.

        ``sqrt(eps) * max|single|`` in the precision the operator computes in (``single`` may
        be promoted to a wider dtype than that).
        """
        eps = max(torch.finfo(self.torch_dtype).eps, torch.finfo(single.dtype).eps)
        return math.sqrt(eps) * float(single.abs().max())

    def _to(self, dtype: torch.dtype, device: torch.device) -> ModelOperator:
        """Return the same operator computing in ``dtype`` on ``device``.

        The model is a converted copy when its parameters or buffers differ; data are cast and
        moved once; no graph is shared.

        Raises
        ------
        TypeError
            For a complex dtype: a model computes in a real one (a real operator applies to
            complex vectors as it is, by their real and imaginary parts).
        """
        if dtype.is_complex:
            raise TypeError(
                f"dtype: expected a real floating dtype for a model operator, got {dtype} (its "
                "products with complex vectors need no conversion: real and imaginary parts "
                "are applied separately)"
            )
        new = copy.copy(self)
        budget = self.memory.total
        if not self._budget_given and device != self.device:
            budget = default_memory_budget(device)
        TorchLinearOperator.__init__(
            new,
            self.shape,
            dtype=dtype,
            device=device,
            max_vectors=self.max_vectors,
            memory_budget=budget,
        )
        new.space = _converted(self._given_space, dtype, device)
        new.memory = MemoryBudget(budget)
        new.batches = self.batches.like(dtype, device, new.memory)
        new._graph_cache, new._graphs_full, new._forward_prints = [], False, {}
        new._graphs_built = 0
        new._first_convolutional = None
        new._pass_bytes = {False: None, True: None}
        new._chain, new.route = False, None
        new.batched = {False: None, True: None}
        new.unbatched_reason = {False: None, True: None}
        new._forward_mode = False  # chosen afresh by the new operator's first batched product
        new._versions = _versions(new.space)
        new._reset_derived()
        return new

    def _reset_derived(self) -> None:
        """Forget what a subclass derived from the dtype or the data (see :meth:`_to`)."""

    def clear_cache(self) -> None:
        """Free the retained graphs (they are rebuilt, and kept within the budget, at the next product)."""
        self._graph_cache = []
        self._graphs_full = False
        self._forward_prints = {}
        self._first_convolutional = None
        self.memory.release("graphs")
        self._versions = _versions(self.space)
        self.batches.rebase()  # data changed on purpose are the data from now on

    def cache_info(self) -> CacheInfo:
        """Return what the operator keeps against its memory budget (see :class:`ModelOperator`)."""
        measured = [b for b in self._pass_bytes.values() if b is not None]
        return CacheInfo(
            bytes_budget=self.memory.total,
            num_batches=self.batches._num_batches,
            batches_cached=self.batches.num_cached,
            graphs_cached=len(self._graph_cache),
            bytes_batches=self.memory.kept["batches"],
            bytes_graphs=self.memory.kept["graphs"],
            bytes_per_pass=max(measured) if measured else None,
            vectors_per_pass=self.vectors_per_pass(),
            graphs_built=self._graphs_built,
        )

    def vectors_per_pass(self) -> int | None:
        """Return the vectors per batched pass: ``max_vectors``, bounded by the memory budget.

        Without ``max_vectors``: :data:`DEFAULT_MAX_VECTORS`, and once the peak ``p`` of a
        one-vector pass has been measured (at the first many-vector product) at most
        ``(budget - cached bytes) // p``, at least 1. A direction known to go one vector per
        pass without a measured pass (:class:`_PerVector`) holds a block's columns, not
        wider passes: there ``p`` is :meth:`bytes_per_vector`'s estimate of a vector's own
        size.
        """
        if self._slot_width is not None:  # slots inside the hooks: the block is not split
            return None
        cap = self.max_vectors if self.max_vectors is not None else DEFAULT_MAX_VECTORS
        measured = [b for b in self._pass_bytes.values() if b is not None]
        if self.max_vectors is not None or not (measured or False in self.batched.values()):
            return cap
        per = max(measured) if measured else self.bytes_per_vector()
        return max(1, min(cap, self.memory.free_for_passes() // max(1, per)))

    def _measure_pass(self, X: torch.Tensor, adjoint: bool) -> torch.Tensor | None:
        """Measure the peak memory of a one-vector product of this direction (once).

        Returns that product (of ``X``'s first column), which the first many-vector product
        reuses as its single-vector check, or ``None`` when nothing was measured.
        """
        if (
            self.max_vectors is not None
            or self._pass_bytes[adjoint] is not None
            or self.batched[adjoint] is False  # a loop: each pass takes one vector anyway
        ):
            return None
        x = X[:, :1].contiguous()  # a column of a column-major block, as the passes get
        with PeakMemory() as measured:
            single = super()._apply(x, adjoint)
        self._pass_bytes[adjoint] = max(1, measured.peak)
        return single

    def _split_params(self, X: torch.Tensor) -> tuple[list[torch.Tensor], bool]:
        """``(m, k)`` block -> parameter-shaped tensors, batched when ``k > 1`` (or probing)."""
        if X.shape[1] == 1 and not self._probing:
            return list(self.space.unflatten(X[:, 0]).values()), False
        return list(self.space.unflatten(X).values()), True

    def _join_params(self, tensors: list[torch.Tensor], batched: bool) -> torch.Tensor:
        """Parameter-shaped tensors -> ``(m, k)`` block."""
        flat = self.space.flatten(tensors)
        return flat if batched else flat[:, None]

    def bytes_per_vector(self) -> int:
        """Return the measured peak of a one-vector pass, or an estimate before it is measured."""
        measured = [b for b in self._pass_bytes.values() if b is not None]
        if measured:
            return max(measured)
        itemsize = torch.empty((), dtype=self.torch_dtype).element_size()
        return 4 * (self.shape[0] + self.shape[1]) * itemsize


_MISSING_DERIVATIVE = (
    re.compile(r"the derivative for '([\w.:]+)' is not implemented"),
    re.compile(r"derivative for (?:aten::)?([\w.:]+) is not implemented"),
    re.compile(r"Trying to use forward AD with ([\w.:]+) that does not support it"),
    re.compile(r"differentiate twice (a function that was marked with @once_differentiable)"),
)


def _missing_derivative(err: BaseException) -> str | None:
    """Return the kernel named by torch's error for a missing derivative, or None."""
    for pattern in _MISSING_DERIVATIVE:
        found = pattern.search(str(err))
        if found:
            return found.group(1)
    return None


def _versions(space: ParamSpace) -> tuple[int, ...]:
    """Return the version counters of the parameter values the products compute with.

    The space's values (the live parameters, through detached views that share their
    counters, or values given with ``params=`` or converted by ``.to()``, which the live
    model's training does not touch) and the parameters outside them, read from the model
    the products run. Buffers are left out: a forward pass may update its own (a step
    counter) without changing the function. A change through ``.data`` is not counted: it
    bypasses the counter by design.
    """
    chosen = space.values()
    others = [p for n, p in space.model.named_parameters() if n not in chosen]
    return tuple(t._version for t in [*chosen.values(), *others])


def _release(graph: Any) -> None:
    """Drop the tensors of a graph that is not kept (its objects' attributes), so it is freed."""
    for part in graph if isinstance(graph, tuple | list) else (graph,):
        # a batch's inputs (dict batches: KeywordInputs) belong to the batches, which may be
        # kept: clearing them broke the next pass (the GGN's graph holds its inputs)
        if hasattr(part, "__dict__") and not isinstance(part, torch.Tensor | KeywordInputs):
            part.__dict__.clear()


def _convolutional(graph: Any) -> bool:
    """Whether a batch's graph (the first of a tuple, a Fisher block's outputs) runs one."""
    part = graph[0] if isinstance(graph, tuple) else graph
    return bool(getattr(getattr(part, "outputs", part), "convolutional", False))


def _column(X: torch.Tensor, i: int) -> torch.Tensor:
    """Return column ``i`` of a block as a contiguous ``(m, 1)`` block (copied if strided).

    A column of a row-major block is strided, and a single product on it cost about twice
    one on a contiguous column (residual LayerNorm MLP of ``bench/models.py``, ``H v``:
    10.1 against 5.1 ms CPU time on one thread). A loop copies each column when its pass
    comes, not the whole block up front, which it would hold through every pass.
    """
    x = X[:, i : i + 1]
    return x if x.is_contiguous() else x.contiguous()


class _PerVector:
    """A block's product taken one vector per pass, written into the block as it comes.

    Built to leave a heap as one product leaves it. The product is allocated before the
    first pass, each column is copied (if strided) when its pass comes, and each pass's
    product is copied into the block and dropped before the next pass: a tensor allocated
    after a pass (or returned at its end) and kept through the next ones lands amid the
    pass's freed temporaries in glibc's heap and pins them, and the next passes' temporaries
    then spread over other pages. A first block known to be a loop (a convolutional graph,
    :meth:`ModelOperator._first_loop`) also skips the pass measured under
    :class:`linops.memory.PeakMemory`, whose dispatch mode raised that pass's resident peak
    3-31% above a plain pass's in six fixed heap layouts, and which sizes no pass here: each
    takes one vector whatever the budget (``cache_info().bytes_per_pass`` stays None, and
    :meth:`ModelOperator.vectors_per_pass` bounds blocks by a vector's own size). CIFAR
    ResNet-20, 128 images, float32, 2 threads, the first 8-vector Hessian block's peak
    resident memory above the start, 20 fresh processes each, alternating: 222-300 MiB
    (median 247.5) with the block's columns, its product and the first column's product
    allocated after the measured pass, 198-287 MiB (median 233.5) here; one product alone
    peaks at 154-246 MiB (nine processes, median 182): each process draws a heap layout
    (address-space randomization), which moves such a peak by a fifth either way. Not a
    ``torch.cat`` of the columns' products either, which would hold the block twice.
    """

    def __init__(self, X: torch.Tensor, rows: int, dtype: torch.dtype) -> None:
        self.X = X
        #: the product, in the dtype :meth:`TorchLinearOperator._apply` returns
        self.out = X.new_empty((rows, X.shape[1]), dtype=dtype)
        #: columns computed so far
        self.done = 0

    def put_first(self, y: torch.Tensor) -> torch.Tensor:
        """Copy column 0's product into the block; return the block's column (a view)."""
        self.out[:, :1] = y
        self.done = max(self.done, 1)
        return self.out[:, :1]

    def run(
        self, apply: Callable[[torch.Tensor, bool], torch.Tensor], adjoint: bool
    ) -> torch.Tensor:
        """Compute the columns not done yet, one pass each; return the block."""
        for i in range(self.done, self.X.shape[1]):
            self.out[:, i : i + 1] = apply(_column(self.X, i), adjoint)
            self.done = i + 1
        return self.out


_VMAP_LOOP = "we have not yet implemented the batching rule for "


#: kernels whose batching rule folds the vectors into the kernel's own batch or groups: on the
#: CPU a pass of K vectors through them costs about K single passes at K times the memory
#: (``bench/batching.py --resnet20``), so a block pass through them is a loop (see
#: :meth:`ModelOperator._first_batched`)
FOLDING_KERNELS = ("aten.convolution_backward", "aten.convolution")


class _KernelLog(LightDispatchMode):
    """Records the kernels a pass runs, as ``aten.<name>`` (after vmap's batching rules)."""

    def __init__(self) -> None:
        super().__init__()
        self.kernels: set[str] = set()

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:  # whatever the kernel returns
        self.kernels.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def _output_print(out: Any) -> tuple[float, float]:
    """Return the sum and the sum of magnitudes of a forward pass's floating outputs, in double.

    Over the finite entries: an output holding -inf (attention scores masked for a mask the
    loss never sees) made every sum -inf, blind to a random forward pass.
    """
    total = scale = 0.0
    for t in torch.utils._pytree.tree_leaves(out):
        if isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex()):
            t = t.detach()
            wide = torch.complex128 if t.is_complex() else torch.float64
            part = t.sum(dtype=wide)
            if not bool(torch.isfinite(part)):  # a copy of the finite entries only then
                t = t[torch.isfinite(t)]
                part = t.sum(dtype=wide)
            total += float(part.real)
            scale += float(t.abs().sum(dtype=torch.float64))
    return total, scale


def attempt_batched(
    apply: Callable[[torch.Tensor, bool], torch.Tensor],
    X: torch.Tensor,
    adjoint: bool,
    kernels: set[str] | None = None,
) -> tuple[torch.Tensor | None, BaseException | None, list[str]]:
    """Return a batched product, its failure if any, and the kernels vmap looped over inside it.

    ``kernels``: if given, the kernels the pass ran are added to it.
    """
    torch._C._functorch._set_vmap_fallback_warning_enabled(True)  # type: ignore[attr-defined]
    log = _KernelLog() if kernels is not None else contextlib.nullcontext()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                with log:
                    out, failure = apply(X, adjoint), None
            except (RuntimeError, NotImplementedError) as err:  # e.g. no forward AD for a kernel
                out, failure = None, err
    finally:
        torch._C._functorch._set_vmap_fallback_warning_enabled(False)  # type: ignore[attr-defined]
    if isinstance(log, _KernelLog) and kernels is not None:
        kernels |= log.kernels
    loops = set()
    for w in caught:
        text = str(w.message)
        if _VMAP_LOOP in text:
            loops.add(text.split(_VMAP_LOOP)[1].split(".")[0].split(" ")[0])
        else:  # not ours to swallow
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return out, failure, sorted(loops)


def forward_checked(space: ParamSpace, x: torch.Tensor) -> torch.Tensor:
    """Return the model's outputs on ``x`` (no graph), with a clear error if the forward pass fails.

    Used on the first batch an operator sees, so a wrong feature dimension or input dtype is
    named as such rather than surfacing as a raw torch error inside a product.
    """
    try:
        with torch.no_grad():
            return space.functional_call(space.values(), x)
    except TypeError as err:  # an unexpected keyword: name the keys given
        if not isinstance(x, KeywordInputs) or "argument" not in str(err):
            raise
        raise ValueError(
            f"inputs: the model's forward pass does not take the keyword inputs {x!r}: "
            f"{str(err).splitlines()[0][:300]}"
        ) from None
    except NotImplementedError:  # a refusal (linops._defects) names what it refuses
        raise
    except (RuntimeError, ValueError, IndexError) as err:
        if isinstance(x, KeywordInputs):
            raise ValueError(
                f"inputs: the model's forward pass raised on the keyword inputs {x!r}: "
                f"{str(err).splitlines()[0][:300]}"
            ) from None
        # the first module with parameters of its own, if the inputs go to it
        first = next(
            (
                m
                for m in space.model.modules()
                if next(m.parameters(recurse=False), None) is not None
            ),
            None,
        )
        hint = ""
        if isinstance(first, torch.nn.Linear) and x.dim() >= 2 and x.shape[-1] != first.in_features:
            hint = f"expected {first.in_features} features per sample, got {x.shape[-1]}; "
        elif (
            isinstance(first, torch.nn.Conv2d) and x.dim() == 4 and x.shape[1] != first.in_channels
        ):
            hint = f"expected {first.in_channels} channels per sample, got {x.shape[1]}; "
        raise ValueError(
            f"inputs: {hint}the model's forward pass raised on inputs of shape "
            f"{tuple(x.shape)} and dtype {x.dtype}: {str(err).splitlines()[0][:300]}"
        ) from None


def _check_finite_model(space: ParamSpace) -> None:
    """Refuse NaN or inf in the differentiated parameters and in the model's buffers."""
    named = [(f"params[{n!r}]", v) for n, v in space.values().items()]
    named += [(f"model buffer {n!r}", b) for n, b in space.model.named_buffers()]
    for what, t in named:
        check_finite(t.detach(), what)


def tensor_in(t: torch.Tensor, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether ``t`` is on ``device`` and, if floating, in ``dtype`` (nothing to convert)."""
    return t.device == device and (t.dtype == dtype or not t.is_floating_point())


def _converted(space: ParamSpace, dtype: torch.dtype, device: torch.device) -> ParamSpace:
    """Return the space on a model whose parameters *and buffers* have ``dtype`` and ``device``.

    A model already there is used as it is (its parameters live: a later in-place update is
    refused at the next product until ``clear_cache()``, see :func:`_versions`). Otherwise the model is deep-copied and converted, so BatchNorm
    statistics, frozen layers and other buffers match the products' dtype; the user's model
    is never changed.
    """
    model = space.model
    others = [p for n, p in model.named_parameters() if n not in space.names]
    if all(tensor_in(t, dtype, device) for t in [*others, *model.buffers()]):
        return space.to(dtype=dtype, device=device)  # only the selected values, if any, differ
    try:
        copied = copy.deepcopy(model)
    except Exception as err:  # a model holding something that cannot be copied
        raise TypeError(
            f"dtype: converting the model to {dtype} on {device} needs a copy of it, which "
            f"failed ({type(err).__name__}: {err}); convert the model yourself "
            f"(model.to({dtype}))"
        ) from None
    copied.to(device=device)
    for t in [*copied.parameters(), *copied.buffers()]:
        if t.is_floating_point():
            t.data = t.data.to(dtype=dtype)
    values = {n: v.detach().to(dtype=dtype, device=device) for n, v in space.values().items()}
    return ParamSpace(copied, values, output=space.output)


def _check_process_group(group: object) -> None:
    if group is None:
        return
    dist = torch.distributed
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(
            f"process_group: expected a torch.distributed ProcessGroup or None, got "
            f"{type(group).__name__}"
        )
    if not dist.is_initialized():
        raise ValueError(
            "process_group: expected a group of an initialised torch.distributed "
            "(call torch.distributed.init_process_group first), got a process group while "
            "torch.distributed is not initialised"
        )
