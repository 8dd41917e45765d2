"""retain_freed_memory and prime_host_allocator: freed blocks are reused (Linux, glibc)."""

from __future__ import annotations

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


def _primed_faults(mode: str, **env: str) -> tuple[bool, int]:
    out = subprocess.run(
        [sys.executable, "-c", _PRIMED_FAULTS, mode],
        check=True,
        capture_output=True,
        text=True,
        env=os.environ | env,
    )
    primed, faults = out.stdout.split()[-2:]
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
