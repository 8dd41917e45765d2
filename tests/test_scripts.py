"""Smoke runs of every benchmark and example with ``--quick`` (slow: ``pytest -m slow``).

Each script must finish and write its JSON under ``--out``; the numbers themselves are checked by
the unit tests and reported by the full runs. A quick run must say it is a smoke run
(``"smoke": true`` in the JSON of the examples and of the benchmarks that write through
``bench/_harness.write_json``), end by saying where it wrote, and leave no large files
(checkpoints) behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = [
    "bench/operators.py",
    "bench/models.py",
    "bench/curvature.py",
    "bench/batching.py",
    "bench/algorithms.py",
    "bench/training_jacobian.py",
    "bench/lowrank_step.py",
    "bench/guess_step.py",
    "bench/rank_seeds.py",
    "bench/streaming.py",
    "bench/streamed_blocks.py",
    "bench/double_backward.py",
    "bench/distributed.py",
    "bench/estimator_coverage.py",
    "examples/reference_rank.py",
    "examples/laziness_vs_width.py",
    "examples/theta_lazy_phase.py",
    "examples/lowrank_training.py",
    "examples/guess_gradient.py",
    "examples/training_jacobian.py",
    "examples/distributed_hessian.py",
    "examples/influence.py",
]
OPTIONAL = {
    "bench/operators.py": "curvlinops",
    "bench/models.py": "curvlinops",
    "bench/training_jacobian.py": "jax",
}


def _refuse(word: str) -> None:
    raise ValueError(f"not strict JSON: {word}")


def test_strict_json_writes_non_finite_numbers_as_null(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import _harness
    finally:
        sys.path.remove(str(ROOT / "bench"))
    payload = {"a": float("inf"), "b": [1.5, float("nan"), (-float("inf"), 2)], "c": {"d": 3}}
    text = _harness.strict_json(payload)
    assert json.loads(text, parse_constant=_refuse) == {
        "a": None, "b": [1.5, None, [None, 2]], "c": {"d": 3}
    }  # fmt: skip
    path = _harness.write_json(tmp_path, "x", {"e": float("nan")})
    assert json.loads(path.read_text(), parse_constant=_refuse) == {"e": None}


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_quick_run_writes_its_json(script: str, tmp_path: Path) -> None:
    extra = []
    peer = OPTIONAL.get(script)
    if peer is not None:
        try:
            __import__(peer)
        except ImportError:
            extra = ["--no-curvlinops"] if peer == "curvlinops" else ["--skip-jax"]
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, str(ROOT / script), "--quick", "--out", str(tmp_path), *extra],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    written = list(tmp_path.glob("*.json"))
    assert written, f"{script} wrote no JSON under --out"
    payloads = [json.loads(path.read_text(), parse_constant=_refuse) for path in written]
    source = (ROOT / script).read_text()
    if script.startswith("examples/") or "write_json" in source:
        assert any(isinstance(p, dict) and p.get("smoke") is True for p in payloads), script
    if script.startswith("examples/") or "from _harness import" in source:
        assert "wrote" in proc.stdout, f"{script} did not say where it wrote"
    if script.startswith("bench/"):
        assert list(tmp_path.glob("*.md")), f"{script} wrote no markdown summary under --out"
    large = [p for p in tmp_path.rglob("*") if p.is_file() and p.stat().st_size > 5_000_000]
    assert not large, f"{script} --quick left large files behind: {large}"
