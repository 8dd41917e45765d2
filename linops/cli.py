"""The ``linops`` command: ``linops report`` (the main job) and ``linops bench``.

``linops report`` trains the built-in default (an MLP on scikit-learn's bundled digits) for a
few epochs, then prints a short report of the operators of the trained network (sizes, top
Hessian and NTK eigenvalues by ``scipy.sparse.linalg.eigsh`` run directly on the operators) and
of the sections the analysis modules contribute, and writes ``report.json`` and PNG figures to
the output folder.

The folder is written atomically: the report is built in a hidden temporary folder beside it
and renamed into place when complete (a previous report in the folder is swapped out), so an
interrupted or failed run never leaves a folder that looks complete but mixes two runs. Bad
arguments get a one-line error and exit code 2, Ctrl-C exits with 130, and ``linops bench``
runs only the benchmarks of ``bench/`` it lists.

The module is over 500 lines for one concept, the command line: its two commands share the
argument parsing, run metadata and the missing-peer messages.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import runpy
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse.linalg as sla
import torch

from linops._checks import check_positive
from linops.memory import retain_freed_memory

__all__ = ["main", "report"]

Section = Callable[[dict[str, Any], Path, bool], dict[str, Any]]


def _default_setup(seed: int, epochs: int) -> dict[str, Any]:
    from trainers import BackpropTrainer
    from trainers.data import digits
    from trainers.models import MLP

    torch.manual_seed(seed)
    data = digits(seed=seed)
    model = MLP(64, 10, widths=(64,), activation="gelu", seed=seed)
    loss = torch.nn.CrossEntropyLoss()
    trainer = BackpropTrainer(model, loss, optimizer="sgd", lr=0.1, momentum=0.9)
    trainer.fit(
        data.X_train,
        data.y_train,
        epochs=epochs,
        batch_size=64,
        seed=seed,
        validation=(data.X_test, data.y_test),
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(trainer.values[name])
    model.eval()
    num_parameters = sum(p.numel() for p in model.parameters())
    return {
        "model": model,
        "loss": loss,
        "data": data,
        "history": trainer.history,
        "models": {
            "default": {
                "architecture": "MLP 64-64-10 (one hidden layer of 64), GELU",
                "num_parameters": num_parameters,
                "initialisation": f"LeCun normal weights, zero biases (seed {seed})",
                "training": (
                    f"backprop, SGD lr 0.1 momentum 0.9, batch 64 shuffled (seed {seed}), "
                    f"{epochs} epochs, mean cross-entropy"
                ),
                "dataset": "digits",
                "used_by": ["operators", "hessian_density", "laziness"],
            }
        },
        "datasets": {
            "digits": {
                "source": "scikit-learn load_digits: 1797 8x8 grey images of the digits 0-9",
                "inputs": "flattened to 64 values, divided by 16 (range [0, 1])",
                "num_train": len(data.X_train),
                "num_test": len(data.X_test),
                "split": f"train_test_split(random_state={seed})",
            }
        },
    }


def _operators_section(setup: dict[str, Any], out: Path, quick: bool) -> dict[str, Any]:
    """Sizes, accuracies, extreme Hessian and NTK eigenvalues (scipy eigsh on the operators)."""
    import linops
    from reports.runs import smoke_title

    model, loss, data = setup["model"], setup["loss"], setup["data"]
    n_ntk = 200 if quick else 500
    H = linops.HessianOperator(model, loss, _hessian_data(data, quick))
    K = linops.NTKOperator(model, data.X_train[:n_ntk])
    k = 10
    t0 = time.perf_counter()
    h_top = np.sort(sla.eigsh(H, k=k, which="LA", tol=1e-6)[0])[::-1]
    h_bottom = np.sort(sla.eigsh(H, k=3, which="SA", tol=1e-6)[0])
    t1 = time.perf_counter()
    ntk_top = np.sort(sla.eigsh(K, k=k, which="LA", tol=1e-6)[0])[::-1]
    t2 = time.perf_counter()
    title = (
        f"MLP 64-64-10 on digits ({H.shape[0]} params), trained; "
        f"Hessian over {H.num_samples} samples"
    )
    _plot_spectra(h_top, ntk_top, n_ntk, out / "spectrum.png", smoke_title(title, quick))
    hist = setup["history"].metrics
    return {
        "num_parameters": H.shape[0],
        "num_train": len(data.X_train),
        "hessian_samples": H.num_samples,
        "ntk_samples": n_ntk,
        "ntk_shape": list(K.shape),
        "train_accuracy": hist["train_accuracy"][-1],
        "test_accuracy": hist["test_accuracy"][-1],
        "hessian_top_eigenvalues": h_top.tolist(),
        "hessian_smallest_eigenvalues": h_bottom.tolist(),
        "ntk_top_eigenvalues": ntk_top.tolist(),
        "seconds_hessian_eigsh": t1 - t0,
        "seconds_ntk_eigsh": t2 - t1,
    }


#: training samples of the Hessian in the operators and hessian_density sections (None: all)
_HESSIAN_SAMPLES = {True: 512, False: None}


def _hessian_data(data: Any, quick: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the ``(X, y)`` the report's Hessians average over: 512 samples with ``--quick``."""
    n = _HESSIAN_SAMPLES[quick]
    return data.X_train[:n], data.y_train[:n]


def _plot_spectra(
    h_top: np.ndarray, ntk_top: np.ndarray, n_ntk: int, path: Path, title: str
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from reports.runs import save_figure

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    panels = (
        (axes[0], h_top, "Hessian of the training loss"),
        (axes[1], ntk_top, f"NTK Gram on {n_ntk} samples"),
    )
    for ax, vals, what in panels:
        ax.semilogy(np.arange(1, len(vals) + 1), np.abs(vals), "o-")
        ax.set(xlabel="index i", ylabel="|eigenvalue i|", title=f"top {len(vals)}: {what}")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3, which="both")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)


def _laziness_section(setup: dict[str, Any], out: Path, quick: bool) -> dict[str, Any]:
    """Laziness ratio and reference-set rank of the default model.

    Section 3.2 of "Leveraging Low Rank Structure in the Lazy Regime" (an anonymous ICLR 2025
    submission, no arXiv id given).
    """
    from reports import laziness_report

    X = setup["data"].X_train[: 200 if quick else 500]
    result = laziness_report(
        setup["model"],
        X,
        num_points=4,
        output_indices=(0,),
        reference_sizes=(16, 64, 256) if quick else (16, 64, 256, 1024),
        exact_rank=True,
        seed=setup.get("seed", 0),
    )
    result["summary"] = (
        f"ratio {result['laziness_ratio_mean']:.3g} (sd {result['laziness_ratio_std']:.2g} "
        f"over the points); reference ranks {result['reference_ranks']} at "
        f"r={result['reference_sizes']} (the paper's Gram rule, lambda > r eps lambda_1); "
        f"exact rank {result['exact_rank']} (sigma > max(n, m) eps sigma_1; unit 0, "
        f"{len(X)} samples)"
    )
    return result


def _density_section(setup: dict[str, Any], out: Path, quick: bool) -> dict[str, Any]:
    """Hessian spectral density (SLQ) and trace (XTrace) of the default model."""
    import linops
    from reports import density_report
    from reports.runs import smoke_title

    model, loss, data = setup["model"], setup["loss"], setup["data"]
    H = linops.HessianOperator(model, loss, _hessian_data(data, quick))
    title = (
        f"Hessian spectral density (loss over {H.num_samples} samples)\n"
        f"MLP 64-64-10 on digits ({H.shape[0]} params, trained)"
    )
    result = density_report(
        H,
        num_matvecs=200 if quick else 400,
        seed=setup.get("seed", 0),
        png=out / "density.png",
        title=smoke_title(title, quick),
    )
    result["hessian_samples"] = H.num_samples
    result["summary"] = (
        f"trace {result['trace_estimate']:.4g} +- {result['trace_stderr']:.2g} "
        f"({result['trace_method']}, {result['num_matvecs']} products); spectrum in "
        f"[{result['lambda_min_estimate']:.3g}, {result['lambda_max_estimate']:.3g}]"
    )
    return result


#: the training-Jacobian section's run: (hidden width, epochs) of the quick and the full report
_TJ_RUNS = {True: (8, 1), False: (16, 2)}


def _training_jacobian_section(setup: dict[str, Any], out: Path, quick: bool) -> dict[str, Any]:
    """Compute a small training Jacobian (its own MLP on digits), dense, with its spectrum.

    As in "Understanding Gradient Descent through the Training Jacobian" (an anonymous
    submission, no arXiv id given): a width-8, 1-epoch run with ``--quick`` (610 parameters,
    25 steps), else width 16 and 2 epochs (1210 parameters, 50 steps).
    """
    from reports import plot_training_jacobian_report, training_jacobian_report

    width, epochs = _TJ_RUNS[quick]
    result = training_jacobian_report(width=width, epochs=epochs, seed=setup.get("seed", 0))
    plot_training_jacobian_report(result, out / "training_jacobian.png", smoke=quick)
    counts = "; ".join(
        f"tol {r['tol']:g}: {r['chaotic']}/{r['bulk']}/{r['stable']}"
        for r in result["region_table"][::2]
    )
    result["summary"] = (
        f"{result['dim']} params, {result['steps']} steps, dense in "
        f"{result['seconds_dense_jacobian']:.1f} s; chaotic/bulk/stable {counts}; "
        f"#(sigma(J - I) > {result['rank_thresholds']}) dense "
        f"{result['rank_dense']} vs matrix-free {result['rank_matrix_free']} "
        f"({result['products_matrix_free']} products)"
    )
    return result


def _sections() -> list[tuple[str, Section]]:
    """Return the report's sections in order; each returns JSON-ready numbers (and may write PNGs)."""
    return [
        ("operators", _operators_section),
        ("hessian_density", _density_section),
        ("laziness", _laziness_section),
        ("training_jacobian", _training_jacobian_section),
    ]


def report(
    out: Path,
    *,
    quick: bool = False,
    seed: int = 0,
    epochs: int | None = None,
    argv: list[str] | None = None,
) -> dict:
    """Run the report; return its numbers (also written to ``out/report.json``).

    Everything is written to a temporary folder beside ``out`` and renamed to ``out`` when the
    report is complete; a previous report in ``out`` is replaced as a whole. Each section
    prints its name when it starts and its wall time when it ends. Every key of
    ``report.json`` is explained in ``reports/report_schema.json``.

    Parameters
    ----------
    out
        The report's folder.
    quick
        A smoke run: every section does less work (smaller samples, fewer products, a smaller
        training Jacobian), and the JSON, the printed summary and the plot titles say so.
    seed
        Seed of the default model's initialisation, its data split and batch order, the
        estimators' probes, and the initialisation of the training-Jacobian section's model.
    epochs
        Training epochs of the default model (default: 5, or 2 with ``quick``).
    argv
        The command line to record (default: ``sys.argv``).

    Raises
    ------
    ValueError
        If ``out`` is a file, or a folder holding anything but a previous report (its
        ``report.json``, written by this command, and its PNGs), or ``epochs`` is not a
        positive integer.
    OSError
        If the folder cannot be written.
    """
    from reports.runs import SMOKE_NOTE, Sections, run_metadata

    epochs = epochs if epochs is not None else (2 if quick else 5)
    if not isinstance(epochs, int):  # a plain int, as before (np.integer refused)
        raise ValueError(f"epochs: expected a positive integer, got {epochs!r}")
    check_positive(epochs, "epochs")
    out = Path(out)
    _check_out(out)
    result: dict[str, Any] = run_metadata(quick=quick, seed=seed, argv=argv)
    if quick:
        result["smoke_note"] = SMOKE_NOTE
    result.update(model="MLP 64-64-10 GELU on digits", epochs=epochs, models={}, datasets={})
    with _Staging(out) as tmp:
        timer = Sections("linops report")
        if quick:
            print(f"linops report: {SMOKE_NOTE}", flush=True)
        with timer("training", f"the default MLP on digits for {epochs} epochs"):
            setup = _default_setup(seed, epochs)
        setup["seed"] = seed
        result["models"].update(setup.get("models", {}))
        result["datasets"].update(setup.get("datasets", {}))
        for key, section in _sections():
            with timer(key, (section.__doc__ or "").split("\n")[0].rstrip(".")):
                result[key] = section(setup, tmp, quick)
            result["models"].update(result[key].pop("models", {}))
            result["datasets"].update(result[key].pop("datasets", {}))
            result[key]["seconds_section"] = timer.seconds[key]
        result["seconds_sections"] = dict(timer.seconds)
        result["seconds_total"] = timer.total()
        (tmp / "report.json").write_text(json.dumps(result, indent=2))
    _print_summary(result, out)
    return result


#: what a report folder holds; a folder with anything else is not replaced
_REPORT_FILES = frozenset({"report.json", "spectrum.png", "density.png", "training_jacobian.png"})
_STAGING = re.compile(r"^\.(?P<name>.+)\.(?P<kind>partial|old)-(?P<pid>\d+)-[^/]*$")


def _check_out(out: Path) -> None:
    """Refuse an ``out`` that is a file, or a folder with files that are not a report's."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out: expected a folder, got the file {out}")
    if out.resolve() in (Path.cwd(), *Path.cwd().parents):
        raise ValueError(
            f"--out: expected a folder of its own (it is replaced as a whole), got {out}, "
            "the current folder or one above it"
        )
    if out.is_dir() and any(out.iterdir()):
        others = sorted(
            p.name for p in out.iterdir() if not (p.is_file() and p.name in _REPORT_FILES)
        )
        if not others and not _is_report(out / "report.json"):
            others = ["no report.json written by linops report"]
        if others:
            shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
            raise ValueError(
                f"--out: expected a new folder or one holding a previous report, got {out} "
                f"holding {shown}"
            )
    parent = out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"--out: expected a writable location, got {out} ({parent} is not)")


def _is_report(path: Path) -> bool:
    """Whether ``path`` is a ``report.json`` this command wrote (its run metadata and timings).

    A folder is replaced only then: one holding a user's own ``figure.png`` and
    ``results.json`` was taken for a previous report and deleted.
    """
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and {"command_line", "seconds_sections"} <= data.keys()


class _Staging:
    """A hidden temporary folder beside ``out``, renamed to ``out`` on success.

    It is removed on failure or interruption. Left-overs of killed runs (dead pids) are swept
    first.
    """

    def __init__(self, out: Path) -> None:
        self.out = out

    def __enter__(self) -> Path:
        parent = self.out.absolute().parent
        parent.mkdir(parents=True, exist_ok=True)
        _sweep_staging(parent, self.out.name)
        prefix = f".{self.out.name}.partial-{os.getpid()}-"
        self.tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
        umask = os.umask(0)
        os.umask(umask)
        self.tmp.chmod(0o777 & ~umask)  # mkdtemp's 0o700 would become the report folder's
        return self.tmp

    def __exit__(self, kind: Any, *_: Any) -> None:
        if kind is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        old = None
        if self.out.exists():
            old = self.out.parent / f".{self.out.name}.old-{os.getpid()}-"
            os.replace(self.out, old)
        os.replace(self.tmp, self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _sweep_staging(parent: Path, name: str) -> None:
    for p in parent.iterdir():
        match = _STAGING.match(p.name)
        if match and match["name"] == name and not _alive(int(match["pid"])):
            shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - another user's process
        return True
    return True


def _print_summary(result: dict[str, Any], out: Path) -> None:
    from reports.runs import print_written

    ops = result["operators"]
    fmt = ", ".join
    lines = [""]
    if result.get("smoke"):
        lines.append(f"*** {result.get('smoke_note', 'SMOKE RUN (--quick)')} ***")
    lines += [
        f"model            {result['model']}, {ops['num_parameters']} parameters",
        f"data             {ops['num_train']} training samples; Hessian on "
        f"{ops.get('hessian_samples', ops['num_train'])}, NTK on {ops['ntk_samples']}",
        f"accuracy         train {ops['train_accuracy']:.3f}, test {ops['test_accuracy']:.3f}",
        f"Hessian top-5    {fmt(f'{v:.4g}' for v in ops['hessian_top_eigenvalues'][:5])}",
        f"Hessian min      {ops['hessian_smallest_eigenvalues'][0]:.4g}",
        f"NTK top-5        {fmt(f'{v:.4g}' for v in ops['ntk_top_eigenvalues'][:5])}",
    ]
    for key, section in result.items():
        summary = section.get("summary") if isinstance(section, dict) else None
        if summary:
            lines.append(f"{key:<16} {summary}")
    timings = ", ".join(f"{k} {v:.1f} s" for k, v in result.get("seconds_sections", {}).items())
    lines.append(f"wall time        {timings}")
    lines.append(f"total            {result['seconds_total']:.1f} s; written to {out}/")
    print("\n".join(lines))
    print_written("linops report", out)


def benchmarks(root: Path | None = None) -> list[str]:
    """Return the benchmarks ``linops bench`` runs: ``bench/NAME.py`` of a checkout, no helpers."""
    bench = (root or Path.cwd()) / "bench"
    if not bench.is_dir():
        return []
    return sorted(
        p.stem
        for p in bench.glob("*.py")
        if p.is_file() and not p.stem.startswith("_") and re.fullmatch(r"\w+", p.stem)
    )


def benchmark_summary(path: Path) -> str:
    """Return the first line of a benchmark script's module docstring, read without running it."""
    import ast

    try:
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
    except (OSError, SyntaxError, ValueError):
        return "(could not be read)"
    return doc.strip().splitlines()[0] if doc and doc.strip() else "(no description)"


def _bench_listing(root: Path | None = None) -> str:
    names = benchmarks(root)
    if not names:
        return "no bench/ folder here: run linops bench from a checkout of the repository"
    folder = (root or Path.cwd()) / "bench"
    width = max(len(n) for n in names)
    lines = [f"  {n:<{width}}  {benchmark_summary(folder / f'{n}.py')}" for n in names]
    return "benchmarks in bench/ (linops bench NAME --help for each one's options):\n" + "\n".join(
        lines
    )


def _bench(parser: argparse.ArgumentParser, name: str | None, rest: list[str]) -> None:
    """Run ``bench/NAME.py`` with ``rest`` as its arguments (``--help`` included)."""
    available = benchmarks()
    if name is None:
        print(_bench_listing())
        return
    if not available:
        parser.error(
            f"no bench/ folder in {Path.cwd()}: run linops bench from a checkout of the repository"
        )
    if name not in available:
        parser.error(f"NAME: expected one of {available}, got {name!r}")
    path = Path.cwd() / "bench" / f"{name}.py"
    argv, sys_path = sys.argv, list(sys.path)
    sys.argv = [str(path), *rest]
    try:
        runpy.run_path(str(path), run_name="__main__")
    except ModuleNotFoundError as err:
        hint = _missing_peer_hint(err, path)
        if hint is None:
            raise
        print(hint, file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        sys.argv, sys.path[:] = argv, sys_path


def _missing_peer_hint(err: ModuleNotFoundError, script: Path) -> str | None:
    """Return ``bench/_harness.py``'s one-line hint for a missing optional peer, if it is one."""
    harness = sys.modules.get("_harness")
    if harness is None or not hasattr(harness, "missing_peer_hint"):
        import importlib.util

        spec = importlib.util.spec_from_file_location("_harness", script.parent / "_harness.py")
        if spec is None or spec.loader is None:
            return None
        harness = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(harness)
        except Exception:  # an old or broken harness: fall back to the traceback
            return None
    hint: str | None = harness.missing_peer_hint(err.name or "", script)
    return hint


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``linops report: error: ...`` and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2**63), got {value}")
    return value


def _parser() -> tuple[_Parser, dict[str, _Parser]]:
    """Return the ``linops`` parser and its subcommands' parsers, by name."""
    from linops import __version__

    parser = _Parser(prog="linops", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"linops {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    rep = sub.add_parser("report", help="analyse the default MLP on digits; write JSON + plots")
    rep.add_argument(
        "--out",
        type=Path,
        default=Path("results/report"),
        help="folder of report.json and the plots, replaced whole (default: results/report)",
    )
    rep.add_argument(
        "--quick",
        action="store_true",
        help=(
            "a smoke run: every section smaller (README, 'The report'), marked as such in "
            "report.json, the printed summary and the plot titles"
        ),
    )
    rep.add_argument(
        "--seed",
        type=_seed,
        default=0,
        help="seed of the model, data split and probes (default: 0)",
    )
    rep.add_argument(
        "--epochs",
        type=_positive_int,
        default=None,
        help="training epochs (default: 5, or 2 with --quick)",
    )
    ben = sub.add_parser(
        "bench",
        help="list the benchmarks of bench/, or run bench/NAME.py with the arguments after NAME",
        description=(
            "Run bench/NAME.py of a checkout; every argument after NAME goes to the script\n"
            "(linops bench NAME --help shows its options). Without NAME: list the benchmarks.\n"
            "Benchmarks that compare with optional peers (curvlinops, JAX, ...) need\n"
            "`bash scripts/setup.sh bench`, or their --no-<peer> / --skip-<peer> option."
        ),
        epilog=_bench_listing(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ben.add_argument("name", metavar="NAME", nargs="?", help="the benchmark (see the list below)")
    return parser, {"report": rep, "bench": ben}


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``linops`` console script.

    Exit codes: 0 success, 1 a failure while running (one line on stderr), 2 bad arguments,
    130 interrupted (Ctrl-C).
    """
    parser, commands = _parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    rest: list[str] = []
    if argv[:1] == ["bench"] and len(argv) > 1 and not argv[1].startswith("-"):
        argv, rest = argv[:2], argv[2:]  # everything after NAME is the script's, --help too
    args = parser.parse_args(argv)
    sub = commands[args.command]
    try:
        if args.command == "report":
            try:
                _check_out(args.out)
            except ValueError as err:
                sub.error(str(err))
            retain_freed_memory()  # this process is ours: keep freed blocks for the next product
            report(
                args.out,
                quick=args.quick,
                seed=args.seed,
                epochs=args.epochs,
                argv=["linops", *argv],
            )
        else:
            _bench(sub, args.name, rest)
    except KeyboardInterrupt:
        print(f"linops {args.command}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except OSError as err:
        if args.command != "report":
            raise
        print(f"linops report: error: {err}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":  # python3 -m linops.cli
    main()
