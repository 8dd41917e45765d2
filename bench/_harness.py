"""What every benchmark script shares: its command line, its timings and its JSON output.

Each script under ``bench/`` takes ``--out`` (a folder, created if needed) and ``--quick`` (a
small run for the smoke tests, ``tests/test_scripts.py``), times with ``time.perf_counter``
and writes ``<name>.json`` (strict JSON: a non-finite number, such as the break-even of a
step that saves no time, is written as ``null``) and a markdown summary, ``<name>.md``
(:func:`write_markdown`), into ``--out``. Scripts add their own options to :func:`parser`'s
result.

What a script gets from :func:`parser` without doing anything else:

* when it ends normally, one line saying where it wrote (each file written under ``--out``
  during the run, with its size) and its total wall time;
* :func:`write_json` marks a ``--quick`` run's JSON with ``"smoke": true`` (and a
  ``smoke_note``) and prints ``wrote PATH``;
* a missing optional peer (curvlinops, JAX, PyHessian, transformers, ...) ends in one line
  saying how to install it or which option skips it (:func:`missing_peer_hint`), not a
  traceback; ``linops bench`` prints the same line.

:func:`section` times a named step and prints its name and elapsed time; :func:`smoke_title`
marks plot titles of a ``--quick`` run.
"""

from __future__ import annotations

import argparse
import atexit
import json
import math
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = [
    "PEERS",
    "median_seconds",
    "missing_peer_hint",
    "parser",
    "section",
    "smoke_title",
    "write_json",
]

ROOT = Path(__file__).resolve().parents[1]

#: optional peers the benchmarks compare with: import name -> how to install it
PEERS = {
    "curvlinops": "bash scripts/setup.sh bench",
    "backpack": "bash scripts/setup.sh bench",
    "jax": "bash scripts/setup.sh bench",
    "jaxlib": "bash scripts/setup.sh bench",
    "pyhessian": "bash scripts/setup.sh bench",
    "transformers": "bash scripts/setup.sh bench",
    "cupy": "pip install cupy-cuda12x (a CUDA GPU only)",
}

#: the run of this process: its parsed arguments, start time and wall clock at the start
_RUN: dict[str, Any] = {}


def missing_peer_hint(module: str, script: str | Path | None = None) -> str | None:
    """Return one line for a missing optional peer ``module``, or None if it is not a peer.

    The line names the script and the peer, how to install it, and the script's option that
    skips that peer when it has one (an option ``--no-PEER`` or ``--skip-PEER`` in its source).
    """
    top = module.split(".")[0]
    if top not in PEERS:
        return None
    script = Path(script or sys.argv[0])
    try:
        source = script.read_text(encoding="utf-8")
    except OSError:
        source = ""
    skips = sorted(set(re.findall(rf"--(?:no|skip)-{re.escape(top)}\b", source)))
    if top == "backpack" and not skips:  # backpack comes with curvlinops
        skips = sorted(set(re.findall(r"--(?:no|skip)-curvlinops\b", source)))
    skip = f", or skip that peer with {' / '.join(skips)}" if skips else ""
    return (
        f"{script.name}: the optional peer {top!r} is not installed: install it with "
        f"`{PEERS[top]}`{skip}"
    )


def _importable(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # ValueError: sys.modules[module] is None
        return False


def _excepthook(kind: type[BaseException], err: BaseException, tb: Any) -> None:
    if isinstance(err, ModuleNotFoundError):
        hint = missing_peer_hint(err.name or "")
        if hint is not None:
            print(hint, file=sys.stderr)
            return
    sys.__excepthook__(kind, err, tb)


class _BenchParser(argparse.ArgumentParser):
    """An ArgumentParser that remembers the run's ``--out`` and ``--quick`` for the harness."""

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        parsed, rest = super().parse_known_args(args, namespace)
        if not _RUN and not _is_child(parsed):
            self._check_peers(parsed)
            _runs()  # imported now: importing torch at exit would fail
            _RUN.update(
                args=parsed, start=time.perf_counter(), wall=time.time(), script=sys.argv[0]
            )
            atexit.register(_report_written)
        return parsed, rest

    def _check_peers(self, parsed: argparse.Namespace) -> None:
        """Stop at once, with one line, when a peer the script can skip is wanted but missing.

        A peer is wanted when the script has an option ``--no-PEER`` / ``--skip-PEER`` and it
        was not given; without this check the run would fail minutes later, at the import.
        """
        for peer in PEERS:
            for option in (f"--no-{peer}", f"--skip-{peer}"):
                action = self._option_string_actions.get(option)
                if action is None or getattr(parsed, action.dest, False):
                    continue
                if not _importable(peer):
                    print(missing_peer_hint(peer), file=sys.stderr)
                    raise SystemExit(1)

    def error(self, message: str) -> Any:  # type: ignore[override]
        """Report a bad command line (nothing was run, so nothing is listed at exit)."""
        _RUN.clear()
        atexit.unregister(_report_written)
        super().error(message)


def _is_child(args: argparse.Namespace) -> bool:
    """Whether this is a script's internal child process (``--child`` / ``--worker``).

    Children talk to their parent through stdout or files, so the harness adds nothing there.
    """
    return bool(getattr(args, "child", None) or getattr(args, "worker", None))


def _report_written() -> None:
    """At exit: print where the run wrote (files under --out changed during it) and its time."""
    out = getattr(_RUN.get("args"), "out", None)
    if out is None or not Path(out).is_dir():
        return
    prog = Path(_RUN.get("script", "bench")).name
    seconds = time.perf_counter() - _RUN["start"]
    _runs().print_written(f"{prog} ({seconds:.1f} s)", out, since=_RUN["wall"])


def _runs() -> Any:
    """Return :mod:`reports.runs` (the repository root is put on the path if needed)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(1, str(ROOT))
    import reports.runs

    return reports.runs


def parser(
    doc: str | None, default_out: str | Path, *, quick_help: str = "small run for smoke tests"
) -> argparse.ArgumentParser:
    """Return an argument parser with ``--out`` (default ``default_out``) and ``--quick``.

    ``doc`` is the script's module docstring; its first line is the description. Parsing it
    also arranges the closing "wrote" lines and the one-line hint for a missing peer.
    """
    sys.excepthook = _excepthook
    p = _BenchParser(description=(doc or "").splitlines()[0] if doc else None)
    p.add_argument(
        "--out",
        type=Path,
        default=Path(default_out),
        help=f"folder of the JSON and plots (default: {default_out})",
    )
    p.add_argument("--quick", action="store_true", help=quick_help)
    return p


def _quick() -> bool:
    return bool(getattr(_RUN.get("args"), "quick", False))


def write_json(out: str | Path, stem: str, payload: Any, *, indent: int | None = 1) -> Path:
    """Write ``payload`` to ``out/stem.json`` (``out`` created if needed); return the path.

    A dict payload of a ``--quick`` run gets ``"smoke": true`` and a ``smoke_note`` (unless it
    has them); the path written is printed.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{stem}.json"
    if isinstance(payload, dict) and "smoke" not in payload and _RUN:
        payload = {"smoke": _quick(), **payload}
        if _quick():
            payload.setdefault("smoke_note", _runs().SMOKE_NOTE)
    write_text(path, strict_json(payload, indent=indent))
    if _RUN:  # not in a child process, whose stdout may be its parent's channel
        print(f"wrote {path}", flush=True)
    return path


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` whole or not at all (:func:`reports.runs.write_text_atomic`)."""
    return Path(_runs().write_text_atomic(path, text))


def save_figure(fig: Any, path: str | Path, **kwargs: Any) -> Path:
    """``fig.savefig``, written whole or not at all (:func:`reports.runs.save_figure`)."""
    return Path(_runs().save_figure(fig, path, **kwargs))


def save_array(path: str | Path, array: Any) -> Path:
    """``numpy.save(path, array)`` (``.npy`` added if missing), written whole or not at all."""
    import io

    import numpy as np

    path = Path(path)
    if path.suffix != ".npy":
        path = path.with_name(path.name + ".npy")
    buffer = io.BytesIO()
    np.save(buffer, array)
    return Path(_runs().write_bytes_atomic(path, buffer.getvalue()))


def strict_json(payload: Any, *, indent: int | None = 1) -> str:
    """``json.dumps`` with every NaN and infinity as ``null``: strict JSON (RFC 8259 has neither).

    Python's ``json`` writes them as the bare words ``NaN`` and ``Infinity``, which other
    parsers (``jq``, JavaScript's ``JSON.parse``, Go, Rust's serde) refuse.
    """

    def finite(x: Any) -> Any:
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: finite(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return [finite(v) for v in x]
        return x

    return json.dumps(finite(payload), indent=indent, allow_nan=False)


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """Return a markdown table: ``header`` and one line per row (each cell as ``str``)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_markdown(out: str | Path, stem: str, title: str, body: str) -> Path:
    """Write ``# title`` (marked as a smoke run under ``--quick``) and ``body`` to ``out/stem.md``.

    Prints ``body`` and the path written; returns the path.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{stem}.md"
    write_text(path, f"# {smoke_title(title)}\n\n{body}\n")
    print(body)
    print(f"wrote {path}", flush=True)
    return path


@contextmanager
def section(name: str) -> Iterator[None]:
    """Time a named step of a benchmark, printing its name and then its elapsed time."""
    prog = Path(_RUN.get("script", sys.argv[0])).stem
    timer = _RUN.setdefault("sections", _runs().Sections(prog))
    with timer(name):
        yield


def smoke_title(title: str) -> str:
    """Return ``title`` marked as a smoke run when this run has ``--quick``."""
    return str(_runs().smoke_title(title, _quick()))


def median_seconds(fn: Callable[[], Any], repeats: int) -> float:
    """Return the median wall-clock seconds of ``repeats`` calls of ``fn`` (warm it up first)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
