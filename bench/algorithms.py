"""Matrix-free algorithms of linops against ARPACK, scikit-learn, torch and scipy.

What is measured (all in one run, on the same matrices and seeds)
------------------------------------------------------------------
* ``eigsh``: top-10 eigenpairs (``which="LA"``) of dense ``n x n`` symmetric matrices
  (``n = 5000``; 600 with ``--quick``) with spectra ``1/i``, ``1/i^2``, ``0.9^i`` and
  ``10 outliers + uniform bulk``, float64 and float32, at accuracy 1e-6, and the 10
  smallest and largest of the slowly decaying spectrum ``i^(-1/2)`` (``n = 2000``) at 5e-8:
  products, seconds, largest relative residual ``||A v - l v|| / ||A||`` (evaluated in
  float64) and eigenvalue error, for ``linops.lanczos`` and ``scipy.sparse.linalg.eigsh``
  (ARPACK), both started from the same vector, at equal basis size (``ncv`` 21 and 40)
  and equal accuracy (see :func:`_eig_case`).
* ``randomized_svd``: top-10 singular values at equal product budgets 120 and 320 (what
  ``sklearn.utils.extmath.randomized_svd`` spends with ``n_iter=2`` and its default
  ``n_iter="auto"`` = 7, ``n_oversamples=10``) for sklearn, ``torch.svd_lowrank`` and
  ``linops.randomized_svd`` (block Krylov and subspace iteration): largest error
  ``max_i |s_i - s_i^true| / s_1``.
* ``trace``: relative error of Hutchinson, Hutch++, XTrace and XTrace with its Hutchinson
  fallback, averaged over seeds, at ~100 products, on the four spectra and a flat one.
* ``angles``: principal angles of a pair of subspaces with angles from 1e-10 to pi/2,
  ``linops.principal_angles`` against ``scipy.linalg.subspace_angles``.
* ``operators``: Lanczos on a ``HessianOperator`` and ``svds`` on a ``JacobianOperator`` of a
  small MLP, products against ARPACK (skipped with a note if those operators are missing).

Usage::

    python bench/algorithms.py [--quick] [--out results/algorithms] [--sections eigsh ...]

writes ``algorithms.json`` (``seconds_*`` keys), ``algorithms.md`` and ``algorithms.png``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import scipy.fft
import scipy.linalg
import torch
from scipy.sparse.linalg import LinearOperator, eigsh
from scipy.sparse.linalg import svds as scipy_svds
from sklearn.utils.extmath import randomized_svd as sk_randomized_svd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/_harness.py

from _harness import save_figure, strict_json, write_text

import linops


def spectra(n: int, seed: int) -> dict[str, np.ndarray]:
    i = np.arange(1, n + 1, dtype=np.float64)
    bulk = np.random.default_rng(seed).uniform(0, 1, n - 10)
    return {
        "1/i": 1 / i,
        "1/i^2": 1 / i**2,
        "0.9^i": 0.9 ** (i - 1),
        "outliers+bulk": np.sort(np.r_[np.linspace(10, 5, 10), bulk])[::-1],
    }


def dense_symmetric(lam: np.ndarray, seed: int) -> np.ndarray:
    """``C P diag(lam) P^T C^T`` with ``C`` the orthonormal DCT-II matrix and ``P`` a random
    permutation: dense, delocalised eigenvectors, built in O(n^2 log n) by two DCTs."""
    lam = np.random.default_rng(seed).permutation(lam)
    CL = scipy.fft.dct(np.diag(lam), axis=0, norm="ortho")  # C diag(lam)
    A = scipy.fft.dct(CL.T, axis=0, norm="ortho").T  # (C (C diag(lam))^T)^T
    return (A + A.T) / 2


def _counting(A: np.ndarray) -> tuple[LinearOperator, list[int]]:
    count = [0]

    def mv(x: np.ndarray) -> np.ndarray:
        count[0] += 1 if x.ndim == 1 else x.shape[1]
        return A @ x

    return LinearOperator(A.shape, matvec=mv, matmat=mv, rmatvec=mv, dtype=A.dtype), count


def _rel_residual(A64: np.ndarray, w: np.ndarray, V: np.ndarray, anorm: float) -> float:
    V = V.astype(np.float64)
    return float((np.linalg.norm(A64 @ V - V * w.astype(np.float64), axis=0) / anorm).max())


def _eig_case(A64: np.ndarray, lam: np.ndarray, case: dict, seed: int) -> dict:
    """One eigenproblem, ARPACK against linops at equal basis size ``ncv`` and accuracy.

    Both must reach ``||A v - l v|| <= target ||A||`` for every wanted pair: linops with
    ``tol=target``; ARPACK, whose test is relative to each Ritz value
    (``||r_i|| <= tol |theta_i|``), with ``tol = target ||A|| / min |lambda_wanted|``.
    """
    k, which, ncv, target, dt = case["k"], case["which"], case["ncv"], case["target"], case["dt"]
    anorm = float(np.abs(lam).max())
    srt = np.sort(lam)
    wanted = srt[:k] if which == "SA" else srt[-k:]
    A = A64.astype(dt)
    v0 = np.random.default_rng(seed).standard_normal(A.shape[0]).astype(dt)
    row = {"spectrum": case["spectrum"], "n": A.shape[0], "which": which, "k": k, "ncv": ncv,
           "dtype": np.dtype(dt).name, "target": target}  # fmt: skip
    L, count = _counting(A)
    tol_arpack = target * anorm / float(np.abs(wanted).min())
    t = time.perf_counter()
    try:
        w, V = eigsh(L, k, which=which, tol=tol_arpack, v0=v0, ncv=ncv, maxiter=100 * A.shape[0])
        row["residual_arpack"] = _rel_residual(A64, w, V, anorm)
        row["eigenvalue_error_arpack"] = float(np.abs(np.sort(w) - wanted).max() / anorm)
    except Exception as err:  # ArpackNoConvergence: keep the count, mark the failure
        row["failure_arpack"] = f"{type(err).__name__}: {err}"[:200]
    row["seconds_arpack"], row["products_arpack"] = time.perf_counter() - t, count[0]
    t = time.perf_counter()
    try:
        maxiter = max(100, 8 * count[0] // (ncv - k))  # stop past ~4x ARPACK's products
        res = linops.lanczos(torch.from_numpy(A), k, which, rtol=target, ncv=ncv,
                             v0=torch.from_numpy(v0), maxiter=maxiter)  # fmt: skip
        wl, Vl = res.eigenvalues.numpy(), res.eigenvectors.numpy()
        row["products_lanczos"] = res.num_matvecs
        row["residual_lanczos"] = _rel_residual(A64, wl, Vl, anorm)
        row["eigenvalue_error_lanczos"] = float(np.abs(np.sort(wl) - wanted).max() / anorm)
    except Exception as err:  # LanczosNoConvergence
        row["failure_lanczos"] = f"{type(err).__name__}: {err}"[:200]
        row["products_lanczos"] = getattr(getattr(err, "result", None), "num_matvecs", -1)
    row["seconds_lanczos"] = time.perf_counter() - t
    row["product_ratio_lanczos_over_arpack"] = row["products_lanczos"] / max(count[0], 1)
    # what ARPACK does not spend: the symmetry probe (2) and the final true-residual block (k)
    row["products_lanczos_verification"] = k + 2
    iteration = row["products_lanczos"] - row["products_lanczos_verification"]
    row["product_ratio_lanczos_iteration_over_arpack"] = iteration / max(count[0], 1)
    return row


def eig_cases(n: int, quick: bool) -> list[dict]:
    """The eigenproblems: top-10 of the four spectra at tolerance 1e-6 (float64 and float32),
    and slowly decaying ``i^(-1/2)`` spectra (``n = 2000``, 600 with ``--quick``) at 5e-8,
    smallest (the hard end, issue 16) and largest; each at ARPACK's default basis size for
    ``k = 10`` (21) and at linops' (40)."""
    cases = []
    for ncv in (21, 40):
        for name in ("1/i", "1/i^2", "0.9^i", "outliers+bulk"):
            for dt in (np.float64, np.float32):
                cases.append({"spectrum": name, "n": n, "which": "LA", "k": 10, "ncv": ncv,
                              "target": 1e-6, "dt": dt})  # fmt: skip
        for which in ("SA", "LA"):
            cases.append({"spectrum": "i^-1/2", "n": 600 if quick else 2000, "which": which,
                          "k": 10, "ncv": ncv, "target": 5e-8, "dt": np.float64})  # fmt: skip
    return cases


def bench_eigsh(mats: dict[str, np.ndarray], lams: dict, seed: int, quick: bool) -> list:
    rows = []
    n = next(iter(mats.values())).shape[0]
    for case in eig_cases(n, quick):
        name = case["spectrum"]
        if name not in mats:
            i = np.arange(1, case["n"] + 1, dtype=np.float64)
            lams[name] = i**-0.5
            mats[name] = dense_symmetric(lams[name], seed)
        rows.append(_eig_case(mats[name], lams[name], case, seed))
        r = rows[-1]
        print(f"{name} {case['which']} ncv={case['ncv']} {r['dtype']}: ARPACK "
              f"{r['products_arpack']}, lanczos {r['products_lanczos']}", flush=True)  # fmt: skip
    return rows


def _sv_error(s: Any, true: np.ndarray) -> float:
    s = np.sort(np.asarray(s, dtype=np.float64))[::-1]
    return float(np.abs(s - true[: s.size]).max() / true[0])


def bench_rsvd(mats: dict, lams: dict, rank: int, seed: int) -> list:
    rows = []
    for name, A in mats.items():
        true = np.sort(np.abs(lams[name]))[::-1]
        At = torch.from_numpy(A)
        for q in (2, 7):
            budget = (rank + 10) * (2 * q + 2)
            row = {"spectrum": name, "budget_products": budget, "n_iter": q}
            t = time.perf_counter()
            _, s, _ = sk_randomized_svd(A, rank, n_oversamples=10, n_iter=q, random_state=seed)
            row["seconds_sklearn"] = time.perf_counter() - t
            row["error_sklearn"] = _sv_error(s, true)
            torch.manual_seed(seed)  # svd_lowrank uses the global generator
            t = time.perf_counter()
            _, s, _ = torch.svd_lowrank(At, q=rank + 10, niter=q)
            row["seconds_torch"] = time.perf_counter() - t
            row["error_torch"] = _sv_error(s[:rank], true)
            for method in ("block_krylov", "subspace"):
                t = time.perf_counter()
                r = linops.randomized_svd(At, rank, power_iters=q, method=method, seed=seed)
                row[f"seconds_linops_{method}"] = time.perf_counter() - t
                row[f"error_linops_{method}"] = _sv_error(r.singular_values.numpy(), true)
                row[f"products_linops_{method}"] = r.num_matvecs
            rows.append(row)
    return rows


def rsvd_curve(A: np.ndarray, lam: np.ndarray, rank: int, seed: int) -> dict:
    true, At = np.sort(np.abs(lam))[::-1], torch.from_numpy(A)
    curve: dict[str, list] = {"budget_products": [], "sklearn": [], "block_krylov": []}
    for q in range(0, 8):
        curve["budget_products"].append((rank + 10) * (2 * q + 2))
        _, s, _ = sk_randomized_svd(A, rank, n_oversamples=10, n_iter=q, random_state=seed)
        curve["sklearn"].append(_sv_error(s, true))
        r = linops.randomized_svd(At, rank, power_iters=q, seed=seed)
        curve["block_krylov"].append(_sv_error(r.singular_values.numpy(), true))
    return curve


def _est() -> Any:
    """The ``estimators`` package, imported when a trace section runs (``--sections eigsh``
    needs only ``linops``)."""
    import estimators

    return estimators


TRACE_METHODS = {
    "hutchinson": lambda A, N, s: _est().hutchinson_trace(A, N, seed=s),
    "hutchpp": lambda A, N, s: _est().hutchpp_trace(A, N, seed=s),
    "xtrace_no_fallback": lambda A, N, s: _est().xtrace(A, N, fallback=False, seed=s),
    "xtrace": lambda A, N, s: _est().xtrace(A, N, seed=s),
}


def bench_trace(mats: dict, lams: dict, budget: int, repeats: int) -> list:
    rows = []
    for name, A in mats.items():
        At, tr = torch.from_numpy(A), float(lams[name].sum())
        row: dict[str, Any] = {"spectrum": name, "budget_products": budget}
        for key, f in TRACE_METHODS.items():
            runs = [f(At, budget, s) for s in range(repeats)]
            row[f"relative_error_{key}"] = float(np.mean([abs(r.estimate - tr) / tr for r in runs]))
        row["xtrace_method_chosen"] = _est().xtrace(At, budget, seed=0).method
        rows.append(row)
    return rows


def trace_curve(A: np.ndarray, tr: float, repeats: int) -> dict:
    curve: dict[str, list] = {"budget_products": [12, 24, 48, 96, 192]}
    for key, f in TRACE_METHODS.items():
        curve[key] = [
            float(np.mean([abs(f(A, N, s).estimate - tr) / tr for s in range(repeats)]))
            for N in curve["budget_products"]
        ]
    return curve


def bench_angles(seed: int) -> dict:
    angles = np.array([1e-10, 1e-8, 1e-6, 0.5, 1.2, np.pi / 2])
    Q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((200, 12)))
    U, W = Q[:, :6], Q[:, 6:]
    V = U * np.cos(angles) + W * np.sin(angles)
    ours = np.asarray(linops.principal_angles(U, V))
    theirs = np.sort(scipy.linalg.subspace_angles(U, V))
    return {
        "true_radians": angles.tolist(), "linops_radians": ours.tolist(),
        "scipy_radians": theirs.tolist(),
        "max_relative_error_linops": float((np.abs(ours - angles) / angles).max()),
        "max_relative_error_scipy": float((np.abs(theirs - angles) / angles).max()),
    }  # fmt: skip


def bench_operators(seed: int, quick: bool) -> dict:
    try:
        from linops import HessianOperator, JacobianOperator
    except ImportError as err:  # pragma: no cover - depends on the operator-core issue
        print(f"note: skipping operator benchmarks ({err})")
        return {"skipped": str(err)}
    torch.manual_seed(seed)
    width = 16 if quick else 32
    model = torch.nn.Sequential(
        torch.nn.Linear(8, width), torch.nn.Tanh(), torch.nn.Linear(width, 3)
    ).double()
    X = torch.randn(64, 8, dtype=torch.float64)
    y = torch.randint(0, 3, (64,))
    H = HessianOperator(model, torch.nn.functional.cross_entropy, (X, y))
    J = JacobianOperator(model, X)
    out: dict[str, Any] = {"num_parameters": H.shape[0], "jacobian_shape": list(J.shape)}
    v0 = np.random.default_rng(seed).standard_normal(H.shape[0])
    L, count = _counting_op(H)
    t = time.perf_counter()
    w, _ = eigsh(L, 5, which="LM", tol=1e-6, v0=v0)
    out.update(hessian_products_arpack=count[0], seconds_hessian_arpack=time.perf_counter() - t)
    t = time.perf_counter()
    res = linops.lanczos(H, 5, "LM", rtol=1e-6, v0=torch.from_numpy(v0))
    out.update(
        hessian_products_lanczos=res.num_matvecs, seconds_hessian_lanczos=time.perf_counter() - t
    )
    out["hessian_eigenvalue_difference"] = float(np.abs(np.sort(w) - res.eigenvalues.numpy()).max())
    L, count = _counting_op(J)
    t = time.perf_counter()
    s = scipy_svds(L, 5, tol=1e-6, random_state=seed, solver="arpack")[1]
    out.update(jacobian_products_arpack=count[0], seconds_jacobian_arpack=time.perf_counter() - t)
    t = time.perf_counter()
    r = linops.svds(J, 5, rtol=1e-6, seed=seed)
    out.update(jacobian_products_svds=r.num_matvecs, seconds_jacobian_svds=time.perf_counter() - t)
    out["jacobian_singular_value_difference"] = float(
        np.abs(np.sort(s)[::-1] - r.singular_values.numpy()).max()
    )
    return out


def _counting_op(op: linops.TorchLinearOperator) -> tuple[LinearOperator, list[int]]:
    count = [0]

    def product(x: np.ndarray, adjoint: bool) -> np.ndarray:
        count[0] += 1 if x.ndim == 1 else x.shape[1]
        y = (op.rmatmat if adjoint else op.matmat)(x.reshape(x.shape[0], -1))
        return y.reshape(-1) if x.ndim == 1 else y

    def mv(x: np.ndarray) -> np.ndarray:
        return product(x, False)

    def rmv(x: np.ndarray) -> np.ndarray:
        return product(x, True)

    out = LinearOperator(op.shape, matvec=mv, matmat=mv, rmatvec=rmv, rmatmat=rmv, dtype=op.dtype)
    return out, count


def _eig_markdown(rows: list) -> list[str]:
    if not rows:
        return []
    lines = [
        "## Eigenpairs: linops.lanczos against ARPACK at equal ncv and accuracy",
        "",
        "Products of lanczos include its symmetry probe (2) and, only where the products "
        "already taken cannot certify the true residuals (residual plus the rounding bound "
        "of their recombination above the tolerance, linops/_certify.py; the float32 rows "
        "at 1e-6 no longer need it since the recombination runs in float64 with its "
        "rounding measured), a final true-residual block of k; 'ratio iter.' leaves k + 2 "
        "out (an upper bound on what those cost).",
        "",
        "| spectrum | n | which | ncv | dtype | target | products ARPACK | products lanczos "
        "| ratio | ratio iter. | residual ARPACK | residual lanczos | s ARPACK | s lanczos |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ra = f"{r['residual_arpack']:.1e}" if "residual_arpack" in r else "failed"
        rl = f"{r['residual_lanczos']:.1e}" if "residual_lanczos" in r else "failed"
        lines.append(
            f"| {r['spectrum']} | {r['n']} | {r['which']} | {r['ncv']} | {r['dtype']} | "
            f"{r['target']:.0e} | {r['products_arpack']} | {r['products_lanczos']} | "
            f"{r['product_ratio_lanczos_over_arpack']:.2f} | "
            f"{r.get('product_ratio_lanczos_iteration_over_arpack', float('nan')):.2f} | {ra} | {rl} | "
            f"{r['seconds_arpack']:.2f} | {r['seconds_lanczos']:.2f} |"
        )
    return [*lines, ""]


def to_markdown(res: dict) -> str:
    lines = [f"# linops algorithms (n = {res['n']})", ""]
    lines += _eig_markdown(res.get("eigsh", []))
    if "randomized_svd" in res:
        lines += ["## Randomized SVD, top-10 singular values, max |s - s_true| / s_1", ""]
        lines += [
            "| spectrum | products | sklearn | torch.svd_lowrank | linops block Krylov "
            "| linops subspace |",
            "|---|---|---|---|---|---|",
        ]
        for r in res["randomized_svd"]:
            lines.append(
                f"| {r['spectrum']} | {r['budget_products']} | {r['error_sklearn']:.1e} | "
                f"{r['error_torch']:.1e} | {r['error_linops_block_krylov']:.1e} | "
                f"{r['error_linops_subspace']:.1e} |"
            )
        lines.append("")
    if "trace" in res:
        lines += ["## Trace, mean relative error", ""]
        keys = list(TRACE_METHODS)
        lines += [
            "| spectrum | products | " + " | ".join(keys) + " | xtrace chose |",
            "|---|---|" + "---|" * (len(keys) + 1),
        ]
        for r in res["trace"]:
            errs = " | ".join(f"{r['relative_error_' + k]:.1e}" for k in keys)
            lines.append(
                f"| {r['spectrum']} | {r['budget_products']} | {errs} | "
                f"{r['xtrace_method_chosen']} |"
            )
        lines.append("")
    if "angles" in res:
        a = res["angles"]
        lines += [
            "## Principal angles (true 1e-10 ... pi/2)",
            "",
            f"max relative error: linops {a['max_relative_error_linops']:.1e}, "
            f"scipy {a['max_relative_error_scipy']:.1e}",
            "",
        ]
    if "operators" in res:
        lines += [
            "## Hessian / Jacobian operators",
            "",
            "```",
            json.dumps(res["operators"], indent=1),
            "```",
            "",
        ]
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    c = res["rsvd_curve"]
    for key in ("sklearn", "block_krylov"):
        a.semilogy(c["budget_products"], np.maximum(c[key], 1e-17), "o-", label=key)
    a.set(
        xlabel="products",
        ylabel="max singular value error / s_1",
        title=f"randomized SVD, rank 10, spectrum {res['curve_spectrum']}",
    )
    a.legend()
    c = res["trace_curve"]
    for key in TRACE_METHODS:
        b.loglog(c["budget_products"], np.maximum(c[key], 1e-17), "o-", label=key)
    b.set(
        xlabel="products",
        ylabel="mean relative error",
        title=f"trace, spectrum {res['curve_spectrum']}",
    )
    b.legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)


SECTIONS = ("eigsh", "randomized_svd", "trace", "angles", "operators")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="n = 600 and fewer repeats (~30 s)")
    p.add_argument("--out", type=Path, default=Path("results/algorithms"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="what to run"
    )
    args = p.parse_args(argv)
    n, repeats = (600, 3) if args.quick else (5000, 10)
    t0 = time.perf_counter()
    lams = spectra(n, args.seed)
    mats = {k: dense_symmetric(v, args.seed + i) for i, (k, v) in enumerate(lams.items())}
    res: dict[str, Any] = {"n": n, "quick": args.quick, "torch_threads": torch.get_num_threads()}
    res["sections"] = list(args.sections)
    if "eigsh" in args.sections:
        res["eigsh"] = bench_eigsh(dict(mats), dict(lams), args.seed, args.quick)
    if "randomized_svd" in args.sections:
        res["randomized_svd"] = bench_rsvd(mats, lams, 10, args.seed)
        res["curve_spectrum"] = "1/i"
        res["rsvd_curve"] = rsvd_curve(mats["1/i"], lams["1/i"], 10, args.seed)
    if "trace" in args.sections:
        flat = np.random.default_rng(args.seed).uniform(1, 2, n)
        mats["flat"], lams["flat"] = dense_symmetric(flat, args.seed), flat
        res["trace"] = bench_trace(mats, lams, 99, repeats)
        res["curve_spectrum"] = "1/i"
        res["trace_curve"] = trace_curve(mats["1/i"], float(lams["1/i"].sum()), repeats)
    if "angles" in args.sections:
        res["angles"] = bench_angles(args.seed)
    if "operators" in args.sections:
        res["operators"] = bench_operators(args.seed, args.quick)
    res["seconds_total"] = time.perf_counter() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    write_text(args.out / "algorithms.json", strict_json(res, indent=2) + "\n")
    md = to_markdown(res)
    write_text(args.out / "algorithms.md", md)
    if "rsvd_curve" in res and "trace_curve" in res:
        plot(res, args.out / "algorithms.png")
    print(md)
    print(f"wrote {args.out / 'algorithms.json'} and {args.out / 'algorithms.md'}")
    return res


if __name__ == "__main__":
    main()
