"""Shared plumbing of the reference-set and Jacobian-rank modules.

Input and index checks, and the full Jacobian in bounded per-sample blocks
(``vmap(jacrev)``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.func import functional_call, jacrev, vmap

from linops import Params
from linops.params import ParamSpace

#: Bound on the per-sample Jacobian block held at once (bytes).
PER_SAMPLE_BYTES = 256 * 2**20


def check_size(r: object, m: int) -> int:
    if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= m:
        raise ValueError(f"r: expected an integer in [1, {m}] (the parameter count), got {r!r}")
    return r


def check_indices(indices: Sequence[int] | torch.Tensor, m: int) -> torch.Tensor:
    idx = torch.as_tensor(indices)
    if idx.dtype.is_floating_point or idx.dtype == torch.bool or idx.ndim != 1 or idx.numel() == 0:
        raise ValueError(
            "indices: expected a non-empty 1-d sequence of integer parameter indices, got "
            f"dtype {idx.dtype} and shape {tuple(idx.shape)}"
        )
    idx = idx.to(torch.long).cpu()
    if int(idx.min()) < 0 or int(idx.max()) >= m:
        raise ValueError(
            f"indices: expected values in [0, {m - 1}], got range [{int(idx.min())}, "
            f"{int(idx.max())}]"
        )
    if torch.unique(idx).numel() != idx.numel():
        raise ValueError("indices: expected distinct parameter indices, got repeats")
    return idx


def inputs_tensor(inputs: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """Return the inputs as one tensor: a tensor, or the ``X`` of an ``(X, y)`` pair.

    A list or tuple is an ``(X, y)`` pair (a DataLoader's batch is a list ``[X, y]``), whose
    ``y`` is not used. Two tensors of different lengths, or more than two, are batches, which
    are refused (the second batch was dropped silently): pass them concatenated.
    """
    if isinstance(inputs, tuple | list) and inputs and isinstance(inputs[0], torch.Tensor):
        lengths = [len(t) if isinstance(t, torch.Tensor) and t.ndim else None for t in inputs]
        if len(inputs) > 2 or (len(inputs) == 2 and lengths[1] not in (None, lengths[0])):
            raise ValueError(
                f"inputs: a list or tuple is read as an (X, y) pair, got {len(inputs)} entries "
                f"of lengths {lengths}; for batches of inputs pass them as one tensor "
                "(torch.cat(batches))"
            )
        inputs = inputs[0]
    if not isinstance(inputs, torch.Tensor):
        raise TypeError(
            f"inputs: expected a tensor or an (X, y) pair of tensors, got {type(inputs).__name__}"
        )
    if inputs.ndim < 1 or len(inputs) == 0:
        raise ValueError(f"inputs: expected at least one sample, got shape {tuple(inputs.shape)}")
    return inputs


def param_space(
    model: torch.nn.Module, params: Params | None, dtype: torch.dtype | None
) -> ParamSpace:
    space = ParamSpace(model, params)
    return space.to(dtype=dtype) if dtype is not None else space


def num_outputs(space: ParamSpace, X: torch.Tensor, output_index: int | None) -> int:
    with torch.no_grad():
        d = space.functional_call(space.values(), X[:1]).reshape(1, -1).shape[1]
    if output_index is not None and (
        isinstance(output_index, bool) or not isinstance(output_index, int)
    ):
        raise TypeError(f"output_index: expected an int or None, got {type(output_index).__name__}")
    if output_index is not None and not 0 <= output_index < d:
        raise ValueError(f"output_index: expected an integer in [0, {d - 1}], got {output_index}")
    return 1 if output_index is not None else d


def per_sample_blocks(
    space: ParamSpace, X: torch.Tensor, output_index: int | None, d: int
) -> Iterator[torch.Tensor]:
    """Yield ``(rows, m)`` blocks of the full Jacobian, sample-major, via ``vmap(jacrev)``."""
    params = space.values()
    model = space.model

    def f(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, p, (x[None],)).reshape(-1)
        return out if output_index is None else out[output_index : output_index + 1]

    per = vmap(jacrev(f), in_dims=(None, 0))
    item = torch.empty((), dtype=space.dtype).element_size()
    chunk = max(1, PER_SAMPLE_BYTES // max(1, d * space.dim * item))
    for i in range(0, len(X), chunk):
        jac = per(params, X[i : i + chunk])  # name -> (b, d, *shape)
        yield torch.cat([jac[n].reshape(jac[n].shape[0] * d, -1) for n in space.names], dim=1)
