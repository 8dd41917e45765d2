"""One memory budget (issue 22, item 2): what it defaults to, what it keeps, how it is measured."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from torch import nn

import linops.memory as memory
from linops import GGNOperator, HessianOperator, JacobianOperator
from linops._fingerprint import operator_fingerprint
from linops._model import DEFAULT_MAX_VECTORS
from linops.memory import (
    CACHE_FRACTION,
    DEFAULT_BUDGET_FRACTION,
    MemoryBudget,
    PeakMemory,
    available_memory,
    default_memory_budget,
    return_freed_memory,
)

F64 = torch.float64


def _setup(
    batches: int = 3, n: int = 6
) -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    g = torch.Generator().manual_seed(1)
    data = [
        (torch.randn(n, 4, generator=g, dtype=F64), torch.randint(0, 3, (n,), generator=g))
        for _ in range(batches)
    ]
    return model, data


def _vectors(m: int, k: int) -> torch.Tensor:
    return torch.randn(m, k, generator=torch.Generator().manual_seed(2), dtype=F64)


# ------------------------------------------------------------------ measurement
def test_peak_memory_counts_storages_and_frees() -> None:
    with PeakMemory() as m:
        a = torch.ones(1000, dtype=F64)  # 8000 bytes
        b = a * 2  # +8000
        c = b[10:]  # a view: no new storage
        del b, c  # the storage stays until its last view goes
        d = torch.zeros(500, dtype=F64)  # +4000
    assert m.peak == 16000 + 4000 - 8000 or m.peak == 16000  # b freed before d, or not
    assert m.current == 8000 + 4000
    del a, d
    assert m.current == 0


def test_peak_memory_does_not_count_views_of_tensors_made_before_it() -> None:
    w = torch.ones(1000, dtype=F64)
    layer = nn.Linear(50, 40, dtype=F64)
    x = torch.randn(3, 50, dtype=F64)
    with PeakMemory() as m:
        t, d = w[None].t(), w.detach()  # views of w
        w.add_(1.0)  # in place on w
        out = layer(x)  # F.linear takes weight.t(), a view of the parameter
    assert m.peak == m.current == 8 * 3 * 40  # the layer's output alone
    with PeakMemory() as m:
        y = t * 2
    assert m.peak == 8000
    del d, out, y
    empty, pre = torch.empty(0, dtype=F64), torch.empty(0, dtype=F64)
    with PeakMemory() as m:  # ops that resize a tensor made before the context allocate
        torch.add(w, w, out=empty)
        pre.resize_(500)
    assert m.peak == m.current == 8000 + 4000


def test_peak_memory_sees_the_backward_pass() -> None:
    w = torch.randn(200, 200, dtype=F64, requires_grad=True)
    x = torch.randn(300, 200, dtype=F64)
    with PeakMemory() as m:
        (torch.tanh(x @ w) ** 2).sum().backward()
    # forward: x @ w and tanh (300 x 200) and the square; backward: w.grad (200 x 200) at least
    assert m.peak >= 8 * (3 * 300 * 200 + 200 * 200)
    assert m.current >= 8 * 200 * 200  # w.grad lives on


def test_available_memory_and_default_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    free = available_memory("cpu")
    with open("/proc/meminfo") as f:
        total = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal"))
    assert 0 < free <= total
    monkeypatch.setattr(memory, "available_memory", lambda device="cpu": 10_000)
    assert default_memory_budget("cpu") == int(DEFAULT_BUDGET_FRACTION * 10_000)
    model, data = _setup()
    H = HessianOperator(model, nn.CrossEntropyLoss(), data)
    assert H.memory_budget == int(DEFAULT_BUDGET_FRACTION * 10_000)


def test_ledger_refuses_beyond_the_cache_share() -> None:
    ledger = MemoryBudget(1000)
    assert ledger.cache_limit == int(CACHE_FRACTION * 1000)
    assert ledger.reserve(300, "batches") and not ledger.reserve(300, "graphs")
    assert ledger.reserve(200, "graphs") and ledger.free_for_passes() == 500
    assert "graphs cached=1" in repr(ledger)


# ------------------------------------------------------------------ what the operator keeps
def test_default_budget_caches_everything_of_a_small_problem() -> None:
    model, data = _setup()
    G = GGNOperator(model, nn.CrossEntropyLoss(), data)
    G @ _vectors(G.shape[1], 1)
    info = G.cache_info()
    assert (info.num_batches, info.batches_cached, info.graphs_cached) == (3, 3, 3)
    assert info.bytes_graphs > 0 and info.bytes_batches == 0  # the caller's tensors: no copy
    G.clear_cache()
    assert G.cache_info().graphs_cached == 0 and G.memory.kept["graphs"] == 0
    G @ _vectors(G.shape[1], 1)
    assert G.cache_info().graphs_cached == 3


def test_graph_bytes_are_measured_and_bound_the_cache() -> None:
    model, data = _setup(batches=4)
    H = HessianOperator(model, nn.CrossEntropyLoss(), data)
    V = _vectors(H.shape[1], 3)
    expected = H @ V
    per_graph = H.cache_info().bytes_graphs / 4
    # a graph retains at least the first layer's activations of its batch
    assert per_graph >= 6 * 16 * 8
    for fit in (0, 1, 2, 3):
        budget = int((fit + 0.5) * per_graph / CACHE_FRACTION)
        Hb = HessianOperator(model, nn.CrossEntropyLoss(), data, memory_budget=budget)
        assert torch.allclose(Hb @ V, expected, rtol=1e-13, atol=0)
        assert Hb.cache_info().graphs_cached == fit
        assert Hb.memory.cached_bytes <= Hb.memory.cache_limit


def test_cache_true_and_false_override_the_budget() -> None:
    model, data = _setup()
    v = _vectors(sum(p.numel() for p in model.parameters()), 1)
    for cache, kept in ((True, 3), (False, 0)):
        J = JacobianOperator(model, data, cache=cache, memory_budget=1)
        J @ v
        assert J.cache_info().graphs_cached == kept


def test_block_size_from_the_measured_peak_of_one_pass() -> None:
    model, data = _setup()
    H = HessianOperator(model, nn.CrossEntropyLoss(), data, cache=False)
    assert H.vectors_per_pass() == DEFAULT_MAX_VECTORS  # not measured yet: the default
    H @ _vectors(H.shape[1], 2)
    peak = H.cache_info().bytes_per_pass
    assert peak is not None and peak > 0
    sizes: list[int] = []
    for fit in (1, 3, 20):
        Hb = HessianOperator(
            model, nn.CrossEntropyLoss(), data, cache=False, memory_budget=int((fit + 0.5) * peak)
        )
        hook = Hb._matmat_torch
        sizes.clear()

        def counting(X: torch.Tensor, hook: Any = hook, Hb: Any = Hb) -> torch.Tensor:
            sizes.append(Hb._slot_width or X.shape[1])  # vectors per pass through a graph
            return hook(X)

        Hb._matmat_torch = counting  # type: ignore[method-assign]
        out = Hb @ _vectors(Hb.shape[1], 7)
        assert Hb.cache_info().bytes_per_pass == peak  # the same pass, measured the same
        assert Hb.vectors_per_pass() == min(fit, DEFAULT_MAX_VECTORS)
        assert sizes[0] == 1 and max(sizes[1:]) == min(fit, 7)  # after the measuring pass
        assert torch.allclose(out, H @ _vectors(H.shape[1], 7), rtol=1e-12, atol=1e-14)


def test_max_vectors_is_not_bounded_by_the_budget() -> None:
    model, data = _setup()
    H = HessianOperator(model, nn.CrossEntropyLoss(), data, memory_budget=1, max_vectors=5)
    H @ _vectors(H.shape[1], 6)
    assert H.vectors_per_pass() == 5 and H.cache_info().bytes_per_pass is None


# ------------------------------------------------------------------ arguments
def test_memory_limit_bytes_is_a_deprecated_name_of_the_budget() -> None:
    model, data = _setup()
    with pytest.warns(DeprecationWarning, match="memory_budget"):
        H = HessianOperator(model, nn.CrossEntropyLoss(), data, memory_limit_bytes=12345)
    assert H.memory_budget == 12345


@pytest.mark.parametrize("bad", [0, -1, True, "1", float("nan"), float("inf")])
def test_bad_budget_is_refused(bad: Any) -> None:
    model, data = _setup()
    with pytest.raises(ValueError, match="memory_budget"):
        HessianOperator(model, nn.CrossEntropyLoss(), data, memory_budget=bad)


def test_bad_cache_is_refused() -> None:
    model, data = _setup()
    with pytest.raises(TypeError, match="cache"):
        HessianOperator(model, nn.CrossEntropyLoss(), data, cache="yes")  # type: ignore[arg-type]


def test_budget_carries_through_to_and_not_into_the_fingerprint() -> None:
    model, data = _setup()
    H = HessianOperator(model, nn.CrossEntropyLoss(), data, memory_budget=10**6)
    H32 = H.to(torch.float32)
    assert H32.memory_budget == 10**6 and H32.memory is not H.memory
    other = HessianOperator(model, nn.CrossEntropyLoss(), data, memory_budget=10**9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert operator_fingerprint(H) == operator_fingerprint(other)


@pytest.mark.parametrize("bad", [0, -1, 2**31, 1.5, True])
def test_return_freed_memory_refuses_bad_thresholds(bad: Any) -> None:
    with pytest.raises(ValueError, match="threshold_bytes"):
        return_freed_memory(bad)


def test_return_freed_memory_in_a_subprocess() -> None:
    import subprocess
    import sys

    code = "from linops.memory import return_freed_memory; print(return_freed_memory())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() in ("True", "False")


def test_budget_refusals_name_the_value_given() -> None:
    for bad, said in ((0, "0"), (0.5, "0.5"), (-5, "-5"), (True, "True")):
        match = "expected at least 1 byte|expected a positive number of bytes or None"
        with pytest.raises(ValueError, match=f"({match}), got {said}$"):
            memory.check_memory_budget(bad)
    assert memory.check_memory_budget(1.9) == 1


def test_numpy_numbers_are_budgets_and_booleans_are_not_counts() -> None:
    import numpy as np

    from linops._krylov import make_generator

    assert memory.check_memory_budget(np.int64(10_000)) == 10_000  # was refused
    assert memory.check_memory_budget(np.float64(1e4)) == 10_000
    model = nn.Linear(2, 1).double()
    data = (torch.randn(3, 2, dtype=torch.float64), torch.randn(3, 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="max_vectors: expected a positive integer"):
        HessianOperator(model, nn.MSELoss(), data, max_vectors=True)  # was taken as 1
    with pytest.raises(ValueError, match=r"seed: expected an integer in \[-2\*\*63, 2\*\*64\)"):
        make_generator(2**64, torch.device("cpu"))  # torch's 'Overflow when unpacking long'
