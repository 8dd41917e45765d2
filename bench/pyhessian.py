"""Head to head with PyHessian 0.1 on a CIFAR ResNet-20: top-1, top-5, trace, SLQ density.

What is measured
----------------
PyHessian 0.1 (Yao, Gholami, Keutzer & Mahoney, "PyHessian: Neural Networks Through the Lens
of the Hessian", arXiv:1912.07145; ``pip install --no-deps pyhessian==0.1``), the tool behind
most Hessian-spectrum papers, against linops on the same model and data, as a user of each
would call them:

* model: the CIFAR ResNet-20 of ``bench/scale.py`` (He et al. 2016; 1x1 convolution
  shortcuts; BatchNorm in eval mode with non-trivial running statistics; 272,474
  parameters), float32, on 128 synthetic CIFAR-shaped images (standard normal pixels, random
  labels), cross-entropy;
* ``top1`` / ``top5``: PyHessian's ``eigenvalues(top_n=1 | 5)`` (power iteration with
  deflation, its defaults ``maxIter=100, tol=1e-3``) against :func:`linops.lanczos`
  ``(k, "LA")`` (thick restart, default ``rtol = sqrt(eps)``);
* ``trace``: Hutchinson at 100 products: PyHessian's ``trace(maxIter=100, tol=-inf)``
  against :func:`estimators.hutchinson_trace` ``(H, 100, seed=seed)``, on the same probes:
  PyHessian draws each probe as ``torch.randint_like(p, high=2)`` per parameter (zeros set to
  -1) from the global generator after ``torch.manual_seed(seed)``, and linops' Rademacher
  probes are the same bits from its ``seed`` (:func:`estimators._budget.rademacher_probes`),
  so the two estimates differ only by their products' rounding. PyHessian stops when ``|mean - previous| / (previous + 1e-6) < tol``,
  without an absolute value in the denominator: after a negative first sample any negative
  ``tol`` can stop it at the second product (``tol=-1`` did, on the quick problem), so only
  ``tol=-inf`` runs all ``maxIter`` products;
* ``density``: SLQ with one probe and 100 Lanczos steps: PyHessian's ``density(iter=100,
  n_v=1)`` against :func:`estimators.spectral_density` ``(num_probes=1, num_steps=100)``.
  Both start from the same Rademacher vector (as the trace's probes).
  PyHessian's ``density`` calls ``torch.eig``, removed in torch 2.x; this bench (only) puts
  a shim in its place that computes the same thing with ``torch.linalg.eigh`` (the
  tridiagonal matrix is symmetric).

PyHessian runs with ``cuda=False`` (its default ``cuda=True`` needs a GPU). Each (tool, task)
runs in a fresh process of its own, so its peak resident memory (``ru_maxrss``) is its own;
the wall time covers building the tool's Hessian (PyHessian's constructor runs the forward
and ``backward(create_graph=True)``; linops builds its graph at the first product) and the
task; products count Hessian-vector products (columns). The repeats are interleaved (tool
order alternating from one repeat to the next) and the table gives medians.

Accuracy is against a float64 reference computed once by linops in float64 (same model and
data converted): the top-5 eigenvalues by :func:`linops.lanczos` at ``rtol=1e-8`` (relative
residual; the eigenvalues' error is far smaller, about its square over the gap), the smallest
eigenvalue at ``rtol=1e-6`` within 20 restarts (its residual is recorded: the bottom of the
spectrum is crowded), the trace by :func:`estimators.xtrace` at 400 products (40 with
``--quick``; with its standard error: an exact trace would take 272k products), and, cached
per seed and budget, the float64 Hutchinson estimate on the trace's probes and the float64
SLQ quadrature from the density's start vector (both tools draw these from ``seed``). Top-k:
the largest relative error over the ``k`` eigenvalues. Trace: the relative error against
XTrace (Hutchinson's sampling error at 100 probes, the same draw for both tools, dominates
it), and below the table each tool's numerical error, against float64 on the same probes.
Density: the Wasserstein-1 distance between the tool's quadrature (nodes and weights) and the
float64 one from the same start vector, over the float64 nodes' span (without that
reference: how far the nodes lie outside the reference spectrum :math:`[\\lambda_{\\min},
\\lambda_{\\max}]`, relative to :math:`\\lambda_{\\max}`, which is printed below the table
too, with each top node's error against float64's).

``--quick`` uses a quarter-width ResNet-20 on 16 images and 20-product budgets (about a
minute on an idle 2-core machine).

Usage::

    python bench/pyhessian.py [--quick] [--repeats 3] [--tasks top1,top5,trace,density]
        [--tools pyhessian,linops,linops-retain,linops-noprime]
        [--out results/pyhessian]

writes ``pyhessian.json`` and ``pyhessian.md`` under ``--out`` (after every process) and
prints the table. The float64 reference is cached in ``--out`` (``reference*.json``).
"""

from __future__ import annotations

import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from scipy.stats import wasserstein_distance
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _harness import parser, write_json, write_text
from scale import cifar_batches, resnet20

import estimators
import linops

TOOLS = ("pyhessian", "linops", "linops-retain", "linops-noprime")
TASKS = ("top1", "top5", "trace", "density")


def problem(quick: bool, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Any, Any]:
    """The ResNet-20 (eval mode) and one batch of CIFAR-shaped images, in ``dtype``."""
    model = resnet20(width=4 if quick else 16, seed=0).to(dtype)
    x, y = cifar_batches(16 if quick else 128, 128, seed=1)[0]
    return model, x.to(dtype), y


#: ``--trace-matvecs``: the trace's products when given
TRACE_MATVECS: list[int] = []


def budgets(quick: bool) -> dict[str, int]:
    """Products of the trace and Lanczos steps of the density."""
    trace = TRACE_MATVECS[0] if TRACE_MATVECS else 20 if quick else 100
    return {"trace": trace, "density": 20 if quick else 100}


def _shim_torch_eig() -> None:
    """Give torch 2.x back ``torch.eig(T, eigenvectors=True)`` for PyHessian's ``density``.

    Returns what torch 1.x did for a symmetric matrix: ``(n, 2)`` eigenvalues (real part,
    imaginary part zero) and the eigenvectors as columns.
    """

    def eig(T: torch.Tensor, eigenvectors: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        vals, vecs = torch.linalg.eigh(T)
        return torch.stack([vals, torch.zeros_like(vals)], dim=1), vecs

    torch.eig = eig  # type: ignore[attr-defined]


def run_pyhessian(task: str, quick: bool, seed: int) -> dict[str, Any]:
    """One task by PyHessian 0.1; the wall time includes its constructor."""
    here = Path(__file__).resolve().parent  # this file is pyhessian.py too: look elsewhere
    sys.path[:] = [d for d in sys.path if Path(d or ".").resolve() != here]
    import pyhessian.hessian  # noqa: F401  (the package's attribute "hessian" is the class)

    ph = sys.modules["pyhessian.hessian"]

    count = [0]
    hvp = ph.hessian_vector_product

    def counted(gradsH: Any, params: Any, v: Any) -> Any:
        count[0] += 1
        return hvp(gradsH, params, v)

    ph.hessian_vector_product = counted
    _shim_torch_eig()
    model, x, y = problem(quick)
    torch.manual_seed(seed)  # PyHessian draws from the global generator
    start = time.perf_counter()
    comp = ph.hessian(model, nn.CrossEntropyLoss(), data=(x, y), cuda=False)
    b = budgets(quick)
    if task in ("top1", "top5"):
        vals, _ = comp.eigenvalues(top_n=1 if task == "top1" else 5)
        out: dict[str, Any] = {"eigenvalues": sorted(float(v) for v in vals)}
    elif task == "trace":
        vhv = comp.trace(maxIter=b["trace"], tol=-math.inf)
        se = statistics.stdev(vhv) / math.sqrt(len(vhv)) if len(vhv) > 1 else math.nan
        out = {"trace": float(sum(vhv) / len(vhv)), "trace_stderr": se}
    else:
        nodes, weights = comp.density(iter=b["density"], n_v=1)
        out = {"nodes": [float(v) for v in nodes[0]], "weights": [float(w) for w in weights[0]]}
    out["seconds"] = time.perf_counter() - start
    out["products"] = count[0]
    return out


def run_linops(task: str, quick: bool, seed: int, retain: bool = False) -> dict[str, Any]:
    """One task by linops; the wall time includes building the operator and its graph.

    ``retain``: first :func:`linops.retain_freed_memory` (glibc keeps freed blocks for the
    next pass instead of faulting fresh pages in; ``--tools ...,linops-retain``).
    """
    if retain and not linops.retain_freed_memory():
        raise RuntimeError("linops-retain: this C library has no mallopt")
    model, x, y = problem(quick)
    start = time.perf_counter()
    H = linops.HessianOperator(model, nn.CrossEntropyLoss(), (x, y))
    b = budgets(quick)
    if task in ("top1", "top5"):
        r = linops.lanczos(H, 1 if task == "top1" else 5, "LA", seed=seed)
        out: dict[str, Any] = {"eigenvalues": r.eigenvalues.tolist(), "products": r.num_matvecs}
    elif task == "trace":
        t = estimators.hutchinson_trace(H, b["trace"], seed=seed)
        out = {"trace": t.estimate, "trace_stderr": t.stderr, "products": t.num_matvecs}
    else:
        sd = estimators.spectral_density(H, num_probes=1, num_steps=b["density"], seed=seed)
        out = {"nodes": sd.nodes[0].tolist(), "weights": sd.weights[0].tolist()}
        out["products"] = sd.num_matvecs
    out["seconds"] = time.perf_counter() - start
    out["route"] = H.route
    return out


def _hessian64(quick: bool) -> linops.HessianOperator:
    model, x, y = problem(quick, torch.float64)
    return linops.HessianOperator(model, nn.CrossEntropyLoss(), (x, y))


def reference(quick: bool) -> dict[str, Any]:
    """Float64 reference by linops: top-5 (``rtol=1e-8``), smallest eigenvalue, XTrace."""
    H = _hessian64(quick)
    start = time.perf_counter()
    top = linops.lanczos(H, 5, "LA", rtol=1e-8, seed=0)
    try:  # the bottom of a Hessian spectrum is crowded: Lanczos needs many restarts there
        low = linops.lanczos(H, 1, "SA", rtol=1e-6, maxiter=20, seed=0)
    except linops.LanczosNoConvergence as err:
        low = err.result
    tr = estimators.xtrace(H, 40 if quick else 400, seed=0)
    return {
        "top5": top.eigenvalues.tolist(),
        "top5_residuals": top.residuals.tolist(),
        "lambda_min": float(low.eigenvalues[0]),
        "lambda_min_residual": float(low.residuals[0]),
        "trace": tr.estimate,
        "trace_stderr": tr.stderr,
        "products": top.num_matvecs + low.num_matvecs + tr.num_matvecs,
        "seconds": time.perf_counter() - start,
        "params": H.shape[0],
    }


def same_probe_reference(task: str, quick: bool, seed: int) -> dict[str, Any]:
    """Float64 on the trace's probes or the density's start vector: the same ``seed``."""
    H = _hessian64(quick)
    start, b = time.perf_counter(), budgets(quick)
    if task == "trace":
        t = estimators.hutchinson_trace(H, b["trace"], seed=seed)
        out: dict[str, Any] = {"trace": t.estimate, "trace_stderr": t.stderr}
        out["products"] = t.num_matvecs
    else:
        sd = estimators.spectral_density(H, num_probes=1, num_steps=b["density"], seed=seed)
        out = {"nodes": sd.nodes[0].tolist(), "weights": sd.weights[0].tolist()}
        out["products"] = sd.num_matvecs
    return out | {"seed": seed, "seconds": time.perf_counter() - start}


def accuracy(task: str, r: dict[str, Any], ref: dict[str, Any]) -> float:
    """The error of a result against the float64 reference (module docstring)."""
    if task in ("top1", "top5"):
        k = len(r["eigenvalues"])
        want = sorted(ref["top5"])[-k:]
        got = sorted(r["eigenvalues"])
        return max(abs(g - w) / abs(w) for g, w in zip(got, want, strict=True))
    if task == "trace":
        return abs(r["trace"] - ref["trace"]) / abs(ref["trace"])
    same = ref.get("same_start_density")
    if same is None:
        return overshoot(r, ref)
    w1 = wasserstein_distance(r["nodes"], same["nodes"], r["weights"], same["weights"])
    return float(w1) / (max(same["nodes"]) - min(same["nodes"]))


def overshoot(r: dict[str, Any], ref: dict[str, Any]) -> float:
    """How far the density's nodes lie outside the reference spectrum, over its top."""
    lmax, lmin = max(ref["top5"]), ref["lambda_min"]
    return max(0.0, max(r["nodes"]) - lmax, lmin - min(r["nodes"])) / abs(lmax)


def markdown(rows: list[dict[str, Any]], ref: dict[str, Any] | None, meta: dict[str, Any]) -> str:
    """Medians per tool and task, and linops over PyHessian."""
    out = [
        f"# bench/pyhessian.py ({meta['when']}, {meta['threads']} threads, load {meta['load']}; "
        f"ResNet-20, float32; {meta['command']})",
        "",
        "no float64 reference (--no-reference): errors not computed"
        if ref is None
        else f"float64 reference ({ref['params']:,} parameters): top-5 "
        f"{', '.join(f'{v:.6g}' for v in reversed(ref['top5']))}; "
        f"lambda_min {ref['lambda_min']:.6g}; trace {ref['trace']:.6g} +- "
        f"{ref['trace_stderr']:.2g} (XTrace)",
        "",
        "| task | tool | repeats | time s | products | peak RSS MB | error | result |"
        " time ratio | products ratio | memory ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    med: dict[tuple[str, str], dict[str, float]] = {}
    for task in TASKS:
        for tool in TOOLS:
            rs = [
                r
                for r in rows
                if r["task"] == task and r["tool"] == tool and "error_message" not in r
            ]
            if not rs:
                continue
            m = {
                key: statistics.median(r[key] for r in rs)
                for key in ("seconds", "products", "peak_rss_mb", "error")
            }
            med[(task, tool)] = m
            last = rs[-1]
            if task in ("top1", "top5"):
                res = ", ".join(f"{v:.6g}" for v in reversed(last["eigenvalues"]))
            elif task == "trace":
                res = f"{last['trace']:.6g} +- {last['trace_stderr']:.2g}"
            else:
                res = f"nodes [{min(last['nodes']):.6g}, {max(last['nodes']):.6g}]"
            ratios = ["", "", ""]
            base = med.get((task, "pyhessian"))
            if tool.startswith("linops") and base is not None:
                ratios = [
                    f"{m[key] / base[key]:.2f}x" for key in ("seconds", "products", "peak_rss_mb")
                ]
            out.append(
                f"| {task} | {tool} | {len(rs)} | {m['seconds']:.2f} | {m['products']:.0f} | "
                f"{m['peak_rss_mb']:.0f} | {m['error']:.2g} | {res} | " + " | ".join(ratios) + " |"
            )
    out += _same_probe_lines(rows, ref)
    errors = [r for r in rows if "error_message" in r]
    for r in errors:
        out.append(f"\n{r['tool']} {r['task']}: failed: {r['error_message']}")
    return "\n".join(out) + "\n"


def _same_probe_lines(rows: list[dict[str, Any]], ref: dict[str, Any] | None) -> list[str]:
    """Each tool against float64 on the same probes (trace) and start vector (density)."""
    ok = [r for r in rows if "error_message" not in r]
    out = []
    same = (ref or {}).get("same_probe_trace")
    trace = [r for r in ok if r["task"] == "trace"]
    if same and trace:
        line = [
            f"trace on the same probes (seed {same['seed']}, {same['products']} products): "
            f"float64 {same['trace']:.10g}; numerical error (median):"
        ]
        line += _per_tool(trace, lambda r: abs(r["trace"] - same["trace"]) / abs(same["trace"]))
        out += ["", " ".join(line)]
    same = (ref or {}).get("same_start_density")
    density = [r for r in ok if r["task"] == "density"]
    if same and density:
        top = max(same["nodes"])
        line = [
            f"density from the same start vector (seed {same['seed']}, {same['products']} "
            f"steps): float64 nodes [{min(same['nodes']):.8g}, {top:.8g}]; the table's error "
            "is the Wasserstein-1 distance to its quadrature over its span; the top node's "
            "error against float64's (median):"
        ]
        line += _per_tool(density, lambda r: abs(max(r["nodes"]) - top) / abs(top))
        line += ["nodes outside the reference spectrum, over its top (median):"]
        line += _per_tool(density, lambda r: overshoot(r, ref or {}))
        out += ["", " ".join(line)]
    return out


def _per_tool(rows: list[dict[str, Any]], error: Any) -> list[str]:
    return [
        f"{tool} {statistics.median(error(r) for r in rs):.2g};"
        for tool in TOOLS
        if (rs := [r for r in rows if r["tool"] == tool])
    ]


def main(argv: list[str] | None = None) -> None:
    p = parser(
        __doc__,
        "results/pyhessian",
        quick_help="small model and budgets (about 2 minutes, measured on a quiet 2-core CPU)",
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument(
        "--tools",
        default="pyhessian,linops",
        help=f"among {', '.join(TOOLS)} (linops-retain: linops after retain_freed_memory(); "
        "linops-noprime: with LINOPS_NO_PRIME=1, see linops.memory.prime_host_allocator)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trace-matvecs", type=int, help="the trace's products (default 100)")
    p.add_argument(
        "--no-reference", action="store_true", help="skip the float64 reference (no errors)"
    )
    p.add_argument("--worker", nargs=2, metavar=("TOOL", "TASK"), help=_hidden())
    p.add_argument("--worker-out", type=Path, help=_hidden())
    args = p.parse_args(argv)
    if args.trace_matvecs is not None:
        TRACE_MATVECS.append(args.trace_matvecs)
    if args.worker:
        tool, task = args.worker
        if tool == "reference":
            row = (
                reference(args.quick)
                if task == "all"
                else same_probe_reference(task, args.quick, args.seed)
            )
        else:
            if tool == "pyhessian":
                row = run_pyhessian(task, args.quick, args.seed)
            else:
                row = run_linops(task, args.quick, args.seed, retain=tool == "linops-retain")
        row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        write_text(args.worker_out, json.dumps(row))
        return
    tasks = [t for t in args.tasks.split(",") if t]
    for t in tasks:
        if t not in TASKS:
            p.error(f"--tasks: expected names among {list(TASKS)}, got {t!r}")
    tools = tuple(t for t in args.tools.split(",") if t)
    for t in tools:
        if t not in TOOLS:
            p.error(f"--tools: expected names among {list(TOOLS)}, got {t!r}")
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "threads": torch.get_num_threads(),
        "load": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "quick": args.quick,
        "repeats": args.repeats,
        "command": " ".join(["bench/pyhessian.py", *(argv if argv is not None else sys.argv[1:])]),
    }

    def worker(tool: str, task: str) -> dict[str, Any]:
        tmp = args.out / f".worker-{tool}-{task}.json"
        cmd = [sys.executable, __file__, "--worker", tool, task, "--worker-out", str(tmp)]
        cmd += ["--seed", str(args.seed)] + (["--quick"] if args.quick else [])
        if args.trace_matvecs is not None:
            cmd += ["--trace-matvecs", str(args.trace_matvecs)]
        load = os.getloadavg()[0]
        env = os.environ | ({"LINOPS_NO_PRIME": "1"} if tool == "linops-noprime" else {})
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0 or not tmp.exists():
            msg = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
            return {"tool": tool, "task": task, "error": math.nan, "error_message": msg[:300]}
        row = json.loads(tmp.read_text())
        tmp.unlink()
        return row | {"tool": tool, "task": task, "load_at_start": load}

    def cached(path: Path, task: str, what: str) -> dict[str, Any]:
        """The float64 reference worker's row for ``task``, computed once into ``path``."""
        if path.exists():
            return json.loads(path.read_text())
        print(f"float64 {what} ...", file=sys.stderr, flush=True)
        row = worker("reference", task)
        if "error_message" in row:
            raise SystemExit(f"the float64 {what} failed: {row['error_message']}")
        write_text(path, json.dumps(row))
        return row

    quick = "_quick" * args.quick
    ref: dict[str, Any] | None = None
    if not args.no_reference:
        ref = cached(args.out / f"reference{quick}.json", "all", "reference")
        for task, key in (("trace", "same_probe_trace"), ("density", "same_start_density")):
            if task in tasks:  # float64 on the same probes: per seed and budget
                b = budgets(args.quick)[task]
                path = args.out / f"reference_{task}_seed{args.seed}_{b}{quick}.json"
                ref[key] = cached(path, task, f"{task} on the same probes")
    rows: list[dict[str, Any]] = []
    for rep in range(args.repeats):
        order = tools if rep % 2 == 0 else tools[::-1]
        for task in tasks:
            for tool in order:
                row = worker(tool, task)
                if "error_message" not in row:
                    row["error"] = math.nan if ref is None else accuracy(task, row, ref)
                row["repeat"] = rep
                rows.append(row)
                meta["load_at_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
                write_json(args.out, "pyhessian", {"meta": meta, "reference": ref, "rows": rows})
                write_text(args.out / "pyhessian.md", markdown(rows, ref, meta))
                print(
                    f"repeat {rep} {task} {tool}: "
                    + (
                        row["error_message"]
                        if "error_message" in row
                        else f"{row['seconds']:.2f} s, {row['products']} products, "
                        f"{row['peak_rss_mb']:.0f} MB, error {row['error']:.2g}"
                    ),
                    flush=True,
                )
    print(markdown(rows, ref, meta))


def _hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
