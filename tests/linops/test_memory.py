"""retain_freed_memory and prime_host_allocator: freed blocks are reused (Linux, glibc)."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import textwrap

import pytest

from linops.memory import retain_freed_memory

# allocate, touch and free a 64 MiB tensor eight times; print the fewest page faults of the
# last four (the heap may grow once or twice before a freed block is reused)
_FAULTS = textwrap.dedent(
    """
    import resource, sys, torch
    if sys.argv[1] == "retain":
        from linops.memory import retain_freed_memory
        assert retain_freed_memory()
    faults = []
    for _ in range(8):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        x = torch.empty(16 * 2**20)
        x.fill_(1.0)
        del x
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(min(faults[4:]))
    """
)


def _faults(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", _FAULTS, mode], check=True, capture_output=True, text=True
    )
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_minflt and mallopt: glibc")
def test_freed_blocks_are_reused_without_page_faults() -> None:
    pages = 64 * 2**20 // 4096
    if _faults("default") < pages // 2:
        pytest.skip("this C library already reuses a freed 64 MiB block")
    assert _faults("retain") < pages // 16


@pytest.mark.parametrize("bad", [0, -1, 2**31, 1.5, True, "1"])
def test_bad_limit_is_refused(bad: object) -> None:
    with pytest.raises(ValueError, match="limit_bytes"):
        retain_freed_memory(bad)  # type: ignore[arg-type]


# fourteen 4 MiB blocks allocated, touched and freed together, eight times: the 56 MiB they
# free at the top of the heap exceed glibc's trim threshold (twice its adaptive mmap
# threshold, which the imports leave at a few MiB) and are given back, to be faulted in
# again, unless it was primed (62 MiB)
_PRIMED_FAULTS = textwrap.dedent(
    """
    import resource, sys, torch
    import linops
    from linops import memory
    if sys.argv[1] == "prime":
        memory.prime_host_allocator()
    elif sys.argv[1] == "operator":
        model = torch.nn.Linear(3, 2)
        linops.HessianOperator(model, torch.nn.MSELoss(), (torch.ones(4, 3), torch.ones(4, 2)))
    faults = []
    for _ in range(8):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        xs = [torch.empty(2**20) for _ in range(14)]
        for x in xs:
            x.fill_(1.0)
        del xs, x
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(memory._primed, min(faults[4:]))
    """
)


def _printed(script: str, mode: str, **env: str) -> list[str]:
    """Run ``script`` with argument ``mode`` in a fresh process; return the words it printed."""
    out = subprocess.run(
        [sys.executable, "-c", script, mode],
        check=True,
        capture_output=True,
        text=True,
        env=os.environ | env,
    )
    return out.stdout.split()


def _primed_faults(mode: str, **env: str) -> tuple[bool, int]:
    primed, faults = _printed(_PRIMED_FAULTS, mode, **env)[-2:]
    return primed == "True", int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_minflt: glibc")
def test_a_model_operator_primes_the_allocator_once_and_blocks_are_reused() -> None:
    pages = 56 * 2**20 // 4096
    primed, faults = _primed_faults("default")
    assert not primed  # importing linops does not touch the allocator
    if faults < pages // 2:
        pytest.skip("this C library already keeps 56 MiB of freed blocks")
    primed, faults = _primed_faults("prime")
    assert primed and faults < pages // 16
    primed, faults = _primed_faults("operator")
    assert primed and faults < pages // 16
    # the variable skips it (whether making the operator frees a large block by itself
    # depends on the installed packages, so only the flag is checked)
    assert not _primed_faults("operator", LINOPS_NO_PRIME="1")[0]


# a model whose forward pass allocates a 20 MiB block and reports whether glibc mapped it on
# its own (mallinfo2's hblkhd: the bytes in mapped blocks), in a streamed and then a cached
# operator's passes, and after them
_STREAMED = textwrap.dedent(
    """
    import ctypes, sys, torch
    import linops

    class Info(ctypes.Structure):
        names = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
        _fields_ = [(name, ctypes.c_size_t) for name in names.split()]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = Info
    seen, probing = [], False

    class Probe(torch.nn.Linear):
        def forward(self, x):
            if not (probing and torch.is_grad_enabled()):  # only where graphs are built
                return super().forward(x)
            before = libc.mallinfo2().hblkhd
            block = torch.empty(5 * 2**20)  # 20 MiB, float32
            seen.append(libc.mallinfo2().hblkhd - before >= block.nbytes)
            del block
            return super().forward(x)

    if sys.argv[1] == "return":
        assert linops.memory.return_freed_memory(32 * 2**20)
    elif sys.argv[1] == "off":
        linops.memory.STREAMED_MMAP_THRESHOLD = 0
    model = torch.nn.Sequential(Probe(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    data = [(torch.ones(5, 3), torch.ones(5, 2)) for _ in range(3)]
    v = torch.ones(26)
    streamed = linops.HessianOperator(model, torch.nn.MSELoss(), data, cache=False)
    cached = linops.HessianOperator(model, torch.nn.MSELoss(), data, cache=True)
    probing = True  # in the products only: a block freed earlier in the heap could hold it
    streamed @ v
    streamed_seen, seen[:] = list(seen), []
    cached @ v
    cached_seen, seen[:] = list(seen), []
    Probe.forward(model[0], torch.ones(1, 3))
    print(all(cached_seen), any(cached_seen), all(streamed_seen), any(streamed_seen), seen[0])
    """
)


def _streamed_mapping(mode: str, **env: str) -> list[bool]:
    return [word == "True" for word in _printed(_STREAMED, mode, **env)[-5:]]


def _has_mallinfo2() -> bool:
    try:
        ctypes.CDLL("libc.so.6").mallinfo2  # noqa: B018
    except (OSError, AttributeError):
        return False
    return True


@pytest.mark.skipif(not _has_mallinfo2(), reason="mallinfo2: glibc 2.33 or later")
def test_a_streamed_pass_maps_its_large_blocks_and_restores_the_thresholds() -> None:
    # streamed: every batch's 20 MiB block is mapped on its own; cached and after the passes
    # it comes from the heap (the primed thresholds, restored)
    _, cached_any, streamed_all, _, after = _streamed_mapping("default")
    assert streamed_all and not cached_any and not after
    # the user's own settings are left as they are (32 MiB): no block mapped in either pass;
    # and a threshold of 0 leaves glibc's alone
    user = {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20)}
    for mode, env in (("return", {}), ("default", user), ("off", {})):
        _, cached_any, _, streamed_any, after = _streamed_mapping(mode, **env)
        assert not cached_any and not streamed_any and not after


@pytest.fixture
def mallopt_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """The ``mallopt`` calls linops makes, recorded instead of made (thresholds as primed)."""
    from linops import memory

    calls: list[tuple[int, int]] = []

    def mallopt(param: int, value: ctypes.c_int) -> int:
        calls.append((param, value.value))
        return 1

    monkeypatch.setattr(memory, "_mallopt", lambda: mallopt)
    monkeypatch.setattr(memory, "_primed", True)
    monkeypatch.setattr(memory, "_thresholds_set", False)
    for name in (*memory._MALLOC_VARIABLES, "GLIBC_TUNABLES"):
        monkeypatch.delenv(name, raising=False)
    return calls


def _lowered_and_restored() -> list[tuple[int, int]]:
    from linops import memory

    mmap, trim = memory._M_MMAP_THRESHOLD, memory._M_TRIM_THRESHOLD
    return [
        (mmap, memory.STREAMED_MMAP_THRESHOLD),
        (trim, 2 * memory.STREAMED_MMAP_THRESHOLD),
        (mmap, 32 * 2**20),
        (trim, 64 * 2**20),
    ]


def test_a_streamed_pass_that_fails_restores_the_thresholds(
    mallopt_calls: list[tuple[int, int]],
) -> None:
    import torch

    import linops
    from linops import memory

    calls = mallopt_calls

    class Failing(torch.nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if torch.is_grad_enabled() and float(x[0, 0]) == 2.0:  # batch 2's graph
                raise RuntimeError("failed in batch 2")
            return super().forward(x)

    data = [(torch.full((4, 3), float(i)), torch.ones(4, 2)) for i in range(3)]
    H = linops.HessianOperator(Failing(3, 2), torch.nn.MSELoss(), data, cache=False)
    with pytest.raises(RuntimeError, match="failed in batch 2"):
        H @ torch.ones(H.shape[1])
    assert calls == _lowered_and_restored()
    assert memory._streamed_depth == 0
    # a cached operator's passes leave them alone
    calls.clear()
    linops.HessianOperator(torch.nn.Linear(3, 2), torch.nn.MSELoss(), data) @ torch.ones(8)
    assert calls == []


def test_a_threshold_set_during_a_streamed_pass_is_kept(
    mallopt_calls: list[tuple[int, int]],
) -> None:
    import torch

    import linops
    from linops import memory

    class Retaining(torch.nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if torch.is_grad_enabled() and not memory._thresholds_set:
                assert memory.retain_freed_memory(2**30)  # the program's own, mid-pass
            return super().forward(x)

    data = [(torch.ones(4, 3), torch.ones(4, 2)) for _ in range(2)]
    H = linops.HessianOperator(Retaining(3, 2), torch.nn.MSELoss(), data, cache=False)
    H @ torch.ones(H.shape[1])
    mmap, trim = memory._M_MMAP_THRESHOLD, memory._M_TRIM_THRESHOLD
    lowered = _lowered_and_restored()[:2]
    assert mallopt_calls == [*lowered, (mmap, 2**30), (trim, 2**30)]  # not put back after


def test_the_first_graph_the_budget_refuses_is_in_the_streamed_pass(
    mallopt_calls: list[tuple[int, int]],
) -> None:
    import torch

    import linops

    data = [(torch.ones(4, 3), torch.ones(4, 2))]  # one batch, its graph beyond the budget
    H = linops.HessianOperator(torch.nn.Linear(3, 2), torch.nn.MSELoss(), data, memory_budget=1)
    H @ torch.ones(H.shape[1])  # the first product learns that the graph is not kept
    assert H.cache_info().graphs_cached == 0
    assert mallopt_calls == _lowered_and_restored()
