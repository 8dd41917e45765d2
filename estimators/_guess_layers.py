r"""Layer plumbing for the gradient guessers of "How to Guess a Gradient" (private).

The guessers of :mod:`estimators.guesses` see a network as a chain of *layers* (``Linear``,
including :class:`trainers.models.ScaledLinear`, and ``Conv2d``) found in execution order with
forward hooks. Between layer :math:`l`'s pre-activation :math:`s_l` and layer :math:`l+1`'s input
:math:`x_{l+1}` sits whatever the model computes there (ReLU, pooling, flattening); the guessers
never need to know what, because they only use it through *local* vector-Jacobian products
recorded on a one-layer graph.

Three passes are provided:

* :func:`record_pass`: a forward pass in which every layer output is replaced by a fresh leaf
  tensor, so that each recorded autograd graph spans one layer only (``leaf s_l -> x_{l+1} ->
  s_{l+1}``). Backpropagating through one of these graphs is the "1-layer" backprop of the paper
  section 3.2; nothing is ever backpropagated through the whole network.
* :func:`preactivation_jvp`: one batched forward-mode pass with tangents :math:`\epsilon_l` added
  at the pre-activations (the perturbation formulation :math:`s_l \leftarrow s_l + \delta_l`,
  differentiated at :math:`\delta = 0`).
* :func:`param_jvp`: one forward-mode pass with a weight-space tangent (directional descent).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.func import functional_call

from linops._data import uses_batch_statistics
from linops.params import ParamSpace

__all__ = [
    "BACKENDS",
    "Layer",
    "Record",
    "find_layers",
    "layer_param_vjp",
    "output_error",
    "param_jvp",
    "param_jvp_many",
    "per_example_dot",
    "preactivation_jvp",
    "record_pass",
    "vjp",
]

BACKENDS = ("forward_ad", "func")
LAYER_TYPES = (nn.Linear, nn.Conv2d)


class Layer(NamedTuple):
    """One guessable layer: its module name, the module, and its parameters in the space."""

    name: str
    module: nn.Module
    param_names: tuple[str, ...]


class Record(NamedTuple):
    """What :func:`record_pass` kept, one entry per layer (in execution order).

    ``inputs[l]`` is the layer input :math:`x_l` as seen in the pass (attached to the graph of
    ``leaves[l - 1]``), ``raw[l]`` the pre-activation :math:`s_l` attached to that graph,
    ``leaves[l]`` a detached copy of :math:`s_l` that requires grad (the start of the next
    one-layer graph) and ``output`` the model output attached to ``leaves[-1]``.
    """

    inputs: list[torch.Tensor]
    raw: list[torch.Tensor]
    leaves: list[torch.Tensor]
    output: torch.Tensor


def _prefix(name: str) -> str:
    return f"{name}." if name else ""


def find_layers(
    space: ParamSpace, x: torch.Tensor, *, allow_batch_statistics: bool = False
) -> list[Layer]:
    """Find the Linear / Conv2d layers of ``space.model`` in the order a forward pass runs them.

    Parameters
    ----------
    space
        Parameter space of the model; every parameter in it must be the weight or bias of one
        of the layers found.
    x
        An input batch (only its first example is used for the probe pass).
    allow_batch_statistics
        Whether BatchNorm that normalises by the batch may run (for analyses of the batch
        loss itself; per-example guesses refuse it). Its probe pass then updates the running
        statistics, as a forward pass in training mode does.

    Returns
    -------
    list of Layer

    Raises
    ------
    ValueError
        If a layer runs twice in one forward pass or two layers share a parameter (weight
        sharing), no layer is found, or a trained parameter belongs to no Linear / Conv2d
        layer.
    """
    coupled = sorted(
        n
        for n, m in space.model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and uses_batch_statistics(m)
    )
    if coupled and not allow_batch_statistics:  # before the probe, which would update them
        raise ValueError(
            f"model: {coupled} normalise by the batch's statistics (BatchNorm in training mode "
            "or without running statistics), which couples the examples: per-example "
            "guesses would be biased (0.33-0.38 relative on a CNN); call .eval() on them"
        )
    names: dict[nn.Module, str] = {
        m: n for n, m in space.model.named_modules() if isinstance(m, LAYER_TYPES)
    }
    order: list[nn.Module] = []

    def hook(module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> None:
        if module in order:
            raise ValueError(
                f"model: expected each Linear/Conv2d layer to run once per forward pass, "
                f"got {names[module]!r} twice (shared weights are not supported)"
            )
        order.append(module)

    handles = [m.register_forward_hook(hook) for m in names]
    try:
        with torch.no_grad():
            space.model(x[:1])
    finally:
        for h in handles:
            h.remove()
    if not order:
        raise ValueError("model: expected at least one Linear or Conv2d layer, got none")
    owner: dict[int, str] = {}
    for m in order:  # tied weights: a second layer's use would be left out of the guesses
        for short, p in m.named_parameters(recurse=False):
            if id(p) in owner:
                raise ValueError(
                    f"model: expected each Linear/Conv2d layer to own its parameters, got "
                    f"{_prefix(names[m]) + short!r} tied to {owner[id(p)]!r} (shared weights "
                    "are not supported)"
                )
            owner[id(p)] = _prefix(names[m]) + short
    trained = set(space.names)
    layers = []
    for m in order:
        own = tuple(
            _prefix(names[m]) + p for p in ("weight", "bias") if _prefix(names[m]) + p in trained
        )
        layers.append(Layer(names[m], m, own))
    covered = {p for layer in layers for p in layer.param_names}
    missing = [n for n in space.names if n not in covered]
    if missing:
        raise ValueError(
            "params: expected every trained parameter to be the weight or bias of a Linear or "
            f"Conv2d layer, got {missing}"
        )
    return layers


def _call(space: ParamSpace, params: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return space.functional_call(params, x)


def record_pass(
    space: ParamSpace,
    params: Mapping[str, torch.Tensor],
    x: torch.Tensor,
    layers: Sequence[Layer],
) -> Record:
    """Forward pass that cuts the autograd graph at every layer output (see :class:`Record`)."""
    modules = {layer.module: i for i, layer in enumerate(layers)}
    inputs: list[Any] = [None] * len(layers)
    raw: list[Any] = [None] * len(layers)
    leaves: list[Any] = [None] * len(layers)

    def hook(module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
        i = modules[module]
        inputs[i], raw[i] = args[0], out
        leaves[i] = out.detach().requires_grad_(True)
        return leaves[i]

    handles = [layer.module.register_forward_hook(hook) for layer in layers]
    detached = {n: p.detach() for n, p in params.items()}
    try:
        with torch.enable_grad():
            output = _call(space, detached, x)
    finally:
        for h in handles:
            h.remove()
    return Record(inputs, raw, leaves, output)


def chain_break(rec: Record, layers: Sequence[Layer]) -> str | None:
    """Describe where the recorded layers are not a chain (each feeding the next only), or None.

    Guessers that propagate a guess through the next layer's weights (``W^T``, downstream,
    mixing) give an exactly zero guess to a layer that does not feed the next one (a parallel
    branch), and leave out what reaches the loss around it (a skip connection).
    """
    n = len(rec.leaves)
    for i in range(n - 1):
        nxt = rec.raw[i + 1]
        fed = (
            nxt.requires_grad
            and torch.autograd.grad(
                nxt, rec.leaves[i], torch.ones_like(nxt), retain_graph=True, allow_unused=True
            )[0]
            is not None
        )
        if not fed:
            return f"{layers[i].name!r} does not feed {layers[i + 1].name!r}"
        later = [t for t in [rec.output, *rec.raw[i + 2 :]] if t.requires_grad]
        if later and torch.autograd.grad(
            later, rec.leaves[i], [torch.ones_like(t) for t in later], retain_graph=True,
            allow_unused=True,
        )[0] is not None:  # fmt: skip
            return f"{layers[i].name!r} reaches the output around {layers[i + 1].name!r}"
    return None


def vjp(output: torch.Tensor, inp: torch.Tensor, cotangent: torch.Tensor) -> torch.Tensor:
    r"""Local vector-Jacobian product :math:`(\partial \text{output}/\partial \text{inp})^\top v`.

    Zero if ``output`` does not depend on ``inp``. The recorded graph is kept for reuse.
    """
    if not output.requires_grad:
        return torch.zeros_like(inp)
    (g,) = torch.autograd.grad(output, inp, cotangent, retain_graph=True, allow_unused=True)
    return torch.zeros_like(inp) if g is None else g


def output_error(
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    output: torch.Tensor,
    y: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Batch loss :math:`L` and the output error :math:`e_b = \partial L / \partial f(x_b)`.

    The error differentiates the loss function alone (a ``B x d_out`` computation, the
    "true error vector" of the paper's section 4.1), never the network.
    """
    out = output.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = loss_fn(out, y)
    if loss.ndim != 0:
        raise ValueError(f"loss_fn: expected a scalar loss, got shape {tuple(loss.shape)}")
    (e,) = torch.autograd.grad(loss, out)
    return loss.detach(), e


def per_example_dot(e: torch.Tensor, out_dot: torch.Tensor) -> torch.Tensor:
    r"""Per-example directional derivatives :math:`d_b = e_b \cdot \dot f_b`, shape ``(B,)``."""
    return (e * out_dot).reshape(e.shape[0], -1).sum(1)


def preactivation_jvp(
    space: ParamSpace,
    params: Mapping[str, torch.Tensor],
    x: torch.Tensor,
    layers: Sequence[Layer],
    tangents: Sequence[torch.Tensor | None],
    backend: str = "forward_ad",
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Model output and its tangent with :math:`\epsilon_l` added at each pre-activation.

    Returns ``(f, \dot f)`` with :math:`\dot f = \sum_l (\partial f / \partial s_l)\,\epsilon_l`,
    computed in one forward-mode pass (``backend="forward_ad"``: dual tensors,
    ``backend="func"``: :func:`torch.func.jvp`). ``None`` tangents are skipped.
    """
    active = [i for i, t in enumerate(tangents) if t is not None]
    modules: dict[nn.Module, int] = {layers[i].module: i for i in active}
    given = {i: t for i, t in enumerate(tangents) if t is not None}
    deltas: dict[int, torch.Tensor] = {}

    def hook(module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
        return out + deltas[modules[module]]

    handles = [layers[i].module.register_forward_hook(hook) for i in active]
    detached = {n: p.detach() for n, p in params.items()}
    try:
        with torch.no_grad():
            if backend == "forward_ad":
                with fwAD.dual_level():
                    for i in active:
                        t = given[i]
                        deltas[i] = fwAD.make_dual(torch.zeros_like(t), t)
                    out = fwAD.unpack_dual(_call(space, detached, x))
                    return _pair(out)

            def f(*ds: torch.Tensor) -> torch.Tensor:
                deltas.update(zip(active, ds, strict=True))
                return _call(space, detached, x)

            zeros = tuple(torch.zeros_like(given[i]) for i in active)
            return _pair(torch.func.jvp(f, zeros, tuple(given[i] for i in active)))
    finally:
        for h in handles:
            h.remove()


def _pair(out: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(primal, tangent)`` of a forward-mode result (an unpacked dual or ``jvp``'s pair)."""
    primal, tangent = out[0], out[1]
    return primal, tangent


def param_jvp(
    space: ParamSpace,
    params: Mapping[str, torch.Tensor],
    x: torch.Tensor,
    v: Mapping[str, torch.Tensor],
    backend: str = "forward_ad",
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Model output and its directional derivative :math:`(\partial f/\partial\theta)\, v`."""
    detached = {n: p.detach() for n, p in params.items()}
    with torch.no_grad():
        if backend == "forward_ad":
            with fwAD.dual_level():
                dual = {n: fwAD.make_dual(p, v[n]) for n, p in detached.items()}
                out = fwAD.unpack_dual(_call(space, dual, x))
                return _pair(out)
        return _pair(
            torch.func.jvp(
                lambda p: _call(space, p, x), (detached,), ({n: v[n] for n in detached},)
            )
        )


def param_jvp_many(
    space: ParamSpace,
    params: Mapping[str, torch.Tensor],
    x: torch.Tensor,
    V: Mapping[str, torch.Tensor],
) -> torch.Tensor:
    r"""Output tangents for ``K`` weight-space directions at once (``vmap`` over ``torch.func.jvp``).

    ``V[name]`` has shape ``(K, *param.shape)``; returns :math:`\dot f` of shape ``(K, *f.shape)``.
    """
    detached = {n: p.detach() for n, p in params.items()}

    def one(v: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.func.jvp(lambda p: _call(space, p, x), (detached,), (v,))[1]

    with torch.no_grad():
        return torch.func.vmap(one)({n: V[n] for n in detached})


def layer_param_vjp(
    layer: Layer,
    params: Mapping[str, torch.Tensor],
    x_in: torch.Tensor,
    cotangent: torch.Tensor,
) -> dict[str, torch.Tensor]:
    r"""Weight update of one layer from a pre-activation cotangent: :math:`(\partial s/\partial W)^\top \hat g_s`.

    For a linear layer :math:`s = c W x + b` this is :math:`c\, \hat g_s^\top x` and
    :math:`\sum_b \hat g_{s,b}` (the outer product of the paper's eq. (3)); for a convolution it
    is the convolution's weight gradient. Only this one layer is differentiated.
    """
    prefix = _prefix(layer.name)
    local = {}
    for short, p in layer.module.named_parameters(recurse=False):
        full = prefix + short
        local[short] = (params[full] if full in params else p).detach().requires_grad_(True)
    with torch.enable_grad():
        s = functional_call(layer.module, local, (x_in.detach(),))
        wanted = [n[len(prefix) :] for n in layer.param_names]
        grads = torch.autograd.grad(s, [local[w] for w in wanted], cotangent)
    return {prefix + w: g for w, g in zip(wanted, grads, strict=True)}
