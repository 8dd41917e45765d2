"""Autodiff routes of the operators: one retained graph per batch, reused by every product.

Measured on this project's 2-core CPU (bench/operators.py, ``--routes``): replaying a retained
graph costs a fraction of rebuilding it, so each batch's graph is built once (lazily, at the
first product) and every later product is a single backward pass through it:

* ``J v`` (JVP) is the "double-backward" trick: with ``g(u) = J^T u`` recorded once as a graph
  (``create_graph=True`` on a dummy ``u``), ``J v = d<g(u), v>/du``: one backward pass, about
  2x faster here than ``torch.autograd.forward_ad`` recomputing the forward pass.
* ``J^T y`` (VJP) is one backward pass through the retained forward graph.
* ``H v`` (HVP) is one backward pass through the retained gradient graph
  (``create_graph=True``), about 2x faster than a fresh double-backward HVP.
* Many vectors go through ``torch.func.vmap`` over the backward pass, in chunks (see
  :data:`linops._model.DEFAULT_MAX_VECTORS`). Not ``is_grads_batched=True``: that is torch's
  older vmap, without batching rules for layer_norm, softmax, gelu, batch_norm or convolution
  backward (it loops over the vectors there: a 32-vector ``J^T`` of ``bench/models.py``'s
  residual LayerNorm MLP cost 1.2 ms per vector against 0.45 ms with ``torch.func.vmap``).

With ``cache=False`` the graphs are rebuilt at every product and freed, for data whose
activations do not fit in memory.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch

from linops.params import ParamSpace

#: a loss called as ``loss(outputs, targets)``; targets are None for a target-free objective
#: (the output Hessian's selected output), hence Any in the second place
LossFn = Callable[[torch.Tensor, Any], torch.Tensor]


def _leaves(space: ParamSpace) -> list[torch.Tensor]:
    return [v.detach().requires_grad_(True) for v in space.values().values()]


def _grad(
    outputs: Sequence[torch.Tensor],
    inputs: Sequence[torch.Tensor],
    grad_outputs: Sequence[torch.Tensor],
    batched: bool,
) -> list[torch.Tensor]:
    """Backward pass that keeps the graph, tolerates unused inputs and returns zeros for them."""
    live = [i for i, o in enumerate(outputs) if o.requires_grad]
    k = grad_outputs[0].shape[0] if batched else None
    if not live:
        return [_zeros(x, k) for x in inputs]
    outs = [outputs[i] for i in live]

    def backward(*cotangents: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return torch.autograd.grad(
            outs,
            inputs,
            grad_outputs=cotangents,
            retain_graph=True,
            allow_unused=True,
            materialize_grads=True,
        )

    cotangents = [grad_outputs[i] for i in live]
    if not batched:
        return list(backward(*cotangents))
    # torch.func.vmap, not is_grads_batched: the latter is torch's older vmap, which has no
    # batching rule for layer_norm, softmax, gelu, batch_norm or convolution backward and
    # loops over the vectors there; functorch's vmap has rules for all of them
    return list(torch.func.vmap(backward)(*cotangents))


def _zeros(x: torch.Tensor, k: int | None) -> torch.Tensor:
    return torch.zeros((k, *x.shape) if k is not None else x.shape, dtype=x.dtype, device=x.device)


class OutputGraph:
    """Retained graph of ``f(theta; x)`` on one batch, for ``J v`` and ``J^T y``.

    The outputs are flattened to ``(n_b, d)`` (``d`` outputs per sample, sample-major rows), or
    to ``(n_b, 1)`` for a single output unit ``output_index``.
    """

    def __init__(self, space: ParamSpace, x: torch.Tensor, output_index: int | None) -> None:
        self.leaves = _leaves(space)
        with torch.enable_grad():
            out = space.functional_call(dict(zip(space.names, self.leaves, strict=True)), x)
            if out.dim() == 0:
                raise ValueError(
                    "output: expected outputs with one row per sample, got a 0-d tensor (the "
                    "model's own loss?): the GGN, the Fisher family and the Jacobian need the "
                    "per-sample outputs the loss is computed from (e.g. output=lambda o: "
                    "o.logits); for the Hessian of a loss the model computes itself, "
                    "HessianOperator takes it with loss_fn=lambda out, y: out"
                )
            self.model_shape = out.shape[1:]  # per-sample output shape, before flattening
            out = out.reshape(out.shape[0], -1)
            if output_index is not None:
                out = out[:, output_index : output_index + 1]
            self.out = out
            self.u = torch.zeros_like(out, requires_grad=True)
            gu = torch.autograd.grad(
                out, self.leaves, grad_outputs=self.u, create_graph=True, allow_unused=True
            )
        self.gu = [
            g if g is not None else torch.zeros_like(x)
            for g, x in zip(gu, self.leaves, strict=True)
        ]

    @functools.cached_property
    def convolutional(self) -> bool:
        """Whether the forward pass ran a convolution (a batched ``J^T`` through it folds)."""
        return graph_has(self.out, "Convolution")

    @functools.cached_property
    def _differentiable_twice(self) -> bool:
        return refuse_once_differentiable(self.gu, "J v (a double backward of the model)")

    def jvp(self, tangents: Sequence[torch.Tensor], batched: bool) -> torch.Tensor:
        """``J v`` for parameter-shaped tangents (leading batch dim if ``batched``)."""
        _ = self._differentiable_twice  # raises once, at the first product, if it is not
        return _grad(self.gu, [self.u], tangents, batched)[0]

    def vjp(self, cotangent: torch.Tensor, batched: bool) -> list[torch.Tensor]:
        """``J^T y`` for output-shaped cotangents (leading batch dim if ``batched``)."""
        return _grad([self.out], self.leaves, [cotangent], batched)


class GradientGraph:
    """Retained graph of the gradient of ``loss(f(theta; x), y)`` on one batch, for ``H v``."""

    def __init__(
        self, space: ParamSpace, loss_fn: LossFn, x: torch.Tensor, y: torch.Tensor | None
    ) -> None:
        self.leaves = _leaves(space)
        with torch.enable_grad():
            values = dict(zip(space.names, self.leaves, strict=True))
            out = space.functional_call(values, x, twice=True)
            loss = loss_fn(out, y)
            grads = torch.autograd.grad(loss, self.leaves, create_graph=True, allow_unused=True)
        self.grads = [
            g if g is not None else torch.zeros_like(x)
            for g, x in zip(grads, self.leaves, strict=True)
        ]

    @functools.cached_property
    def _differentiable_twice(self) -> bool:
        return refuse_once_differentiable(self.grads, "H v (a double backward of model and loss)")

    @functools.cached_property
    def convolutional(self) -> bool:
        """Whether the gradient's graph runs a convolution (a batched ``H V`` through it folds)."""
        return any(g.grad_fn is not None and graph_has(g, "Convolution") for g in self.grads)

    def hvp(self, tangents: Sequence[torch.Tensor], batched: bool) -> list[torch.Tensor]:
        _ = self._differentiable_twice  # raises once, at the first product, if it is not
        return _grad(self.grads, self.leaves, tangents, batched)


class LossOutputGraph:
    """Retained graph of the loss gradient w.r.t. the outputs, for ``H_loss u`` (GGN)."""

    def __init__(
        self, out: torch.Tensor, loss_fn: LossFn, y: torch.Tensor | None, shape: torch.Size
    ) -> None:
        with torch.enable_grad():
            self.out = out.detach().reshape(shape).requires_grad_(True)
            self.g = torch.autograd.grad(loss_fn(self.out, y), self.out, create_graph=True)[0]
        refuse_once_differentiable([self.g], "the loss's Hessian with respect to the outputs")

    def hvp(self, u: torch.Tensor, batched: bool) -> torch.Tensor:
        """``H_loss u`` with ``u`` shaped like the model output (leading batch dim if ``batched``)."""
        return _grad([self.g], [self.out], [u], batched)[0]


def forward_mode_jvp(
    space: ParamSpace, x: torch.Tensor, output_index: int | None, tangents: Sequence[torch.Tensor]
) -> torch.Tensor:
    """``J V`` of one batch for ``K`` batched tangents by forward mode: ``(K, n_b, d)``.

    ``torch.func.vmap`` over ``torch.func.jvp``: the forward pass is recomputed with ``K``
    tangents at once; through convolutions it is truly batched where the retained graph's
    backward is not (:data:`linops._model.FOLDING_KERNELS`).
    Used only after :class:`linops._model.ModelOperator` has checked it against a
    single-vector product of the retained graph.
    """
    values = space.values()
    names = space.names

    def f(*params: torch.Tensor) -> torch.Tensor:
        out = space.functional_call(dict(zip(names, params, strict=True)), x)
        out = out.reshape(out.shape[0], -1)
        return out if output_index is None else out[:, output_index : output_index + 1]

    primals = tuple(values[n] for n in names)

    def one(*t: torch.Tensor) -> torch.Tensor:
        return torch.func.jvp(f, primals, t)[1]

    # no_grad: parameters outside the space would otherwise record a graph into the product
    with torch.no_grad():
        return torch.func.vmap(one)(*tangents)


def forward_ad_jvp(
    space: ParamSpace, x: torch.Tensor, output_index: int | None, tangents: Sequence[torch.Tensor]
) -> torch.Tensor:
    """``J v`` of one batch for one tangent by forward mode (``torch.autograd.forward_ad``): ``(n_b, d)``.

    The forward pass is recomputed on dual numbers. Through a convolution this costs less
    than replaying the retained graph's double backward (which runs
    ``_convolution_double_backward``); measured in CPU time on one thread, ``bench/models.py``'s
    ResNet-style CNN with BatchNorm: 32 ms against 48 ms. Used only after
    :class:`linops.JacobianOperator` has checked it against a retained-graph product.
    """
    import torch.autograd.forward_ad as fwad

    values = space.values()
    with torch.no_grad(), fwad.dual_level():  # no graph through parameters outside the space
        duals = {
            n: fwad.make_dual(values[n], t) for n, t in zip(space.names, tangents, strict=True)
        }
        out = space.functional_call(duals, x)
        tangent = fwad.unpack_dual(out).tangent
    if tangent is None:  # no parameter reaches the outputs
        tangent = torch.zeros_like(out)
    tangent = tangent.reshape(tangent.shape[0], -1)
    return tangent if output_index is None else tangent[:, output_index : output_index + 1]


def graph_has(out: torch.Tensor, prefix: str) -> bool:
    """Whether the autograd graph of ``out`` has a node whose type name starts with ``prefix``."""
    seen: set[Any] = set()
    stack = [out.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        if type(fn).__name__.startswith(prefix):
            return True
        seen.add(fn)
        stack.extend(f for f, _ in fn.next_functions)
    return False


def refuse_once_differentiable(grads: Sequence[torch.Tensor], product: str) -> bool:
    """Raise if ``grads`` (built with ``create_graph``) went through a once-differentiable step.

    The backward of an ``autograd.Function`` marked ``@once_differentiable`` runs without a
    graph; torch only attaches an ``Error`` node that raises if it is ever run, and it is never
    run: a second derivative through it is silently zero. Returns True if there is none.

    Raises
    ------
    NotImplementedError
        Naming the product that would be wrong.
    """
    if any(g.grad_fn is not None and graph_has(g, "Error") for g in grads):
        raise NotImplementedError(
            f"{product} needs the second derivative of a custom torch.autograd.Function "
            "whose backward is marked @once_differentiable (or computed without a graph); "
            "torch would silently give zeros for it. Give the Function a differentiable "
            "backward (torch ops on the saved tensors, without @once_differentiable) or "
            "exclude the parameters before it from params="
        )
    return True
