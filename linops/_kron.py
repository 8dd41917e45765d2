r"""Products with block-diagonal Kronecker-factored matrices on a flat parameter vector.

Each layer's weight is an ``out x in`` matrix inside the flat vector (a :class:`Slot`); a
Kronecker block :math:`A \otimes G` acts on it as :math:`V \mapsto G V A`. :func:`map_blocks`
applies such per-layer maps to a whole block of vectors without copying or transposing it,
whatever its memory layout (:class:`Layout`). Used by :class:`linops.KFACOperator`,
:class:`linops.EKFACOperator` and their inverses.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

__all__ = ["COLS", "ONE", "ROWS", "Layout", "Slot", "map_blocks"]

Tensor = torch.Tensor


def map_blocks(X: Tensor, slots: list[Slot], separate: bool, weight: Any, bias: Any) -> Tensor:
    """Apply ``weight(k, V, lay, out)`` and ``bias(k, V, lay, out)`` per layer, in one pass.

    ``V`` is a free view of the ``K`` columns' part of a layer: ``out x in`` matrices (the
    bias appended as a last column for a joint block; ``out x 1`` for a separate bias)
    stacked along the axis of ``lay`` (:class:`Layout`), which also gives the products
    acting on them; ``out`` (or None) is where the result may be written (the output block's
    part, for one vector and a row-major block: no concatenation then). A row-major block
    is read as ``(out, in, K)``, a column-major one as ``(K, out, in)`` and one vector as
    ``(out, in)``, so no product copies or transposes the block.
    """
    if X.shape[1] == 0:
        return X.new_empty(X.shape)
    if X.shape[1] == 1:  # a strided column (of a wider block) is gathered once
        lay, Z = ONE, X[:, 0] if X.stride(0) == 1 else X[:, 0].contiguous()
        if separate or all(s.w is None or s.b is None for s in slots):
            return _map_one(Z, slots, weight, bias)
    elif X.T.is_contiguous():  # column-major
        lay, Z = COLS, X.T
    else:
        lay, Z = ROWS, X if X.is_contiguous() else X.contiguous()
    Y = torch.empty_like(Z) if lay is not COLS else None
    pieces: list[tuple[int, Tensor]] = []

    def put(part: slice, R: Tensor, out: Tensor | None = None) -> None:
        """Place a result: gathered for a column-major block, else into ``out`` (or ``Y[part]``)."""
        if Y is None:
            pieces.append((part.start, lay.flat(R)))
            return
        out = Y[part] if out is None else out
        if R.data_ptr() != out.data_ptr():  # not computed in place (a joint block's split)
            out.copy_(R.reshape(out.shape))

    for s in slots:
        Vw = lay.view(Z, s.w, s.rows, s.cols) if s.w is not None else None
        vb = lay.view(Z, s.b, -1, 1) if s.b is not None else None
        if Vw is not None and vb is not None and not separate:
            R = weight(s.layer, torch.cat([Vw, vb], dim=lay.in_axis), lay, None)
            Rw, Rb = R.split([s.cols, 1], dim=lay.in_axis)
            put(s.w, Rw)  # type: ignore[arg-type]
            put(s.b, Rb)  # type: ignore[arg-type]
            continue
        for part, V, f, rows, cols in ((s.w, Vw, weight, s.rows, s.cols), (s.b, vb, bias, -1, 1)):
            if V is not None:
                out = None if Y is None else lay.view(Y, part, rows, cols)  # type: ignore[arg-type]
                put(part, f(s.layer, V, lay, out), out)  # type: ignore[arg-type]
    if Y is not None:
        return Y if lay is ROWS else Y[:, None]
    pieces.sort(key=lambda p: p[0])
    return lay.join([p for _, p in pieces])


def _map_one(z: Tensor, slots: list[Slot], weight: Any, bias: Any) -> Tensor:
    """:func:`map_blocks` for one contiguous vector and no joint blocks: straight into ``y``.

    The per-call overhead is most of a product on small layers (six 2-D products of a
    two-layer MLP's KFAC take about 50 us), so the views are made directly.
    """
    y = torch.empty_like(z)
    base = z.storage_offset()
    for s in slots:
        for part, f, cols in ((s.w, weight, s.cols), (s.b, bias, 1)):
            if part is None:
                continue
            shape = ((part.stop - part.start) // cols, cols)
            out = y.as_strided(shape, (cols, 1), part.start)
            R = f(s.layer, z.as_strided(shape, (cols, 1), base + part.start), ONE, out)
            if R.data_ptr() != out.data_ptr():
                out.copy_(R)
    return y[:, None]


class Layout:
    r"""Products on a stack of ``out x in`` matrices ``V_c`` (see :meth:`view` for the layouts).

    ``left(M, V)`` is :math:`M V_c`, ``right(V, M)`` :math:`V_c M`, ``scale(V, D)``
    :math:`V_c \odot D`, for every ``c``; ``view`` reads rows ``part`` of the block as such a
    stack. The row-major and single-vector layouts (``kind="rows"``, ``"one"``) write results
    straight into the output block (``out=``); the column-major one gathers them by one
    concatenation (``flat``, ``join``).
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.in_axis = 2 if kind == "columns" else 1

    def view(self, Z: Tensor, part: slice, rows: int, cols: int) -> Tensor:
        """Rows ``part`` of the block as ``(K, rows, cols)``, ``(rows, cols)`` or ``(rows, cols, K)``."""
        if self.kind == "columns":  # Z = X^T, (K, n)
            return Z[:, part].view(Z.shape[0], rows, cols)
        if self.kind == "one":  # Z = X[:, 0], contiguous: a strided view is the cheapest
            size = part.stop - part.start
            return Z.as_strided((size // cols, cols), (cols, 1), Z.storage_offset() + part.start)
        return Z[part].view(rows, cols, Z.shape[1])

    def left(self, M: Tensor, V: Tensor, out: Tensor | None = None) -> Tensor:
        if self.kind == "one":
            return torch.mm(M, V, out=out)
        if self.kind != "rows":
            return M @ V
        R = torch.mm(
            M, V.reshape(V.shape[0], -1), out=None if out is None else out.view(M.shape[0], -1)
        )
        return R.view(M.shape[0], *V.shape[1:])

    def right(self, V: Tensor, M: Tensor, out: Tensor | None = None) -> Tensor:
        if self.kind == "one":
            return torch.mm(V, M, out=out)
        return torch.matmul(M.mT, V, out=out) if self.kind == "rows" else V @ M

    def scale(self, V: Tensor, D: Tensor) -> Tensor:
        return V * D[..., None] if self.kind == "rows" else V * D

    def flat(self, R: Tensor) -> Tensor:
        return R.reshape(R.shape[0], -1) if self.kind == "columns" else R.reshape(-1)

    def join(self, pieces: list[Tensor]) -> Tensor:
        if self.kind == "columns":
            return torch.cat(pieces, dim=1).T
        return torch.cat(pieces)[:, None]


COLS, ROWS, ONE = Layout("columns"), Layout("rows"), Layout("one")


class Slot(NamedTuple):
    """A layer's place in the flat vector: its weight as ``rows x cols`` and its bias."""

    layer: str
    w: slice | None
    rows: int
    cols: int
    b: slice | None
