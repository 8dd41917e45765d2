r"""The Jacobian of a model's outputs over a dataset, and the NTK Gram matrix it defines.

For inputs :math:`x^{(1)}, \dots, x^{(n)}` and a model :math:`f(\theta; x) \in \mathbb{R}^{d_y}`
with :math:`m` parameters, the Jacobian (section 1.1 of "Leveraging Low Rank Structure in the Lazy Regime", an anonymous
ICLR 2025 submission with no arXiv id given; there :math:`J` of size
:math:`n \times d_y \times m`) is flattened sample-major into the matrix

.. math::

    J \in \mathbb{R}^{n d_y \times m}, \qquad
    J_{i d_y + j,\, p} = \frac{\partial f_j(\theta; x^{(i)})}{\partial \theta_p},

and the empirical NTK Gram matrix is :math:`K = J J^\top` (section 2 of that paper,
:math:`K_{NTK}(i, j) = \langle J_i, J_j \rangle`).
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from linops._autodiff import OutputGraph, forward_ad_jvp, forward_mode_jvp
from linops._chain import ChainOutputGraph
from linops._checks import check_output_index
from linops._data import Batches
from linops._model import ModelOperator, forward_checked
from linops._types import Data, OutputSelector, Params, ProcessGroup
from linops.base import TorchLinearOperator
from linops.params import ParamSpace, listed

__all__ = ["JacobianOperator", "NTKOperator"]


class JacobianOperator(ModelOperator):
    r"""The Jacobian :math:`J` of the model outputs over a dataset, as an operator.

    Parameters
    ----------
    model
        The network; evaluated at its current parameter values (or at ``params`` if given as
        a mapping).
    inputs
        A tensor of inputs ``(n, ...)``, an ``(X, y)`` tuple (``y`` ignored), or an iterable of
        batches (a list of tensors is a list of input batches).
    params
        Which parameters (see :class:`linops.ParamSpace`); columns follow its order.
    output_index
        If given, only output unit ``j``: the ``n x m`` slice :math:`J_{:, j, :}` of that paper's Jacobian.
    output
        Selects the tensor to differentiate from what the model returns, for models that
        return tuples, dicts or output objects (``lambda out: out[0]``,
        ``lambda out: out.logits``); see :class:`linops.ParamSpace`.
    dtype, device
        Of the products (default: those of the parameters); inputs are cast and moved once.
    batch_size
        Split tensor inputs into batches of this many samples (bounds graph memory); data
        that gives its own batches (a loader, a list of batches) refuse it.
    cache
        ``None`` (default): keep each batch's autodiff graph between products while the
        memory budget allows, rebuild the rest at every product; ``True``: keep every graph;
        ``False``: keep none.
    allow_train_mode, allow_reshuffle
        Skip the checks that refuse dropout / batch norm in training mode and reshuffling
        loaders.
    max_vectors
        Bound the number of vectors per batched pass (default 8, lowered by the budget).
    memory_budget
        Bytes the operator may keep (batches on the device, graphs, block sizes); default
        half the memory free on the device. See :mod:`linops.memory` and ``op.cache_info()``.
        ``memory_limit_bytes`` is its deprecated former name.
    label_key
        For dict batches (models called as ``model(**batch)``): the key of the targets, left
        out of the model's keyword inputs.
    route
        ``"auto"`` (default): hand-derived products when the model provably is a chain of
        ``nn.Linear``, ``nn.Conv2d``, ``nn.MaxPool2d``, ``nn.AvgPool2d`` and elementwise
        modules (a plain ``nn.Sequential`` MLP or CNN without hooks, parametrizations or
        subclassed forwards; :mod:`linops._chain`), else autograd on a retained graph;
        ``"chain"`` requires the former, ``"autograd"`` forces the latter. The route taken is
        ``op.route`` after the first product (``"autograd, one vector per pass"`` where torch
        cannot batch a layer's derivatives: see :mod:`linops._defects`).
    process_group
        A ``torch.distributed`` process group: each rank passes its own shard of the inputs
        (contiguous, in rank order, e.g. :func:`linops.distributed.shard`) and the operator
        is the Jacobian of the concatenated shards, replicated on both sides: ``J v``
        all-gathers the rows (rank ``r`` computes rows ``local_rows``), ``J^T y``
        all-reduces the VJPs of each rank's slice of ``y``. Construction and every product
        are collectives (see :mod:`linops.distributed`).

    Notes
    -----
    ``J v`` is a JVP and ``J^T y`` a VJP, both replayed on a retained graph
    (:mod:`linops._autodiff`). Rows are ordered sample-major: row ``i * d_y + j`` is output
    ``j`` of sample ``i``; outputs of any shape are flattened row-major per sample.

    Examples
    --------
    >>> import torch
    >>> lin = torch.nn.Linear(3, 2, bias=False).double()
    >>> X = torch.eye(3, dtype=torch.float64)[:1]
    >>> J = JacobianOperator(lin, X)
    >>> J.shape
    (2, 6)
    >>> J.to_dense().tolist()  # d f_j / d W_jk = x_k
    [[1.0, 0.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0, 0.0, 0.0]]
    """

    def __init__(
        self,
        model: torch.nn.Module,
        inputs: Data,
        params: Params | None = None,
        *,
        output_index: int | None = None,
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
        self.output_index = output_index
        super().__init__(
            model,
            inputs,
            params,
            shape=self._infer_shape,
            targets=False,
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

    def _infer_shape(self, batches: Batches, space: ParamSpace) -> tuple[int, int]:
        if self.process_group is None:
            return self._local_shape(batches, space)
        from linops.distributed import gather_counts

        def local() -> tuple[int, dict[str, int]]:
            rows, m = self._local_shape(batches, space)
            return rows, {"parameters": m, "outputs per sample": self.num_outputs}

        #: rows owned by each rank, in rank order (this rank's rows are ``local_rows``)
        self.row_counts = gather_counts(self, local, device=batches._device)
        rank = torch.distributed.get_rank(self.process_group)
        start = sum(self.row_counts[:rank])
        self.local_rows = range(start, start + self.row_counts[rank])
        return sum(self.row_counts), space.dim

    def _local_shape(self, batches: Batches, space: ParamSpace) -> tuple[int, int]:
        x0 = batches.first()[0][:1]
        d_out = forward_checked(space, x0).reshape(1, -1).shape[1]
        self.output_index = check_output_index(self.output_index, d_out, optional=True)
        self.num_outputs = 1 if self.output_index is not None else d_out
        self.batch_rows = [len(x) * self.num_outputs for x, _ in batches]
        return sum(self.batch_rows), space.dim

    def _build_graph(self, x: torch.Tensor, y: torch.Tensor | None) -> Any:
        return self._route_graph(
            lambda chain: ChainOutputGraph(chain, x, self.output_index),
            lambda: OutputGraph(self.space, x, self.output_index),
        )

    def _matmat_torch(self, X: torch.Tensor) -> torch.Tensor:
        if self._slot_width is not None:
            return self._jvp_in_slots(X)
        tangents, batched = self._split_params(X)
        rows = []
        if batched and self._forward_mode:
            for x, _ in self.batches:
                jv = forward_mode_jvp(self.space, x, self.output_index, tangents)
                rows.append(jv.reshape(X.shape[1], -1).T)
            return torch.cat(rows, dim=0)
        if not batched and self._single_forward_mode is not False:
            return self._single_by_forward_mode(tangents)
        for graph in self._graphs():
            jv = graph.jvp(tangents, batched)  # (k, n_b, d) or (n_b, d)
            rows.append(jv.reshape(X.shape[1], -1).T if batched else jv.reshape(-1, 1))
        return torch.cat(rows, dim=0)

    def _jvp_in_slots(self, X: torch.Tensor) -> torch.Tensor:
        """``J V`` taken in slots (:meth:`ModelOperator._in_slots`), each batch visited once.

        Every slot is computed as the same columns alone would be: by forward mode where
        their own product would be (many vectors: where the block pass is; one vector: where
        single products are), else on the batch's graph, built only if some slot needs it.
        The slots' results are written into their rows and columns of the output.
        """
        k = X.shape[1]
        slots = [
            (c, b, self._slot_by_forward_mode(b), self._split_params(X[:, c])[0])
            for c, b in self._slot_columns(k)
        ]
        graphs = not all(forward for _, _, forward, _ in slots)
        out = X.new_empty(k, self.shape[0]).T
        row = 0
        for x, graph in self._graphs(inputs=True) if graphs else self.batches:
            rows = 0
            for cols, batched, forward, tangents in slots:
                if not forward:
                    jv = graph.jvp(tangents, batched)
                elif batched:
                    jv = forward_mode_jvp(self.space, x, self.output_index, tangents)
                else:
                    jv = forward_ad_jvp(self.space, x, self.output_index, tangents)
                piece = jv.reshape(cols.stop - cols.start, -1).T if batched else jv.reshape(-1, 1)
                rows = piece.shape[0]
                out[row : row + rows, cols] = piece
                del jv, piece
            del x, graph
            row += rows
        return out

    def _slot_by_forward_mode(self, batched: bool) -> bool | None:
        """Whether a slot of ``J V`` takes forward mode (``None``: not decided yet).

        A many-vector slot does where the block pass is forward mode, a one-vector slot where
        single products are (decided at the first single product).
        """
        return self._forward_mode if batched else self._single_forward_mode

    def _single_way_undecided(self, adjoint: bool) -> bool:
        return not adjoint and self._single_forward_mode is None

    #: whether single products ``J v`` take forward mode (``None``: not decided yet)
    _single_forward_mode: bool | None = None

    def _single_by_forward_mode(self, tangents: list[torch.Tensor]) -> torch.Tensor:
        """``J v`` by forward mode (:func:`linops._autodiff.forward_ad_jvp`) where it pays.

        On the autograd route, for models with convolutions: there a replay of the retained
        graph's double backward costs about 1.5x a forward-mode pass (measured, see
        :func:`~linops._autodiff.forward_ad_jvp`), while on the MLPs and transformers of
        ``bench/models.py`` the replay is the faster one (CPU time on one thread: 2.1 against
        3.6 ms on the residual LayerNorm MLP, 9.0 against 12.1 ms on the transformer). The
        choice depends on the model's layers, never on a timing. At the first single product
        the forward-mode result is compared with the retained graph's; if it raises (a custom
        ``autograd.Function`` without a forward rule) or differs beyond rounding, the
        retained graph is used from then on. ``op.route`` names the choice.
        """
        if self._single_forward_mode is None:
            ref = torch.cat([g.jvp(tangents, False).reshape(-1, 1) for g in self._graphs()])
            out = self._try_forward_ad(ref, lambda: self._forward_rows(tangents))
            self._single_forward_mode = out is not None
            return ref if out is None else out
        return self._forward_rows(tangents)

    def _forward_rows(self, tangents: list[torch.Tensor]) -> torch.Tensor:
        rows = [
            forward_ad_jvp(self.space, x, self.output_index, tangents).reshape(-1, 1)
            for x, _ in self.batches
        ]
        return torch.cat(rows, dim=0)

    def _reset_derived(self) -> None:
        self._single_forward_mode = None

    def _has_forward_mode(self, adjoint: bool) -> bool:
        return not adjoint  # J V by forward mode; J^T U replays the retained graph

    _slotted_directions: tuple[bool, ...] = (False, True)

    def _rmatmat_torch(self, Y: torch.Tensor) -> torch.Tensor:
        """``J^T U = sum_b J_b^T U_b`` over the batches, a running sum per slot.

        One slot holds the whole block (batched when ``k > 1``); taken in slots
        (:meth:`ModelOperator._in_slots`: a block split into passes while graphs are
        rebuilt) each slot of columns sums into its columns of the output, so a streamed block
        builds each batch's graph once, not once per chunk (as
        :meth:`_LossOperator._accumulate`).
        """
        k = Y.shape[1]
        out: torch.Tensor | None = None
        slots: list[tuple[slice, bool, list[torch.Tensor] | None]]
        if self._slot_width is not None:
            out, parts = self._slot_sums(Y, k)
            slots = list(parts)
        else:
            batched = k > 1 or self._probing
            # several batches: a column-major running sum, as the products' tangents are: a
            # row-major one made every add_ and the join strided (1.7x the time of J^T U on an
            # 85k-parameter MLP, k = 32)
            many = len(self.batch_rows) > 1
            slots = [(slice(None), batched, self._zero_sums(Y, k, batched) if many else None)]
        for graph, Yb in zip(self._graphs(), torch.split(Y, self.batch_rows), strict=True):
            shape = graph.out.shape
            for i, (cols, batched, total) in enumerate(slots):
                U = Yb[:, cols]
                cot = U.T.reshape(U.shape[1], *shape) if batched else U.reshape(shape)
                part = graph.vjp(cot, batched)
                if total is None:
                    slots[i] = (cols, batched, listed(part))
                else:
                    for a, t in zip(total, part, strict=True):
                        a.add_(t)
                del part, cot, U
        if out is not None:
            return out
        _, batched, total = slots[0]
        assert total is not None  # the data has at least one batch
        return self._join_params(total, batched)


class NTKOperator(TorchLinearOperator):
    r"""The empirical NTK Gram matrix :math:`K = J_1 J_2^\top`, never forming :math:`J`.

    Parameters
    ----------
    model
        The network.
    inputs
        Inputs of the rows (see :class:`JacobianOperator`).
    inputs2
        Inputs of the columns for the cross-kernel :math:`J_1 J_2^\top`; default ``inputs``
        (then the operator is symmetric positive semi-definite).
    params, output_index, **kwargs
        Passed to both :class:`JacobianOperator`\ s.

    Examples
    --------
    >>> import torch
    >>> lin = torch.nn.Linear(2, 1, bias=False).double()
    >>> X = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    >>> NTKOperator(lin, X).to_dense().tolist()  # K = X X^T for a linear model
    [[1.0, 1.0], [1.0, 2.0]]
    """

    def __init__(
        self,
        model: torch.nn.Module,
        inputs: Data,
        inputs2: Data | None = None,
        params: Params | None = None,
        **kwargs: Any,  # JacobianOperator's keywords, forwarded to both
    ) -> None:
        self.J1 = JacobianOperator(model, inputs, params, **kwargs)
        self.J2 = self.J1 if inputs2 is None else JacobianOperator(model, inputs2, params, **kwargs)
        self.is_symmetric = inputs2 is None
        super().__init__(
            (self.J1.shape[0], self.J2.shape[0]),
            dtype=self.J1.torch_dtype,
            device=self.J1.device,
        )

    @property
    def route(self) -> str | None:
        """The route of the Jacobians' products (see :class:`JacobianOperator`)."""
        return self.J1.route

    def _to(self, dtype: torch.dtype, device: torch.device) -> NTKOperator:
        new = copy.copy(self)
        TorchLinearOperator.__init__(new, self.shape, dtype=dtype, device=device)
        new.J1 = self.J1.to(dtype, device=device)
        new.J2 = new.J1 if self.J2 is self.J1 else self.J2.to(dtype, device=device)
        return new

    def _matmat_torch(self, X: torch.Tensor) -> torch.Tensor:
        return self.J1._apply(self.J2._apply(X, adjoint=True))

    def _rmatmat_torch(self, Y: torch.Tensor) -> torch.Tensor:
        return self.J2._apply(self.J1._apply(Y, adjoint=True))
