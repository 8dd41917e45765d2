"""The README's Python code runs as written, seeded, and prints what it computes (issue 18).

The ```` ```python ```` blocks of README.md are read like a notebook: in order, later blocks
using what earlier ones built (``H`` and ``J`` of "A first look"). The blocks run in fresh
processes (no state leaks into or out of the test session). A block may be preceded by a
marker comment:

* ``<!-- readme-test: slow ... -->``: run only under ``-m slow`` (with the blocks before it);
* ``<!-- readme-test: distributed ... -->``: a self-contained ``torch.distributed`` block, run
  alone as a one-process gloo group (``RANK=0``, ``WORLD_SIZE=1``).

Every block must print something, and a second run of the fast blocks must print the same
(they are seeded). Numbers are not compared with stored values: the operators' own tests do
that against independent references; this test checks the README does not rot.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
_BLOCK = re.compile(
    r"(?:<!-- readme-test: (?P<mark>\w+)[^>]*-->\n)?```python\n(?P<code>.*?)^```", re.M | re.S
)
_SEPARATOR = "----- readme block {} -----"


class Block(NamedTuple):
    index: int
    line: int
    mark: str | None
    code: str


def readme_blocks() -> list[Block]:
    text = (ROOT / "README.md").read_text()
    return [
        Block(i, text.count("\n", 0, m.start("code")) + 1, m.group("mark"), m.group("code"))
        for i, m in enumerate(_BLOCK.finditer(text))
    ]


def _run(blocks: list[Block], env: dict[str, str] | None = None) -> dict[int, str]:
    """Run the blocks in order in one fresh process; return each block's printed output."""
    parts = []
    for b in blocks:
        parts.append(f"print({_SEPARATOR.format(b.index)!r}, flush=True)\n")
        parts.append(f"# README.md line {b.line}\n{b.code}")
    script = "".join(parts)
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})},
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, (
        f"README blocks failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    )
    outputs: dict[int, str] = {}
    pieces = re.split(r"^----- readme block (\d+) -----$", proc.stdout, flags=re.M)
    for index, out in zip(pieces[1::2], pieces[2::2], strict=True):
        outputs[int(index)] = out.strip()
    return outputs


def _notebook(upto: Block | None = None) -> list[Block]:
    """The ordinary blocks (before ``upto``, if given), read as one notebook."""
    chosen = []
    for b in readme_blocks():
        if upto is not None and b.index >= upto.index:
            break
        if b.mark is None:
            chosen.append(b)
    return chosen


def _check_printed(blocks: list[Block], outputs: dict[int, str]) -> None:
    for b in blocks:
        assert outputs.get(b.index), f"README.md line {b.line}: the block prints nothing"


def test_readme_has_the_blocks_this_test_expects() -> None:
    blocks = readme_blocks()
    assert len(blocks) >= 5
    assert {b.mark for b in blocks} <= {None, "slow", "distributed"}, "unknown readme-test mark"
    for b in blocks:
        assert "print(" in b.code, f"README.md line {b.line}: print what the block computes"


def test_readme_blocks_run_seeded_and_print_what_they_compute() -> None:
    blocks = _notebook()
    first = _run(blocks)
    _check_printed(blocks, first)
    checks = [b for b in blocks if "check_operator(" in b.code]
    assert checks, "README: the check_operator block is gone"
    assert "dense: skipped" in first[checks[0].index]  # it says what it did not check


@pytest.mark.slow
def test_readme_blocks_print_the_same_twice() -> None:
    blocks = _notebook()
    assert _run(blocks) == _run(blocks)


@pytest.mark.slow
@pytest.mark.parametrize("index", [b.index for b in readme_blocks() if b.mark == "slow"])
def test_slow_readme_blocks(index: int) -> None:
    block = readme_blocks()[index]
    outputs = _run([*_notebook(upto=block), block])
    assert outputs.get(index), f"README.md line {block.line}: the block prints nothing"


@pytest.mark.parametrize("index", [b.index for b in readme_blocks() if b.mark == "distributed"])
def test_distributed_readme_blocks_as_one_process(index: int) -> None:
    block = readme_blocks()[index]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    out = _run([block], env)[index]
    assert out.startswith("rank 0 of 1:"), out
