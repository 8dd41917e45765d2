"""The estimators' Rademacher probes, drawn independently of the library's code."""

from __future__ import annotations

import torch


def rademacher(n: int, k: int, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """``k`` probes ``(n, k)``: each ``2 b - 1`` for ``n`` bits ``torch.randint(0, 2)``, in turn."""
    bits = [torch.randint(0, 2, (n,), generator=gen) for _ in range(k)]
    return (2 * torch.stack(bits, 1) - 1).to(dtype)
