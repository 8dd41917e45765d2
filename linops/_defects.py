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

from linops._double_backward import covered, has_convolution

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
        "cdist, pdist and embedding_bag have no second derivative",
        "torch.cdist, F.pdist and F.embedding_bag (nn.EmbeddingBag) have neither a double "
        "backward nor forward AD: every Hessian, GGN and J v product through them raises",
        "while a graph is built they are computed from differentiable primitives (a "
        "TorchFunctionMode, active only for models that call them): cdist and pdist as "
        "vector_norm of the pairwise differences (exact, and O(P R M) memory instead of "
        "cdist's O(P R)), embedding_bag as embedding followed by the bag's sum, mean or max; "
        "embedding_bag with max_norm (which renormalises the weight in place) is refused",
    ),
    TorchDefect(
        "batch_norm's double backward in eval mode does training-mode work, without a batching rule",
        "in eval mode (running statistics) batch norm is an affine map per channel, but the "
        "double backward of native_batch_norm evaluates the training-mode formula's terms "
        "(a fifth of a CIFAR ResNet-20's Hessian product), and vmap has no batching rule for "
        "native_batch_norm_backward: a block pass loops over its vectors",
        "while a graph that is differentiated twice in reverse mode is built (a Hessian's: "
        "the gradient's graph), F.batch_norm with training=False is computed as "
        "input * scale + shift (scale = weight / sqrt(running_var + eps), shift = bias - "
        "running_mean * scale), the formula of torch's own CPU inference kernel, from "
        "batchable primitives (a TorchFunctionMode, active for models with a batch norm "
        "module in eval mode); training mode, and first-derivative and forward-mode graphs "
        "(where torch's fused kernels are faster), are left to torch",
    ),
    TorchDefect(
        "once-differentiable Functions have a silently zero second derivative",
        "a custom autograd.Function whose backward is marked @once_differentiable gets an "
        "Error node that is never run: a double backward through it returns zeros (with "
        "allow_unused) instead of raising",
        "H, GGN and J v products refuse it at the first product "
        "(linops._autodiff.refuse_once_differentiable); J^T v, a first derivative, works",
    ),
    TorchDefect(
        "reentrant checkpoints hide their parameters from autograd.grad",
        "torch.utils.checkpoint.checkpoint(use_reentrant=True) on inputs that do not require "
        "grad returns outputs without a graph (torch only warns): every derivative with "
        "respect to the parameters inside is silently zero; on inputs that do, "
        "torch.autograd.grad raises",
        "refused at the first forward pass (linops.params.ParamSpace.functional_call) or "
        "product, asking for use_reentrant=False, whose products are exact at the model's own "
        "parameters; at other values (params=, dtype=, finite differences) its recomputation "
        "reads the module's parameters, so those are refused (CHECKPOINT_ELSEWHERE)",
    ),
    TorchDefect(
        "vmapped second derivatives are wrong through layer_norm",
        "torch.func's jvp(jacrev(f)) and jacrev(jacrev(f)) disagree with reverse-over-reverse "
        "and with finite differences through layer_norm (6-11% on a residual LayerNorm MLP)",
        "not used by the operators (retained-graph double backward, checked against finite "
        "differences); the tests' references avoid it (tests/linops/references.py)",
    ),
)


#: how torch shows a reentrant checkpoint: its warning when no input of the checkpointed function
#: requires grad (the parameters inside then get no derivative), and its error when
#: torch.autograd.grad meets one
REENTRANT_WARNING = "None of the inputs have requires_grad=True"
REENTRANT_ERROR = "Checkpointing is not compatible with .grad()"
#: the refusal of both (KNOWN_DEFECTS)
REENTRANT_REFUSAL = (
    "the model runs torch.utils.checkpoint.checkpoint with use_reentrant=True, which hides "
    "the parameters inside the checkpointed function from torch.autograd.grad (their "
    "derivatives would be silently zero, or torch raises); pass use_reentrant=False"
)


#: the refusal of a product of a checkpointing model at values other than its own parameters
CHECKPOINT_ELSEWHERE = (
    "the model runs torch.utils.checkpoint.checkpoint (use_reentrant=False), which recomputes "
    "the checkpointed blocks during the backward pass from the module's own parameters, not "
    "from the values a product is evaluated at; here {detail}, so the products would be wrong. "
    "Evaluate at the model's own parameters: load the values into the model (load_state_dict "
    "or torch.nn.utils.vector_to_parameters) instead of passing params=, convert the model "
    "itself (model.double()) instead of passing dtype=, and keep OutputHessianOperator's "
    "default method instead of 'finite_difference'"
)


def _saved_tensor_hooks() -> tuple[Any, Any] | None:
    """Return the innermost saved-tensor hooks ``(pack, unpack)``, or None.

    None while dynamo traces a compiled model: it cannot trace the C function that reads them
    (a graph break and a UserWarning at every call).
    """
    if torch.compiler.is_compiling():
        return None
    hooks: tuple[Any, Any] | None = torch._C._autograd._top_saved_tensors_default_hooks(False)
    return hooks


class CheckpointWatch(TorchFunctionMode):
    """Notes whether a torch function runs under non-reentrant activation checkpointing.

    ``torch.utils.checkpoint.checkpoint(use_reentrant=False)`` runs the block under its own
    saved-tensor hooks (``.seen`` after the code run inside).
    """

    def __init__(self) -> None:
        super().__init__()
        self.seen = False

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Iterable[type],
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:  # whatever the intercepted torch function returns
        if not self.seen:
            hooks = _saved_tensor_hooks()
            pack = None if hooks is None else hooks[0]
            self.seen = getattr(pack, "__module__", None) == "torch.utils.checkpoint"
        return func(*args, **(kwargs or {}))


def _weight_norm(v: torch.Tensor, g: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """``torch._weight_norm`` from differentiable primitives: ``v * g / ||v||``.

    The norm is over every dimension but ``dim`` (over all of them for ``dim == -1``), as in
    ``torch.norm_except_dim``.
    """
    dims = list(range(v.dim())) if dim == -1 else [d for d in range(v.dim()) if d != dim % v.dim()]
    return v * (g / torch.linalg.vector_norm(v, dim=dims, keepdim=True))


def _cdist(x1: torch.Tensor, x2: torch.Tensor, p: float = 2.0, compute_mode: Any = None) -> Any:
    """``torch.cdist`` as the ``p``-norm of the pairwise differences (differentiable twice)."""
    return torch.linalg.vector_norm(x1.unsqueeze(-2) - x2.unsqueeze(-3), ord=p, dim=-1)


def _pdist(x: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """``F.pdist``: the ``p``-norm distances of the rows ``i < j``, in row-major order."""
    i, j = torch.triu_indices(x.shape[0], x.shape[0], 1, device=x.device)
    return torch.linalg.vector_norm(x[i] - x[j], ord=p, dim=-1)


def _embedding_bag(
    input: torch.Tensor,
    weight: torch.Tensor,
    offsets: torch.Tensor | None = None,
    max_norm: float | None = None,
    norm_type: float = 2,
    scale_grad_by_freq: bool = False,
    mode: str = "mean",
    sparse: bool = False,
    per_sample_weights: torch.Tensor | None = None,
    include_last_offset: bool = False,
    padding_idx: int | None = None,
) -> torch.Tensor:
    """``F.embedding_bag`` as ``F.embedding`` followed by each bag's sum, mean or max.

    Indices equal to ``padding_idx`` are left out of their bag; an empty bag gives zeros, as
    in ``F.embedding_bag``.
    """
    if max_norm is not None:
        raise NotImplementedError(
            "embedding_bag with max_norm renormalises the embedding weight in place, which a "
            "product cannot differentiate; rescale the weight outside the model instead"
        )
    if input.dim() == 2:
        n, per = input.shape
        bags = torch.arange(n, device=input.device).repeat_interleave(per)
        input = input.reshape(-1)
        if per_sample_weights is not None:
            per_sample_weights = per_sample_weights.reshape(-1)
    else:
        assert offsets is not None
        n = offsets.numel() - 1 if include_last_offset else offsets.numel()
        ends = torch.cat([offsets[1:n], offsets.new_tensor([input.numel()])])
        bags = torch.arange(n, device=input.device).repeat_interleave(ends - offsets[:n])
    rows = torch.nn.functional.embedding(input, weight, scale_grad_by_freq=scale_grad_by_freq)
    keep = torch.ones_like(input, dtype=torch.bool) if padding_idx is None else input != padding_idx
    if per_sample_weights is not None:
        rows = rows * per_sample_weights.unsqueeze(-1)
    rows, bags = rows[keep], bags[keep]
    out = rows.new_zeros(n, weight.shape[1])
    if mode == "max":
        index = bags.unsqueeze(-1).expand_as(rows)
        return out.scatter_reduce(0, index, rows, "amax", include_self=False)
    out = out.index_add(0, bags, rows)
    if mode == "mean":
        counts = torch.bincount(bags, minlength=n).clamp(min=1).to(out.dtype)
        out = out / counts.unsqueeze(-1)
    return out


#: torch functions computed from differentiable primitives while a graph is built
_COMPOSED: dict[Callable[..., Any], Callable[..., Any]] = {
    torch._weight_norm: _weight_norm,
    torch.cdist: _cdist,
    torch.pdist: _pdist,
    torch.nn.functional.pdist: _pdist,
    torch.nn.functional.embedding_bag: _embedding_bag,
}


class ComposedKernels(TorchFunctionMode):
    """Compute the functions of :data:`_COMPOSED` from primitives (``compose``), noting calls.

    ``.seen`` says whether the code run inside called one of them; with ``compose=False``
    they run as torch's own (the first forward pass of a model, to find out). ``twice``: also
    compute batch norm in eval mode and convolutions as :mod:`linops._double_backward` does,
    for a graph that is differentiated twice in reverse mode.
    """

    def __init__(self, compose: bool = True, twice: bool = False) -> None:
        super().__init__()
        self.compose, self.twice, self.seen = compose, twice, False

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Iterable[type],
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:  # whatever the intercepted torch function returns
        kwargs = kwargs or {}
        composed = _COMPOSED.get(func)
        if composed is not None:
            self.seen = True
            if self.compose:
                func = composed
        elif self.twice and (replacement := covered(func, args, kwargs)) is not None:
            # not under saved-tensor hooks: activation checkpointing recomputes outside this
            # mode, with torch's kernels, and needs them to save what the first pass saved
            if _saved_tensor_hooks() is None:
                func = replacement
        return func(*args, **kwargs)


def needs_composition(model: nn.Module) -> bool:
    """Whether a module of ``model`` is known to call a function of :data:`_COMPOSED`.

    Weight norm (either API) and ``nn.EmbeddingBag``; plain calls of ``torch.cdist`` and the
    like in a ``forward`` are found by running it under :class:`ComposedKernels` with ``compose=False``.
    """
    return uses_weight_norm(model) or any(isinstance(m, nn.EmbeddingBag) for m in model.modules())


def has_double_backward_kernels(model: nn.Module) -> bool:
    """Whether ``model`` has a module :mod:`linops._double_backward` computes differently.

    A batch norm module in eval mode or a convolution (not transposed).
    """
    return has_convolution(model) or any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) and not m.training for m in model.modules()
    )


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
def workarounds(
    model: nn.Module,
    *,
    compose: bool | None = None,
    weight_norm: bool | None = None,
    twice: bool = False,
) -> Iterator[None]:
    """Return the context every graph-building forward pass of ``model`` runs in.

    ``compose``: whether to compute the functions whose derivatives are broken or missing
    (weight norm, cdist, pdist, embedding_bag; see :data:`KNOWN_DEFECTS`) from differentiable
    primitives; looked up from the model's modules when None (:func:`needs_composition`).
    ``weight_norm`` is an older name for ``compose``. ``twice``: the graph will be
    differentiated twice in reverse mode (a Hessian's), so batch norm in eval mode and
    convolutions take kernels whose double backward is cheaper (:mod:`linops._double_backward`;
    for models with such modules).
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(sdpa_kernel(SDPBackend.MATH))
            if compose is None:
                compose = weight_norm
            if compose is None:
                compose = needs_composition(model)
            twice = twice and has_double_backward_kernels(model)
            if compose or twice:
                stack.enter_context(ComposedKernels(compose, twice))
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
