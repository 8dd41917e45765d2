"""Matrix-free algorithms of linops against ARPACK, scikit-learn, torch and scipy.

What is measured (all in one run, on the same matrices and seeds)
------------------------------------------------------------------
* ``eigsh``: top-10 eigenpairs (``which="LA"``) of dense ``n x n`` symmetric matrices
  (``n = 5000``; 1000 with ``--quick``) with spectra ``1/i``, ``1/i^2``, ``0.9^i`` and
  ``10 outliers + uniform bulk``, float64 and float32, at tolerance 1e-6: products, seconds,
  largest relative residual ``||A v - l v|| / ||A||`` (evaluated in float64) and eigenvalue
  error, for ``linops.lanczos`` and ``scipy.sparse.linalg.eigsh`` (ARPACK), both started
  from the same vector.
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

    python bench/algorithms.py [--quick] [--out results/algorithms]

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

import estimators
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


def bench_eigsh(mats: dict[str, np.ndarray], lams: dict, k: int, tol: float, seed: int) -> list:
    rows = []
    for name, A64 in mats.items():
        lam, anorm = lams[name], float(np.abs(lams[name]).max())
        top = np.sort(lam)[-k:]
        for dt in (np.float64, np.float32):
            A = A64.astype(dt)
            v0 = np.random.default_rng(seed).standard_normal(A.shape[0]).astype(dt)
            L, count = _counting(A)
            t = time.perf_counter()
            w, V = eigsh(L, k, which="LA", tol=tol, v0=v0)
            t_arpack = time.perf_counter() - t
            At = torch.from_numpy(A)
            t = time.perf_counter()
            res = linops.lanczos(At, k, "LA", tol=tol, v0=torch.from_numpy(v0))
            t_ours = time.perf_counter() - t
            wl, Vl = res.eigenvalues.numpy(), res.eigenvectors.numpy()
            rows.append({
                "spectrum": name, "dtype": np.dtype(dt).name,
                "products_arpack": count[0], "products_lanczos": res.num_matvecs,
                "residual_arpack": _rel_residual(A64, w, V, anorm),
                "residual_lanczos": _rel_residual(A64, wl, Vl, anorm),
                "eigenvalue_error_arpack": float(np.abs(np.sort(w) - top).max() / anorm),
                "eigenvalue_error_lanczos": float(np.abs(np.sort(wl) - top).max() / anorm),
                "seconds_arpack": t_arpack, "seconds_lanczos": t_ours,
            })  # fmt: skip
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


TRACE_METHODS = {
    "hutchinson": lambda A, N, s: estimators.hutchinson_trace(A, N, seed=s),
    "hutchpp": lambda A, N, s: estimators.hutchpp_trace(A, N, seed=s),
    "xtrace_no_fallback": lambda A, N, s: estimators.xtrace(A, N, fallback=False, seed=s),
    "xtrace": lambda A, N, s: estimators.xtrace(A, N, seed=s),
}


def bench_trace(mats: dict, lams: dict, budget: int, repeats: int) -> list:
    rows = []
    for name, A in mats.items():
        At, tr = torch.from_numpy(A), float(lams[name].sum())
        row: dict[str, Any] = {"spectrum": name, "budget_products": budget}
        for key, f in TRACE_METHODS.items():
            runs = [f(At, budget, s) for s in range(repeats)]
            row[f"relative_error_{key}"] = float(np.mean([abs(r.estimate - tr) / tr for r in runs]))
        row["xtrace_method_chosen"] = estimators.xtrace(At, budget, seed=0).method
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
    res = linops.lanczos(H, 5, "LM", tol=1e-6, v0=torch.from_numpy(v0))
    out.update(
        hessian_products_lanczos=res.num_matvecs, seconds_hessian_lanczos=time.perf_counter() - t
    )
    out["hessian_eigenvalue_difference"] = float(np.abs(np.sort(w) - res.eigenvalues.numpy()).max())
    L, count = _counting_op(J)
    t = time.perf_counter()
    s = scipy_svds(L, 5, tol=1e-6, random_state=seed, solver="arpack")[1]
    out.update(jacobian_products_arpack=count[0], seconds_jacobian_arpack=time.perf_counter() - t)
    t = time.perf_counter()
    r = linops.svds(J, 5, tol=1e-6, seed=seed)
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


def to_markdown(res: dict) -> str:
    lines = [f"# linops algorithms (n = {res['n']})", "", "## Top-10 eigenpairs, tol 1e-6", ""]
    lines += [
        "| spectrum | dtype | products ARPACK | products lanczos | residual ARPACK "
        "| residual lanczos | s ARPACK | s lanczos |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in res["eigsh"]:
        lines.append(
            f"| {r['spectrum']} | {r['dtype']} | {r['products_arpack']} | "
            f"{r['products_lanczos']} | {r['residual_arpack']:.1e} | {r['residual_lanczos']:.1e} "
            f"| {r['seconds_arpack']:.2f} | {r['seconds_lanczos']:.2f} |"
        )
    lines += ["", "## Randomized SVD, top-10 singular values, max |s - s_true| / s_1", ""]
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
    lines += ["", "## Trace, mean relative error", ""]
    keys = list(TRACE_METHODS)
    lines += [
        "| spectrum | products | " + " | ".join(keys) + " | xtrace chose |",
        "|---|---|" + "---|" * (len(keys) + 1),
    ]
    for r in res["trace"]:
        errs = " | ".join(f"{r['relative_error_' + k]:.1e}" for k in keys)
        lines.append(
            f"| {r['spectrum']} | {r['budget_products']} | {errs} | {r['xtrace_method_chosen']} |"
        )
    a = res["angles"]
    lines += [
        "",
        "## Principal angles (true 1e-10 ... pi/2)",
        "",
        f"max relative error: linops {a['max_relative_error_linops']:.1e}, "
        f"scipy {a['max_relative_error_scipy']:.1e}",
        "",
    ]
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
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="n = 600 and fewer repeats (~30 s)")
    p.add_argument("--out", type=Path, default=Path("results/algorithms"))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    n, repeats = (600, 3) if args.quick else (5000, 10)
    t0 = time.perf_counter()
    lams = spectra(n, args.seed)
    mats = {k: dense_symmetric(v, args.seed + i) for i, (k, v) in enumerate(lams.items())}
    res: dict[str, Any] = {"n": n, "quick": args.quick, "torch_threads": torch.get_num_threads()}
    res["eigsh"] = bench_eigsh(mats, lams, 10, 1e-6, args.seed)
    res["randomized_svd"] = bench_rsvd(mats, lams, 10, args.seed)
    res["curve_spectrum"] = "1/i"
    res["rsvd_curve"] = rsvd_curve(mats["1/i"], lams["1/i"], 10, args.seed)
    flat = np.random.default_rng(args.seed).uniform(1, 2, n)
    mats["flat"], lams["flat"] = dense_symmetric(flat, args.seed), flat
    res["trace"] = bench_trace(mats, lams, 99, repeats)
    res["trace_curve"] = trace_curve(mats["1/i"], float(lams["1/i"].sum()), repeats)
    res["angles"] = bench_angles(args.seed)
    res["operators"] = bench_operators(args.seed, args.quick)
    res["seconds_total"] = time.perf_counter() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "algorithms.json").write_text(json.dumps(res, indent=2) + "\n")
    md = to_markdown(res)
    (args.out / "algorithms.md").write_text(md)
    plot(res, args.out / "algorithms.png")
    print(md)
    return res


if __name__ == "__main__":
    main()
