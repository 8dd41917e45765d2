"""``report.json`` documents itself: every key it holds is explained in reports/report_schema.json.

The fast tests check the schema's own shape, the run metadata and the plotting helpers; the
slow one runs a real ``linops report --quick`` and walks its ``report.json`` against the
schema in both directions (no undocumented key, no documented key missing).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from linops import cli

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = json.loads((ROOT / "reports" / "report_schema.json").read_text())


def schema_mismatches(value: Any, entry: dict[str, Any], where: str = "") -> list[str]:
    """Return the keys of ``value`` that ``entry`` does not document, and the reverse."""
    problems: list[str] = []
    if "keys" in entry:
        if not isinstance(value, dict):
            return [f"{where or '.'}: expected an object, got {type(value).__name__}"]
        documented = entry["keys"]
        for key in sorted(set(value) - set(documented)):
            problems.append(f"{where}.{key}: not in the schema")
        for key, sub in documented.items():
            if key not in value:
                if not sub.get("optional"):
                    problems.append(f"{where}.{key}: in the schema, missing from the report")
                continue
            problems += schema_mismatches(value[key], sub, f"{where}.{key}")
    elif "each" in entry:
        if not isinstance(value, dict) or not value:
            return [f"{where}: expected a non-empty object"]
        for key, item in value.items():
            problems += schema_mismatches(item, entry["each"], f"{where}.{key}")
    elif "items" in entry:
        if not isinstance(value, list) or not value:
            return [f"{where}: expected a non-empty list"]
        for i, item in enumerate(value):
            problems += schema_mismatches(item, entry["items"], f"{where}[{i}]")
    return problems


def _entries(entry: dict[str, Any], where: str = "") -> list[tuple[str, dict[str, Any]]]:
    found = [(where, entry)]
    for key, sub in entry.get("keys", {}).items():
        found += _entries(sub, f"{where}.{key}")
    for kind in ("each", "items"):
        if kind in entry:
            found += _entries(entry[kind], f"{where}.<{kind}>")
    return found


def test_every_schema_entry_explains_itself() -> None:
    for where, entry in _entries(SCHEMA):
        assert isinstance(entry.get("doc"), str) and len(entry["doc"]) > 10, where
        assert set(entry) <= {"doc", "keys", "each", "items", "optional"}, where


def test_the_checker_finds_both_kinds_of_mismatch() -> None:
    entry = {"doc": "x", "keys": {"a": {"doc": "a"}, "b": {"doc": "b", "optional": True}}}
    assert schema_mismatches({"a": 1}, entry) == []
    assert schema_mismatches({"a": 1, "b": 2}, entry) == []
    assert schema_mismatches({"a": 1, "c": 3}, entry) == [".c: not in the schema"]
    assert schema_mismatches({}, entry) == [".a: in the schema, missing from the report"]


def _fake_setup(seed: int, epochs: int) -> dict:
    return {"models": {"default": {"architecture": "fake"}}, "datasets": {"digits": {}}}


def _fake_section(setup: dict, out: Path, quick: bool) -> dict:
    """Stand-in for the operators section (the keys _print_summary reads)."""
    return {
        "num_parameters": 10,
        "num_train": 5,
        "ntk_samples": 5,
        "train_accuracy": 1.0,
        "test_accuracy": 0.5,
        "hessian_top_eigenvalues": [3.0],
        "hessian_smallest_eigenvalues": [-1.0],
        "ntk_top_eigenvalues": [4.0],
        "models": {"second": {"architecture": "fake too"}},
    }


@pytest.mark.parametrize("quick", [False, True])
def test_report_records_how_it_was_run(monkeypatch, tmp_path, capsys, quick) -> None:
    """Run metadata, section timings and the models of every section, with training faked."""
    import linops

    monkeypatch.setattr(cli, "_default_setup", _fake_setup)
    monkeypatch.setattr(cli, "_sections", lambda: [("operators", _fake_section)])
    argv = ["report", "--out", str(tmp_path / "rep"), "--seed", "7", *(["--quick"] * quick)]
    cli.main(argv)
    out = capsys.readouterr().out
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert rep["command_line"] == "linops " + " ".join(argv)
    assert rep["seed"] == 7 and rep["quick"] is quick and rep["smoke"] is quick
    assert ("smoke_note" in rep) is quick and ("SMOKE RUN" in out) is quick
    assert rep["versions"]["linops"] == linops.__version__
    assert set(rep["versions"]) == {"python", "linops", "torch", "numpy", "scipy"}
    assert rep["threads"]["torch_threads"] >= 1
    assert list(rep["seconds_sections"]) == ["training", "operators"]
    assert set(rep["models"]) == {"default", "second"}  # the section's own model is listed
    assert "models" not in rep["operators"]
    top = {k: v for k, v in SCHEMA["keys"].items() if k not in ("models", "datasets")}
    top_level = {k: v for k, v in rep.items() if k in top or k not in SCHEMA["keys"]}
    shallow = {"doc": "", "keys": {k: {**v, "keys": {}} for k, v in top.items()}}
    for v in shallow["keys"].values():
        v.pop("keys")
    for key in ("hessian_density", "laziness", "training_jacobian"):  # not run here
        shallow["keys"][key]["optional"] = True
    assert schema_mismatches(top_level, shallow) == []
    assert "[2] operators" in out and "wrote 1 file(s)" in out  # report.json (fakes plot none)


def test_plot_helpers_label_the_data_and_refuse_bad_axes() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from reports.plotting import integer_ticks, log_ticks_at

    fig, ax = plt.subplots()
    ax.plot([16, 64, 256], [1, 2, 3])
    log_ticks_at(ax, [16, 64, 256])
    integer_ticks(ax, "y")
    fig.canvas.draw()
    assert ax.get_xscale() == "log"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["16", "64", "256"]
    assert all(float(t).is_integer() for t in ax.get_yticks())
    with pytest.raises(ValueError, match="axis: expected 'x' or 'y', got 'z'"):
        log_ticks_at(ax, [1], axis="z")
    with pytest.raises(ValueError, match="axis: expected 'x' or 'y', got 'z'"):
        integer_ticks(ax, "z")
    plt.close(fig)


def test_sections_print_names_and_times(capsys) -> None:
    from reports.runs import Sections, human_bytes, smoke_title

    timer = Sections("prog")
    with timer("one", "the first"):
        pass
    timer.step("two")
    timer.step("three")
    timer.end()
    with pytest.raises(RuntimeError), timer("four"):
        raise RuntimeError("boom")
    out = capsys.readouterr().out
    assert "prog: [1] one: the first ..." in out and "prog: [1] one done in" in out
    assert "prog: [4] four failed after" in out
    assert list(timer.seconds) == ["one", "two", "three", "four"]
    assert smoke_title("t", True).startswith("[SMOKE RUN") and smoke_title("t", False) == "t"
    assert human_bytes(999) == "999 B" and human_bytes(23_400_000) == "23.4 MB"


def test_an_output_is_written_whole_or_not_at_all(tmp_path: Path, monkeypatch) -> None:
    from reports.runs import write_text_atomic

    path = tmp_path / "result.json"
    plain = tmp_path / "plain.json"
    plain.write_text("x")
    assert write_text_atomic(path, '{"a": 1}') == path
    assert path.read_text() == '{"a": 1}'
    assert path.stat().st_mode == plain.stat().st_mode  # the permissions of a plain write
    write_text_atomic(path, "é" * 10_000)  # replaces, in UTF-8 whatever the locale
    assert path.read_bytes().decode("utf-8") == "é" * 10_000

    def interrupted(*_: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)  # the run stops before the rename
    with pytest.raises(KeyboardInterrupt):
        write_text_atomic(path, '{"a": 2, "truncated"')
    assert path.read_bytes().decode("utf-8") == "é" * 10_000  # the last complete output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.json", "result.json"]


def test_an_atomic_write_keeps_what_a_plain_write_keeps(tmp_path: Path) -> None:
    from reports.runs import write_text_atomic

    private = tmp_path / "private.json"
    private.write_text("old")
    private.chmod(0o600)
    write_text_atomic(private, "new")
    assert private.read_text() == "new" and private.stat().st_mode & 0o777 == 0o600
    real, link = tmp_path / "real.json", tmp_path / "link.json"
    real.write_text("old")
    link.symlink_to(real.name)
    write_text_atomic(link, "new")  # written through the link, which stays a link
    assert link.is_symlink() and real.read_text() == "new"
    long_name = tmp_path / ("r" * 240 + ".json")  # no room for a longer temporary name
    write_text_atomic(long_name, "x")
    assert long_name.read_text() == "x"
    with pytest.raises(FileNotFoundError, match="missing"):
        write_text_atomic(tmp_path / "missing" / "a.json", "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["private.json", "real.json", "link.json", long_name.name]
    )


def test_a_figure_is_saved_in_its_suffix_format_whole_or_not_at_all(
    tmp_path: Path, monkeypatch
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from reports.runs import save_figure

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    png, svg = tmp_path / "f.png", tmp_path / "f.svg"
    assert save_figure(fig, png, dpi=50) == png
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    save_figure(fig, svg)
    assert b"<svg" in svg.read_bytes()[:400]
    bare = save_figure(fig, tmp_path / "bare", dpi=50)  # matplotlib's default format and suffix
    assert bare == tmp_path / "bare.png" and bare.read_bytes()[:4] == b"\x89PNG"
    bare.unlink()
    before = png.read_bytes()

    def failing(target: Any, **_: Any) -> None:  # writes part of the image, then fails
        if isinstance(target, str | Path):
            Path(target).write_bytes(b"\x89PNG partial")
        else:
            target.write(b"\x89PNG partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(fig, "savefig", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        save_figure(fig, png)
    assert png.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.png", "f.svg"]
    plt.close(fig)


@pytest.mark.slow
def test_a_real_quick_report_matches_its_schema(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": str(ROOT)}
    code = "import sys; from linops.cli import main; main(sys.argv[1:])"
    out = tmp_path / "rep"
    proc = subprocess.run(
        [sys.executable, "-c", code, "report", "--quick", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rep = json.loads((out / "report.json").read_text())
    assert schema_mismatches(rep, SCHEMA) == []
    assert rep["smoke"] is True and rep["quick"] is True
    assert set(rep["models"]) == {"default", "training_jacobian"}
    assert rep["models"]["training_jacobian"]["num_parameters"] == rep["training_jacobian"]["dim"]
    assert sorted(p.name for p in out.iterdir()) == [
        "density.png",
        "report.json",
        "spectrum.png",
        "training_jacobian.png",
    ]
    for section in ("training", "operators", "hessian_density", "laziness", "training_jacobian"):
        assert f"] {section}" in proc.stdout


def test_a_busy_machine_gets_the_passive_hint_once(monkeypatch) -> None:
    from reports import runs

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setattr(runs, "thread_counts", lambda: {"cpus_usable": 2})
    monkeypatch.setattr(runs.os, "getloadavg", lambda: (20.0, 20.0, 20.0))
    hint = runs.busy_machine_hint("prog")
    assert hint is not None and hint.startswith("prog: the machine is busy (load 20.0 on 2 CPUs)")
    assert "OMP_WAIT_POLICY=PASSIVE" in hint
    monkeypatch.setattr(runs.os, "getloadavg", lambda: (2.5, 2.0, 2.0))
    assert runs.busy_machine_hint("prog") is None  # not busy
    monkeypatch.setattr(runs.os, "getloadavg", lambda: (20.0, 20.0, 20.0))
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert runs.busy_machine_hint("prog") is None  # the user chose
