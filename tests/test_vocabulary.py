"""One vocabulary across linops, estimators and trainers (README, "Conventions").

Walks the public API (every name in ``__all__`` of each package and of its public modules):
functions, classes (constructor, ``__call__`` and public methods) and result NamedTuples, and
checks argument and field names against the conventions:

* randomness is ``seed`` (``int | torch.Generator | None``), never ``generator`` / ``rng``;
* product counts and budgets are ``num_matvecs``, never ``num_products`` / ``max_products``;
* tolerances are ``rtol`` / ``atol`` (meaning as in ``scipy.sparse.linalg.cg``), never ``tol``;
* ``params`` only selects parameters: an argument ``params`` annotated as a mapping or a
  tensor (parameter values) is an error, values are called ``values``;
* result fields: ``num_matvecs`` for products, ``left_vectors`` / ``right_vectors`` for
  singular vectors, ``stderr`` for a standard error (no ``trace_stderr`` / ``ratio_stderr``).

``linops`` is read here, not edited by this test's owners: its known departures are listed in
``PENDING`` (with the reason) and reported, not failed; a new departure anywhere fails.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest

PACKAGES = ("linops", "estimators", "trainers")

#: argument names that have one vocabulary name instead
BANNED_ARGS = {
    "generator": "seed",
    "rng": "seed",
    "random_state": "seed",
    "num_products": "num_matvecs",
    "max_products": "num_matvecs",
    "max_matvecs": "num_matvecs",
    "tol": "rtol / atol",
    "params_t": "values_t",
    "params_0": "values_0",
}

#: result-field names that have one vocabulary name instead
BANNED_FIELDS = {
    "num_products": "num_matvecs",
    "total_products": "num_matvecs (of the whole computation)",
    "products": "num_matvecs",
    "left": "left_vectors",
    "right": "right_vectors",
    "trace_stderr": "a TraceEstimate (estimate, stderr)",
    "ratio_stderr": "stderr",
    "ratio_std": "std",
}

#: known departures, ``"module.qualname:argument" -> why it is still there``
PENDING = {
    "linops.distributed.shared_seed:seed-annotation": (
        "the int every rank agrees on (it returns one); a generator cannot be broadcast"
    ),
    "trainers.setups.digits_mlp_run:seed-annotation": (
        "an int names one of the paper's runs (two generators are derived from it)"
    ),
}


def _public_modules(name: str) -> Iterator[ModuleType]:
    package = importlib.import_module(name)
    yield package
    for info in pkgutil.iter_modules(package.__path__):
        if not info.name.startswith("_") and info.name != "cli":
            yield importlib.import_module(f"{name}.{info.name}")


def _public_objects() -> Iterator[tuple[str, Any]]:
    seen: set[int] = set()
    for pkg in PACKAGES:
        for mod in _public_modules(pkg):
            for attr in getattr(mod, "__all__", []):
                obj = getattr(mod, attr)
                if id(obj) in seen or not (inspect.isclass(obj) or inspect.isfunction(obj)):
                    continue
                seen.add(id(obj))
                yield f"{obj.__module__}.{obj.__qualname__}", obj


def _callables(qualname: str, obj: Any) -> Iterator[tuple[str, Any]]:
    if inspect.isfunction(obj):
        yield qualname, obj
        return
    if hasattr(obj, "_fields"):
        return
    for name, member in vars(obj).items():
        if name in ("__init__", "__call__") or (not name.startswith("_") and callable(member)):
            fn = member.__func__ if isinstance(member, staticmethod | classmethod) else member
            if inspect.isfunction(fn):
                yield (qualname if name == "__init__" else f"{qualname}.{name}"), fn


def _departures() -> list[str]:
    found = []
    for qualname, obj in _public_objects():
        if inspect.isclass(obj) and hasattr(obj, "_fields"):
            for field in obj._fields:
                if field in BANNED_FIELDS:
                    found.append(f"{qualname}:{field}: field, use {BANNED_FIELDS[field]}")
        for where, fn in _callables(qualname, obj):
            for p in inspect.signature(fn).parameters.values():
                ann = str(p.annotation)
                if p.name in BANNED_ARGS:
                    found.append(f"{where}:{p.name}: argument, use {BANNED_ARGS[p.name]}")
                elif p.name == "seed" and not ("Generator" in ann or "Seed" in ann):
                    found.append(
                        f"{where}:seed-annotation: {ann}, use int | torch.Generator | None"
                    )
                elif p.name == "params" and any(t in ann for t in ("Mapping", "dict", "Tensor")):
                    found.append(f"{where}:params: holds values ({ann}), use values")
    return found


def test_public_api_uses_the_one_vocabulary() -> None:
    found = _departures()
    pending = [f for f in found if f.split(": ")[0] in PENDING]
    new = [f for f in found if f.split(": ")[0] not in PENDING]
    for f in pending:
        print("pending:", f)
    assert not new, "departures from the vocabulary (README, Conventions):\n" + "\n".join(new)


def test_the_walk_sees_the_api() -> None:
    """The walk itself: it finds the renamed names and would catch the old ones."""
    names = dict(_public_objects())
    assert "estimators.laziness.hessian_norm" in names
    assert "trainers.lowrank.lowrank_factors" in names
    assert "linops.lanczos.LanczosResult" in names

    def bad(generator: int = 0, tol: float = 0.0, params: dict | None = None) -> None: ...

    fake = [p.name for p in inspect.signature(bad).parameters.values() if p.name in BANNED_ARGS]
    assert fake == ["generator", "tol"]


@pytest.mark.parametrize("key", sorted(PENDING))
def test_pending_entries_name_real_objects(key: str) -> None:
    """Every pending entry names an object that exists (stale entries are removed)."""
    parts = key.split(":")[0].split(".")
    for i in range(len(parts), 0, -1):  # the longest importable prefix, then attributes
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for name in parts[i:]:
            assert hasattr(obj, name), f"{key}: {'.'.join(parts)} does not exist any more"
            obj = getattr(obj, name)
        return
    pytest.fail(f"{key}: no module of {'.'.join(parts)} imports")
