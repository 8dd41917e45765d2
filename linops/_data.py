"""Datasets behind operators: a fixed order of batches, cached on the device while they fit.

An operator over a dataset is a sum over batches. ``data`` may be a tensor of inputs, an
``(X, y)`` pair of tensors, a dict of tensors (keyword inputs of the model and, under
``label_key``, the targets), or any iterable of batches (a ``DataLoader``) whose batches are
tensors, ``(x, y)`` pairs or dicts. The order is fixed: a loader that reshuffles between
passes is refused, because the operator it defines would change from one product to the next.

Each batch is moved to the operator's device and cast to its floating dtype when a product
needs it (from pinned host memory, without blocking, on CUDA). Batches are kept on the
device while they fit in the operator's memory budget (:mod:`linops.memory`); beyond it the
rest are *streamed*: drawn from the loader again at every product and freed after use, so a
dataset never has to fit in memory and a streamed pass holds one batch at a time. A cached
and a streamed batch are prepared by the same code, so the products are the same, bit for
bit. A one-shot iterator (a generator, ``iter(loader)``) cannot be drawn twice: it is kept
whole, whatever the budget.
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, cast

import numpy as np
import torch
from torch import nn
from torch.utils.data import BatchSampler

from linops._checks import check_finite, check_positive_or_none
from linops.memory import MemoryBudget, storage_bytes, tensor_leaves
from linops.params import KeywordInputs

_STATEFUL_IN_TRAINING = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)


def check_model_mode(
    model: nn.Module, *, allow_train_mode: bool, selected: Iterable[torch.Tensor] = ()
) -> None:
    """Refuse a model whose forward pass is random, updates statistics or uses batch statistics.

    Dropout layers in training mode and BatchNorm layers that normalise by each batch's
    statistics (in training mode, or in eval mode without running statistics, torch's rule:
    ``running_mean`` and ``running_var`` None), whatever the mode of the model around them:
    the loss is then no fixed sum over samples and the operator would depend on the batches
    (``allow_train_mode=True`` lets them pass: right for data given as one batch). And,
    whatever the mode, embeddings of ``selected`` weights whose backward pass is not the
    derivative of their forward pass (:func:`check_model_layers`).
    """
    check_model_layers(model, selected)
    if allow_train_mode:
        return
    culprits = sorted(
        {
            type(m).__name__
            for m in model.modules()
            if (isinstance(m, _STATEFUL_IN_TRAINING) and m.training)
            or (isinstance(m, nn.modules.batchnorm._BatchNorm) and uses_batch_statistics(m))
        }
    )
    if culprits and model.training:
        raise ValueError(
            f"model: is in training mode and contains {culprits}, whose forward pass "
            "is random or updates running statistics, so the operator would not be a fixed "
            "matrix; call model.eval() first, or pass allow_train_mode=True to skip this check"
        )
    if culprits:
        raise ValueError(
            f"model: contains {culprits} in training mode or, for BatchNorm, without running "
            "statistics, so its forward pass is random or normalises by each batch's own "
            "statistics: the loss is not a sum over samples and the operator would depend on "
            "how the data are split into batches; call .eval() on them (with running "
            "statistics), or give the data as one batch and pass allow_train_mode=True"
        )


def random_layers(model: nn.Module) -> list[str]:
    """Return the names of the dropout layers in training mode with ``p > 0`` (random passes)."""
    return sorted(
        {
            type(m).__name__
            for m in model.modules()
            if isinstance(m, _STATEFUL_IN_TRAINING) and m.training and float(m.p) > 0
        }
    )


def uses_batch_statistics(bn: nn.Module) -> bool:
    """Whether a BatchNorm normalises by the batch's statistics (torch's own rule)."""
    return bool(bn.training or (bn.running_mean is None and bn.running_var is None))


def check_model_layers(model: nn.Module, selected: Iterable[torch.Tensor] = ()) -> None:
    """Refuse embeddings whose backward pass is not the derivative of their forward pass.

    For an embedding whose weight is among the ``selected`` parameters (the products are
    not affected otherwise): ``scale_grad_by_freq=True`` divides each row's gradient by its
    count in the batch (not a derivative: a Hessian 37% off and not symmetric);
    ``nn.Embedding`` with ``max_norm`` renormalises the looked-up rows of the weight in place
    at every forward pass (the user's weights change, and the products are not those of the
    model at its weights), as ``nn.EmbeddingBag`` with it already was.
    """
    chosen = {id(t) for t in selected}
    for name, m in model.named_modules():
        if not isinstance(m, nn.Embedding | nn.EmbeddingBag) or id(m.weight) not in chosen:
            continue
        if m.scale_grad_by_freq:
            raise ValueError(
                f"model: {name} ({type(m).__name__}) has scale_grad_by_freq=True, which divides "
                "each row's gradient by its count in the batch: its backward pass is not the "
                "derivative of its forward pass, and no Hessian, GGN or J^T product would be "
                f"right; set model.{name}.scale_grad_by_freq = False for the operator (the "
                "forward pass is the same)"
            )
        if isinstance(m, nn.Embedding) and m.max_norm is not None:
            raise ValueError(
                f"model: {name} (Embedding) has max_norm={m.max_norm}, which renormalises the "
                "looked-up rows of its weight in place at every forward pass, so the products "
                "would not be those of the model at its weights (and would change them); "
                "rescale the weight once outside the model and set max_norm=None"
            )


_RANDOM_SAMPLERS = (
    torch.utils.data.RandomSampler,
    torch.utils.data.WeightedRandomSampler,
    torch.utils.data.SubsetRandomSampler,
)


def check_loader(data: object, *, allow_reshuffle: bool) -> None:
    """Refuse a ``DataLoader`` whose sampler does not give one fixed order.

    torch's random samplers (``shuffle=True``, ``WeightedRandomSampler``,
    ``RandomSampler(replacement=True)``, ``SubsetRandomSampler``) are refused by type; any
    other sampler (or batch sampler) is drawn twice and refused if the two orders differ. A
    loader over an ``IterableDataset`` has no sampler to check: the dataset's ``__iter__``
    must give the same batches at every pass.
    """
    if allow_reshuffle or not isinstance(data, torch.utils.data.DataLoader):
        return
    if isinstance(data.dataset, torch.utils.data.IterableDataset):
        return  # its own __iter__ gives the order; its sampler yields None without end
    samplers = [data.sampler]
    if data.batch_sampler is not None:  # its own sampler when passed as batch_sampler=
        samplers.append(data.batch_sampler)
    random = [_sampler_name(s) for s in samplers if not _fixed_order(s)]
    if random:
        raise ValueError(
            f"data: the DataLoader's sampler ({random[0]}) draws a different order or resample "
            "at every pass, so the operator would be the one of a single random draw; use a "
            "fixed order (shuffle=False, a SequentialSampler or a fixed list of indices), or "
            "pass allow_reshuffle=True to skip this check"
        )


def _sampler_name(sampler: object) -> str:
    """Return a sampler's type, with the sampler a plain ``BatchSampler`` draws from."""
    if type(sampler) is BatchSampler:
        return f"BatchSampler of a {type(sampler.sampler).__name__}"
    return type(sampler).__name__


def _batch_refusal(batch: object) -> str:
    """Return the message for a batch that is not a tensor, an ``(x, y)`` pair or a dict."""
    what = f"data: expected batches as tensors, (x, y) pairs or dicts, got a {type(batch).__name__}"
    if not isinstance(batch, tuple | list):
        return what
    if _numbers(batch) or any(isinstance(v, numbers.Number) for v in batch):
        # X.tolist() as data is read as a list of batches, each a row of numbers
        return (
            f"{what} of Python numbers (inputs given as Python lists are read as a list of "
            "batches): pass tensors or numpy arrays (torch.tensor(...), numpy.asarray(...))"
        )
    return (
        f"{what} of {len(batch)} (per-sample weights: weight the loss instead, such as "
        "CrossEntropyLoss(weight=...) per class)"
    )


def _numbers(data: object) -> bool:
    """Whether ``data`` is a nested Python list of numbers (every item a list, down to numbers)."""
    if not (isinstance(data, list) and data):
        return False
    if all(isinstance(v, numbers.Number) for v in data):
        return True
    return all(isinstance(v, list) for v in data) and _numbers(data[0])


def _splits(data: object, targets: bool) -> bool:
    """Whether ``batch_size`` splits ``data`` (tensors, an ``(X, y)`` pair, a dict): as ``_split``."""
    if isinstance(data, torch.Tensor | np.ndarray | Mapping):
        return True
    if isinstance(data, list) and len(data) > 1 and not targets:
        return False  # inputs only: a list of tensors is a list of batches
    if not (isinstance(data, tuple | list) and data):
        return False
    # an (X, y) pair, or (X,); inputs only, a tuple of more tensors is a tuple of batches
    return isinstance(data[0], torch.Tensor | np.ndarray) and (targets or len(data) <= 2)


#: indices drawn per pass from a sampler without a length to compare two of its passes
_MAX_SAMPLER_DRAW = 1_000_000


def _fixed_order(sampler: Iterable[object]) -> bool:
    """Whether two passes over ``sampler`` give the same indices (or it cannot be told)."""
    try:
        if isinstance(sampler, torch.utils.data.SequentialSampler):
            return True
        if isinstance(sampler, _RANDOM_SAMPLERS):
            return False
        if type(sampler) is BatchSampler:
            return _fixed_order(sampler.sampler)
        try:  # at most one index past its length: a sampler without end cannot hang here
            cap = len(sampler) + 1  # type: ignore[arg-type]
        except TypeError:
            cap = _MAX_SAMPLER_DRAW
        first, second = (list(itertools.islice(sampler, cap)) for _ in range(2))
    except TypeError:  # no indices to compare: it cannot be told
        return True
    return first == second


Batch = tuple[Any, torch.Tensor | None]


class Batches:
    """A fixed order of ``(x, y)`` batches on one device (``y`` is ``None`` for inputs only).

    ``x`` is a tensor, or :class:`linops.params.KeywordInputs` for dict batches.

    Parameters
    ----------
    data
        Inputs tensor, ``(X, y)`` pair, dict of tensors, or iterable of batches (tensors,
        ``(x, y)`` pairs or dicts).
    dtype, device
        Floating inputs and targets are cast to ``dtype``; everything moves to ``device``.
    targets
        Whether the operator needs targets (loss-based operators) or only inputs.
    batch_size
        For tensor (or dict of tensors) data, split into batches of this many samples
        (default: one batch).
    allow_reshuffle
        Skip the check that refuses a reshuffling ``DataLoader``.
    budget
        The ledger batches are kept against (:class:`linops.memory.MemoryBudget`); ``None``
        keeps every batch.
    label_key
        The key of the targets in dict batches (``"labels"``); the other keys are the
        model's keyword inputs.
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
        budget: MemoryBudget | None = None,
        label_key: str | None = None,
    ) -> None:
        check_loader(data, allow_reshuffle=allow_reshuffle)
        if isinstance(batch_size, bool):
            raise ValueError(f"batch_size: expected a positive integer or None, got {batch_size!r}")
        if isinstance(batch_size, np.integer):  # as memory_budget=: numpy's integers are integers
            batch_size = int(batch_size)
        check_positive_or_none(batch_size, "batch_size")
        if batch_size is not None and not _splits(data, targets):
            raise ValueError(
                "batch_size: expected None for data that gives its own batches (a "
                f"{type(data).__name__}), got {batch_size}: batch_size splits tensor data (X, "
                "(X, y) or a dict of tensors); leave it out, or set the loader's batch size"
            )
        if label_key is not None and not isinstance(label_key, str):
            raise TypeError(f"label_key: expected a string or None, got {type(label_key).__name__}")
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
        self._allow_reshuffle = allow_reshuffle
        #: prints (:func:`_batch_print`) of the first draw of batches drawn at every pass
        self._prints: dict[int, Print] = {}
        #: version counters and prints of the kept batches' tensors when they were kept
        self._versions: list[list[int]] = []
        self._kept_prints: list[Print] = []
        #: the weights of the prints, by length, dtype and device
        self._weights: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}
        self._budget, self.label_key = budget, label_key
        #: the first batches, kept on the device (all of them unless some did not fit)
        self._cached: list[Batch] = []
        #: whether a batch did not fit: it and every later one are streamed
        self.streaming = False
        self._num_batches: int | None = None
        self._num_samples: int | None = None
        #: whether the batches are keyword inputs (dicts), known once one has been drawn
        self.keyword_inputs = False

    @property
    def source(self) -> Any:
        """The data as given (tensors, a pair, a dict, a loader or an iterable of batches)."""
        return self._source

    @property
    def batch_size(self) -> int | None:
        """The split of tensor data into batches, as given (``None``: one batch)."""
        return self._batch_size

    # ----------------------------------------------------------------- iteration
    def __iter__(self) -> Iterator[Any]:
        if self._num_batches is not None and len(self._cached) == self._num_batches:
            return self._kept()  # everything kept
        if isinstance(self._source, Iterator):  # one-shot: drawn whole, kept whatever it costs
            self._draw_all()
            return self._kept()
        return self._pass()

    def _kept(self) -> Iterator[Batch]:
        for i, batch in enumerate(self._cached):
            self._check_unchanged(i, batch)
            yield batch

    def _keep(self, batch: Batch) -> None:
        self._cached.append(batch)
        self._versions.append(_batch_versions(batch))
        self._kept_prints.append(_batch_print(batch, self._weights))

    def rebase(self) -> None:
        """Take the data as they are now as the first draw (after a deliberate change)."""
        self._versions = [_batch_versions(b) for b in self._cached]
        self._kept_prints = [_batch_print(b, self._weights) for b in self._cached]
        self._prints = {}

    def _check_unchanged(self, i: int, batch: Batch) -> None:
        """Refuse a kept batch whose values were changed in place since it was kept.

        Kept batches are views of tensor data where no cast or move was needed: changing
        ``X`` in place (``X.add_(...)``) changed them, while graphs built from the old values
        were kept (a product mixed both). A moved version counter (a write anywhere in the
        tensor the views share it with) is followed by a comparison of the batch's print.
        """
        versions = _batch_versions(batch)
        if versions == self._versions[i]:
            return
        if _same_prints(_batch_print(batch, self._weights), self._kept_prints[i]):
            self._versions[i] = versions  # written elsewhere in the shared tensor
            return
        raise RuntimeError(
            f"data: batch {i} was changed in place after the operator kept it, by the "
            "caller, by a loader that refills one buffer for every batch, or by the model's "
            "forward pass (the operator holds the tensors it was given or drawn, and graphs "
            "built from their old values): make a new "
            "operator for the new data or call op.clear_cache() after changing it, change a "
            "copy, or keep the forward pass from writing into its inputs"
        )

    def _compare_with_first(self, drawn: list[tuple[int, Print]]) -> None:
        """Refuse batches drawn again (index, print) that differ from their first draw.

        Compared at the end of a pass (no synchronisation per batch on a GPU); a batch's first
        draw is recorded here.
        """
        differ = [i for i, p in drawn if i in self._prints and not _same_prints(p, self._prints[i])]
        for i, p in drawn:
            self._prints.setdefault(i, p)
        if not differ:
            return
        i = differ[0]
        raise RuntimeError(
            f"data: batch {i} of this pass differs from its first draw (inputs or targets): "
            "the loader gives other data at each pass (random augmentation or noise in the "
            "dataset, an order that changes with set_epoch, a shuffling IterableDataset, "
            "or data changed in place), so the operator would be a different matrix at "
            "every product. Pass fixed data (precomputed tensors, a deterministic "
            "dataset), call op.clear_cache() after a deliberate change, or pass "
            "allow_reshuffle=True if the operator should not check this"
        )

    def _held_by_caller(self) -> bool:
        """Whether the source's batches live in memory anyway (tensors, a list of batches).

        Keeping such a batch costs only what moving it allocated; a batch a loader made
        (collated, read from disk) costs all its bytes while it is kept.
        """
        return isinstance(self._source, torch.Tensor | np.ndarray | tuple | list | Mapping)

    def _pass(self) -> Iterator[Batch]:
        count = samples = 0
        held = self._held_by_caller()
        drawn: list[tuple[int, Print]] = []  # batches not kept: drawn at every pass
        for i, raw in enumerate(self._split(self._source)):
            if i < len(self._cached):
                batch = self._cached[i]
                self._check_unchanged(i, batch)
            else:
                batch, nbytes = self._prepare(raw, i)
                nbytes = nbytes if held else storage_bytes(batch)
                if not self.streaming and i == len(self._cached):
                    if self._budget is None or self._budget.reserve(nbytes, "batches"):
                        self._keep(batch)
                    else:
                        self.streaming = True
                if i >= len(self._cached) and not self._allow_reshuffle:
                    drawn.append((i, _batch_print(batch, self._weights)))
            count, samples = count + 1, samples + len(batch[0])
            yield batch
        self._compare_with_first(drawn)
        first_pass = self._num_batches is None
        self._finish(count, samples)
        if first_pass:
            self._check_redraw()

    def _check_redraw(self) -> None:
        """Draw a loader's first batch again and refuse it if it differs from the first draw.

        Random augmentation or noise in a dataset's ``__getitem__`` gives other data at every
        pass: kept, the batches would be one random draw of it, and streamed a different
        matrix at every product. Tensors, lists and one-shot iterators are not drawn again.
        """
        if self._allow_reshuffle or self._held_by_caller() or isinstance(self._source, Iterator):
            return
        if 0 not in self._prints:  # kept: its print was taken when it was kept
            self._prints[0] = self._kept_prints[0]
        raw = next(iter(self._split(self._source)), None)
        if raw is None:  # nothing drawn this time: the next pass's count refuses it
            return
        batch, _ = self._prepare(raw, 0)
        self._compare_with_first([(0, _batch_print(batch, self._weights))])

    def _draw_all(self) -> list[Batch]:
        if self._num_batches is None:
            for i, raw in enumerate(self._split(self._source)):
                batch, _ = self._prepare(raw, i)
                nbytes = storage_bytes(batch)
                if self._budget is not None and not self._budget.reserve(nbytes, "batches"):
                    self._budget.kept["batches"] += nbytes  # kept anyway: cannot be redrawn
                    self._budget.counts["batches"] += 1
                self._keep(batch)
            self._finish(len(self._cached), sum(len(x) for x, _ in self._cached))
        return self._cached

    def _finish(self, count: int, samples: int) -> None:
        if (count == 0 or samples == 0) and self._num_batches:
            raise ValueError(
                f"data: the data gave no batches in this pass and {self._num_batches} in the "
                "first (a single-use iterable?); pass a list of batches, a DataLoader or "
                "tensors, which can be drawn again at every product"
            )
        if count == 0 or samples == 0:
            raise ValueError("data: expected at least one sample, got an empty dataset")
        if self._num_batches is not None and count != self._num_batches:
            raise ValueError(
                f"data: the loader gave {count} batches in this pass and {self._num_batches} "
                "in the first; expected a fixed dataset"
            )
        self._num_batches, self._num_samples = count, samples

    def __len__(self) -> int:
        if self._num_batches is None:
            for _ in self:  # one pass (keeps what fits)
                pass
        assert self._num_batches is not None
        return self._num_batches

    def first(self) -> Batch:
        """Return the first batch (drawn, not the whole dataset)."""
        for batch in self:
            return batch
        raise ValueError("data: expected at least one sample, got an empty dataset")

    @property
    def batches(self) -> list[Batch]:
        """Return all batches as a list (every batch in memory at once: prefer iterating)."""
        return list(self)

    @property
    def num_samples(self) -> int:
        """Return the number of samples (one pass over the data the first time)."""
        if self._num_samples is None:
            len(self)
        assert self._num_samples is not None
        return self._num_samples

    @property
    def num_cached(self) -> int:
        """Return the number of batches kept on the device."""
        return len(self._cached)

    def like(
        self, dtype: torch.dtype, device: torch.device, budget: MemoryBudget | None
    ) -> Batches:
        """Return the same data for another dtype or device (a one-shot iterator's batches)."""
        source = self._source
        if isinstance(source, Iterator):
            source = self._draw_all()  # already drawn (or drawn now): its batches, re-prepared
        new = Batches(
            source,
            dtype=dtype,
            device=device,
            targets=self._targets,
            batch_size=self._batch_size,
            allow_reshuffle=True,  # the loader was checked when the first was made
            budget=budget,
            label_key=self.label_key,
        )
        new._allow_reshuffle = self._allow_reshuffle
        return new

    # ----------------------------------------------------------------- preparation
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
        if isinstance(data, Mapping):  # one dict of tensors: the whole dataset
            return self._split_mapping(data)
        if isinstance(data, torch.Tensor) and not self._targets:
            data = cast(Any, (data,))
        if isinstance(data, list) and len(data) > 1 and not self._targets:
            return data  # inputs only: a list of tensors is a list of batches, not (X, y)
        if isinstance(data, tuple | list) and data and isinstance(data[0], torch.Tensor):
            parts = len(data)  # (a separate name: mypy would read len() as a tuple's length)
            if parts == 2 or (parts == 1 and not self._targets):
                n, bs = len(data[0]), self._batch_size or max(1, len(data[0]))
                if parts == 2 and isinstance(data[1], torch.Tensor) and len(data[1]) != n:
                    what = "" if self._targets else " (input batches: pass them as a list)"
                    raise ValueError(
                        f"data: expected inputs and targets of equal length, got {n} and "
                        f"{len(data[1])}{what}"
                    )
                return [tuple(t[i : i + bs] for t in data) for i in range(0, n, bs)]
            if self._targets:
                raise ValueError(
                    f"data: expected an (X, y) pair of tensors, got a tuple of {len(data)}"
                )
        if isinstance(data, Iterable):
            return data
        raise TypeError(
            "data: expected a tensor, an (X, y) pair of tensors, a dict of tensors or an "
            f"iterable of batches, got {type(data).__name__}"
        )

    def _split_mapping(self, data: Mapping[str, Any]) -> list[dict[str, Any]]:
        lengths = {
            k: len(v)
            for k, v in data.items()
            if isinstance(v, torch.Tensor | np.ndarray) and v.ndim
        }
        if not lengths:
            raise ValueError(
                f"data: expected a dict with tensors of shape (n, ...), got keys {list(data)}"
            )
        n = next(iter(lengths.values()))
        if len(set(lengths.values())) > 1:
            if self._batch_size is None:  # one batch: nothing to split (labels (N T,) of an LM)
                return [dict(data)]
            raise ValueError(
                f"data: expected tensors with the same number of samples to split into "
                f"batch_size={self._batch_size}, got {lengths}"
            )
        bs = self._batch_size or max(1, n)
        return [
            {k: v[i : i + bs] if k in lengths else v for k, v in data.items()}
            for i in range(0, n, bs)
        ]

    def _from_pair(self, batch: Any, index: int, moved: list[int]) -> Batch:
        """Return a tensor or ``(x, y)`` batch on the device (``moved``: the bytes allocated)."""
        if isinstance(batch, torch.Tensor):
            x, y = batch, None
        elif isinstance(batch, tuple | list) and len(batch) in (1, 2):
            x, y = batch[0], batch[1] if len(batch) == 2 else None
        else:
            raise TypeError(_batch_refusal(batch))
        if self._targets and y is None:
            raise ValueError("data: this operator needs targets; expected (x, y) batches")
        if isinstance(x, Mapping):
            x = self._keywords(x, index, moved)
        else:
            x = self._move(x, f"batch {index} inputs", moved)
        y = self._move(y, f"batch {index} targets", moved) if self._targets else None
        return x, y

    def _prepare(self, batch: Any, index: int) -> tuple[Batch, int]:
        """Return the batch on the device and the bytes it newly allocated there."""
        moved: list[int] = []
        if isinstance(batch, Mapping):
            x, y = self._from_mapping(batch, index, moved)
        else:
            x, y = self._from_pair(batch, index, moved)
        if len(x) == 0:  # one empty batch among others: its graphs cannot even be shaped
            raise ValueError(f"data: batch {index} has no samples; leave empty batches out")
        return (x, y), sum(moved)

    def _from_mapping(self, batch: Mapping[str, Any], index: int, moved: list[int]) -> Batch:
        key = self.label_key
        if self._targets and (key is None or key not in batch):
            given = "no label_key was given" if key is None else f"label_key={key!r} is not one"
            raise ValueError(
                f"data: batch {index} is a dict with keys {list(batch)}, and {given} of them; "
                "pass label_key= naming the key of the targets (e.g. label_key='labels')"
            )
        inputs = {k: v for k, v in batch.items() if k != key}
        y = (
            self._move(batch[cast(str, key)], f"batch {index} targets ({key!r})", moved)
            if self._targets
            else None
        )
        return self._keywords(inputs, index, moved), y

    def _keywords(self, inputs: Mapping[str, Any], index: int, moved: list[int]) -> KeywordInputs:
        self.keyword_inputs = True
        values = {
            k: self._move(v, f"batch {index} input {k!r}", moved)
            if isinstance(v, torch.Tensor | np.ndarray)
            else v
            for k, v in inputs.items()
        }
        return KeywordInputs(values)

    def _move(self, t: Any, what: str, moved: list[int]) -> torch.Tensor:
        if not isinstance(t, torch.Tensor):
            try:
                t = _as_tensor(t, what) if isinstance(t, np.ndarray) else torch.as_tensor(t)
            except (ValueError, RuntimeError, TypeError) as err:
                raise TypeError(
                    f"data: expected numeric arrays or tensors, got {what} of type "
                    f"{type(t).__name__} ({str(err).splitlines()[0]})"
                ) from None
        check_finite(t, "data", what)
        dtype = self._dtype if t.is_floating_point() else None
        if self._device.type == "cuda" and t.device.type == "cpu":
            # pinned host memory, copied without blocking the host; the cast runs on the device
            source = t if t.is_pinned() else t.pin_memory()
            out = source.to(device=self._device, non_blocking=True).to(dtype=dtype)
        else:
            out = t.to(device=self._device, dtype=dtype)
        if out.requires_grad:  # a leaf the caller made require grad: the data, not a variable
            out = out.detach()
        if out.is_inference() and not torch.is_inference_mode_enabled():
            # made under torch.inference_mode (a frozen backbone's features): autograd may not
            # save it, so a product raised torch's "cannot be saved for backward"
            out = out.clone()
        if out is not t:
            moved.append(out.untyped_storage().nbytes())
        return out


def _tensors(batch: Batch) -> list[torch.Tensor]:
    """Return the dense tensors of a batch: its inputs (one, or a dict's values), targets."""
    # sparse layouts have no reshape (nor, CSR, a version counter): not printed
    return [t for t in tensor_leaves(batch) if t.layout == torch.strided]


def _batch_versions(batch: Batch) -> list[int]:
    """Return the version counters of a batch's tensors (bumped by in-place changes).

    Inference tensors (made under ``torch.inference_mode``) have none: -1.
    """
    return [-1 if t.is_inference() else t._version for t in _tensors(batch)]


#: a batch's print: Python floats for a batch on the CPU (tensors kept through a pass would be
#: small allocations amid the graphs' temporaries, pinning glibc's heap), else a device tensor
Print = tuple[float, ...] | torch.Tensor


def _batch_print(
    batch: Batch, weights: dict[tuple[int, torch.dtype, torch.device], torch.Tensor]
) -> Print:
    """Return position-weighted sums of a batch's tensors, one each (:data:`Print`).

    A tensor is read as ``(n, m)`` (``n`` samples) and printed as ``u^T T w`` with weights
    ``1 + k / n`` and ``1 + k / m`` (kept in ``weights`` by length), so reordered samples
    and flipped or shifted samples print differently. Computed in the tensor's own
    precision (float32 for narrower floats, integers and booleans; complex as real pairs):
    equal data give equal prints, as the same reduction of the same values.
    """

    def w(length: int, like: torch.Tensor) -> torch.Tensor:
        key = (length, like.dtype, like.device)
        if key not in weights:
            weights[key] = torch.linspace(1.0, 2.0, length, dtype=like.dtype, device=like.device)
        return weights[key]

    out = []
    for t in _tensors(batch):
        flat = torch.view_as_real(t.detach()) if t.is_complex() else t.detach()
        if flat.dtype not in (torch.float32, torch.float64):
            flat = flat.to(torch.float32)
        if flat.numel() == 0:
            out.append(flat.new_zeros(1))
            continue
        table = flat.reshape(len(flat) if flat.dim() else 1, -1)
        # torch's own reductions (a BLAS kernel may round by the data's alignment), in an
        # order that does not depend on the number of threads (_fixed_sum)
        weighted = table * w(table.shape[1], table)
        weighted *= w(table.shape[0], table)[:, None]
        out.append(_fixed_sum(weighted.reshape(-1)).reshape(1))
    if not out:
        return ()
    values = torch.cat(out)
    return tuple(values.tolist()) if values.device.type == "cpu" else values


#: the length of the rows :func:`_fixed_sum` sums one by one (below torch's parallel grain)
_SUM_CHUNK = 4096


def _fixed_sum(v: torch.Tensor) -> torch.Tensor:
    """Return the sum of a 1-d tensor in an order that does not depend on torch's threads.

    torch splits one sum of more than 32,768 elements among its threads, so the rounding
    followed ``torch.set_num_threads``. Here rows of :data:`_SUM_CHUNK` are summed (each by
    one thread, whichever), then their sums, until one row is left.
    """
    while v.numel() > _SUM_CHUNK:
        k = v.numel() // _SUM_CHUNK
        head = v[: k * _SUM_CHUNK].reshape(k, _SUM_CHUNK).sum(dim=1)
        tail = v[k * _SUM_CHUNK :]
        v = torch.cat([head, tail.sum().reshape(1)]) if tail.numel() else head
    return v.sum()


def _same_prints(a: Print, b: Print) -> bool:
    """Whether two prints are equal (NaN equal to NaN: a sum of huge values may overflow)."""
    if isinstance(a, tuple) or isinstance(b, tuple):
        x = a if isinstance(a, tuple) else tuple(a.tolist())
        y = b if isinstance(b, tuple) else tuple(b.tolist())
        return len(x) == len(y) and all(
            u == v or (math.isnan(u) and math.isnan(v)) for u, v in zip(x, y, strict=True)
        )
    return a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())


def _as_tensor(a: np.ndarray, what: str) -> torch.Tensor:
    if a.dtype.kind not in "biufc":
        raise TypeError(f"data: expected numeric arrays for the {what}, got dtype {a.dtype}")
    return torch.as_tensor(a)
