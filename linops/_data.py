"""Datasets behind operators: normalised once into a fixed list of batches on the device.

An operator over a dataset is a sum over batches. ``data`` may be a tensor of inputs, an
``(X, y)`` pair of tensors, or any iterable of batches (a ``DataLoader``). Batches are moved to
the operator's device and cast to its floating dtype once, at the first product, and then kept:
the order is therefore fixed. A loader that reshuffles between passes is refused, because the
operator it defines would change from one product to the next.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, cast

import numpy as np
import torch
from torch import nn
from torch.utils.data import BatchSampler

from linops._checks import check_finite, check_positive_or_none

_STATEFUL_IN_TRAINING = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)


def check_model_mode(model: nn.Module, *, allow_train_mode: bool) -> None:
    """Refuse a model in training mode whose forward pass is random or updates statistics."""
    if allow_train_mode or not model.training:
        return
    culprits = [
        type(m).__name__
        for m in model.modules()
        if isinstance(m, _STATEFUL_IN_TRAINING) or isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]
    if culprits:
        raise ValueError(
            f"model: is in training mode and contains {sorted(set(culprits))}, whose forward pass "
            "is random or updates running statistics, so the operator would not be a fixed "
            "matrix; call model.eval() first, or pass allow_train_mode=True to skip this check"
        )


_RANDOM_SAMPLERS = (
    torch.utils.data.RandomSampler,
    torch.utils.data.WeightedRandomSampler,
    torch.utils.data.SubsetRandomSampler,
)


def check_loader(data: Any, *, allow_reshuffle: bool) -> None:
    """Refuse a ``DataLoader`` whose sampler does not give one fixed order.

    torch's random samplers (``shuffle=True``, ``WeightedRandomSampler``,
    ``RandomSampler(replacement=True)``, ``SubsetRandomSampler``) are refused by type; any
    other sampler (or batch sampler) is drawn twice and refused if the two orders differ.
    """
    if allow_reshuffle or not isinstance(data, torch.utils.data.DataLoader):
        return
    samplers = [data.sampler]
    if data.batch_sampler is not None and type(data.batch_sampler) is not BatchSampler:
        samplers.append(data.batch_sampler)  # a custom batch sampler
    random = [type(s).__name__ for s in samplers if not _fixed_order(s)]
    if random:
        raise ValueError(
            f"data: the DataLoader's sampler ({random[0]}) draws a different order or resample "
            "at every pass, so the operator would be the one of a single random draw; use a "
            "fixed order (shuffle=False, a SequentialSampler or a fixed list of indices), or "
            "pass allow_reshuffle=True to skip this check"
        )


def _fixed_order(sampler: Any) -> bool:
    """Whether two passes over ``sampler`` give the same indices (or it cannot be told)."""
    try:
        if isinstance(sampler, torch.utils.data.SequentialSampler):
            return True
        if isinstance(sampler, _RANDOM_SAMPLERS):
            return False
        if type(sampler) is BatchSampler:
            return _fixed_order(sampler.sampler)
        first, second = list(iter(sampler)), list(iter(sampler))
    except TypeError:  # e.g. the sampler of an IterableDataset: no indices to compare
        return True
    return first == second


class Batches:
    """A fixed list of ``(x, y)`` batches on one device (``y`` is ``None`` for inputs only).

    Parameters
    ----------
    data
        Inputs tensor, ``(X, y)`` pair, or iterable of batches (tensors or ``(x, y)`` pairs).
    dtype, device
        Floating inputs and targets are cast to ``dtype``; everything moves to ``device``.
    targets
        Whether the operator needs targets (loss-based operators) or only inputs.
    batch_size
        For tensor data, split into batches of this many samples (default: one batch).
    """

    def __init__(
        self,
        data: Any,
        *,
        dtype: torch.dtype,
        device: torch.device,
        targets: bool,
        batch_size: int | None = None,
        allow_reshuffle: bool = False,
    ) -> None:
        check_loader(data, allow_reshuffle=allow_reshuffle)
        if isinstance(batch_size, bool | np.integer):  # refused as before: not a plain int
            raise ValueError(f"batch_size: expected a positive integer or None, got {batch_size!r}")
        check_positive_or_none(batch_size, "batch_size")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(
                "device: expected an available device, got 'cuda' while "
                "torch.cuda.is_available() is False"
            )
        for i, t in enumerate(data if isinstance(data, tuple | list) else (data,)):
            if isinstance(t, torch.Tensor):  # tensors given directly: checked now, not later
                check_finite(t, "data", "targets" if i == 1 and targets else "inputs")
        self._source, self._dtype, self._device = data, dtype, device
        self._targets, self._batch_size = targets, batch_size
        self._batches: list[tuple[torch.Tensor, torch.Tensor | None]] | None = None

    def __iter__(self) -> Any:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)

    @property
    def batches(self) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        if self._batches is None:
            self._batches = [self._prepare(b, i) for i, b in enumerate(self._split(self._source))]
            if not self._batches or self.num_samples == 0:
                raise ValueError("data: expected at least one sample, got an empty dataset")
        return self._batches

    @property
    def num_samples(self) -> int:
        return sum(len(x) for x, _ in self.batches)

    def _split(self, data: Any) -> Iterable[Any]:
        if isinstance(data, np.ndarray):
            data = _as_tensor(data, "inputs")
        elif isinstance(data, tuple | list) and data and isinstance(data[0], np.ndarray):
            data = cast(
                Any,
                type(data)(
                    _as_tensor(t, "targets" if i else "inputs") if isinstance(t, np.ndarray) else t
                    for i, t in enumerate(data)
                ),
            )
        if isinstance(data, torch.Tensor) and not self._targets:
            data = cast(Any, (data,))
        if isinstance(data, tuple | list) and data and isinstance(data[0], torch.Tensor):
            parts = len(data)  # (a separate name: mypy would read len() as a tuple's length)
            if parts == 2 or (parts == 1 and not self._targets):
                n, bs = len(data[0]), self._batch_size or max(1, len(data[0]))
                if self._targets and len(data[1]) != n:
                    raise ValueError(
                        f"data: expected inputs and targets of equal length, got {n} and "
                        f"{len(data[1])}"
                    )
                return [tuple(t[i : i + bs] for t in data) for i in range(0, n, bs)]
            if self._targets:
                raise ValueError(
                    f"data: expected an (X, y) pair of tensors, got a tuple of {len(data)}"
                )
        if isinstance(data, Iterable):
            return data
        raise TypeError(
            "data: expected a tensor, an (X, y) pair of tensors or an iterable of batches, got "
            f"{type(data).__name__}"
        )

    def _prepare(self, batch: Any, index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        if isinstance(batch, torch.Tensor):
            x, y = batch, None
        elif isinstance(batch, tuple | list) and len(batch) in (1, 2):
            x, y = batch[0], batch[1] if len(batch) == 2 else None
        else:
            raise TypeError(
                f"data: expected batches as tensors or (x, y) pairs, got {type(batch).__name__}"
            )
        if self._targets and y is None:
            raise ValueError("data: this operator needs targets; expected (x, y) batches")
        x = self._move(x, f"batch {index} inputs")
        return x, (self._move(y, f"batch {index} targets") if self._targets else None)

    def _move(self, t: Any, what: str) -> torch.Tensor:
        if not isinstance(t, torch.Tensor):
            try:
                t = _as_tensor(t, what) if isinstance(t, np.ndarray) else torch.as_tensor(t)
            except (ValueError, RuntimeError) as err:
                raise TypeError(
                    f"data: expected numeric arrays or tensors, got {what} of type "
                    f"{type(t).__name__} ({str(err).splitlines()[0]})"
                ) from None
        check_finite(t, "data", what)
        dtype = self._dtype if t.is_floating_point() else None
        return t.to(device=self._device, dtype=dtype)


def _as_tensor(a: np.ndarray, what: str) -> torch.Tensor:
    if a.dtype.kind not in "biufc":
        raise TypeError(f"data: expected numeric arrays for the {what}, got dtype {a.dtype}")
    return torch.as_tensor(a)
