"""Private helpers shared by the Krylov and randomized routines.

Input normalisation (operator, output kind, generator), checked integers, and block
orthogonalisation against a basis with classical Gram-Schmidt applied twice ("twice is
enough", Giraud et al. 2005) followed by a QR factorisation that replaces numerically
dependent columns by fresh random directions.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from linops._backend import ArrayKind, array_kind, from_torch
from linops.base import TorchLinearOperator, aslinearoperator

__all__ = [
    "check_int",
    "check_which",
    "make_generator",
    "orth_qr",
    "output_kind",
    "prepare",
    "random_block",
    "start_block",
    "to_output",
]


def output_kind(A: Any) -> ArrayKind:
    """Kind of arrays to return: torch for tensors and torch operators, CuPy for CuPy, else numpy."""
    if isinstance(A, TorchLinearOperator):
        return "torch"
    return array_kind(A)


def prepare(A: Any) -> tuple[TorchLinearOperator, ArrayKind]:
    """The operator view of ``A`` and the kind of arrays the caller expects back."""
    return aslinearoperator(A), output_kind(A)


def to_output(t: torch.Tensor, kind: ArrayKind) -> Any:
    """Convert a result tensor to the caller's array kind (once, at the end)."""
    return from_torch(t, kind)


def make_generator(seed: int | torch.Generator | None, device: torch.device) -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded by ``seed`` (fresh entropy when ``None``)."""
    if isinstance(seed, torch.Generator):
        return seed
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    elif isinstance(seed, int | np.integer) and not isinstance(seed, bool):
        gen.manual_seed(int(seed))
    else:
        raise TypeError(f"seed: expected an int, a torch.Generator or None, got {seed!r}")
    return gen


def check_int(value: Any, name: str, lo: int, hi: int | None = None) -> int:
    """Return ``value`` as an int if ``lo <= value <= hi``; raise ValueError otherwise."""
    ok = isinstance(value, int | np.integer) and not isinstance(value, bool)
    if not ok or value < lo or (hi is not None and value > hi):
        upper = f" and <= {hi}" if hi is not None else ""
        raise ValueError(f"{name}: expected an integer >= {lo}{upper}, got {value!r}")
    return int(value)


def check_which(which: str, allowed: tuple[str, ...], name: str = "which") -> str:
    """Validate a string option (``which``, ``method``, ...) against the allowed values."""
    if which not in allowed:
        raise ValueError(f"{name}: expected one of {allowed}, got {which!r}")
    return which


def random_block(n: int, b: int, op: TorchLinearOperator, gen: torch.Generator) -> torch.Tensor:
    """A Gaussian ``(n, b)`` block on the operator's device and dtype."""
    return torch.randn(n, b, generator=gen, dtype=op.torch_dtype, device=op.device)


def start_block(
    v0: Any, n: int, b: int, op: TorchLinearOperator, gen: torch.Generator
) -> torch.Tensor:
    """Orthonormal start block: ``v0`` if given (checked), else Gaussian."""
    if v0 is None:
        X = random_block(n, b, op, gen)
    else:
        from linops._backend import to_torch

        X, _ = to_torch(v0, dtype=op.torch_dtype, device=op.device)
        X = X.to(device=op.device, dtype=op.torch_dtype).reshape(X.shape[0], -1)
        if X.shape != (n, b):
            raise ValueError(f"v0: expected shape ({n},) or ({n}, {b}), got {tuple(X.shape)}")
        if not bool(torch.isfinite(X).all()):
            raise ValueError("v0: expected a finite start vector, got NaN or inf")
        if bool((torch.linalg.vector_norm(X, dim=0) == 0).any()):
            raise ValueError("v0: expected a nonzero start vector, got a zero vector")
    Q, _, _ = orth_qr(X, X[:, :0], gen, ref=float(torch.linalg.matrix_norm(X, ord=2)))
    return Q


def _project_twice(W: torch.Tensor, V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    C = V.mH @ W
    W = W - V @ C
    D = V.mH @ W
    return W - V @ D, C + D


def orth_qr(
    W: torch.Tensor, V: torch.Tensor, gen: torch.Generator, ref: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Orthonormalise the block ``W`` against the orthonormal basis ``V``.

    Returns ``(Q, C, R)`` with :math:`W = V C + Q R`, :math:`V^H Q = 0`, :math:`Q^H Q = I`.
    Columns whose remainder is below ``100 eps ref`` are numerically in ``span(V)``; they are
    replaced by random directions orthogonal to ``V`` (with ``R`` recomputed, so the
    relation holds up to that tiny remainder). When ``V`` already spans the whole space,
    ``Q`` and ``R`` are zero.
    """
    n, b = W.shape
    W, C = _project_twice(W, V)
    if V.shape[1] + b > n:
        return torch.zeros_like(W), C, torch.zeros(b, b, dtype=W.dtype, device=W.device)
    Q, R = torch.linalg.qr(W)
    eps = torch.finfo(W.dtype).eps
    d = torch.linalg.diagonal(R).abs()
    tiny = 100 * eps * max(ref, float(torch.linalg.vector_norm(W, dim=0).max()))
    if bool((d <= tiny).any()):
        Q = _replace_columns(Q, d <= tiny, V, gen)
    elif bool((d <= eps**0.5 * ref).any()):
        Q, _ = torch.linalg.qr(_project_twice(Q, V)[0])  # heavy cancellation: a third pass
    else:
        return Q, C, R
    return Q, C, Q.mH @ W


def _replace_columns(
    Q: torch.Tensor, bad: torch.Tensor, V: torch.Tensor, gen: torch.Generator
) -> torch.Tensor:
    good = Q[:, ~bad]
    X = torch.randn(Q.shape[0], int(bad.sum()), generator=gen, dtype=Q.dtype, device=Q.device)
    basis = torch.cat([V, good], dim=1)
    X, _ = torch.linalg.qr(_project_twice(X, basis)[0])
    X, _ = torch.linalg.qr(_project_twice(X, basis)[0])
    Q = Q.clone()
    Q[:, bad] = X
    return Q


def check_products(W: torch.Tensor, count: int) -> None:
    """Raise FloatingPointError if the operator returned NaN or inf."""
    if not bool(torch.isfinite(W).all()):
        raise FloatingPointError(
            f"the operator returned NaN or inf at product {count}; check the operator "
            "(and its data) for overflow or invalid values"
        )
