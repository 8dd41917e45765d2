"""Seed studies behind issue 16's "estimators that are honest about their error".

For each estimator, many seeded runs against a dense reference (numpy ``eigh``/``svd`` of a
matrix with a prescribed spectrum), reporting how often the ``+-2 stderr`` interval holds the
truth ("coverage"), the root-mean-square error and the mean reported standard error:

* trace: ``hutchinson_trace``, ``hutchpp_trace``, ``xtrace`` (with and without its Hutchinson
  fallback) on decaying and flat spectra, next to the textbook standard errors (sample standard
  deviation over sqrt(N); for XTrace the paper's std of the m exchangeable terms over sqrt(m)),
  computed here independently of ``estimators.trace`` with brute-force leave-one-out QRs;
* ``singular_value_count``: counts inside ``[0, min(m, n)]`` and coverage, on issue 16's
  2500 x 1000 linear spectrum and on two small gapless spectra;
* ``range_finder(atol=...)``: basis size, ``converged``, estimate against the true error, in
  float64 and float32 (reachable and unreachable tolerances), the zero and a rank-3 operator;
* ``numerical_rank`` of a float32 numpy array of rank 60;
* ``spectral_density``: L1 distance to the exact eigenvalues smoothed with the same sigma,
  for the former defaults (8 probes, 40 steps, span/200), span/50, and the current defaults.

Usage::

    python bench/estimator_coverage.py [--out DIR] [--quick] [--seeds 200]
    # writes DIR/estimator_coverage.json (default results/estimator_coverage/)
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/_harness.py

from _harness import markdown_table, strict_json, write_markdown, write_text  # noqa: E402

from estimators.counting import singular_value_count  # noqa: E402
from estimators.density import spectral_density  # noqa: E402
from estimators.trace import hutchinson_trace, hutchpp_trace, xtrace  # noqa: E402
from linops.randomized import range_finder  # noqa: E402
from linops.rank import numerical_rank  # noqa: E402


def spectrum_matrix(lam: np.ndarray, seed: int = 0) -> np.ndarray:
    """``Q diag(lam) Q^T`` with a Haar-like orthogonal ``Q``."""
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((lam.size, lam.size)))
    return (Q * lam) @ Q.T


def singular_matrix(m: int, s: np.ndarray, seed: int = 0) -> np.ndarray:
    """``U diag(s) V^T`` with orthonormal ``U`` (m x n) and ``V`` (n x n)."""
    rng = np.random.default_rng(seed)
    U, _ = np.linalg.qr(rng.standard_normal((m, s.size)))
    V, _ = np.linalg.qr(rng.standard_normal((s.size, s.size)))
    return (U * s) @ V.T


# ----------------------------------------------------------------------------- textbook errors
def naive_hutchinson(A: np.ndarray, N: int, rng: np.random.Generator) -> tuple[float, float]:
    Z = rng.choice([-1.0, 1.0], size=(A.shape[0], N))
    t = np.einsum("ij,ij->j", Z, A @ Z)
    return float(t.mean()), float(t.std(ddof=1) / math.sqrt(N))


def naive_hutchpp(A: np.ndarray, N: int, rng: np.random.Generator) -> tuple[float, float]:
    m = N // 3
    Q, _ = np.linalg.qr(A @ rng.choice([-1.0, 1.0], size=(A.shape[0], m)))
    G = rng.choice([-1.0, 1.0], size=(A.shape[0], m))
    G = G - Q @ (Q.T @ G)
    AG = A @ G
    t = np.einsum("ij,ij->j", G, AG - Q @ (Q.T @ AG))
    return float(np.trace(Q.T @ A @ Q) + t.mean()), float(t.std(ddof=1) / math.sqrt(m))


def naive_xtrace(A: np.ndarray, N: int, rng: np.random.Generator) -> tuple[float, float]:
    """XTrace by brute force, with the paper's error estimate std(t_i) / sqrt(m)."""
    m = N // 2
    Om = rng.choice([-1.0, 1.0], size=(A.shape[0], m))
    Y = A @ Om
    t = np.empty(m)
    for i in range(m):
        Qi, _ = np.linalg.qr(np.delete(Y, i, axis=1))
        w = Om[:, i] - Qi @ (Qi.T @ Om[:, i])
        t[i] = np.trace(Qi.T @ A @ Qi) + w @ A @ w
    return float(t.mean()), float(t.std(ddof=1) / math.sqrt(m))


# ----------------------------------------------------------------------------- studies
def trace_study(n: int, budgets: list[int], seeds: int, spectra: list[str]) -> dict:
    shapes = {
        "poly1": 1.0 / np.arange(1, n + 1),
        "poly2": 1.0 / np.arange(1, n + 1) ** 2,
        "exp0.9": 0.9 ** np.arange(n),
        "poly0.5": 1.0 / np.arange(1, n + 1) ** 0.5,
        "step": np.r_[np.ones(10), 1e-2 * np.ones(n - 10)],
        "flat": 1.0 + 0.1 * np.arange(n) / n,
    }
    current = {
        "hutchinson": lambda A, N, s: hutchinson_trace(A, N, seed=s),
        "hutchpp": lambda A, N, s: hutchpp_trace(A, N, seed=s),
        "xtrace": lambda A, N, s: xtrace(A, N, seed=s),
        "xtrace_no_fallback": lambda A, N, s: xtrace(A, N, fallback=False, seed=s),
    }
    naive = {
        "hutchinson_sample_stderr": naive_hutchinson,
        "hutchpp_sample_stderr": naive_hutchpp,
        "xtrace_paper_stderr": naive_xtrace,
    }
    out = {"n": n, "budgets": budgets, "seeds": seeds, "spectra": {}}
    for name in spectra:
        lam = shapes[name]
        A = spectrum_matrix(lam, seed=3)
        true = float(lam.sum())
        rows = {}
        for est, f in list(current.items()) + list(naive.items()):
            cov, rmse, se = [], [], []
            for N in budgets:
                runs = []
                for s in range(seeds):
                    if est in naive:
                        runs.append(f(A, N, np.random.default_rng(10_000 + s)))
                    else:
                        r = f(A, N, s)
                        runs.append((r.estimate, r.stderr))
                e = np.array([r[0] for r in runs]) - true
                sd = np.array([r[1] for r in runs])
                cov.append(float(np.mean(np.abs(e) <= 2 * sd)))
                rmse.append(float(np.sqrt(np.mean(e**2))))
                se.append(float(np.mean(sd)))
            rows[est] = {"coverage": cov, "rmse": rmse, "mean_stderr": se}
        out["spectra"][name] = rows
    return out


def count_study(seeds: int, issue_seeds: int, quick: bool) -> dict:
    cases = {
        "linear_500x200_tau0.1_240": (500, np.linspace(3.0, 0.01, 200), 0.1, 240, 8),
        "log_300x300_tau0.3_300": (300, np.logspace(1, -3, 300), 0.3, 300, 8),
    }
    if not quick:
        cases["issue16_linear_2500x1000_tau0.1_1200"] = (
            2500,
            np.linspace(3.0, 0.01, 1000),
            0.1,
            1200,
            16,
        )
    out = {}
    for name, (m, s, tau, budget, b) in cases.items():
        A = torch.from_numpy(singular_matrix(m, s))
        true = int((s > tau).sum())
        runs = issue_seeds if name.startswith("issue16") else seeds
        c, se = [], []
        for seed in range(runs):
            r = singular_value_count(A, tau, budget, block_size=b, seed=seed)
            c.append(float(r.counts[0]))
            se.append(float(r.stderrs[0]))
        c, se = np.array(c), np.array(se)
        out[name] = {
            "true": true,
            "dimension": int(min(m, s.size)),
            "seeds": runs,
            "coverage": float(np.mean(np.abs(c - true) <= 2 * se)),
            "count_min": float(c.min()),
            "count_max": float(c.max()),
            "rmse": float(np.sqrt(np.mean((c - true) ** 2))),
            "mean_stderr": float(se.mean()),
            "counts": c.tolist(),
            "stderrs": se.tolist(),
        }
    return out


def _true_error(A: np.ndarray, Q: np.ndarray) -> float:
    A64, Q64 = A.astype(np.float64), Q.astype(np.float64)
    return float(np.linalg.norm(A64 - Q64 @ (Q64.T @ A64), 2))


def range_finder_study() -> dict:
    rng = np.random.default_rng(0)
    fast = spectrum_matrix(0.7 ** np.arange(200))
    rank3 = rng.standard_normal((100, 3)) @ rng.standard_normal((3, 80))
    cases = []
    for dtype in (np.float64, np.float32):
        for tol in (1e-4, 1e-6, 1e-8, 1e-10):
            cases.append(("0.7^i 200x200", fast.astype(dtype), tol))
        cases.append(("zero 100x80", np.zeros((100, 80), dtype), 1e-3))
        cases.append(("rank-3 100x80", rank3.astype(dtype), 1e-3))
    rows = []
    for name, A, tol in cases:
        r = range_finder(A, atol=tol, seed=0)
        rows.append(
            {
                "matrix": name,
                "dtype": str(A.dtype),
                "tol": tol,
                "columns": int(r.basis.shape[1]),
                "converged": bool(r.converged),
                "error_estimate": float(r.error_estimate),
                "true_error": _true_error(A, r.basis),
                "num_matvecs": int(r.num_matvecs),
            }
        )
    return {"rows": rows}


def rank_study() -> dict:
    rng = np.random.default_rng(0)
    A = (rng.standard_normal((1000, 60)) @ rng.standard_normal((60, 800))).astype(np.float32)
    return {
        "numpy_float32": numerical_rank(A),
        "torch_float32": numerical_rank(torch.from_numpy(A)),
        "numpy_matrix_rank": int(np.linalg.matrix_rank(A)),
        "true": 60,
    }


def _l1(sd, lam: np.ndarray) -> float:
    x, s = np.asarray(sd.grid), sd.sigma
    exact = np.exp(-((x[:, None] - lam[None]) ** 2) / (2 * s**2)).sum(1)
    exact /= lam.size * s * math.sqrt(2 * math.pi)
    return float(np.abs(np.asarray(sd.density) - exact).sum() * (x[1] - x[0]))


def density_study(n: int, seeds: int) -> dict:
    from scipy.stats import norm

    u = (np.arange(n) + 0.5) / n
    half = norm.ppf(u[::2]) * 0.3
    spectra = {"uniform": -1 + 2 * u, "bimodal": np.sort(np.r_[half - 2, half + 2])}
    out = {"n": n, "seeds": seeds, "l1_to_smoothed_exact": {}}
    for name, lam in spectra.items():
        A = spectrum_matrix(lam, seed=1)
        rows = {"former_default_8x40_span_over_200": [], "8x40_span_over_50": [], "default": []}
        for s in range(seeds):
            probe = spectral_density(A, num_probes=8, num_steps=40, seed=s)
            span = float(np.ptp(probe.nodes))  # same seed, same nodes: the former default sigma
            for key, div in (("former_default_8x40_span_over_200", 200), ("8x40_span_over_50", 50)):
                sd = spectral_density(A, num_probes=8, num_steps=40, sigma=span / div, seed=s)
                rows[key].append(_l1(sd, lam))
            rows["default"].append(_l1(spectral_density(A, seed=s), lam))
        out["l1_to_smoothed_exact"][name] = rows
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "results" / "estimator_coverage")
    p.add_argument("--quick", action="store_true", help="few seeds and cases (smoke test)")
    p.add_argument("--seeds", type=int, default=200, help="seeds per trace configuration")
    args = p.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    if args.quick:
        trace = trace_study(100, [10, 40], 20, ["poly2", "exp0.9"])
        counts = count_study(10, 0, quick=True)
        density = density_study(400, 2)
    else:
        spectra = ["poly1", "poly2", "exp0.9", "poly0.5", "step", "flat"]
        trace = trace_study(200, [10, 20, 40, 80], args.seeds, spectra)
        counts = count_study(60, 20, quick=False)
        density = density_study(1000, 10)
    result = {
        "trace": trace,
        "singular_value_count": counts,
        "range_finder": range_finder_study(),
        "numerical_rank": rank_study(),
        "spectral_density": density,
        "seconds_total": time.perf_counter() - t0,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_text(args.out / "estimator_coverage.json", strict_json(result, indent=1))

    parts = [
        f"## trace: coverage of +-2 stderr, n = {trace['n']}, {trace['seeds']} seeds",
        markdown_table(
            ["spectrum", "estimator", *(f"N={N}" for N in trace["budgets"])],
            [
                (name, est, *(f"{c:.2f}" for c in r["coverage"]))
                for name, rows in trace["spectra"].items()
                for est, r in rows.items()
            ],
        ),
        "## singular_value_count",
        markdown_table(
            ["matrix", "true", "counts", "dimension", "rmse", "mean stderr", "coverage", "seeds"],
            [
                (name, r["true"], f"{r['count_min']:.0f}-{r['count_max']:.0f}", r["dimension"],
                 f"{r['rmse']:.1f}", f"{r['mean_stderr']:.1f}", f"{r['coverage']:.2f}", r["seeds"])
                for name, r in counts.items()
            ],
        ),
        "## range_finder(atol)",
        markdown_table(
            ["matrix", "dtype", "tol", "columns", "converged", "estimate", "true error", "products"],
            [
                (r["matrix"], r["dtype"], f"{r['tol']:.0e}", r["columns"], r["converged"],
                 f"{r['error_estimate']:.2e}", f"{r['true_error']:.2e}", r["num_matvecs"])
                for r in result["range_finder"]["rows"]
            ],
        ),
        f"numerical_rank float32 rank 60: numpy {result['numerical_rank']['numpy_float32']}, "
        f"torch {result['numerical_rank']['torch_float32']}",
        f"## spectral_density L1 (n = {density['n']}, mean / max over {density['seeds']} seeds)",
        "\n".join(
            f"- {name}: "
            + ", ".join(f"{k} {np.mean(v):.3f} / {np.max(v):.3f}" for k, v in rows.items())
            for name, rows in density["l1_to_smoothed_exact"].items()
        ),
        f"total {result['seconds_total']:.0f} s",
    ]  # fmt: skip
    write_markdown(
        args.out, "estimator_coverage",
        "bench/estimator_coverage.py: standard errors' coverage"
        + (" (--quick)" if args.quick else ""),
        "\n\n".join(parts),
    )  # fmt: skip


if __name__ == "__main__":
    main()
