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

from typing import Any

import torch
from torch import nn

from linops._chain import Chain, ChainMismatch
from linops._chain import _forward_checked as forward_checked_chain
from linops._layers import Affine, Conv, Flatten, Pool
from linops.params import ParamSpace

__all__ = ["Layers", "chain_batch", "hook_batch", "shared_inputs", "shared_outputs"]

Tensor = torch.Tensor
#: module name -> (weight name, bias name), either None when not selected
Layers = dict[str, tuple[str | None, str | None]]


def hook_batch(
    space: ParamSpace, layers: Layers, x: Any, scaled: Any, *, average_groups: bool = False
) -> tuple[dict[str, Tensor], list[dict[str, Tensor]]]:
    """One batch's layer inputs and output gradients from module hooks and autograd.

    ``average_groups``: a grouped convolution's input channels averaged over its groups
    (:func:`shared_inputs`).
    """
    modules = dict(space.model.named_modules())
    names = list(layers)
    inputs: dict[str, Tensor] = {}
    outputs: dict[str, Tensor] = {}
    hooks = []
    for name in names:

        def hook(
            mod: nn.Module, args: Any, out: Tensor, name: str = name,
        ) -> None:  # fmt: skip
            inputs[name], outputs[name] = args[0].detach(), out

        hooks.append(modules[name].register_forward_hook(hook))
    try:
        with torch.enable_grad():
            values = space.values().items()
            f = space.functional_call({k: v.detach().requires_grad_(True) for k, v in values}, x)
    finally:
        for h in hooks:
            h.remove()
    for k in names:
        c = float(getattr(modules[k], "multiplier", 1.0)) if layers[k][0] else 1.0
        a = shared_inputs(modules[k], inputs[k], average_groups)  # (n, L, d_in): L positions
        inputs[k] = a if c == 1.0 else c * a
    S = scaled(f)
    f2 = f.reshape(f.shape[0], -1)
    grads = [
        {k: shared_outputs(modules[k], g) for k, g in zip(names, torch.autograd.grad(
            f2, [outputs[k] for k in names], grad_outputs=S[r], retain_graph=True
        ), strict=True)}
        for r in range(S.shape[0])
    ]  # fmt: skip
    return inputs, grads


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
    patches = nn.functional.unfold(
        a, mod.kernel_size, dilation=mod.dilation, padding=padding, stride=mod.stride
    )
    return patches.transpose(1, 2)


def shared_outputs(mod: nn.Module, g: Tensor) -> Tensor:
    """Output gradients as ``(n, L, d_out)``, matching :func:`shared_inputs`."""
    if isinstance(mod, nn.Conv2d):
        return g.flatten(2).transpose(1, 2)
    return g.reshape(g.shape[0], -1, g.shape[-1])
