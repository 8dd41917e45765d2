"""``Any`` only where an input is genuinely open (issue 17, item 4).

Walks the public API (every name in ``__all__`` of ``linops``, ``estimators``, ``trainers`` and
``reports`` and of their public modules): functions, classes (constructor, ``__call__``, public
methods and properties) and result NamedTuples (their fields), and finds every parameter,
return value and field annotated ``Any``: ``typing.Any`` itself, a name bound to it (an alias
such as ``linops._types.ModelOutput``) or a union with it at the top level (``Any | None``).
An ``Any`` nested in a container (``dict[str, Any]``, ``Callable[..., Any]``) is not counted:
the container is the type.

Every ``Any`` found must be in :data:`ALLOWED` with the reason it is open; an entry that is no
longer found fails too, so the list stays the true list. The named types that replace ``Any``
are in ``linops/_types.py``.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import typing
from collections.abc import Callable, Iterator
from types import ModuleType

import numpy as np
import pytest
import torch

PACKAGES = ("linops", "estimators", "trainers", "reports")

_FORWARDED = "keyword options forwarded untouched to another callable, which checks them"
_ARRAY_OUT = (
    "an array of the kind the input came as (linops._types.ArrayOut): a NamedTuple cannot be "
    "generic on Python 3.10, and the union Array would make every torch caller narrow"
)

#: ``"module.qualname:argument"`` (``return`` for a result, ``field`` for a NamedTuple field)
#: -> why that ``Any`` is genuinely open
ALLOWED: dict[str, str] = {
    "estimators.spectrum.top_singular_values:kw": _FORWARDED + " (linops.svds)",
    "estimators.kernel.gram_operator:kwargs": _FORWARDED + " (linops.NTKOperator)",
    "estimators.guesses.make_guesser:options": _FORWARDED + " (the guesser's constructor)",
    "trainers._base.Trainer:optimizer_kw": _FORWARDED
    + " (the optimizer; a user factory's options are its own)",
    "trainers.forward.ForwardGradientTrainer:optimizer_kw": _FORWARDED + " (the optimizer)",
    "trainers.lowrank.LowRankJacobianTrainer:optimizer_kw": _FORWARDED + " (the optimizer)",
    "trainers.subspace.SubspaceTrainer:optimizer_kw": _FORWARDED + " (the optimizer)",
    "trainers.linearized.LinearizedTrainer:optimizer_kw": _FORWARDED + " (the optimizer)",
    "trainers.linearized.LinearizedTrainer.fit:kwargs": _FORWARDED + " (Trainer.fit)",
    "trainers._base.make_optimizer:kw": _FORWARDED
    + " (the optimizer; a user factory's options are its own)",
    "linops.fisher.FisherOperator:kwargs": _FORWARDED
    + " (the model operators' keywords: dtype, device, batch_size, ...)",
    "linops.hessian.OutputHessianOperator:kwargs": _FORWARDED
    + " (the model operators' keywords: dtype, device, batch_size, ...)",
    "linops.jacobian.NTKOperator:kwargs": _FORWARDED
    + " (the model operators' keywords: dtype, device, batch_size, ...)",
    "linops.kfac.KFACOperator:kwargs": _FORWARDED
    + " (the model operators' keywords: dtype, device, batch_size, ...)",
    "reports.runs.save_figure:kwargs": _FORWARDED + " (matplotlib's savefig)",
    "linops.randomized.EighResult:eigenvalues": _ARRAY_OUT,
    "linops.randomized.EighResult:eigenvectors": _ARRAY_OUT,
    "linops.randomized.RandomizedSVDResult:left_vectors": _ARRAY_OUT,
    "linops.randomized.RandomizedSVDResult:right_vectors": _ARRAY_OUT,
    "linops.randomized.RandomizedSVDResult:singular_values": _ARRAY_OUT,
    "linops.randomized.RangeFinderResult:basis": _ARRAY_OUT,
    "linops.lanczos.LanczosResult:eigenvalues": _ARRAY_OUT,
    "linops.lanczos.LanczosResult:eigenvectors": _ARRAY_OUT,
    "linops.lanczos.LanczosResult:residuals": _ARRAY_OUT,
    "linops.svds.SVDSResult:left_vectors": _ARRAY_OUT,
    "linops.svds.SVDSResult:residuals": _ARRAY_OUT,
    "linops.svds.SVDSResult:right_vectors": _ARRAY_OUT,
    "linops.svds.SVDSResult:singular_values": _ARRAY_OUT,
    "estimators.density.SpectralDensity:grid": _ARRAY_OUT,
    "estimators.density.SpectralDensity:density": _ARRAY_OUT,
    "estimators.density.SpectralDensity:nodes": _ARRAY_OUT,
    "estimators.density.SpectralDensity:weights": _ARRAY_OUT,
    "estimators.functions.QuadratureBounds:lower": _ARRAY_OUT + " (a float for one vector)",
    "estimators.functions.QuadratureBounds:upper": _ARRAY_OUT + " (a float for one vector)",
    "estimators.functions.QuadratureBounds:gauss": _ARRAY_OUT + " (a float for one vector)",
    "estimators.functions.QuadratureBounds:radau": _ARRAY_OUT + " (a float for one vector)",
    "linops.params.ParamSpace.functional_call:args": "the model's own inputs, passed on to "
    "its forward() untouched (genuinely open)",
    "linops.params.ParamSpace.functional_call:return": "whatever the model returns "
    "(ModelOutput: genuinely open; an output= selector picks the tensor)",
}

#: ``Any`` not yet replaced (modules other engineers were editing when the rest was typed),
#: with the type from linops/_types.py that should replace it: reported, not failed; remove an
#: entry when its annotation is mended (test_report_counts lists the mended ones)
PENDING: dict[str, str] = {}


def _public_modules(name: str) -> Iterator[ModuleType]:
    package = importlib.import_module(name)
    yield package
    for info in pkgutil.iter_modules(package.__path__):
        if not info.name.startswith("_"):
            yield importlib.import_module(f"{name}.{info.name}")


def _public_objects() -> Iterator[tuple[str, object]]:
    seen: set[int] = set()
    for pkg in PACKAGES:
        for mod in _public_modules(pkg):
            for attr in getattr(mod, "__all__", []):
                obj = getattr(mod, attr)
                if id(obj) in seen or not (inspect.isclass(obj) or inspect.isfunction(obj)):
                    continue
                seen.add(id(obj))
                yield f"{obj.__module__}.{obj.__qualname__}", obj


def _is_any(annotation: object, globalns: dict[str, object]) -> bool:
    """Whether ``annotation`` is ``Any``, an alias of it, or a top-level union with it."""
    if annotation is typing.Any:
        return True
    if isinstance(annotation, typing.ForwardRef):  # NamedTuple fields under future annotations
        annotation = annotation.__forward_arg__
    if not isinstance(annotation, str):
        args = (
            typing.get_args(annotation)
            if typing.get_origin(annotation)
            in (
                typing.Union,
                type(int | None),
            )
            else ()
        )
        return any(a is typing.Any for a in args)
    try:
        node = ast.parse(annotation, mode="eval").body
    except SyntaxError:
        return False

    def members(n: ast.expr) -> Iterator[ast.expr]:
        if isinstance(n, ast.BinOp) and isinstance(n.op, ast.BitOr):
            yield from members(n.left)
            yield from members(n.right)
        else:
            yield n

    for m in members(node):
        if isinstance(m, ast.Name | ast.Attribute):
            try:
                value = eval(compile(ast.Expression(m), "<annotation>", "eval"), dict(globalns))
            except Exception:  # a name imported under TYPE_CHECKING only: not Any
                continue
            if value is typing.Any:
                return True
    return False


def _callables(qualname: str, obj: object) -> Iterator[tuple[str, Callable]]:
    if inspect.isfunction(obj):
        yield qualname, obj
        return
    for name, member in vars(obj).items():
        if isinstance(member, property) and member.fget is not None and not name.startswith("_"):
            yield f"{qualname}.{name}", member.fget
            continue
        if name in ("__init__", "__call__") or (not name.startswith("_") and callable(member)):
            fn = member.__func__ if isinstance(member, staticmethod | classmethod) else member
            if inspect.isfunction(fn):
                yield (qualname if name == "__init__" else f"{qualname}.{name}"), fn


def _any_annotations() -> dict[str, str]:
    """Every ``Any`` in a public signature: ``"where:argument" -> the annotation``."""
    found: dict[str, str] = {}
    for qualname, obj in _public_objects():
        if inspect.isclass(obj) and hasattr(obj, "_fields"):  # a result NamedTuple
            globalns = vars(importlib.import_module(obj.__module__))
            for field, ann in getattr(obj, "__annotations__", {}).items():
                if _is_any(ann, globalns):
                    found[f"{qualname}:{field}"] = str(ann)
            continue
        for where, fn in _callables(qualname, obj):
            sig = inspect.signature(fn)
            for p in sig.parameters.values():
                if p.name in ("self", "cls") or p.annotation is inspect.Parameter.empty:
                    continue
                if _is_any(p.annotation, fn.__globals__):
                    found[f"{where}:{p.name}"] = str(p.annotation)
            if sig.return_annotation is not inspect.Signature.empty and _is_any(
                sig.return_annotation, fn.__globals__
            ):
                found[f"{where}:return"] = str(sig.return_annotation)
    return found


def test_any_only_where_open() -> None:
    found = _any_annotations()
    unexplained = sorted(k for k in found if k not in ALLOWED and k not in PENDING)
    assert not unexplained, (
        "public signatures annotated Any without a reason (use a type from linops/_types.py, "
        "or add it to ALLOWED with why the input is open):\n  " + "\n  ".join(unexplained)
    )


def test_allow_list_is_current() -> None:
    found = _any_annotations()
    stale = sorted(k for k in ALLOWED if k not in found)
    assert not stale, "ALLOWED entries no longer annotated Any:\n  " + "\n  ".join(stale)


def test_report_counts(capsys: pytest.CaptureFixture[str]) -> None:
    found = _any_annotations()
    with capsys.disabled():
        print(
            f"\npublic signatures annotated Any: {len(found)} "
            f"({len([k for k in found if k in ALLOWED])} allowed, "
            f"{len([k for k in found if k in PENDING])} pending)"
        )
        mended = sorted(k for k in PENDING if k not in found)
        if mended:  # reported, not failed: whoever mends one need not edit this file at once
            print("PENDING entries already mended (remove them):\n  " + "\n  ".join(mended))


# --------------------------------------------------------------------------- the detector itself
def _sample(a: typing.Any, b: int, c: typing.Any | None, d: dict[str, typing.Any]) -> typing.Any:
    return a


def test_detector_finds_any() -> None:
    """The walker's test would pass vacuously if ``_is_any`` never said yes: check it does."""
    g = globals()
    hints = {p.name: p.annotation for p in inspect.signature(_sample).parameters.values()}
    assert _is_any(hints["a"], g)
    assert not _is_any(hints["b"], g)
    assert _is_any(hints["c"], g)  # Any | None is Any
    assert not _is_any(hints["d"], g)  # a container of Any is typed
    assert _is_any(inspect.signature(_sample).return_annotation, g)
    assert _is_any(typing.Any, {})
    assert not _is_any("NotImportedHere", {})
    assert _is_any(typing.ForwardRef("typing.Any"), g)  # as NamedTuple fields hold them


def test_aliases_admit_what_they_say() -> None:
    """The named types are importable from linops and mean what their docstrings say."""
    import linops
    from linops import _types

    assert set(typing.get_args(linops.Seed)) == {int, torch.Generator, type(None)}
    assert linops.Seed == _types.Seed
    array_members = set(typing.get_args(linops.Array))
    assert {np.ndarray, torch.Tensor, _types.CupyArray} == array_members
    assert array_members <= set(typing.get_args(linops.ArrayLike))
    assert isinstance(linops.aslinearoperator(torch.eye(2)), _types.SupportsMatvec)
    assert _types.ModelOutput is typing.Any  # the one alias that is open on purpose
    for name in _types.__all__:
        assert hasattr(_types, name), name
