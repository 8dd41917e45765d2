"""An orthonormal basis kept in a file: out-of-core Krylov bases for models too large for memory.

A Lanczos basis of ``ncv`` vectors of a 124M-parameter model takes ``ncv`` times 0.5 GB in
float32, beside the Hessian product's own 4 GB. :class:`DiskColumns` keeps the columns in a
file instead and reads them back by chunks of :data:`linops._krylov.CHUNK_ROWS` rows for each
use: the projections of classical Gram-Schmidt applied twice (three passes over the file,
the second fusing the first update with the second projection), the recombinations of a
thick restart (in place, chunk by chunk) and Ritz vectors. Only a chunk buffer
(``CHUNK_ROWS x ncv`` entries) is in memory.

The file is created already unlinked in the directory given (``tempfile.TemporaryFile``), so
nothing is left behind even when the process is killed, and its space is reserved up front
(a full disk is an error before the first product, not in the middle of a run). It is read
and written with positioned ``pread``/``pwrite`` into the chunk buffer, not memory-mapped: the
pages the operating system caches belong to its page cache, which it reclaims under
pressure, and not to the process's resident memory.
"""

from __future__ import annotations

import os
import tempfile
from typing import BinaryIO

import torch

from linops._krylov import CHUNK_ROWS


class DiskColumns:
    """``n x ncols`` matrix in a temporary file, column-major; :meth:`view` its first columns.

    All arithmetic runs on ``device`` in ``dtype``; the file holds the raw entries.
    """

    def __init__(
        self,
        n: int,
        ncols: int,
        dtype: torch.dtype,
        device: torch.device,
        directory: str | os.PathLike[str],
    ) -> None:
        self.n, self.width, self.dtype, self.device = n, ncols, dtype, torch.device(device)
        self.itemsize = torch.empty((), dtype=dtype).element_size()
        size = n * ncols * self.itemsize
        if not os.path.isdir(directory):
            raise ValueError(f"basis_dir: {os.fspath(directory)!r} is not a directory")
        self._file: BinaryIO = tempfile.TemporaryFile(dir=directory)
        try:
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(self._file.fileno(), 0, size)
            else:  # pragma: no cover - macOS and Windows
                os.ftruncate(self._file.fileno(), size)
        except OSError as err:
            self._file.close()
            raise ValueError(
                f"basis_dir: cannot reserve {size / 2**30:.3g} GiB for a basis of {ncols} "
                f"vectors of n={n} in {os.fspath(directory)!r} ({err.strerror}); free space "
                "there, name another directory, or lower ncv"
            ) from err
        self._buf = torch.empty(ncols, min(n, CHUNK_ROWS), dtype=dtype)

    @property
    def shape(self) -> tuple[int, int]:
        return self.n, self.width

    def view(self, width: int) -> DiskColumns:
        """Return a view of the first ``width`` columns (sharing the file and the buffer)."""
        v = object.__new__(DiskColumns)
        v.__dict__ |= self.__dict__
        v.width = width
        return v

    def close(self) -> None:
        self._file.close()

    def _chunks(self) -> list[tuple[int, int]]:
        """Row ranges ``(lo, hi)`` of the chunks read back at a time."""
        return [(lo, min(lo + CHUNK_ROWS, self.n)) for lo in range(0, self.n, CHUNK_ROWS)]

    def _offset(self, col: int, row: int) -> int:
        return (col * self.n + row) * self.itemsize

    def _rows(self, lo: int, hi: int) -> torch.Tensor:
        """Rows ``lo:hi`` of the columns in view, ``(hi - lo, width)`` on the device."""
        buf = self._buf[: self.width, : hi - lo]
        raw = buf.view(torch.uint8).numpy()
        fd = self._file.fileno()
        for c in range(self.width):
            _read_fully(fd, raw[c].data, self._offset(c, lo))
        return buf.T.to(self.device)

    def write(self, col: int, X: torch.Tensor) -> None:
        """Columns ``col : col + X.shape[1]`` become ``X`` (``n x b``)."""
        for lo, hi in self._chunks():
            self._write_rows(lo, X[lo:hi], col)

    def project_twice(self, W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``W <- (I - V V^H)^2 W`` **in place**; returns ``(W, C)`` with ``C`` the coefficients.

        Classical Gram-Schmidt twice, as :func:`linops._krylov.orth_qr` does in memory, in
        three passes over the file: ``C = V^H W``; ``W -= V C`` and ``D = V^H W`` chunk by
        chunk (a chunk's rows of ``W`` are final once updated); ``W -= V D``.
        """
        C = W.new_zeros(self.width, W.shape[1])
        if self.width == 0:
            return W, C
        chunks = self._chunks()
        for lo, hi in chunks:
            C += self._rows(lo, hi).mH @ W[lo:hi]
        D = torch.zeros_like(C)
        for lo, hi in chunks:
            V = self._rows(lo, hi)
            D += V.mH @ W[lo:hi].addmm_(V, C, alpha=-1)
        for lo, hi in chunks:
            W[lo:hi].addmm_(self._rows(lo, hi), D, alpha=-1)
        return W, C + D

    def combine(self, S: torch.Tensor) -> torch.Tensor:
        """``V S`` (``n x p``, column-major, in memory on the device)."""
        Y = torch.empty(S.shape[1], self.n, dtype=self.dtype, device=self.device).T
        S = S.to(device=self.device, dtype=self.dtype)
        for lo, hi in self._chunks():
            torch.mm(self._rows(lo, hi), S, out=Y[lo:hi])
        return Y

    def recombine_(self, S: torch.Tensor) -> None:
        """Columns ``0 : p`` become ``V S`` (``S`` is ``width x p``), chunk by chunk in place."""
        S = S.to(device=self.device, dtype=self.dtype)
        for lo, hi in self._chunks():
            self._write_rows(lo, self._rows(lo, hi) @ S, 0)

    def _write_rows(self, lo: int, rows: torch.Tensor, col: int) -> None:
        """Rows ``lo : lo + len(rows)`` of columns ``col : col + rows.shape[1]``."""
        fd = self._file.fileno()
        part = rows.detach().to("cpu", self.dtype)
        for c in range(part.shape[1]):
            x = part[:, c]
            if x.stride(0) != 1:  # not .contiguous(): it keeps a one-row chunk's stride
                x = torch.empty_like(x, memory_format=torch.contiguous_format).copy_(x)
            _write_fully(fd, x.view(torch.uint8).numpy().data, self._offset(col + c, lo))


def _read_fully(fd: int, buf: memoryview, offset: int) -> None:
    done = 0
    while done < len(buf):
        got = os.preadv(fd, [buf[done:]], offset + done)
        if got <= 0:
            raise OSError(f"short read from the basis file at byte {offset + done}")
        done += got


def _write_fully(fd: int, buf: memoryview, offset: int) -> None:
    done = 0
    while done < len(buf):
        done += os.pwrite(fd, buf[done:], offset + done)
