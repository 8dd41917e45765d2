"""Atomic, verified, resumable column-chunk checkpoints for long dense computations.

A dense ``(m, n)`` matrix built column chunk by column chunk (e.g. a training Jacobian)
is written to a directory as one ``.npy`` file per finished chunk plus a ``manifest.json`` that
identifies the computation (a content fingerprint, :mod:`linops._fingerprint`, with the shape,
dtype and chunking). Trust comes from four rules:

* **Every chunk names its computation and its content**:
  ``cols_<start>_<stop>.<key>.<sha>.npy``, where ``key`` is a hash of the manifest and ``sha``
  the first 16 hex digits of the SHA-256 of the file's bytes. Chunks of another computation
  (another key: e.g. left behind when ``manifest.json`` was deleted) are never loaded, and a
  chunk whose bytes do not match its checksum (a flipped byte, a truncated file) is named in a
  :class:`CheckpointWarning`, deleted and recomputed.
* **The manifest is created exclusively**: written to a temporary file, then hard-linked into
  place (``link`` fails if the name exists; ``O_EXCL`` where links are not supported), so of
  two computations started together on one empty directory exactly one creates it, and the
  other finds a different manifest and refuses with a ``ValueError``.
* **Writes are atomic**: every file is written to a temporary name in the same directory,
  flushed, ``fsync``-ed and renamed into place, so a killed run leaves only whole chunks.
* **Nothing is unpickled**: chunks are read with ``allow_pickle=False``.

Several processes may share one directory (the ranks of a column-parallel ``to_dense``, forked
workers), so a temporary file carries its writer's host and pid, and only those of dead writers
on this host are swept away as left-overs of a killed run.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import socket
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import numpy.typing as npt

__all__ = ["CheckpointWarning", "ColumnCheckpoint"]

_FORMAT = "linops-column-checkpoint-v2"
_CHUNK = re.compile(r"^cols_(\d{9})_(\d{9})\.([0-9a-f]{16})\.([0-9a-f]{16})\.npy$")
_MANIFEST_READ_TRIES = 20  # a manifest created with O_EXCL may be read before it is whole


class CheckpointWarning(UserWarning):
    """A checkpoint file was damaged (and is recomputed) or belongs to another computation."""


class ColumnCheckpoint:
    """A directory of finished, checksummed column chunks of one dense ``(m, n)`` matrix.

    Parameters
    ----------
    directory
        Where the chunks live (created if missing).
    shape
        ``(m, n)`` of the full matrix.
    dtype
        numpy dtype of the chunks.
    fingerprint
        A string that identifies the computation (:func:`linops._fingerprint.operator_fingerprint`
        and the chunking); a directory holding another fingerprint, shape or dtype is refused
        rather than mixed in.

    Raises
    ------
    ValueError
        If the directory already holds a checkpoint of a different computation, or its
        manifest cannot be read.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        shape: tuple[int, int],
        dtype: npt.DTypeLike,
        fingerprint: str,
    ) -> None:
        self.directory = Path(directory)
        if self.directory.exists() and not self.directory.is_dir():
            raise ValueError(f"checkpoint_dir: expected a directory, got the file {directory}")
        self.directory.mkdir(parents=True, exist_ok=True)
        self.shape = (int(shape[0]), int(shape[1]))
        self.dtype = np.dtype(dtype)
        manifest = {
            "format": _FORMAT,
            "shape": list(self.shape),
            "dtype": self.dtype.str,
            "fingerprint": fingerprint,
        }
        #: names this computation's chunk files
        self.key = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]
        path = self.directory / "manifest.json"
        if not _create_exclusively(path, json.dumps(manifest, indent=1).encode()):
            old = _read_manifest(path)
            if old != manifest:
                diff = sorted(k for k in manifest if old.get(k) != manifest[k])
                hint = (
                    f" (it was written by {old.get('format')!r}, this is {_FORMAT!r}: "
                    "recompute into a new directory)"
                    if old.get("format") != _FORMAT
                    else ""
                )
                raise ValueError(
                    f"checkpoint: {self.directory} holds a different computation (differs in "
                    f"{diff}){hint}; expected an empty directory or one written by the same "
                    "computation"
                )
        _sweep_stale_temporaries(self.directory)
        self._index: dict[tuple[int, int], list[Path]] = {}
        foreign = self.refresh()
        if foreign:
            warnings.warn(
                f"checkpoint: ignoring {foreign} chunk file(s) in {self.directory} that belong "
                "to another computation (or an older checkpoint format)",
                CheckpointWarning,
                stacklevel=2,
            )

    def refresh(self) -> int:
        """Rescan the directory for this computation's chunks; returns the number of others."""
        index: dict[tuple[int, int], list[Path]] = {}
        foreign = 0
        for name in sorted(os.listdir(self.directory)):
            match = _CHUNK.match(name)
            if match is None or match.group(3) != self.key:
                foreign += name.startswith("cols_") and name.endswith(".npy")
                continue
            span = (int(match.group(1)), int(match.group(2)))
            index.setdefault(span, []).append(self.directory / name)
        self._index = index
        return foreign

    def _name(self, start: int, stop: int, checksum: str) -> str:
        return f"cols_{start:09d}_{stop:09d}.{self.key}.{checksum}.npy"

    def has(self, start: int, stop: int) -> bool:
        """Whether a file of columns ``[start, stop)`` was seen (it is verified on loading)."""
        return bool(self._index.get((start, stop)))

    def load(self, start: int, stop: int) -> np.ndarray | None:
        """Return the finished chunk of columns ``[start, stop)``, shape ``(m, stop - start)``.

        Returns ``None`` if there is none, or if every file of it is damaged: such a file
        (checksum mismatch, truncated, wrong shape or dtype) is named in a
        :class:`CheckpointWarning` and deleted, and the caller recomputes the chunk.
        """
        expected = (self.shape[0], stop - start)
        for path in list(self._index.get((start, stop), [])):
            problem = None
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                self._index[(start, stop)].remove(path)
                continue
            checksum = _CHUNK.match(path.name).group(4)  # type: ignore[union-attr]
            if hashlib.sha256(data).hexdigest()[:16] != checksum:
                problem = "its bytes do not match its checksum (truncated or modified)"
            else:
                try:
                    arr = np.load(io.BytesIO(data), allow_pickle=False)
                except ValueError as err:
                    problem = f"it is not a readable array ({err})"
                else:
                    if arr.shape == expected and arr.dtype == self.dtype:
                        return arr
                    problem = (
                        f"expected shape {expected} and dtype {self.dtype}, got {arr.shape} "
                        f"and {arr.dtype}"
                    )
            warnings.warn(
                f"checkpoint: {path} is damaged: {problem}; recomputing columns [{start}, {stop})",
                CheckpointWarning,
                stacklevel=2,
            )
            path.unlink(missing_ok=True)
            self._index[(start, stop)].remove(path)
        return None

    def save(self, start: int, stop: int, chunk: np.ndarray) -> Path:
        """Write columns ``[start, stop)`` atomically, named by their checksum; returns the path."""
        chunk = np.ascontiguousarray(chunk, dtype=self.dtype)
        expected = (self.shape[0], stop - start)
        if chunk.shape != expected:
            raise ValueError(f"chunk: expected shape {expected}, got {chunk.shape}")
        buf = io.BytesIO()
        np.save(buf, chunk, allow_pickle=False)
        data = buf.getvalue()
        path = self.directory / self._name(start, stop, hashlib.sha256(data).hexdigest()[:16])
        _atomic_write(path, data)
        paths = self._index.setdefault((start, stop), [])
        if path not in paths:
            paths.append(path)
        return path

    def finished(self) -> list[tuple[int, int]]:
        """Column ranges with a file on disk (as of the last :meth:`refresh` or save)."""
        return sorted(span for span, paths in self._index.items() if paths)


def _create_exclusively(path: Path, data: bytes) -> bool:
    """Create ``path`` holding ``data`` unless it exists; whether this call created it.

    The file is written whole under a temporary name and hard-linked into place, which fails
    if the name exists, so no reader ever sees a partial manifest and of two racing writers
    exactly one succeeds. Where hard links are not supported, ``O_CREAT | O_EXCL``.
    """
    fd, tmp = _temporary(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError:  # pragma: no cover - file systems without hard links
            try:
                fd2 = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd2, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
    finally:
        Path(tmp).unlink(missing_ok=True)
    _fsync_dir(path.parent)
    return True


def _read_manifest(path: Path) -> dict:
    for attempt in range(_MANIFEST_READ_TRIES):
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as err:
            if attempt == _MANIFEST_READ_TRIES - 1:
                raise ValueError(f"checkpoint: {path} is not a valid manifest ({err})") from err
            time.sleep(0.05)  # an O_EXCL manifest being written (no hard links here)
        except FileNotFoundError as err:
            raise ValueError(f"checkpoint: {path} disappeared while being read") from err
    raise AssertionError("unreachable")  # pragma: no cover


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
