"""Atomic, resumable column-chunk checkpoints for long dense computations.

A dense ``(m, n)`` matrix built column chunk by column chunk (e.g. a training Jacobian, seed 004)
is written to a directory as one ``.npy`` file per finished chunk plus a ``manifest.json`` that
fingerprints the computation. Every file is written to a temporary name in the same directory,
flushed, ``fsync``-ed and renamed into place, so a killed run leaves only whole chunks behind; a
rerun with the same fingerprint skips them. Files are read with ``allow_pickle=False``: nothing in
the directory is ever unpickled.

Several processes may share one directory (the ranks of a column-parallel ``to_dense``), so a
temporary file carries its writer's host and pid, and only those of dead writers on this host
are swept away as left-overs of a killed run.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["ColumnCheckpoint"]

_FORMAT = "linops-column-checkpoint-v1"


class ColumnCheckpoint:
    """A directory of finished column chunks of one dense ``(m, n)`` matrix.

    Parameters
    ----------
    directory
        Where the chunks live (created if missing).
    shape
        ``(m, n)`` of the full matrix.
    dtype
        numpy dtype of the chunks.
    fingerprint
        A string that identifies the computation; a directory holding another fingerprint,
        shape or dtype is refused rather than mixed in.

    Raises
    ------
    ValueError
        If the directory already holds a checkpoint of a different computation.
    """

    def __init__(
        self, directory: str | os.PathLike, *, shape: tuple[int, int], dtype: Any, fingerprint: str
    ) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.shape = (int(shape[0]), int(shape[1]))
        self.dtype = np.dtype(dtype)
        manifest = {
            "format": _FORMAT,
            "shape": list(self.shape),
            "dtype": self.dtype.str,
            "fingerprint": fingerprint,
        }
        path = self.directory / "manifest.json"
        if path.exists():
            try:
                old = json.loads(path.read_text())
            except json.JSONDecodeError as err:
                raise ValueError(f"checkpoint: {path} is not a valid manifest ({err})") from err
            if old != manifest:
                diff = sorted(k for k in manifest if old.get(k) != manifest[k])
                raise ValueError(
                    f"checkpoint: {self.directory} holds a different computation (differs in {diff}); "
                    "expected an empty directory or one written by the same computation"
                )
        else:
            _atomic_write(path, json.dumps(manifest, indent=1).encode())
        _sweep_stale_temporaries(self.directory)

    def path(self, start: int, stop: int) -> Path:
        """File of columns ``[start, stop)``."""
        return self.directory / f"cols_{start:09d}_{stop:09d}.npy"

    def has(self, start: int, stop: int) -> bool:
        """Whether columns ``[start, stop)`` are finished."""
        return self.path(start, stop).exists()

    def load(self, start: int, stop: int) -> np.ndarray:
        """The finished chunk of columns ``[start, stop)``, shape ``(m, stop - start)``.

        Raises
        ------
        ValueError
            If the file does not hold an array of that shape and dtype.
        """
        arr = np.load(self.path(start, stop), allow_pickle=False)
        expected = (self.shape[0], stop - start)
        if arr.shape != expected or arr.dtype != self.dtype:
            raise ValueError(
                f"checkpoint: {self.path(start, stop).name}: expected shape {expected} and dtype "
                f"{self.dtype}, got {arr.shape} and {arr.dtype}"
            )
        return arr

    def save(self, start: int, stop: int, chunk: np.ndarray) -> None:
        """Write columns ``[start, stop)`` atomically."""
        chunk = np.ascontiguousarray(chunk, dtype=self.dtype)
        expected = (self.shape[0], stop - start)
        if chunk.shape != expected:
            raise ValueError(f"chunk: expected shape {expected}, got {chunk.shape}")
        _atomic_save(self.path(start, stop), chunk)

    def finished(self) -> list[tuple[int, int]]:
        """Column ranges already on disk."""
        out = []
        for p in sorted(self.directory.glob("cols_*.npy")):
            _, a, b = p.stem.split("_")
            out.append((int(a), int(b)))
        return out


_SEP = "~"  # between the parts of a temporary name: <file>.<host>~<pid>~<random>.tmp
_UNOWNED_STALE_S = 3600.0  # a temporary of no recognisable writer is stale after this long
_HOST = socket.gethostname().replace(".", "-").replace(_SEP, "-")


def _temporary(path: Path) -> tuple[int, str]:
    prefix = f"{path.name}.{_HOST}{_SEP}{os.getpid()}{_SEP}"
    return tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=".tmp")


def _writer(tmp: Path) -> tuple[str, int] | None:
    """``(host, pid)`` of the process that wrote temporary ``tmp``, if its name tells."""
    parts = tmp.name.split(_SEP)
    if len(parts) != 3 or not parts[1].isdigit():
        return None
    return parts[0].rsplit(".", 1)[-1], int(parts[1])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - another user's live process
        return True
    return True


def _sweep_stale_temporaries(directory: Path) -> None:
    """Remove temporaries of killed writers; never those of a live writer (another rank)."""
    for tmp in directory.glob("*.tmp"):
        writer = _writer(tmp)
        try:
            if writer is None:
                stale = time.time() - tmp.stat().st_mtime > _UNOWNED_STALE_S
            else:
                stale = writer[0] == _HOST and writer[1] != os.getpid() and not _alive(writer[1])
        except FileNotFoundError:  # finished by its writer meanwhile
            continue
        if stale:
            tmp.unlink(missing_ok=True)


def _atomic_save(path: Path, arr: np.ndarray) -> None:
    fd, tmp = _temporary(path)
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, arr, allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = _temporary(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)
