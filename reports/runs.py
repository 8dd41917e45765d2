"""What every script of the toolkit shares while it runs: metadata, timed sections, smoke marks.

``linops report``, the examples and (through ``bench/_harness.py``) the benchmarks use these so
that a user always sees the same things: the name and elapsed time of each section as it runs,
``"smoke": true`` plus a visible mark on the tables and plot titles of a ``--quick`` run, and a
closing list of the files written, with their sizes.
"""

from __future__ import annotations

import datetime
import io
import os
import platform
import secrets
import shlex
import stat
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "SMOKE_NOTE",
    "Sections",
    "busy_machine_hint",
    "human_bytes",
    "print_written",
    "run_metadata",
    "save_figure",
    "smoke_title",
    "thread_counts",
    "versions",
    "write_bytes_atomic",
    "write_text_atomic",
]

#: printed above the tables of a ``--quick`` run and stored in its JSON as ``smoke_note``
SMOKE_NOTE = (
    "SMOKE RUN (--quick): sizes cut to check that the script runs; the numbers are not results"
)


def versions() -> dict[str, str]:
    """Return the versions of Python, linops, torch, numpy and scipy (``"absent"`` if missing)."""
    found = {"python": platform.python_version()}
    for name in ("linops", "torch", "numpy", "scipy"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            module = sys.modules.get(name)
            found[name] = str(getattr(module, "__version__", "absent"))
    return found


def thread_counts() -> dict[str, int | None]:
    """Return the thread counts that set the speed of a CPU run.

    ``torch_threads`` (``torch.get_num_threads()``, intra-op), ``torch_interop_threads``,
    ``cpu_count`` (``os.cpu_count()``) and ``cpus_usable`` (the CPUs this process may run on).
    """
    import torch

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
    }


def run_metadata(
    *, quick: bool, seed: int | None, argv: Sequence[str] | None = None
) -> dict[str, Any]:
    """Return what is needed to rerun and compare a run, JSON-ready.

    Parameters
    ----------
    quick
        Whether this is a ``--quick`` smoke run (stored as ``quick`` and ``smoke``).
    seed
        The run's seed (``None`` if it has none).
    argv
        The command line (default: ``sys.argv``).

    Returns
    -------
    dict
        ``command_line`` (shell-quoted), ``seed``, ``quick``, ``smoke``, ``versions``
        (:func:`versions`), ``threads`` (:func:`thread_counts`), ``platform``,
        ``load_average`` (1, 5, 15 min, where the OS has it) and ``started_utc`` (ISO 8601).
    """
    load = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return {
        "command_line": shlex.join(list(sys.argv if argv is None else argv)),
        "seed": seed,
        "quick": bool(quick),
        "smoke": bool(quick),
        "versions": versions(),
        "threads": thread_counts(),
        "platform": platform.platform(),
        "load_average": load,
        "started_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def busy_machine_hint(prog: str) -> str | None:
    """Return one line advising ``OMP_WAIT_POLICY=PASSIVE`` when the machine is busy, else None.

    Busy: the 1-minute load average is above 1.5 x the usable CPUs and ``OMP_WAIT_POLICY`` is
    not set. OpenMP's default busy-waiting then costs several-fold: ``linops report --quick``
    measured 130 s with ``PASSIVE`` against 656-1060 s without it at a load of about 20 on 2
    CPUs (and ``PASSIVE`` slows small kernels on an idle machine, so it is not the default).
    The variable is read when torch starts, so it has to be set before the command.
    """
    if "OMP_WAIT_POLICY" in os.environ or not hasattr(os, "getloadavg"):
        return None
    load = os.getloadavg()[0]
    cpus = thread_counts()["cpus_usable"] or 1
    if load <= 1.5 * cpus:
        return None
    return (
        f"{prog}: the machine is busy (load {load:.1f} on {cpus} CPUs); OpenMP's busy-waiting "
        f"then slows torch several-fold: rerun with OMP_WAIT_POLICY=PASSIVE in front of the "
        f"command if this is slow"
    )


def smoke_title(title: str, quick: bool) -> str:
    """Return ``title`` marked as a smoke run when ``quick`` (for plot titles)."""
    return f"[SMOKE RUN --quick] {title}" if quick else title


class Sections:
    """Timed, named sections of a run: ``with sections("name"): ...`` prints start and end.

    Each section prints ``PROG: [i] name ...`` when it starts and ``PROG: [i] name: 12.3 s
    (total 45.6 s)`` when it ends (also when it fails), flushed at once so a user watching a
    slow machine sees where the run is. The wall times are kept in :attr:`seconds`.
    """

    def __init__(self, prog: str) -> None:
        self.prog = prog
        self.start = time.perf_counter()
        #: wall seconds of each finished section, by name, in order
        self.seconds: dict[str, float] = {}
        self._open: Any = None
        hint = busy_machine_hint(prog)
        if hint is not None:
            print(hint, flush=True)

    def step(self, name: str, what: str = "") -> None:
        """End the section begun by the previous :meth:`step` (if any) and begin ``name``.

        For scripts that run their sections one after another; :meth:`end` closes the last.
        """
        self.end()
        self._open = self(name, what)
        self._open.__enter__()

    def end(self) -> None:
        """End the section begun by :meth:`step`, if one is open."""
        if self._open is not None:
            opened, self._open = self._open, None
            opened.__exit__(None, None, None)

    @contextmanager
    def __call__(self, name: str, what: str = "") -> Iterator[None]:
        """Time the section ``name`` (described by ``what``) and print its start and elapsed time."""
        index = len(self.seconds) + 1
        print(f"{self.prog}: [{index}] {name}{': ' + what if what else ''} ...", flush=True)
        t0 = time.perf_counter()
        failed = True
        try:
            yield
            failed = False
        finally:
            dt = time.perf_counter() - t0
            self.seconds[name] = dt
            state = "failed after" if failed else "done in"
            print(
                f"{self.prog}: [{index}] {name} {state} {dt:.1f} s (total {self.total():.1f} s)",
                flush=True,
            )

    def total(self) -> float:
        """Return the seconds since this object was made."""
        return time.perf_counter() - self.start


def human_bytes(n: float) -> str:
    """Return ``n`` bytes as a short human-readable size (``"1.2 MB"``, decimal units)."""
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")  # pragma: no cover


def print_written(
    prog: str, folder: str | os.PathLike[str], *, since: float | None = None
) -> list[Path]:
    """Print where a run wrote: the folder, then each file (below it) with its size.

    Parameters
    ----------
    prog
        The script's name, printed first.
    folder
        Its output folder.
    since
        Only files modified at or after this ``time.time()`` (default: all).

    Returns
    -------
    list of Path
        The files listed.
    """
    root = Path(folder)
    files = sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and (since is None or p.stat().st_mtime >= since - 1.0)
    )
    total = sum(p.stat().st_size for p in files)
    print(f"{prog}: wrote {len(files)} file(s), {human_bytes(total)}, to {root}/", flush=True)
    for p in files:
        print(f"  {p.relative_to(root)}  {human_bytes(p.stat().st_size)}")
    return files


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` whole or not at all; return the path.

    The text goes to a new file in the target's folder, which then replaces the target in one
    rename (``os.replace``): a reader, or a run killed while it writes, sees the old file or
    the new one, never a half-written one that looks complete. The target keeps its
    permissions (a new one gets the usual ones), and a symbolic link is written through to
    the file it points at; hard links to the old file keep the old content. Where the folder
    takes no new file (not writable, or missing) the target is written in place, as a plain
    write would (and fails as it would).
    """
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` whole or not at all, as :func:`write_text_atomic`."""
    path = Path(path)
    target = Path(os.path.realpath(path))  # through symbolic links
    tmp = target.with_name(f".{target.name[:64]}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        f = open(tmp, "xb")
    except OSError:  # a folder that takes no new file (or is missing): as a plain write does
        target.write_bytes(data)
        return path
    try:
        with f:
            f.write(data)
        if target.exists():
            os.chmod(tmp, stat.S_IMODE(target.stat().st_mode))
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def save_figure(fig: Figure, path: str | os.PathLike[str], **kwargs: Any) -> Path:
    """``fig.savefig(path, **kwargs)``, written whole or not at all (:func:`write_bytes_atomic`).

    The format is ``format=`` if given, else the suffix's (``.png``, ``.pdf``, ``.svg``); a
    path without a suffix gets matplotlib's default format and its suffix, as ``savefig``
    does. Returns the path written.
    """
    path = Path(path)
    if "format" not in kwargs:
        if not path.suffix:
            import matplotlib

            path = path.with_name(f"{path.name}.{matplotlib.rcParams['savefig.format']}")
        kwargs["format"] = path.suffix[1:]
    buffer = io.BytesIO()
    fig.savefig(buffer, **kwargs)
    return write_bytes_atomic(path, buffer.getvalue())
