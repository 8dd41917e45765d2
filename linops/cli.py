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
    data = digits()
    model = MLP(64, 10, widths=(64,), activation="gelu")
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
    return {"model": model, "loss": loss, "data": data, "history": trainer.history}


def _operators_section(setup: dict[str, Any], out: Path, quick: bool) -> dict[str, Any]:
    import linops

    model, loss, data = setup["model"], setup["loss"], setup["data"]
    n_ntk = 200 if quick else 500
    H = linops.HessianOperator(model, loss, (data.X_train, data.y_train))
    K = linops.NTKOperator(model, data.X_train[:n_ntk])
    k = 10
    t0 = time.perf_counter()
    h_top = np.sort(sla.eigsh(H, k=k, which="LA", tol=1e-6)[0])[::-1]
    h_bottom = np.sort(sla.eigsh(H, k=3, which="SA", tol=1e-6)[0])
    t1 = time.perf_counter()
    ntk_top = np.sort(sla.eigsh(K, k=k, which="LA", tol=1e-6)[0])[::-1]
    t2 = time.perf_counter()
    _plot_spectra(h_top, ntk_top, out / "spectrum.png")
    hist = setup["history"].metrics
    return {
        "num_parameters": H.shape[0],
        "num_train": len(data.X_train),
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


def _plot_spectra(h_top: np.ndarray, ntk_top: np.ndarray, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, vals, title in ((axes[0], h_top, "Hessian"), (axes[1], ntk_top, "NTK Gram")):
        ax.semilogy(np.arange(1, len(vals) + 1), np.abs(vals), "o-")
        ax.set(xlabel="index i", ylabel="|eigenvalue|", title=f"top {len(vals)}: {title}")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
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
    )
    result["summary"] = (
        f"ratio {result['laziness_ratio_mean']:.3g} +- {result['laziness_ratio_std']:.2g}; "
        f"reference ranks {result['reference_ranks']} at r={result['reference_sizes']}; "
        f"exact rank {result['exact_rank']} (unit 0, {len(X)} samples)"
    )
    return result


def _density_section(setup: dict[str, Any], out: Path, quick: bool) -> dict[str, Any]:
    """Hessian spectral density (SLQ) and trace (XTrace), with the exact trace as a check."""
    import linops
    from reports import density_report

    model, loss, data = setup["model"], setup["loss"], setup["data"]
    H = linops.HessianOperator(model, loss, (data.X_train, data.y_train))
    result = density_report(H, num_matvecs=200 if quick else 400, seed=0, png=out / "density.png")
    result["summary"] = (
        f"trace {result['trace_estimate']:.4g} +- {result['trace_stderr']:.2g} "
        f"({result['trace_method']}, {result['num_matvecs']} products); spectrum in "
        f"[{result['lambda_min_estimate']:.3g}, {result['lambda_max_estimate']:.3g}]"
    )
    return result


def _training_jacobian_section(setup: dict[str, Any], out: Path, quick: bool) -> dict[str, Any]:
    """Compute a small training Jacobian (width-16 MLP, 2 epochs), dense, with its spectrum.

    As in "Understanding Gradient Descent through the Training Jacobian" (an anonymous
    submission, no arXiv id given).
    """
    from reports import plot_training_jacobian_report, training_jacobian_report

    result = training_jacobian_report(quick=True)
    plot_training_jacobian_report(result, out / "training_jacobian.png")
    counts = "; ".join(
        f"tol {r['tol']:g}: {r['chaotic']}/{r['bulk']}/{r['stable']}"
        for r in result["region_table"][::2]
    )
    result["summary"] = (
        f"{result['dim']} params, {result['steps']} steps, dense in "
        f"{result['seconds_dense_jacobian']:.1f} s; chaotic/bulk/stable {counts}; rank(J - I) dense "
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


def report(out: Path, *, quick: bool = False, seed: int = 0, epochs: int | None = None) -> dict:
    """Run the report; return its numbers (also written to ``out/report.json``).

    Everything is written to a temporary folder beside ``out`` and renamed to ``out`` when the
    report is complete; a previous report in ``out`` is replaced as a whole.

    Raises
    ------
    ValueError
        If ``out`` is a file, or a folder holding anything but a previous report, or
        ``epochs`` is not a positive integer.
    OSError
        If the folder cannot be written.
    """
    epochs = epochs if epochs is not None else (2 if quick else 5)
    if not isinstance(epochs, int):  # a plain int, as before (np.integer refused)
        raise ValueError(f"epochs: expected a positive integer, got {epochs!r}")
    check_positive(epochs, "epochs")
    out = Path(out)
    _check_out(out)
    with _Staging(out) as tmp:
        start = time.perf_counter()
        print(f"linops report: training the default MLP on digits for {epochs} epochs ...")
        setup = _default_setup(seed, epochs)
        result: dict[str, Any] = {"model": "MLP 64-64-10 GELU on digits", "epochs": epochs}
        for key, section in _sections():
            print(f"  section {key} ...", flush=True)
            t0 = time.perf_counter()
            result[key] = section(setup, tmp, quick)
            result[key]["seconds_section"] = time.perf_counter() - t0
        result["seconds_total"] = time.perf_counter() - start
        (tmp / "report.json").write_text(json.dumps(result, indent=2))
    _print_summary(result, out)
    return result


#: what a report folder holds; a folder with anything else is not replaced
_REPORT_SUFFIXES = (".json", ".png")
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
    if out.is_dir():
        others = sorted(
            p.name for p in out.iterdir() if not (p.is_file() and p.suffix in _REPORT_SUFFIXES)
        )
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
    ops = result["operators"]
    fmt = ", ".join
    lines = [
        "",
        f"model            {result['model']}, {ops['num_parameters']} parameters",
        f"data             {ops['num_train']} training samples; NTK on {ops['ntk_samples']}",
        f"accuracy         train {ops['train_accuracy']:.3f}, test {ops['test_accuracy']:.3f}",
        f"Hessian top-5    {fmt(f'{v:.4g}' for v in ops['hessian_top_eigenvalues'][:5])}",
        f"Hessian min      {ops['hessian_smallest_eigenvalues'][0]:.4g}",
        f"NTK top-5        {fmt(f'{v:.4g}' for v in ops['ntk_top_eigenvalues'][:5])}",
    ]
    for key, section in result.items():
        summary = section.get("summary") if isinstance(section, dict) else None
        if summary:
            lines.append(f"{key:<16} {summary}")
    lines.append(f"total            {result['seconds_total']:.1f} s; written to {out}/")
    print("\n".join(lines))


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


def _bench(parser: argparse.ArgumentParser, name: str, rest: list[str]) -> None:
    available = benchmarks()
    if not available:
        parser.error(
            f"no bench/ folder in {Path.cwd()}: run linops bench from a checkout of the repository"
        )
    if name not in available:
        parser.error(f"NAME: expected one of {available}, got {name!r}")
    path = Path.cwd() / "bench" / f"{name}.py"
    sys.argv = [str(path), *rest]
    runpy.run_path(str(path), run_name="__main__")


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
    rep.add_argument("--quick", action="store_true", help="a smaller, faster smoke run")
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
    ben = sub.add_parser("bench", help="run bench/NAME.py of a checkout (extra args passed on)")
    ben.add_argument("name", metavar="NAME")
    return parser, {"report": rep, "bench": ben}


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``linops`` console script.

    Exit codes: 0 success, 1 a failure while running (one line on stderr), 2 bad arguments,
    130 interrupted (Ctrl-C).
    """
    parser, commands = _parser()
    args, rest = parser.parse_known_args(argv)
    sub = commands[args.command]
    try:
        if args.command == "report":
            if rest:
                sub.error(f"unrecognized arguments: {' '.join(rest)}")
            try:
                _check_out(args.out)
            except ValueError as err:
                sub.error(str(err))
            retain_freed_memory()  # this process is ours: keep freed blocks for the next product
            report(args.out, quick=args.quick, seed=args.seed, epochs=args.epochs)
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
