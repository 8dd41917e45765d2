r"""Content fingerprints of operators: what a checkpointed column depends on, hashed.

A dense matrix built chunk by chunk into a checkpoint directory
(:class:`linops._checkpoint.ColumnCheckpoint`) may only resume from chunks of the *same*
computation. :func:`operator_fingerprint` hashes (SHA-256) everything the columns depend on:

* the operator's class, shape, dtype and options (public attributes of plain types such as
  ``output_index``, ``method``, ``eps``, the loss reduction), but not how products are routed
  or batched (``route``, ``batched``, ``max_vectors``, ``memory_budget``, ``cache``,
  ``device``), nor counters and caches (private attributes). An operator class lists further
  public bookkeeping attributes in ``fingerprint_exclude``; a fingerprint must not change when
  products are computed (``tests/linops/test_checkpoint.py`` checks every operator kind);
* the model: every module's class (and the bytecode of ``forward`` for classes outside torch),
  its plain attributes (``kappa``, ``stride``), training flag and hooks, and the values of
  *all* parameters and buffers (untrained parameters and BatchNorm statistics included);
* the parameter space (names and the values it was built with) and the data (every batch);
* callables such as a loss: qualified name, bytecode, defaults, closure cells and the module
  globals they read; an ``nn.Module`` loss by its class and state; never a ``repr`` that holds
  a memory address, so the fingerprint is the same in a new process;
* composites through their parts, dense operators through their matrix, and a training
  Jacobian through its run (model, trained parameter names, loss, data schedule, optimizer,
  learning-rate schedule, gradient engine), :math:`\theta_0` and the model's other values.

Objects of other types are hashed by their class and attributes, recursively; shared objects
and cycles are hashed once and referred to by the order they were first met.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import inspect
import re
import types
from collections.abc import Iterable, Mapping
from pathlib import PurePath
from typing import TYPE_CHECKING, TypeAlias, TypeGuard

import numpy as np
import torch

from linops._types import SparseMatrix

if TYPE_CHECKING:  # pragma: no cover
    from linops.base import TorchLinearOperator
    from linops.params import ParamSpace

__all__ = ["operator_fingerprint", "value_fingerprint"]

#: operator attributes that change how products are computed or counted, not their values
_OPERATOR_SKIP = frozenset(
    {
        "route",
        "batched",
        "unbatched_reason",
        "max_vectors",
        "memory_limit_bytes",
        "memory_budget",
        "memory",
        "cache",
        "check_finite",
        "device",
        "dtype",
        "torch_dtype",
        "shape",
        "num_matvecs",
        "num_products",
        "process_group",
        "row_counts",
        "local_rows",
        "args",
    }
)
#: properties that are options inferred at the first product (hashed through the property,
#: so the fingerprint is the same before and after it)
_OPERATOR_PROPERTIES = ("reduction",)
#: TrainingRun attributes that define the function theta0 -> theta_T
_RUN_FIELDS = ("space", "loss_name", "loss_fn", "data", "optimizer", "schedule")
_ADDRESS = re.compile(r"0x[0-9a-fA-F]+")
#: objects nested deeper than this (through attributes of plain objects) are hashed by type
_MAX_DEPTH = 32
_PLAIN = (type(None), bool, int, float, complex, str, bytes)
#: anything a fingerprint meets (the hasher dispatches on its type; ``object`` is shadowed by
#: :meth:`_Hasher.object` inside the class)
_Value: TypeAlias = object


def operator_fingerprint(op: TorchLinearOperator) -> str:
    """SHA-256 (hex) of everything the columns of ``op`` depend on.

    Parameters
    ----------
    op
        A :class:`linops.base.TorchLinearOperator` (model operators, composites, dense
        operators, :class:`linops.TrainingJacobianOperator`) or any object with a ``shape``.

    Returns
    -------
    str
        64 hexadecimal digits, equal for equal computations in any process.

    Examples
    --------
    >>> import torch
    >>> from linops import aslinearoperator
    >>> A = aslinearoperator(torch.eye(2, dtype=torch.float64))
    >>> operator_fingerprint(A) == operator_fingerprint(aslinearoperator(torch.eye(2).double()))
    True
    >>> operator_fingerprint(A) == operator_fingerprint(2 * A)
    False
    """
    h = _Hasher()
    h.operator(op)
    return h.hexdigest()


def value_fingerprint(value: object) -> str:
    """SHA-256 (hex) of a value: tensors, modules, callables, plain data, objects."""
    h = _Hasher()
    h.value(value)
    return h.hexdigest()


def _qualname(obj: object) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__name__)}"


def _is_operator(obj: object) -> TypeGuard[TorchLinearOperator]:
    from scipy.sparse.linalg import LinearOperator

    return isinstance(obj, LinearOperator) and hasattr(obj, "torch_dtype")


class _Hasher:
    """A SHA-256 over typed, length-prefixed fields, with a memo of the objects already met."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()
        self._seen: dict[int, int] = {}
        self._keep: list[_Value] = []  # keeps memoised objects alive, so ids stay unique
        self._depth = 0

    def hexdigest(self) -> str:
        return self._h.hexdigest()

    def field(self, tag: str, data: bytes | str) -> None:
        raw = data.encode() if isinstance(data, str) else data
        self._h.update(f"{tag}:{len(raw)}:".encode())
        self._h.update(raw)

    def _first_visit(self, obj: _Value) -> bool:
        """Whether ``obj`` is new; a repeat is hashed as a reference to its first visit."""
        if id(obj) in self._seen:
            self.field("ref", str(self._seen[id(obj)]))
            return False
        self._seen[id(obj)] = len(self._seen)
        self._keep.append(obj)
        return True

    # ------------------------------------------------------------------ operators
    def operator(self, op: TorchLinearOperator) -> None:
        if not self._first_visit(op):
            return
        self.field("operator", _qualname(type(op)))
        self.field("shape", repr(tuple(int(s) for s in op.shape)))
        self.field("dtype", str(getattr(op, "torch_dtype", getattr(op, "dtype", None))))
        if hasattr(op, "run") and hasattr(op, "theta0"):
            self._training(op)
        elif hasattr(op, "space") and hasattr(op, "batches"):
            self._model_operator(op)
        elif not _is_operator(op) and callable(getattr(op, "fingerprint", None)):
            self.field("own fingerprint", str(op.fingerprint()))
            return
        self._options(op)

    def _options(self, op: TorchLinearOperator) -> None:
        done = {"run", "theta0", "space", "batches", "model"}
        done |= set(getattr(op, "fingerprint_exclude", ()))
        for name in sorted(vars(op)):
            if name in done or name in _OPERATOR_SKIP:
                continue
            if name.startswith("_"):
                continue
            self.field("attribute", name)
            self.value(vars(op)[name])
        for name in _OPERATOR_PROPERTIES:
            if isinstance(getattr(type(op), name, None), property):
                self.field("attribute", name)
                self.value(getattr(op, name))

    def _model_operator(self, op: TorchLinearOperator) -> None:  # a model operator
        self.field("section", "parameters")
        self.param_space(op.space)
        self.field("section", "model")
        self.module(getattr(op, "model", op.space.model))
        self.field("section", "data")
        for batch in op.batches:
            self.value(tuple(batch) if isinstance(batch, tuple | list) else batch)

    def _training(self, op: TorchLinearOperator) -> None:  # a TrainingJacobianOperator
        run = op.run
        self.field("section", "run")
        self.field("run class", _qualname(type(run)))
        for name in _RUN_FIELDS:
            if hasattr(run, name):
                self.field("run field", name)
                self.value(getattr(run, name))
        self.field("engine", str(getattr(getattr(run, "engine", None), "name", None)))
        self.field("section", "theta0")
        self.tensor(op.theta0)

    def param_space(self, space: ParamSpace) -> None:
        if not self._first_visit(space):
            return
        self.field("names", repr(list(space.names)))
        for name, value in space.values().items():
            self.field("parameter", name)
            self.tensor(value)
        self.module(space.model)

    # ------------------------------------------------------------------ values
    def value(self, v: _Value) -> None:
        if isinstance(v, _PLAIN):
            self.field(type(v).__name__, repr(v))
        elif isinstance(v, enum.Enum):
            self.field("enum", f"{_qualname(type(v))}.{v.name}")
        elif isinstance(v, torch.Tensor):
            self.tensor(v)
        elif isinstance(v, np.ndarray | np.generic):
            self.array(np.asarray(v))
        elif isinstance(v, torch.dtype | torch.device | np.dtype | PurePath):
            self.field(type(v).__name__, str(v))
        elif isinstance(v, torch.Size):
            self.field("size", repr(tuple(v)))
        elif isinstance(v, tuple | list):
            self.field(type(v).__name__, str(len(v)))
            for item in v:
                self.value(item)
        elif isinstance(v, Mapping):
            self.field("mapping", str(len(v)))
            for key in sorted(v, key=repr):
                self.value(key)
                self.value(v[key])
        elif isinstance(v, set | frozenset):
            self.field("set", repr(sorted(repr(x) for x in v)))
        elif _is_operator(v):
            self.operator(v)
        elif isinstance(v, torch.nn.Module):
            self.module(v)
        elif hasattr(v, "names") and callable(getattr(v, "values", None)) and hasattr(v, "model"):
            self.param_space(v)  # type: ignore[arg-type]  # duck-typed: names, values(), model
        elif isinstance(v, types.ModuleType):
            self.field("python module", v.__name__)
        elif isinstance(v, type):
            self.field("class", _qualname(v))
        elif isinstance(v, torch.Generator):
            self.field("generator", str(v.device))
            self.tensor(v.get_state())
        elif _is_sparse(v):
            self._sparse(v)
        elif callable(v):
            self.callable(v)
        else:
            self.object(v)

    def tensor(self, t: torch.Tensor) -> None:
        t = t.detach()
        if t.layout != torch.strided:
            t = t.to_dense()
        t = t.resolve_conj().resolve_neg().cpu().contiguous()
        self.field("tensor", f"{t.dtype} {tuple(t.shape)}")
        self.field("bytes", t.reshape(-1).view(torch.uint8).numpy().tobytes())

    def array(self, a: np.ndarray) -> None:
        if a.dtype.hasobject:
            self.field("object array", repr(a.shape))
            for item in a.reshape(-1):
                self.value(item)
            return
        self.field("array", f"{a.dtype.str} {a.shape}")
        self.field("bytes", np.ascontiguousarray(a).tobytes())

    def _sparse(self, s: SparseMatrix) -> None:
        csr = s.tocsr()
        csr.sum_duplicates()
        csr.sort_indices()
        self.field("sparse", repr(csr.shape))
        for part in (csr.data, csr.indices, csr.indptr):
            self.array(part)

    def module(self, m: torch.nn.Module) -> None:
        if not self._first_visit(m):
            return
        for name, sub in m.named_modules(remove_duplicate=False):
            cls = type(sub)
            self.field("module", f"{name} {_qualname(cls)} training={sub.training}")
            if not cls.__module__.startswith("torch."):
                forward = getattr(cls, "forward", None)
                code = getattr(forward, "__code__", None)
                if code is not None:
                    self.code(code)
            for key, val in sorted(vars(sub).items()):
                if not key.startswith("_") and key != "training":
                    self.field("module attribute", key)
                    self.value(val)
            for hooks in ("_forward_pre_hooks", "_forward_hooks"):
                for hook in getattr(sub, hooks, {}).values():
                    self.field("hook", hooks)
                    self.callable(hook)
        for name, p in m.named_parameters(remove_duplicate=False):
            self.field("parameter", f"{name} requires_grad={p.requires_grad}")
            self.tensor(p)
        for name, b in m.named_buffers(remove_duplicate=False):
            self.field("buffer", name)
            self.tensor(b)

    # ------------------------------------------------------------------ callables
    def callable(self, fn: _Value) -> None:
        if isinstance(fn, functools.partial):
            self.field("partial", "")
            self.value(fn.func)
            self.value(fn.args)
            self.value(fn.keywords)
        elif isinstance(fn, torch.nn.Module):
            self.module(fn)
        elif inspect.ismethod(fn):
            self.field("method", _qualname(fn.__func__))
            self.callable(fn.__func__)
            self.value(fn.__self__)
        elif isinstance(fn, types.FunctionType):
            self._function(fn)
        elif hasattr(fn, "__qualname__") and not hasattr(fn, "__dict__"):
            self.field("builtin", _qualname(fn))  # a C function: its name identifies it
        elif hasattr(fn, "__qualname__") and getattr(fn, "__module__", "").startswith("torch"):
            self.field("library callable", _qualname(fn))
        else:
            self.object(fn)

    def _function(self, fn: types.FunctionType) -> None:
        if not self._first_visit(fn):
            return
        self.field("function", _qualname(fn))
        self.code(fn.__code__)
        self.value(fn.__defaults__)
        self.value(fn.__kwdefaults__)
        for cell in fn.__closure__ or ():
            try:
                contents = cell.cell_contents
            except ValueError:  # an empty cell
                self.field("cell", "empty")
                continue
            self.field("cell", "")
            self.value(contents)
        if fn.__module__ and fn.__module__.split(".")[0] in ("torch", "numpy", "scipy"):
            return  # library code: identified by its name and bytecode
        g = fn.__globals__
        for name in sorted(_global_names(fn.__code__)):
            if name in g and not isinstance(g[name], types.ModuleType | type):
                self.field("global", name)
                self.value(g[name])

    def code(self, co: types.CodeType) -> None:
        self.field("code", co.co_name)
        for attr in (
            "co_argcount",
            "co_posonlyargcount",
            "co_kwonlyargcount",
            "co_flags",
            "co_names",
            "co_varnames",
            "co_freevars",
            "co_cellvars",
        ):
            self.field(attr, repr(getattr(co, attr)))
        self.field("co_code", co.co_code)
        for const in co.co_consts:
            if isinstance(const, types.CodeType):
                self.code(const)
            else:
                self.value(const)

    # ------------------------------------------------------------------ other objects
    def object(self, obj: _Value) -> None:
        if not self._first_visit(obj):
            return
        cls = type(obj)
        self.field("object", _qualname(cls))
        if self._depth >= _MAX_DEPTH:
            return
        self._depth += 1
        try:
            self._object_state(obj, cls)
        finally:
            self._depth -= 1

    def _object_state(self, obj: _Value, cls: type) -> None:
        call = inspect.getattr_static(cls, "__call__", None)
        if isinstance(call, types.FunctionType):
            self.code(call.__code__)
        state = getattr(obj, "__dict__", None)
        if state is None:
            slots = [
                s
                for c in cls.__mro__
                for s in _as_tuple(getattr(c, "__slots__", ()))
                if s not in ("__dict__", "__weakref__")
            ]
            state = {s: getattr(obj, s) for s in slots if hasattr(obj, s)}
        if state:
            for key in sorted(state):
                self.field("attribute", key)
                self.value(state[key])
        else:  # no attributes: the repr, without memory addresses, is all there is
            self.field("repr", _ADDRESS.sub("0x?", repr(obj)))


def _as_tuple(slots: str | Iterable[str]) -> tuple:
    return (slots,) if isinstance(slots, str) else tuple(slots)


def _global_names(co: types.CodeType) -> set[str]:
    names = set(co.co_names)
    for const in co.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_names(const)
    return names


def _is_sparse(v: object) -> TypeGuard[SparseMatrix]:
    try:
        import scipy.sparse
    except ImportError:  # pragma: no cover
        return False
    return scipy.sparse.issparse(v)
