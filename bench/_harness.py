"""What every benchmark script shares: its command line, its timings and its JSON output.

Each script under ``bench/`` takes ``--out`` (a folder, created if needed) and ``--quick`` (a
small run for the smoke tests, ``tests/test_scripts.py``), times with ``time.perf_counter``
and writes ``<name>.json`` into ``--out``. Scripts add their own options to :func:`parser`'s
result.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["median_seconds", "parser", "write_json"]


def parser(
    doc: str | None, default_out: str | Path, *, quick_help: str = "small run for smoke tests"
) -> argparse.ArgumentParser:
    """An argument parser with ``--out`` (default ``default_out``) and ``--quick``.

    ``doc`` is the script's module docstring; its first line is the description.
    """
    p = argparse.ArgumentParser(description=(doc or "").splitlines()[0] if doc else None)
    p.add_argument("--out", type=Path, default=Path(default_out))
    p.add_argument("--quick", action="store_true", help=quick_help)
    return p


def write_json(out: str | Path, stem: str, payload: Any, *, indent: int | None = 1) -> Path:
    """Write ``payload`` to ``out/stem.json`` (``out`` created if needed); return the path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{stem}.json"
    path.write_text(json.dumps(payload, indent=indent))
    return path


def median_seconds(fn: Callable[[], Any], repeats: int) -> float:
    """Median wall-clock seconds of ``repeats`` calls of ``fn`` (warm it up first)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
