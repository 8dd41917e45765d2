"""The toolkit's named types: what an argument admits, said once.

Annotations across :mod:`linops`, :mod:`estimators`, :mod:`trainers` and :mod:`reports` use
these names instead of ``Any``. ``Any`` is kept only where an input is genuinely open (what a
user's model returns, a value forwarded untouched to torch), each with a reason.

Arrays
    :data:`Array` (a numpy, torch or CuPy array; a returned ``Array`` is of the kind the input
    came as), :data:`ArrayT` (the same kind in and out), :data:`ArrayOut` (a result field of
    the input's kind), :data:`ArrayLike` (an ``Array`` or nested lists of numbers),
    :class:`CupyArray` (CuPy is optional, so it is recognised structurally).
Operators
    :data:`OperatorLike` (what :func:`linops.aslinearoperator` accepts),
    :class:`SupportsMatvec`, :class:`SparseMatrix`.
Randomness, dtypes, devices, process groups
    :data:`Seed`, :data:`DTypeLike`, :data:`Device`, :data:`ProcessGroup`.
Models, losses and data
    :data:`Params` (which parameters: the ``params`` selector), :data:`ModelOutput`,
    :data:`OutputSelector`, :data:`LossFunction`, :data:`Batch`, :data:`Data`.

The aliases users meet in signatures are re-exported by :mod:`linops` (``linops.ArrayLike``,
``linops.Seed``, ...), which is where :mod:`estimators`, :mod:`trainers` and :mod:`reports`
import them from (no package imports another's private module).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias, TypeVar, runtime_checkable

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

__all__ = [
    "Array",
    "ArrayLike",
    "ArrayOut",
    "ArrayT",
    "Batch",
    "CupyArray",
    "DTypeLike",
    "Data",
    "Device",
    "LossFunction",
    "ModelOutput",
    "OperatorLike",
    "OutputSelector",
    "Params",
    "ProcessGroup",
    "Seed",
    "SparseMatrix",
    "SupportsMatvec",
]


# --------------------------------------------------------------------------- arrays
@runtime_checkable
class CupyArray(Protocol):
    """A CuPy array, recognised by its CUDA array interface (CuPy is optional, never imported).

    Any object exposing ``__cuda_array_interface__`` and ``shape`` matches; the toolkit reads
    CuPy arrays through DLPack without a copy (``linops._backend``).
    """

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        """The CUDA array interface (pointer, shape, typestr, ...)."""
        ...

    @property
    def shape(self) -> tuple[int, ...]:
        """The array's shape."""
        ...


#: A dense array of one of the three frameworks the toolkit speaks: a numpy ``ndarray``
#: (``np.matrix`` included), a ``torch.Tensor`` or a CuPy array. As a return type: the array
#: is of the kind the input came as (numpy in, numpy out; a tensor stays on its device).
Array: TypeAlias = np.ndarray | torch.Tensor | CupyArray

#: An :data:`Array` whose kind a function keeps: ``f(X: ArrayT) -> ArrayT`` returns numpy for
#: numpy, a tensor (on the input's device) for a tensor, CuPy for CuPy.
ArrayT = TypeVar("ArrayT", torch.Tensor, np.ndarray, CupyArray)

#: A result field holding an :data:`Array` of the kind the input came as (numpy for numpy and
#: SciPy operators, torch for tensors and torch operators, CuPy for CuPy). ``Any`` on purpose:
#: a NamedTuple cannot be generic on Python 3.10, and the union :data:`Array` would make every
#: caller that passed a torch operator narrow a value it knows is a tensor.
ArrayOut: TypeAlias = Any

#: What the toolkit reads as a dense array: an :data:`Array`, or (nested) lists and tuples of
#: numbers, read through ``numpy.asarray`` (so they give numpy results).
ArrayLike: TypeAlias = Array | Sequence[float] | Sequence[Sequence[float]]


# --------------------------------------------------------------------------- operators
@runtime_checkable
class SupportsMatvec(Protocol):
    """Any object with ``shape`` and ``matvec``: a SciPy ``LinearOperator``, a ``TorchLinearOperator``.

    Products of a foreign (non-torch) operator go through numpy on the host.
    """

    @property
    def shape(self) -> tuple[int, ...]:
        """``(m, n)``."""
        ...

    def matvec(self, x: Any, /) -> Any:
        """Return ``A x`` (the argument and result are whatever the operator speaks)."""
        ...


@runtime_checkable
class SparseMatrix(Protocol):
    """A SciPy sparse matrix or array, recognised by ``tocsr`` (SciPy ships no type hints)."""

    @property
    def shape(self) -> tuple[int, ...]:
        """``(m, n)``."""
        ...

    def tocsr(self) -> Any:
        """Return the matrix in CSR format."""
        ...


#: What :func:`linops.aslinearoperator` accepts: a ``TorchLinearOperator`` or SciPy
#: ``LinearOperator`` (anything with ``shape`` and ``matvec``), a SciPy sparse matrix, or a
#: dense 2-d :data:`ArrayLike` (integer and boolean data are promoted to float64).
OperatorLike: TypeAlias = SupportsMatvec | SparseMatrix | ArrayLike


# --------------------------------------------------------------------------- options
#: The type of every ``seed`` argument: an int seeds a fresh ``torch.Generator`` (the same int
#: gives the same draws), a ``torch.Generator`` is used as it is (its state advances) and
#: ``None`` draws fresh entropy (never the global RNG). numpy generators are not accepted.
Seed: TypeAlias = int | torch.Generator | None

#: A dtype given as a torch dtype or anything ``numpy.dtype`` reads (``np.float32``, ``"f8"``).
DTypeLike: TypeAlias = torch.dtype | npt.DTypeLike

#: A device as torch reads it: ``torch.device("cuda", 0)``, ``"cuda:0"``, ``"cpu"`` or an index.
Device: TypeAlias = torch.device | str | int

# ProcessGroup: a ``torch.distributed`` process group (``None`` in signatures: the default
# group if one is initialised, else a single process). A torch built without distributed
# support has none; the name then stands for ``object`` (it is used in annotations only).
if TYPE_CHECKING:
    from torch.distributed import ProcessGroup as ProcessGroup
else:
    ProcessGroup = getattr(torch.distributed, "ProcessGroup", object)


# --------------------------------------------------------------------------- models and data
#: Which parameters of a model (the ``params`` selector; never parameter values): a submodule
#: (its trainable parameters); a name (``"0.weight"``) or a submodule's name prefix
#: (``"encoder.layers.0"``); one of the model's parameter tensors; a sequence of these; or a
#: mapping from names to tensors (their values replace the model's, a point other than the
#: current one). ``None`` (written separately, ``Params | None``) selects every parameter with
#: ``requires_grad``.
Params: TypeAlias = (
    str
    | nn.Module
    | torch.Tensor
    | Sequence[str | nn.Module | torch.Tensor]
    | Mapping[str, torch.Tensor]
)

#: Whatever a user's model returns: a tensor, a tuple, a dict, a ``ModelOutput`` dataclass.
#: Genuinely open (``Any``): an :data:`OutputSelector` picks the tensor out of it.
ModelOutput: TypeAlias = Any

#: Selects the tensor to differentiate from a :data:`ModelOutput` (``lambda out: out[0]``,
#: ``lambda out: out["logits"]``, ``lambda out: out.logits``).
OutputSelector: TypeAlias = Callable[[ModelOutput], torch.Tensor]

#: A scalar loss of ``(outputs, targets)``: a torch loss module (``nn.CrossEntropyLoss()``), a
#: functional (``F.mse_loss``, a ``functools.partial`` of one) or a plain function.
LossFunction: TypeAlias = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

#: One batch: an inputs array, an ``(x, y)`` (or ``(x,)``) tuple or list of arrays, or a dict
#: of keyword inputs for ``model(**batch)`` (the targets under the operator's ``label_key``;
#: values that are not tensors, such as flags, reach the model as they are: open).
Batch: TypeAlias = ArrayLike | Sequence[ArrayLike] | Mapping[str, Any]

#: A dataset: an inputs array (split into batches by ``batch_size``), an ``(X, y)`` pair of
#: arrays, one dict of keyword inputs, or an iterable of :data:`Batch` (a ``DataLoader`` with a
#: fixed order, a list).
Data: TypeAlias = Batch | Iterable[Batch]
