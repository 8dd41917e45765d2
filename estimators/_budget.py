"""The memory budget of the estimators: how many probes a block may hold, whether a sketch fits.

Every estimator takes ``memory_budget=`` (bytes; default
:func:`linops.memory.default_memory_budget` of the operator's device, a fraction of its free
memory), like the operators (:class:`linops.TorchLinearOperator`) and
:func:`linops.lanczos`. It bounds the ``n``-sized arrays the estimator itself holds: probes
and their products go in groups that fit, and a sketch that cannot be split (Hutch++,
XTrace, Diag++, XDiag keep ``O(num_matvecs)`` vectors at once) is refused with what it needs.
"""

from __future__ import annotations

import torch

from linops.base import TorchLinearOperator
from linops.memory import check_memory_budget, default_memory_budget

__all__ = [
    "budget_bytes",
    "check_sketch",
    "count_within",
    "grouped_probes",
    "probe_group",
    "rademacher_probes",
]


def budget_bytes(op: TorchLinearOperator, memory_budget: int | None) -> int:
    """Return ``memory_budget`` checked, or the default budget of the operator's device."""
    return check_memory_budget(memory_budget) or default_memory_budget(op.device)


def count_within(
    op: TorchLinearOperator, unit_bytes: int, memory_budget: int | None, reserved: int = 0
) -> tuple[int, int]:
    """Return how many units of ``unit_bytes`` fit the budget beside ``reserved`` bytes, and the budget."""
    budget = budget_bytes(op, memory_budget)
    return max(0, (budget - reserved) // max(1, unit_bytes)), budget


def _vector_bytes(op: TorchLinearOperator) -> int:
    return max(op.shape) * op.torch_dtype.itemsize


def probe_group(op: TorchLinearOperator, N: int, memory_budget: int | None, arrays: int = 3) -> int:
    """Probes per block: the operator's vectors per pass (else all ``N``), within the budget.

    ``arrays`` ``n``-vectors are held per probe (the probe, its product and one temporary).
    Where a wider block costs no more visits of the data than one pass (a streamed model
    operator after its first product,
    :meth:`linops.TorchLinearOperator._visits_data_once_per_block`), as many as the
    operator's own ``memory_budget`` holds too (a budget of one pass keeps groups of one
    pass): callers ask again before each group, so only such an operator's first group is
    one pass wide.

    Raises
    ------
    ValueError
        If not even one probe fits.
    """
    k = op.vectors_per_pass()
    vec = _vector_bytes(op)
    if k is not None and op._visits_data_once_per_block() and op.memory_budget is not None:
        k = max(k, op.memory_budget // (arrays * vec))  # as wide as the operator's budget holds
    group = N if k is None else max(1, min(N, k))
    fit, budget = count_within(op, arrays * vec, memory_budget)
    if fit < 1:
        raise ValueError(
            f"memory_budget: one probe with its product ({arrays} vectors of n={max(op.shape)}, "
            f"{arrays * vec / 2**30:.3g} GiB) exceeds the budget ({budget / 2**30:.3g} GiB)"
        )
    return min(group, fit)


def rademacher_probes(
    op: TorchLinearOperator, n: int, k: int, gen: torch.Generator
) -> torch.Tensor:
    """Return ``k`` Rademacher probes ``(n, k)`` (column-major), each drawn on its own.

    Probe ``j`` is ``2 b - 1`` for the bits ``b = torch.randint(0, 2, (n,))``: the draw
    PyHessian's ``trace`` and ``density`` make (``torch.randint_like(p, high=2)`` per
    parameter, zeros set to -1). On CPU torch draws these bits one 32-bit number each whatever
    the dtype, so a seed gives the same probes in float32 and float64, and the probes PyHessian
    draws after ``torch.manual_seed(seed)`` on the same parameters (``bench/pyhessian.py``
    compares the two tools on identical probes). Complex-typed for a complex operator.
    """
    real = op.torch_dtype.to_real()
    Z = torch.empty(k, n, dtype=real, device=op.device)
    for j in range(k):
        torch.randint(0, 2, (n,), generator=gen, dtype=real, device=op.device, out=Z[j])
    return Z.mul_(2).sub_(1).T.to(op.torch_dtype)  # column-major: every probe contiguous


def grouped_probes(
    op: TorchLinearOperator, n: int, k: int, gen: torch.Generator, rademacher: bool = True
) -> torch.Tensor:
    """Return the next ``k`` probes ``(n, k)``, each drawn on its own (Rademacher or Gaussian).

    One draw of ``n`` numbers per probe, so probe ``j`` is the same however the probes are
    grouped (the group size follows the budget and the operator's measured passes: drawn as
    one ``(n, k)`` block, the same seed gave other probes, and another estimate, after the
    operator's first product or under another budget).
    """
    if rademacher:
        return rademacher_probes(op, n, k, gen)
    # complex Gaussian probes for a complex operator (E[z z^H] = I)
    Z = torch.empty(k, n, dtype=op.torch_dtype, device=op.device)
    for j in range(k):
        torch.randn(n, generator=gen, dtype=op.torch_dtype, device=op.device, out=Z[j])
    return Z.T  # column-major: every probe contiguous


def check_sketch(
    op: TorchLinearOperator, vectors: float, memory_budget: int | None, name: str, hint: str
) -> None:
    """Raise ValueError if a sketch of about ``vectors`` ``n``-vectors exceeds the budget."""
    budget, need = budget_bytes(op, memory_budget), int(vectors * _vector_bytes(op))
    if need > budget:
        raise ValueError(
            f"{name}: its sketch holds about {vectors:.0f} vectors of n={max(op.shape)} "
            f"({need / 2**30:.3g} GiB) at once, more than memory_budget "
            f"({budget / 2**30:.3g} GiB); {hint}"
        )
