r"""Where KFAC's factors come from: each layer's inputs and backpropagated output gradients.

Two sources, the same numbers: the chain route's stored step inputs with one batched backward
sweep of all factor columns (:func:`chain_batch`, for models :mod:`linops._chain` recognises),
or module forward hooks and one autograd backward pass per factor column
(:func:`hook_batch`, any model). Weight-sharing layers give ``(n, L, d)`` arrays: the ``L``
positions sharing a weight (:func:`shared_inputs`, :func:`shared_outputs`), which
:class:`linops.KFACOperator` expands or reduces ("Kronecker-factored approximate curvature
for modern neural network architectures", arXiv:2311.00636).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.autograd.graph import get_gradient_edge

from linops._chain import Chain, ChainMismatch
from linops._chain import _forward_checked as forward_checked_chain
from linops._layers import Affine, Conv, Flatten, Pool, forward_multiplier
from linops.params import ParamSpace

__all__ = ["Layers", "chain_batch", "hook_batch", "shared_inputs", "shared_outputs"]

Tensor = torch.Tensor
#: module name -> (weight name, bias name), either None when not selected
Layers = dict[str, tuple[str | None, str | None]]


def hook_batch(
    space: ParamSpace,
    layers: Layers,
    x: Any,
    scaled: Any,
    *,
    average_groups: bool = False,
    check: bool = False,
) -> tuple[dict[str, Tensor], list[dict[str, Tensor]]]:
    """One batch's layer inputs and output gradients from module hooks and autograd.

    Each call of a layer is recorded (a forward hook run before the model's own hooks, so the
    output is the layer's ``W x + b`` before anything changes it), and the calls of a layer
    used more than once are its shared positions, after those of each call: the inputs and
    gradients of all its uses, as arXiv:2311.00636 treats weight sharing. The output
    gradients are taken at the recorded outputs' autograd edges, so an in-place operation on
    an output afterwards (``nn.ReLU(inplace=True)``) does not change them. A selected layer
    the forward never calls has zero inputs and gradients (its block is zero, as the GGN's).

    ``average_groups``: a grouped convolution's input channels averaged over its groups
    (:func:`shared_inputs`). ``check``: verify first that the recorded inputs and output
    gradients give the parameters' gradients (:func:`_check_layer_gradients`).
    """
    modules = dict(space.model.named_modules())
    names = list(layers)
    calls: dict[str, list[tuple[Tensor, Tensor, Any]]] = {k: [] for k in names}
    hooks = []
    for name in names:

        def hook(mod: nn.Module, args: Any, kw: Any, out: Tensor, name: str = name) -> None:
            a = args[0] if args else kw["input"]  # layer(x) or layer(input=x)
            calls[name].append((a.detach(), out, get_gradient_edge(out)))

        hooks.append(modules[name].register_forward_hook(hook, prepend=True, with_kwargs=True))
    try:
        with torch.enable_grad():
            values = {k: v.detach().requires_grad_(True) for k, v in space.values().items()}
            f = space.functional_call(values, x)
    finally:
        for h in hooks:
            h.remove()
    f2 = f.reshape(f.shape[0], -1)
    if check:
        _check_layer_gradients(modules, layers, values, f2, calls)
    inputs: dict[str, Tensor] = {}
    for k in names:
        c = forward_multiplier(modules[k]) if layers[k][0] else 1.0
        a = _all_calls(modules[k], [a for a, *_ in calls[k]], f, "in", average_groups)
        inputs[k] = a if c == 1.0 else c * a
    S = scaled(f)
    edges = [(k, i) for k in names for i in range(len(calls[k]))]
    grads = []
    for r in range(S.shape[0]):
        got = torch.autograd.grad(
            f2, [calls[k][i][2] for k, i in edges], grad_outputs=S[r], retain_graph=True,
            allow_unused=True,
        ) if edges else ()  # fmt: skip
        g = {e: torch.zeros_like(calls[e[0]][e[1]][1]) if t is None else t
             for e, t in zip(edges, got, strict=True)}  # fmt: skip
        grads.append({
            k: _all_calls(modules[k], [g[k, i] for i in range(len(calls[k]))], f, "out",
                          average_groups)
            for k in names
        })  # fmt: skip
    return inputs, grads


def _all_calls(mod: Any, per_call: list[Tensor], f: Tensor, side: str, average: bool) -> Tensor:
    """Return a layer's ``(n, L, d)`` inputs (``side="in"``) or output gradients of all calls.

    Zeros at one position (in the dtype of the model's outputs ``f``) for a layer that was not
    called.
    """
    if side == "in":
        parts = [shared_inputs(mod, a, average) for a in per_call]
    else:
        parts = [shared_outputs(mod, g) for g in per_call]
    if parts:
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
    w = mod.weight.shape
    if side == "out":
        d = w[0]
    elif isinstance(mod, nn.Linear):
        d = w[1]
    else:  # a convolution's patches: every input channel, or a group's after averaging
        d = w[1] * (1 if average else mod.groups) * math.prod(w[2:])
    return f.new_zeros(f.shape[0], 1, d)


def _check_layer_gradients(
    modules: dict[str, nn.Module],
    layers: Layers,
    values: dict[str, Tensor],
    f: Tensor,
    calls: dict[str, list[tuple[Tensor, Tensor, Any]]],
) -> None:
    r"""Raise unless every selected layer's gradient is its output gradient times its input.

    KFAC's factors assume that a weight's gradient is :math:`c\sum g\,a^\top` over the
    layer's calls (``g`` at the layer's output ``W a + b``, ``c`` its ``multiplier``) and a
    bias's :math:`\sum g`. That fails silently for a subclass with its own ``forward``
    (``2 * super().forward(x)``), a weight also used outside the layer (tied weights), or a
    forward hook that reads the weight. One backward pass of a fixed random cotangent of the
    outputs compares both to autograd's parameter gradients, to :math:`\sqrt{\epsilon}` of
    :math:`\sum \|g\|(1 + \|a\|)` (:func:`_weight_gradient`).
    """
    gen = torch.Generator(device=f.device).manual_seed(0)
    d = torch.randn(f.shape, generator=gen, dtype=f.dtype, device=f.device)
    edges = [(k, i) for k in layers for i in range(len(calls[k]))]
    params = [p for pair in layers.values() for p in pair if p is not None]
    got = torch.autograd.grad(
        f, [calls[k][i][2] for k, i in edges] + [values[p] for p in params], grad_outputs=d,
        retain_graph=True, allow_unused=True,
    )  # fmt: skip
    out_grads = dict(zip(edges, got[: len(edges)], strict=True))
    param_grads = dict(zip(params, got[len(edges) :], strict=True))
    eps = torch.finfo(f.dtype).eps
    for k, (wn, bn) in layers.items():
        mod: Any = modules[k]
        c = forward_multiplier(mod)
        W = f.new_zeros(mod.weight.shape[0], math.prod(mod.weight.shape[1:]))
        B = f.new_zeros(mod.weight.shape[0])
        bound = 0.0
        for i, (a, _, _) in enumerate(calls[k]):
            g = out_grads[k, i]
            if g is None:
                continue
            dW, dB, norms = _weight_gradient(mod, a, g)
            W += c * dW
            B += dB
            bound += norms
        for name, ours in ((wn, W), (bn, B)):
            if name is None:
                continue
            ref = param_grads[name]
            ref = torch.zeros_like(ours) if ref is None else ref.reshape(ours.shape)
            err, scale = float((ours - ref).norm()), max(bound, float(ref.norm()), 1e-300)
            if err > math.sqrt(eps) * scale:
                raise ValueError(
                    f"params: the gradient of {name!r} is not layer {k or '(the model)'!r}'s "
                    f"output gradient times its input (relative difference {err / scale:.2g}): "
                    f"KFAC needs each selected {type(mod).__name__} to compute W x + b. A "
                    "subclass with its own forward, a weight also used outside the layer (tied "
                    "weights, nn.MultiheadAttention's out_proj) or a hook that changes how the "
                    "weight enters break that. Leave these parameters out with params=, or "
                    "give a layer computing c W x + b a 'multiplier' attribute"
                )


def _weight_gradient(mod: Any, a: Tensor, g: Tensor) -> tuple[Tensor, Tensor, float]:
    r"""Return a layer's weight and bias gradients from its input ``a`` and output gradient ``g``.

    As ``(out, in kh kw)`` and ``(out,)``, with :math:`\sum_{n,l} \|g_{nl}\|(1 +
    \|a_{nl}\|)` over the positions ``l`` sharing the weight (a bound on the rounding scale).
    A convolution's by its own weight-gradient kernel and patch norms by a convolution of
    :math:`a^2` with ones (no unfolded patches: they cost as much again as the factors).
    """
    if isinstance(mod, nn.Linear):
        a2, g2 = a.reshape(-1, a.shape[-1]), g.reshape(-1, g.shape[-1])
        norms = g2.norm(dim=1) * (1 + a2.norm(dim=1))
        return g2.mT @ a2, g2.sum(dim=0), float(norms.sum())
    a, padding = _padded(mod, a)
    kw = {"stride": mod.stride, "padding": padding, "dilation": mod.dilation}
    dW = nn.grad.conv2d_weight(a, mod.weight.shape, g, groups=mod.groups, **kw)
    ones = a.new_ones(1, a.shape[1], *mod.kernel_size)
    patch = nn.functional.conv2d(a * a, ones, **kw).clamp(min=0).sqrt()  # (n, 1, H', W')
    norms = g.pow(2).sum(dim=1, keepdim=True).sqrt() * (1 + patch)
    return dW.flatten(1), g.sum(dim=(0, 2, 3)), float(norms.sum())


def chain_batch(
    space: ParamSpace, layers: Layers, chain: Chain, x: Tensor, scaled: Any
) -> tuple[dict[str, Tensor], list[dict[str, Tensor]]]:
    """One batch's layer inputs and output gradients from the chain's stored forward pass.

    All factor columns go back through the chain at once, as ``(n, R, ...)`` cotangents.

    Raises
    ------
    ChainMismatch
        If the chain does not reproduce the model on ``x`` (the caller falls back to hooks).
    """
    xs, derivs, model_shape = forward_checked_chain(chain, x)
    modules = dict(space.model.named_modules())
    layer_of = {}
    for k, (wn, bn) in layers.items():
        for pn in (wn, bn):
            if pn is not None:
                layer_of[space.names.index(pn)] = k
    f = xs[-1]
    S = scaled(f.reshape(f.shape[0], *model_shape))
    n, R = f.shape[0], S.shape[0]
    g = S.transpose(0, 1)  # (n, R, d)
    owned = False  # whether g is a tensor of this loop's own (then updated in place)
    inputs: dict[str, Tensor] = {}
    outs: dict[str, Tensor] = {}
    for t in range(len(chain.steps) - 1, chain.first - 1, -1):
        st, xt = chain.steps[t], xs[t]
        if isinstance(st, Affine | Conv) and (st.w_index is not None or st.b_index is not None):
            k = layer_of[st.w_index if st.w_index is not None else st.b_index]  # type: ignore[index]
            if k in inputs:  # a layer used twice: the hooks' convention is not defined
                raise ChainMismatch(f"layer {k!r} appears twice in the chain")
            c = st.scale if isinstance(st, Affine) and st.w_index is not None else 1.0
            a = shared_inputs(modules[k], xt)
            inputs[k] = a if c == 1.0 else c * a
            outs[k], owned = g, False
        if t == chain.first:
            break
        if isinstance(st, Affine):
            o, i = st.weight.shape
            g, owned = (g.reshape(n * R, o) @ st.weight).view(n, R, i), True
            g = g if st.scale == 1.0 else g.mul_(st.scale)
        elif isinstance(st, Conv):
            o = st.weight.shape[0]
            flat = g.reshape(n * R, o, *g.shape[3:])
            g = st.input_grad((n * R, *xt.shape[1:]), st.weight, flat).view(n, R, *xt.shape[1:])
            owned = True
        elif isinstance(st, Pool):
            g, owned = st.adjoint(g, derivs[t], xt.shape), False  # may share g's memory
        elif isinstance(st, Flatten):
            g = g.reshape(n, R, *xt.shape[1:])  # a view of g if it can be: owned as g was
        elif st.derivs is None:
            g, owned = (g.mul_(st.scale) if owned else st.scale * g), True
        else:  # in place where g is this loop's own (a 16 MB product spared per layer)
            d = derivs[t][0].unsqueeze(1)
            g, owned = (g.mul_(d) if owned else g * d), True
    # (R, n, ...) views: the products of the factors read the strided columns (no copies)
    per_column = {k: g.transpose(0, 1) for k, g in outs.items()}
    grads = [{k: shared_outputs(modules[k], per_column[k][r]) for k in layers} for r in range(R)]
    return inputs, grads


def shared_inputs(mod: Any, a: Tensor, average_groups: bool = False) -> Tensor:
    """Return a layer's inputs as ``(n, L, d_in)``: the ``L`` positions sharing its weight.

    The unfolded patches of a ``Conv2d`` (channel-major: ``C_in kh kw``), the middle axes of a
    ``Linear`` on ``(n, ..., d_in)``. With ``average_groups`` a grouped convolution's input
    channels are first averaged over its groups (``C_in / G`` channels: curvlinops 3.0.1's
    approximation).
    """
    if isinstance(mod, nn.Linear):
        return a.reshape(a.shape[0], -1, a.shape[-1])
    if average_groups and mod.groups > 1:
        a = a.unflatten(1, (mod.groups, -1)).mean(dim=1)
    a, padding = _padded(mod, a)
    patches = nn.functional.unfold(
        a, mod.kernel_size, dilation=mod.dilation, padding=padding, stride=mod.stride
    )
    return patches.transpose(1, 2)


def _padded(mod: Any, a: Tensor) -> tuple[Tensor, Any]:
    """Return a convolution's input with string padding applied, and the integer padding left."""
    padding: Any = mod.padding
    if isinstance(padding, str):  # "valid": none; "same" (stride 1): torch's split, extra right
        total = [
            d * (k - 1) if padding == "same" else 0
            for d, k in zip(mod.dilation, mod.kernel_size, strict=True)
        ]
        a = nn.functional.pad(
            a, [total[1] // 2, total[1] - total[1] // 2, total[0] // 2, total[0] - total[0] // 2]
        )
        padding = 0
    return a, padding


def shared_outputs(mod: nn.Module, g: Tensor) -> Tensor:
    """Output gradients as ``(n, L, d_out)``, matching :func:`shared_inputs`."""
    if isinstance(mod, nn.Conv2d):
        return g.flatten(2).transpose(1, 2)
    return g.reshape(g.shape[0], -1, g.shape[-1])
