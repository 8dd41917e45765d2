"""Known defects of torch's derivatives, and how the operators work around or refuse them.

Each entry of :data:`KNOWN_DEFECTS` names a torch kernel whose first or second derivative is
missing or wrong in the torch this project pins (2.13), says what the operators do about it,
and is exercised by a regression test in ``tests/linops/test_zoo.py``. To add one: write the
entry, put the workaround (a context entered around every forward pass that builds a graph,
:func:`workarounds`) or the refusal here, and add the model that shows it to the zoo.

The workarounds change which kernels run inside the operators' own forward passes only: the
model, its modules and torch's global settings are as they were once a graph is built.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

__all__ = ["KNOWN_DEFECTS", "TorchDefect", "workarounds"]


@dataclass(frozen=True)
class TorchDefect:
    """One known defect: what breaks, and what the operators do instead."""

    name: str
    symptom: str
    handling: str


KNOWN_DEFECTS: tuple[TorchDefect, ...] = (
    TorchDefect(
        "flash attention has no double backward",
        "aten::_scaled_dot_product_flash_attention_for_cpu_backward has no derivative: every "
        "second-order product (and J v, which is a double backward here) through "
        "F.scaled_dot_product_attention, nn.MultiheadAttention or nn.Transformer* raises",
        "graphs are built under sdpa_kernel(SDPBackend.MATH), whose backward is differentiable",
    ),
    TorchDefect(
        "fused attention fast paths have no forward AD",
        "nn.MultiheadAttention's _native_multi_head_attention and nn.TransformerEncoderLayer's "
        "_transformer_encoder_layer_fwd raise under forward-mode AD",
        "graphs are built with torch.backends.mha fast paths disabled (restored afterwards)",
    ),
    TorchDefect(
        "weight_norm double backward is wrong",
        "the double backward of torch._weight_norm (parametrizations.weight_norm and the older "
        "nn.utils.weight_norm) gives Hessians off by 10-40% (first derivatives are right)",
        "torch._weight_norm is computed as v * g / ||v|| from differentiable primitives while "
        "a graph is built (a TorchFunctionMode, active only for models that use weight norm)",
    ),
    TorchDefect(
        "is_grads_batched lacks batching rules and fails through group_norm",
        "torch.autograd.grad(..., is_grads_batched=True) runs torch's older vmap, which raises "
        "a shape error on a GroupNorm's double backward and loops over the vectors inside "
        "layer_norm, softmax, gelu, batch_norm and convolution backward",
        "blocks go through torch.func.vmap over the backward pass, which batches all of these; "
        "an autograd-route operator whose batched pass still raises, or disagrees with a "
        "single-vector pass on its first batched product, computes one vector per pass from "
        "then on, says so in op.route and warns once",
    ),
    TorchDefect(
        "vmapped second derivatives are wrong through layer_norm",
        "torch.func's jvp(jacrev(f)) and jacrev(jacrev(f)) disagree with reverse-over-reverse "
        "and with finite differences through layer_norm (6-11% on a residual LayerNorm MLP)",
        "not used by the operators (retained-graph double backward, checked against finite "
        "differences); the tests' references avoid it (tests/linops/references.py)",
    ),
)


def _weight_norm(v: torch.Tensor, g: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """``torch._weight_norm`` from differentiable primitives: ``v * g / ||v||``.

    The norm is over every dimension but ``dim`` (over all of them for ``dim == -1``), as in
    ``torch.norm_except_dim``.
    """
    dims = list(range(v.dim())) if dim == -1 else [d for d in range(v.dim()) if d != dim % v.dim()]
    return v * (g / torch.linalg.vector_norm(v, dim=dims, keepdim=True))


class _ComposedWeightNorm(TorchFunctionMode):
    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Iterable[type],
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:  # whatever the intercepted torch function returns
        if func is torch._weight_norm:
            return _weight_norm(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


def uses_weight_norm(model: nn.Module) -> bool:
    """Whether a module of ``model`` computes a weight with ``torch._weight_norm``."""
    from torch.nn.utils.parametrizations import _WeightNorm
    from torch.nn.utils.weight_norm import WeightNorm

    for m in model.modules():
        if isinstance(m, _WeightNorm):
            return True
        if any(isinstance(h, WeightNorm) for h in m._forward_pre_hooks.values()):
            return True
    return False


@contextlib.contextmanager
def workarounds(model: nn.Module, *, weight_norm: bool | None = None) -> Iterator[None]:
    """Return the context every graph-building forward pass of ``model`` runs in.

    ``weight_norm``: whether the model uses weight norm (looked up when None).
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(sdpa_kernel(SDPBackend.MATH))
            if weight_norm if weight_norm is not None else uses_weight_norm(model):
                stack.enter_context(_ComposedWeightNorm())
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
