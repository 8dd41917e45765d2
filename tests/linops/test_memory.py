"""retain_freed_memory: argument checks, and that freed blocks are reused (Linux, glibc)."""

from __future__ import annotations

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
