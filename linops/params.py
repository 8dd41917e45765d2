r"""Parameter spaces: which parameters an operator differentiates, and their flat ordering.

A :class:`ParamSpace` fixes a list of named parameters of a ``torch.nn.Module`` (all trainable
ones by default, or a subset such as one layer). The flat vector
:math:`\theta \in \mathbb{R}^m` concatenates them in that order, each flattened row-major.
Parameters outside the subset and all buffers (e.g. BatchNorm statistics) are held fixed at
their values in the model. A model that returns a tuple, a dict or an output object is read
through an ``output`` selector (``lambda out: out.logits``). A model called with keyword
inputs (``model(**batch)``, as Hugging Face models are) receives them as
:class:`KeywordInputs`.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from linops._defects import (
    CHECKPOINT_ELSEWHERE,
    REENTRANT_REFUSAL,
    REENTRANT_WARNING,
    CheckpointWatch,
    ComposedKernels,
    needs_composition,
    workarounds,
)
from linops._types import Device, Params

__all__ = ["KeywordInputs", "ParamSpace"]


class KeywordInputs:
    """One batch of keyword inputs: the model is called as ``model(**inputs)``.

    The tensors share a leading batch dimension of ``len(inputs)`` samples (tensors without
    it, and values that are not tensors such as flags, are passed as they are). Slicing
    (``inputs[:8]``) slices every batched tensor; ``inputs["attention_mask"]`` is one value.

    Parameters
    ----------
    values
        Keyword arguments of the model, by name.

    Raises
    ------
    ValueError
        If no value is a tensor with a leading (batch) dimension, or two batched tensors
        disagree on it.
    """

    def __init__(self, values: Mapping[str, Any]) -> None:
        self.values = dict(values)
        sized = {k: v for k, v in self.values.items() if isinstance(v, torch.Tensor) and v.dim()}
        if not sized:
            raise ValueError(
                f"data: expected keyword inputs with at least one tensor of shape (n, ...), got "
                f"keys {list(self.values)} without one"
            )
        first = next(iter(sized.values()))
        lengths = {k: v.shape[0] for k, v in sized.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(
                f"data: expected keyword inputs with the same number of samples, got {lengths}"
            )
        self.num_samples: int = first.shape[0]
        self._first = first

    def __len__(self) -> int:
        """Return the number of samples."""
        return self.num_samples

    @property
    def shape(self) -> torch.Size:
        """Return the shape of the first batched tensor (its first entry is the sample count)."""
        return self._first.shape

    @property
    def dtype(self) -> torch.dtype:
        """Return the dtype of the first batched tensor."""
        return self._first.dtype

    @property
    def device(self) -> torch.device:
        """Return the device of the first batched tensor."""
        return self._first.device

    def keys(self) -> list[str]:
        """Return the names of the keyword inputs."""
        return list(self.values)

    def __getitem__(self, index: Any) -> Any:
        """Return one value by name, or the batch sliced along its samples."""
        if isinstance(index, str):
            return self.values[index]
        n = self.num_samples
        return KeywordInputs(
            {
                k: v[index] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == n else v
                for k, v in self.values.items()
            }
        )

    def __repr__(self) -> str:
        """Return the names and shapes of the inputs."""
        shapes = {
            k: tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            for k, v in self.values.items()
        }
        return f"KeywordInputs({shapes})"


class ParamSpace:
    """Named parameters of a model, flattened into one vector.

    Parameters
    ----------
    model
        The module whose parameters are differentiated.
    params
        ``None`` (all parameters with ``requires_grad``); a submodule of the model (all its
        trainable parameters); a sequence of parameter names (``"0.weight"``), name prefixes
        of submodules (``"2"`` or ``"encoder.layers.0"``: their trainable parameters), the
        model's parameter tensors or submodules; or a mapping from names to tensors (values
        override the model's, e.g. a point other than the current one).
    output
        Selects the tensor to differentiate from what the model returns (``lambda out:
        out[0]``, ``lambda out: out["logits"]``, ``lambda out: out.logits``); default: the
        return value, which must then be a tensor.

    Raises
    ------
    ValueError
        If the model has no trainable parameters, or ``params`` names or holds a tensor that
        is not a parameter of the model.
    TypeError
        If ``output`` is not callable, or ``params`` holds something that is neither a name,
        a tensor nor a module.

    Examples
    --------
    >>> import torch
    >>> space = ParamSpace(torch.nn.Linear(3, 2))
    >>> space.names, space.dim
    (['weight', 'bias'], 8)
    """

    def __init__(
        self,
        model: torch.nn.Module,
        params: Params | None = None,
        *,
        output: Callable[[Any], torch.Tensor] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        if output is not None and not callable(output):
            raise TypeError(
                f"output: expected a callable selecting a tensor, got {type(output).__name__}"
            )
        named = dict(model.named_parameters())
        if isinstance(params, str | nn.Module | torch.Tensor):
            params = [params]
        if params is None:
            names = [n for n, p in named.items() if p.requires_grad]
            if not names:
                raise ValueError("model: expected at least one trainable parameter, got none")
            values: dict[str, torch.Tensor] = {n: named[n] for n in names}
        elif isinstance(params, Mapping):
            aliases = _aliases(model, named)
            values = {aliases.get(n, n): v for n, v in params.items()}
            _check_names(values, named)
        else:
            values = _resolve(list(params), named, model)
        if not values:
            raise ValueError("params: expected at least one parameter, got an empty selection")
        self.model = model
        self.names: list[str] = list(values)
        self.shapes: list[torch.Size] = [values[n].shape for n in self.names]
        self.numels: list[int] = [values[n].numel() for n in self.names]
        self.dim: int = sum(self.numels)
        self._values = {n: v.detach() for n, v in values.items()}
        # torch.func.functional_call (2.13) corrupts a model in which one module is registered
        # twice (nn.Sequential(lin, act, lin)): the module keeps the passed tensors afterwards
        self._shared_modules = len(list(model.named_modules(remove_duplicate=False))) != len(
            list(model.named_modules())
        )
        self.output = output
        # whether forward passes compute functions with broken derivatives from primitives
        # (linops._defects); None: not known until a forward pass has run
        self._compose: bool | None = True if needs_composition(model) else None
        # whether the forward runs non-reentrant activation checkpointing; None: not known yet
        self._checkpointed: bool | None = None

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the parameter values (that of the first parameter)."""
        return self._values[self.names[0]].dtype

    @property
    def device(self) -> torch.device:
        """The device of the parameter values (that of the first parameter)."""
        return self._values[self.names[0]].device

    def values(self) -> dict[str, torch.Tensor]:
        """Return the parameter values (detached) this space was built with, by name."""
        return dict(self._values)

    def flat_values(self) -> torch.Tensor:
        """Return the parameter values as one flat vector of length :attr:`dim`."""
        return self.flatten(self._values)

    def flatten(self, tensors: Mapping[str, torch.Tensor] | Sequence[torch.Tensor]) -> torch.Tensor:
        """Concatenate parameter-shaped tensors into a flat ``(m,)`` vector.

        With a leading batch dimension (each tensor ``(k, *shape)``) the result is ``(m, k)``.
        """
        ts = [tensors[n] for n in self.names] if isinstance(tensors, Mapping) else list(tensors)
        if len(ts) != len(self.names):
            raise ValueError(f"expected {len(self.names)} tensors, got {len(ts)}")
        if isinstance(tensors, BlockViews):  # views of one block: that block, not a copy
            return tensors.block
        batched = ts[0].dim() == len(self.shapes[0]) + 1
        if batched:
            return torch.cat([t.reshape(t.shape[0], -1) for t in ts], dim=1).T
        return torch.cat([t.reshape(-1) for t in ts])

    def unflatten(self, vec: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split a flat ``(m,)`` vector into parameter-shaped tensors (views), by name.

        A matrix ``(m, k)`` gives tensors of shape ``(k, *shape)`` (batch first, as ``vmap``
        expects).
        """
        if vec.shape[0] != self.dim:
            raise ValueError(
                f"expected a vector of length {self.dim} (the parameter count), got {vec.shape[0]}"
            )
        parts = torch.split(vec, self.numels, dim=0)
        if vec.dim() == 1:
            return {n: p.view(s) for n, p, s in zip(self.names, parts, self.shapes, strict=True)}
        k = vec.shape[1]
        return {
            n: p.T.reshape(k, *s) for n, p, s in zip(self.names, parts, self.shapes, strict=True)
        }

    def functional_call(
        self, values: Mapping[str, torch.Tensor], *args: Any, twice: bool = False
    ) -> Any:
        """Call the model with ``values`` in place of the selected parameters.

        Parameters outside the space and buffers keep their values in the model, which is left
        as it was (also when a module appears in it twice). The call runs in the context that
        works around torch's known derivative defects (:mod:`linops._defects`), and the
        ``output`` selector picks the tensor from what the model returns. ``twice``: the graph
        of this call will be differentiated twice in reverse mode (a Hessian's), which batch
        norm in eval mode takes as its affine map (``linops._defects.workarounds``).

        Raises
        ------
        TypeError
            If the (selected) output is not a tensor.
        NotImplementedError
            If the forward runs a reentrant checkpoint, or a non-reentrant one while ``values``
            differ from the model's own parameters (its recomputation reads those).
        """
        # without grad, checkpoint() runs its block plainly and nothing is recomputed: a
        # pass without grad neither tells nor needs to know (nor pays for the watch)
        grad = torch.is_grad_enabled()
        watching = grad and self._checkpointed is None
        watch = CheckpointWatch() if watching else contextlib.nullcontext()
        with watch:
            out = self._first_or_later_call(values, args, twice)
        if isinstance(watch, CheckpointWatch):
            self._checkpointed = watch.seen
        if self._checkpointed and grad:
            self._refuse_other_values(values)
        if self.output is not None:
            out = self.output(out)
            if not isinstance(out, torch.Tensor):
                raise TypeError(
                    f"output: expected the selector to return a tensor, got {_kind(out)}"
                )
        elif not isinstance(out, torch.Tensor):
            raise TypeError(
                f"model: expected the forward pass to return a tensor, got {_kind(out)}; pass "
                "output= to select the tensor to differentiate (e.g. output=lambda out: out[0] "
                "or output=lambda out: out.logits)"
            )
        return out

    def _first_or_later_call(
        self, values: Mapping[str, torch.Tensor], args: tuple[Any, ...], twice: bool
    ) -> Any:
        """Return the model's output (the first pass finds out whether it needs composition)."""
        if self._compose is not None:
            return self._call(values, args, compose=self._compose, twice=twice)
        with warnings.catch_warnings(record=True) as caught, ComposedKernels(False) as seen:
            warnings.simplefilter("always")
            out = self._call(values, args, compose=False, twice=twice)
        for w in caught:
            if REENTRANT_WARNING in str(w.message):
                raise NotImplementedError(f"model: {REENTRANT_REFUSAL}")
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        self._compose = seen.seen
        if self._compose:
            out = self._call(values, args, compose=True, twice=twice)
        return out

    def _refuse_other_values(self, values: Mapping[str, torch.Tensor]) -> None:
        """Refuse ``values`` other than the model's own parameters (a checkpointing model)."""
        live = dict(self.model.named_parameters(remove_duplicate=False))
        for name, v in values.items():
            p = live.get(name)
            if p is None or p is v:
                continue
            if (p.dtype, p.device, p.shape) != (v.dtype, v.device, v.shape):
                detail = f"{name} is {v.dtype} on {v.device}, the model's {p.dtype} on {p.device}"
            elif (p.data_ptr(), p.stride()) == (v.data_ptr(), v.stride()) or torch.equal(
                p.detach(), v.detach()
            ):
                continue
            else:
                detail = f"{name} differs from the model's own value"
            raise NotImplementedError(f"model: {CHECKPOINT_ELSEWHERE.format(detail=detail)}")

    def _call(
        self,
        values: Mapping[str, torch.Tensor],
        args: tuple[Any, ...],
        compose: bool,
        twice: bool = False,
    ) -> Any:
        with workarounds(self.model, compose=compose, twice=twice):
            # a module in training mode (allow_train_mode=True) updates its running statistics
            # in place: it updates copies, so the user's model is never changed by a product
            kept = _training_buffers(self.model)
            positional: tuple[Any, ...] = args
            kwargs: dict[str, Any] = {}
            if len(args) == 1 and isinstance(args[0], KeywordInputs):
                positional, kwargs = (), args[0].values
            if self._shared_modules:
                return _call_swapped(self.model, values, positional, kept, kwargs)
            return functional_call(self.model, {**values, **kept}, positional, kwargs)

    def to(self, dtype: torch.dtype | None = None, device: Device | None = None) -> ParamSpace:
        """Return a copy of the space whose reference values live in another dtype or device."""
        new = object.__new__(ParamSpace)
        new.__dict__.update(self.__dict__)
        new._values = {n: v.to(dtype=dtype, device=device) for n, v in self._values.items()}
        return new


def _training_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Return copies of the buffers of modules in training mode (empty in eval mode)."""
    if not any(m.training for m in model.modules()):
        return {}
    return {
        n: b.clone()
        for mod_name, mod in model.named_modules()
        if mod.training
        for n, b in ((f"{mod_name}.{k}" if mod_name else k, b) for k, b in mod._buffers.items())
        if b is not None
    }


def _call_swapped(
    model: torch.nn.Module,
    params: Mapping[str, torch.Tensor],
    args: Any,
    buffers: Mapping[str, torch.Tensor],
    kwargs: Mapping[str, Any],
) -> Any:
    """``model(*args, **kwargs)`` with ``params`` in place of the named parameters, restored afterwards.

    Every slot holding one of the named parameters is swapped, so modules registered twice and
    parameters tied between modules see the same tensor, as with ``functional_call``.
    """
    named = dict(model.named_parameters())
    new = {id(named[n]): v for n, v in params.items()}
    slots = [
        (mod, key, p)
        for mod in model.modules()  # each module once
        for key, p in mod._parameters.items()
        if p is not None and id(p) in new
    ]
    saved = {n: b.clone() for n, b in model.named_buffers() if n in buffers}
    try:
        for mod, key, p in slots:
            mod._parameters[key] = new[id(p)]  # type: ignore[assignment]  # a plain tensor
        return model(*args, **kwargs)
    finally:
        for mod, key, p in slots:
            mod._parameters[key] = p
        with torch.no_grad():
            for n, b in model.named_buffers():
                if n in saved:
                    b.copy_(saved[n])


def _aliases(model: nn.Module, named: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Map the other names of tied parameters (``lm_head.weight``) to the name ``named`` uses."""
    by_id = {id(p): n for n, p in named.items()}
    return {
        n: by_id[id(p)]
        for n, p in model.named_parameters(remove_duplicate=False)
        if n not in named and id(p) in by_id
    }


def _check_names(values: Mapping[str, torch.Tensor], named: Mapping[str, Any]) -> None:
    unknown = [n for n in values if n not in named]
    if unknown:
        raise ValueError(
            f"params: {unknown} are not parameters of the model; expected names among {list(named)}"
        )
    for n, v in values.items():
        if tuple(v.shape) != tuple(named[n].shape):
            raise ValueError(
                f"params[{n!r}]: expected shape {tuple(named[n].shape)}, got {tuple(v.shape)}"
            )


def _kind(out: Any) -> str:
    if isinstance(out, tuple | list):
        return f"a {type(out).__name__} of {len(out)}"
    if isinstance(out, Mapping):
        return f"a {type(out).__name__} with keys {list(out)}"
    return f"a {type(out).__name__}"


def _resolve(
    items: Iterable[Any], named: Mapping[str, torch.Tensor], model: nn.Module
) -> dict[str, torch.Tensor]:
    by_id = {id(p): n for n, p in named.items()}
    modules = dict(model.named_modules())
    aliases = _aliases(model, named)
    values: dict[str, torch.Tensor] = {}
    for item in items:
        if isinstance(item, str) and item not in named:
            if item in aliases:  # a tied parameter by its second name: the same tensor
                item = aliases[item]
            elif item in modules:
                item = modules[item]
            else:
                raise ValueError(
                    f"params: {item!r} is neither a parameter nor a submodule of the model; "
                    f"expected names among {list(named)} or a prefix such as "
                    f"{sorted({n.rsplit('.', 1)[0] for n in named if '.' in n})[:8]}"
                )
        if isinstance(item, nn.Module):
            found = [by_id.get(id(p)) for p in item.parameters() if p.requires_grad]
            if not found or None in found:
                raise ValueError(
                    f"params: expected a submodule of the model with trainable parameters, got "
                    f"a {type(item).__name__} "
                    + ("without any" if not found else "that is not part of the model")
                )
            values.update({n: named[n] for n in found if n is not None})
        elif isinstance(item, str):
            values[item] = named[item]
        elif isinstance(item, torch.Tensor):
            if id(item) not in by_id:
                raise ValueError(
                    "params: a tensor of shape "
                    f"{tuple(item.shape)} does not belong to the model's parameters"
                )
            values[by_id[id(item)]] = item
        else:
            raise TypeError(
                f"params: expected names, tensors or modules, got {type(item).__name__}"
            )
    return values


class BlockViews(list[torch.Tensor]):
    """The parameter-shaped views ``(k, *shape)`` of one new ``(m, k)`` block (``.block``).

    A running sum or a product's result laid out in place: :meth:`ParamSpace.flatten` returns
    ``.block`` itself for it instead of concatenating a copy. Made only around a block that
    nothing else references (never around a caller's input, which a join would then alias).
    """

    def __init__(self, space: ParamSpace, block: torch.Tensor) -> None:
        super().__init__(space.unflatten(block).values())
        self.block = block


def listed(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Return parameter-shaped tensors as a list (:class:`BlockViews` stay views of a block)."""
    return tensors if isinstance(tensors, BlockViews) else list(tensors)
