"""The ``linops`` command: atomic report folders, one-line errors, Ctrl-C, listed benchmarks.

The report's heavy work (training, eigensolvers) is replaced by fake sections that write a
figure and return numbers, so these tests check the command's behaviour, not the analysis.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from linops import cli

ROOT = Path(__file__).resolve().parents[1]
PATIENCE_S = 120  # hang guard for the subprocess, not a speed assertion


def _operators(setup: dict, out: Path, quick: bool) -> dict:
    (out / "spectrum.png").write_bytes(b"png of run " + str(setup["run"]).encode())
    return {
        "num_parameters": 10,
        "num_train": 5,
        "ntk_samples": 5,
        "train_accuracy": 1.0,
        "test_accuracy": 0.5,
        "hessian_top_eigenvalues": [3.0, 2.0],
        "hessian_smallest_eigenvalues": [-1.0],
        "ntk_top_eigenvalues": [4.0],
    }


class Interrupt:
    """A section that writes its figure, then is interrupted (Ctrl-C) or fails."""

    def __init__(self, error: BaseException) -> None:
        self.error = error

    def __call__(self, setup: dict, out: Path, quick: bool) -> dict:
        (out / "density.png").write_bytes(b"half-written figure")
        raise self.error


@pytest.fixture
def fake(monkeypatch):
    """Replace training and the sections; ``fake["sections"]`` may be changed per test."""
    state = {"runs": 0, "sections": [("operators", _operators)]}

    def setup(seed: int, epochs: int) -> dict:
        state["runs"] += 1
        return {"run": state["runs"], "seed": seed, "epochs": epochs}

    monkeypatch.setattr(cli, "_default_setup", setup)
    monkeypatch.setattr(cli, "_sections", lambda: state["sections"])
    monkeypatch.setattr(cli, "retain_freed_memory", lambda: None)
    return state


def _main(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        cli.main(argv)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected a one-line error, got:\n{err}"
    assert "Traceback" not in err
    return lines[0]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# --------------------------------------------------------------------------- atomic folders
def test_report_writes_a_complete_folder_and_nothing_beside_it(fake, tmp_path, capsys):
    out = tmp_path / "rep"
    code, stdout, _ = _main(["report", "--out", str(out), "--epochs", "1"], capsys)
    assert code == 0 and "written to" in stdout
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "spectrum.png"]
    assert json.loads((out / "report.json").read_text())["epochs"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep"]  # no staging left-overs
    # a rerun replaces the report as a whole
    code, _, _ = _main(["report", "--out", str(out), "--epochs", "2"], capsys)
    assert code == 0 and json.loads((out / "report.json").read_text())["epochs"] == 2
    assert (out / "spectrum.png").read_bytes() == b"png of run 2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep"]


@pytest.mark.parametrize(
    ("error", "code"), [(KeyboardInterrupt(), 130), (OSError(28, "No space left on device"), 1)]
)
def test_interrupted_rerun_leaves_the_previous_report_untouched(
    fake, tmp_path, capsys, error, code
):
    """Regression (issue 16): an interrupted rerun left the old report.json beside new PNGs."""
    out = tmp_path / "rep"
    assert _main(["report", "--out", str(out)], capsys)[0] == 0
    before = _snapshot(out)
    fake["sections"] = [("operators", _operators), ("hessian_density", Interrupt(error))]
    got, _, err = _main(["report", "--out", str(out)], capsys)
    assert got == code
    line = _one_line(err)
    assert line.startswith("linops report: ")
    assert _snapshot(out) == before  # same files, same bytes: nothing of the second run
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep"]


def test_interrupted_first_run_leaves_no_folder(fake, tmp_path, capsys):
    fake["sections"] = [("operators", _operators), ("x", Interrupt(KeyboardInterrupt()))]
    out = tmp_path / "rep"
    assert _main(["report", "--out", str(out)], capsys)[0] == 130
    assert list(tmp_path.iterdir()) == []


def test_staging_folders_of_killed_runs_are_swept(fake, tmp_path, capsys):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], text=True,
                          capture_output=True, check=True).stdout.strip()  # fmt: skip
    stale = tmp_path / f".rep.partial-{dead}-abc"
    stale.mkdir()
    (stale / "report.json").write_text("{}")
    mine = tmp_path / f".other.partial-{dead}-abc"  # another report's: not touched
    mine.mkdir()
    assert _main(["report", "--out", str(tmp_path / "rep")], capsys)[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [mine.name, "rep"]


def test_ctrl_c_in_a_real_process_exits_130_with_one_line(tmp_path):
    # a process started with SIGINT ignored (a background job of a non-interactive shell, as
    # `nohup bash .ci/run &`) passes that on and Python then keeps ignoring it: install the
    # handler an interactive terminal's process gets
    script = (
        "import signal, time\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "from linops import cli\n"
        "def slow(seed, epochs):\n"
        "    print('training', flush=True)\n"
        "    time.sleep(600)\n"
        "cli._default_setup = slow\n"
        f"cli.main(['report', '--out', {str(tmp_path / 'rep')!r}])\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        start = time.monotonic()
        for line in proc.stdout:  # wait until it is inside the report
            if line.startswith("training"):
                break
            assert time.monotonic() - start < PATIENCE_S
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=PATIENCE_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130
    assert _one_line(err) == "linops report: interrupted"
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- bad arguments
@pytest.mark.parametrize(
    ("argv", "pattern"),
    [
        (["report", "--epochs", "0"], "--epochs: expected a positive integer, got 0"),
        (["report", "--epochs", "-3"], "--epochs: expected a positive integer, got -3"),
        (["report", "--epochs", "two"], "--epochs: expected a positive integer, got 'two'"),
        (["report", "--seed", "-1"], r"--seed: expected an integer in \[0, 2\*\*63\), got -1"),
        (["report", "--seed", "1.5"], "--seed: expected an integer, got '1.5'"),
        (["report", "--frobnicate"], "unrecognized arguments: --frobnicate"),
        (["report", "--out"], "--out: expected one argument"),
        (["nonsense"], "invalid choice: 'nonsense'"),
        ([], "the following arguments are required"),
    ],
)
def test_invalid_arguments_get_one_line_errors(fake, tmp_path, capsys, argv, pattern):
    """Regression (issue 16): --epochs 0 ended in a KeyError."""
    import re

    code, _, err = _main(argv, capsys)
    assert code == 2
    assert re.search(pattern, _one_line(err)), err
    assert fake["runs"] == 0


def test_bad_out_gets_one_line_errors(fake, tmp_path, capsys, monkeypatch):
    """Regression (issue 16): a bad --out gave raw tracebacks."""
    a_file = tmp_path / "file.txt"
    a_file.write_text("keep me")
    mixed = tmp_path / "mine"
    mixed.mkdir()
    (mixed / "thesis.tex").write_text("keep me too")
    cases = {
        str(a_file): "--out: expected a folder, got the file",
        str(a_file / "sub"): "--out: expected a writable location",
        str(mixed): "--out: expected a new folder or one holding a previous report",
        ".": "--out: expected a folder of its own",
    }
    monkeypatch.chdir(tmp_path)
    for out, message in cases.items():
        code, _, err = _main(["report", "--out", out], capsys)
        assert code == 2, out
        assert message in _one_line(err), err
    assert a_file.read_text() == "keep me" and (mixed / "thesis.tex").read_text() == "keep me too"
    assert fake["runs"] == 0


def test_a_folder_of_the_users_json_and_png_files_is_not_taken_for_a_report(fake, tmp_path, capsys):
    """Any folder of .json and .png files was taken for a previous report and replaced: a
    user's results.json and figure.png were deleted without a word (exit code 0)."""
    mine = tmp_path / "myfigs"
    mine.mkdir()
    (mine / "experiment_results.json").write_text('{"my": "data"}')
    (mine / "figure.png").write_bytes(b"my figure")
    named = tmp_path / "named"  # a report's file names, not a report's contents
    named.mkdir()
    (named / "report.json").write_text('{"my": "data"}')
    (named / "spectrum.png").write_bytes(b"my figure")
    for out, shown in ((mine, "experiment_results.json, figure.png"), (named, "no report.json")):
        code, _, err = _main(["report", "--out", str(out)], capsys)
        assert code == 2 and "holding " + shown in _one_line(err), err
    assert (mine / "experiment_results.json").read_text() == '{"my": "data"}'
    assert (named / "spectrum.png").read_bytes() == b"my figure"
    assert fake["runs"] == 0


def test_unwritable_out_gets_a_one_line_error(fake, tmp_path, capsys, monkeypatch):
    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path))

    monkeypatch.setattr(cli.tempfile, "mkdtemp", denied)
    code, _, err = _main(["report", "--out", str(tmp_path / "rep")], capsys)
    assert code == 1
    assert "Permission denied" in _one_line(err)
    monkeypatch.setattr(cli.os, "access", lambda *a: False)
    code, _, err = _main(["report", "--out", str(tmp_path / "rep")], capsys)
    assert code == 2 and "--out: expected a writable location" in _one_line(err)


def test_report_function_checks_epochs(fake, tmp_path):
    with pytest.raises(ValueError, match="epochs: expected a positive integer, got 0"):
        cli.report(tmp_path / "rep", epochs=0)


# --------------------------------------------------------------------------- bench
@pytest.fixture
def checkout(tmp_path, monkeypatch) -> Path:
    """A fake checkout: bench/ok.py and a helper, and an evil.py outside bench/."""
    root = tmp_path / "repo"
    (root / "bench").mkdir(parents=True)
    marker = tmp_path / "ran.txt"
    body = "import sys\nopen({!r}, 'a').write('{} ' + ' '.join(sys.argv[1:]) + '\\n')\n"
    (root / "bench" / "ok.py").write_text(body.format(str(marker), "ok"))
    (root / "bench" / "_helper.py").write_text(body.format(str(marker), "helper"))
    (root / "evil.py").write_text(body.format(str(marker), "evil"))
    (tmp_path / "evil.py").write_text(body.format(str(marker), "evil"))
    monkeypatch.chdir(root)
    return marker


def test_bench_runs_a_listed_benchmark_with_its_arguments(checkout, capsys):
    code, _, _ = _main(["bench", "ok", "--quick", "--out", "x"], capsys)
    assert code == 0
    assert checkout.read_text() == "ok --quick --out x\n"
    assert cli.benchmarks() == ["ok"]


@pytest.mark.parametrize("name", ["../evil", "../../evil", "_helper", "ok.py", "/tmp/evil", ""])
def test_bench_refuses_names_it_does_not_list(checkout, capsys, name):
    """Regression (issue 16): `linops bench ../evil` ran ../evil.py."""
    code, _, err = _main(["bench", name], capsys)
    assert code == 2
    assert "NAME: expected one of ['ok']" in _one_line(err)
    assert not checkout.exists(), "nothing may run"


def test_bench_outside_a_checkout_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, _, err = _main(["bench", "operators"], capsys)
    assert code == 2 and "no bench/ folder" in _one_line(err)


def test_version_and_help_texts(capsys: pytest.CaptureFixture[str]) -> None:
    import linops
    from linops.cli import main

    assert linops.__version__ and linops.__version__ != "0+unknown"
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"linops {linops.__version__}"
    with pytest.raises(SystemExit):
        main(["report", "--help"])
    text = capsys.readouterr().out
    for option, default in (("--out", "results/report"), ("--seed", "0"), ("--epochs", "5")):
        assert option in text and f"default: {default}" in text


# --------------------------------------------------------------------------- bench listing
def test_bench_without_a_name_lists_each_benchmark_with_its_first_docstring_line(
    tmp_path, monkeypatch, capsys
):
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "alpha.py").write_text('"""Alpha: times A against B.\n\nMore."""\n')
    (tmp_path / "bench" / "beta.py").write_text("x = 1\n")
    (tmp_path / "bench" / "_harness.py").write_text('"""Not listed."""\n')
    monkeypatch.chdir(tmp_path)
    code, out, _ = _main(["bench"], capsys)
    assert code == 0
    assert "alpha  Alpha: times A against B." in out
    assert "beta   (no description)" in out and "_harness" not in out
    code, out, _ = _main(["bench", "--help"], capsys)
    assert code == 0 and "alpha  Alpha: times A against B." in out


def test_bench_forwards_help_and_every_argument_to_the_script(checkout, capsys):
    """Regression (issue 18): `linops bench operators --help` showed linops' own help."""
    code, _, _ = _main(["bench", "ok", "--help", "--seed", "3", "-x"], capsys)
    assert code == 0
    assert checkout.read_text() == "ok --help --seed 3 -x\n"


def test_bench_real_script_help_is_the_scripts(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    code, out, _ = _main(["bench", "rank_seeds", "--help"], capsys)
    assert code == 0
    assert "usage: rank_seeds.py" in out and "--thresholds" in out
    assert "linops bench" not in out.splitlines()[0]


def test_a_missing_optional_peer_is_one_line_with_the_way_out(tmp_path, monkeypatch, capsys):
    """Regression (issue 18): a missing curvlinops ended in a ModuleNotFoundError traceback."""
    (tmp_path / "bench").mkdir()
    harness = (ROOT / "bench" / "_harness.py").read_text()
    (tmp_path / "bench" / "_harness.py").write_text(harness)
    script = (
        "import argparse\n"
        "p = argparse.ArgumentParser()\n"
        "p.add_argument('--no-curvlinops', action='store_true')\n"
        "import curvlinops_is_not_installed_here as curvlinops\n"
    )
    (tmp_path / "bench" / "peer.py").write_text(script.replace("_is_not_installed_here", ""))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "curvlinops", None)  # import fails as if not installed
    monkeypatch.delitem(sys.modules, "_harness", raising=False)
    code, _, err = _main(["bench", "peer", "--quick"], capsys)
    assert code == 1
    line = _one_line(err)
    assert "'curvlinops' is not installed" in line
    assert "bash scripts/setup.sh bench" in line and "--no-curvlinops" in line
    # an ordinary missing module is not hidden
    (tmp_path / "bench" / "broken.py").write_text("import no_such_module_xyz\n")
    with pytest.raises(ModuleNotFoundError):
        cli.main(["bench", "broken"])


def test_harness_marks_smoke_json_says_where_it_wrote_and_hints_peers(tmp_path):
    """bench/_harness.py gives every script these without the script doing anything."""
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "_harness.py").write_text((ROOT / "bench" / "_harness.py").read_text())
    script = (
        "import sys\n"
        "from _harness import parser, section, write_json\n"
        "args = parser(__doc__, 'unused').parse_args()\n"
        "with section('sum'):\n"
        "    total = 1 + 1\n"
        "write_json(args.out, 'demo', {'total': total})\n"
        "if 'PEER' in __import__('os').environ:\n"
        "    import jax_is_absent_here as jax\n"
    )
    (tmp_path / "bench" / "demo.py").write_text(script)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def run(*args: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, str(tmp_path / "bench" / "demo.py"), *args]
        return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path)

    out = tmp_path / "out"
    proc = run("--quick", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    payload = json.loads((out / "demo.json").read_text())
    assert (
        payload["smoke"] is True and payload["total"] == 2 and "SMOKE RUN" in payload["smoke_note"]
    )
    assert f"wrote {out / 'demo.json'}" in proc.stdout
    assert "demo: [1] sum done in" in proc.stdout
    assert "wrote 1 file(s)" in proc.stdout and "demo.json" in proc.stdout.splitlines()[-1]
    proc = run("--out", str(out))
    assert json.loads((out / "demo.json").read_text())["smoke"] is False
    script = script.replace("jax_is_absent_here", "jax")
    (tmp_path / "bench" / "demo.py").write_text(
        script.replace("import sys\n", "import sys\nsys.modules['jax'] = None\n")
    )
    env["PEER"] = "1"
    proc = run("--out", str(out))
    assert proc.returncode == 1
    assert _one_line(proc.stderr) == (
        "demo.py: the optional peer 'jax' is not installed: install it with "
        "`bash scripts/setup.sh bench`"
    )


def test_harness_stops_at_once_when_a_skippable_peer_is_missing(monkeypatch, capsys, tmp_path):
    """Regression (issue 18): without curvlinops, bench/operators.py failed after 3 minutes."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_harness_test", ROOT / "bench" / "_harness.py")
    assert spec is not None and spec.loader is not None
    harness = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(harness)
    monkeypatch.setitem(sys.modules, "jax", None)
    monkeypatch.setattr(sys, "argv", [str(tmp_path / "demo.py")])
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # parser() installs its own
    p = harness.parser("Demo.", tmp_path / "missing")
    p.add_argument("--skip-jax", action="store_true")
    with pytest.raises(SystemExit) as stop:
        p.parse_args([])
    assert stop.value.code == 1
    assert "demo.py: the optional peer 'jax' is not installed" in _one_line(capsys.readouterr().err)
    assert p.parse_args(["--skip-jax"]).skip_jax  # skipping it runs
    import atexit

    atexit.unregister(harness._report_written)


@pytest.mark.parametrize("module", ["linops", "linops.cli"])
def test_python_dash_m_runs_the_command_line(module: str) -> None:
    """``python3 -m linops`` had no __main__; ``python3 -m linops.cli`` printed nothing."""
    import linops

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-m", module, "--version"], capture_output=True, text=True, env=env,
        timeout=120, check=True,
    )  # fmt: skip
    assert out.stdout.strip() == f"linops {linops.__version__}"
