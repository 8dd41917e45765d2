r"""Influence of training points on the test loss of the digits MLP, by inverse-Hessian products.

For the training objective :math:`L(\theta) = \frac1N\sum_j \ell_j(\theta) +
\frac\lambda2\|\theta\|^2` at its minimum :math:`\theta^*`, removing training point :math:`i`
(its weight set to zero, the others' kept at :math:`1/N`) moves the parameters by
:math:`\theta_{-i} - \theta^* \approx \frac1N (H + \lambda I)^{-1}\nabla\ell_i` and the test
loss :math:`L_{\mathrm{test}}` by

.. math:: \Delta_i \approx \frac1N\, \nabla\ell_i^\top (H + \lambda I)^{-1} b, \qquad
   b = \nabla L_{\mathrm{test}}(\theta^*)

(Cook & Weisberg 1982; Koh & Liang, "Understanding black-box predictions via influence
functions", ICML 2017, arXiv:1703.04730), with :math:`H` the Hessian of the mean training loss.
One solve :math:`s = (H + \lambda I)^{-1} b` (``linops.inverse`` on ``linops.HessianOperator``,
matrix-free) gives every :math:`\Delta_i` from the per-sample gradients. The script checks

1. :math:`s` against a dense solve with a reverse-over-reverse Hessian (``torch.func``);
2. the predicted :math:`\Delta_i` against leave-one-out retraining on the most influential
   points and on random ones: Pearson and Spearman correlations, reported as measured. Each
   retraining minimises the objective without point :math:`i` from :math:`\theta^*` by Newton
   iterations with the fixed dense Hessian at :math:`\theta^*` (the chord method) to a
   gradient norm of 1e-11 (the training itself: L-BFGS to 1e-6, then the same iterations),
   so the actual change is that of the exact minimiser, not of a truncated run;
3. the certified Gauss / Gauss-Radau bounds (``estimators.quadratic_form_bounds``, Golub &
   Meurant) on :math:`b^\top (H + \lambda I)^{-1} b` against the dense value, for a few numbers
   of Lanczos steps. The Radau bound needs a lower bound :math:`a` on the spectrum of
   :math:`H + \lambda I`: for the GGN :math:`G` (positive semi-definite) :math:`a = \lambda`
   is certified matrix-free; for :math:`H` the script takes :math:`a = 0.99\,\lambda_{\min}`
   from the dense eigenvalues it already has (a matrix-free certificate of :math:`\lambda_{\min}`
   is not part of this example).

Run ``python examples/influence.py [--quick] [--out DIR]``; writes ``DIR/influence.json``,
``DIR/influence.png`` and prints a summary and where it wrote.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from estimators import quadratic_form_bounds
from linops import GGNOperator, HessianOperator, inverse
from reports.runs import (
    SMOKE_NOTE,
    print_written,
    run_metadata,
    save_figure,
    smoke_title,
    write_text_atomic,
)
from trainers.data import digits
from trainers.models import MLP

F = torch.nn.functional
F64 = torch.float64


def _flat_loss(model: torch.nn.Module, names: list[str], shapes: list, X: Any, y: Any, w: Any):
    """Return ``theta -> sum_j w_j CE(f(x_j), y_j)`` on the flat parameter vector.

    The one-hidden-layer MLP written out (``tanh(x W1^T + b1) W2^T + b2``: the standard
    parameterisation of :class:`trainers.models.MLP`, checked against the model in :func:`run`),
    which L-BFGS evaluates thousands of times: cheaper than a functional call of the module.
    """
    sizes = [math.prod(s) for s in shapes]

    def loss(theta: torch.Tensor) -> torch.Tensor:
        W1, b1, W2, b2 = (p.view(s) for p, s in zip(torch.split(theta, sizes), shapes, strict=True))
        out = torch.tanh(X @ W1.T + b1) @ W2.T + b2
        return (F.cross_entropy(out, y, reduction="none") * w).sum()

    return loss


def _minimise(fn: Any, theta0: torch.Tensor, lam: float, gtol: float) -> tuple[torch.Tensor, float]:
    """L-BFGS on ``fn(theta) + lam/2 |theta|^2`` from ``theta0``; the minimiser and grad norm."""
    theta = theta0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS(
        [theta], lr=1.0, max_iter=2000, tolerance_grad=gtol, tolerance_change=0.0,
        history_size=50, line_search_fn="strong_wolfe",
    )  # fmt: skip

    def closure() -> torch.Tensor:
        opt.zero_grad()
        v = fn(theta) + 0.5 * lam * theta.pow(2).sum()
        v.backward()
        return v

    for _ in range(3):
        opt.step(closure)
        closure()
        g = float(theta.grad.norm())  # type: ignore[union-attr]
        if g <= gtol:
            break
    return theta.detach(), g


def _chord(
    fn: Any, theta: torch.Tensor, lam: float, lu: Any, gtol: float
) -> tuple[torch.Tensor, float]:
    r"""Newton iterations with a fixed Hessian (the chord method) on ``fn + lam/2 |theta|^2``.

    ``lu`` factors :math:`H(\theta^*) + \lambda I`; near :math:`\theta^*` the iteration
    converges linearly at a rate :math:`\|(H^* + \lambda I)^{-1}(H(\theta) - H^*)\|`, to a
    gradient norm far below what L-BFGS reaches here.
    """
    grad = torch.func.grad(fn)
    g = grad(theta) + lam * theta
    gn = float(g.norm())
    for _ in range(200):
        if gn <= gtol:
            break
        step, t = torch.linalg.lu_solve(*lu, g[:, None])[:, 0], 1.0
        while t > 1e-6:  # backtracking on the gradient norm: never a diverging iteration
            new = theta - t * step
            g_new = grad(new) + lam * new
            if float(g_new.norm()) < gn:
                break
            t /= 2
        else:
            break  # no decrease: reported as the gradient norm reached
        theta, g, gn = new, g_new, float(g_new.norm())
    return theta, gn


def run(quick: bool, seed: int) -> dict:
    cfg = {
        "n_train": 300 if quick else 1000,
        "width": 16 if quick else 32,
        "lam": 1e-2,
        "loo_top": 4 if quick else 20,
        "loo_random": 4 if quick else 20,
        "gtol": 1e-11,
        "bound_steps": [2, 5, 10, 20, 40],
    }
    ds = digits(dtype=F64, seed=seed)
    X, y = ds.X_train[: cfg["n_train"]], ds.y_train[: cfg["n_train"]]
    Xt, yt = ds.X_test, ds.y_test
    N, lam = len(X), cfg["lam"]
    torch.set_default_dtype(F64)
    model = MLP(64, 10, widths=(cfg["width"],), activation="tanh", seed=seed).double().eval()
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    theta0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert names == ["layers.0.weight", "layers.0.bias", "layers.2.weight", "layers.2.bias"]
    with torch.no_grad():  # the written-out forward pass is the model's
        ref = F.cross_entropy(model(X), y)
        assert (
            abs(float(_flat_loss(model, names, shapes, X, y, torch.ones(N) / N)(theta0) - ref))
            < 1e-12
        )
    train = _flat_loss(model, names, shapes, X, y, torch.full((N,), 1.0 / N, dtype=F64))
    test = _flat_loss(
        model, names, shapes, Xt, yt, torch.full((len(Xt),), 1.0 / len(Xt), dtype=F64)
    )

    t0 = time.perf_counter()
    theta, _ = _minimise(train, theta0, lam, 1e-6)  # then the chord method, to gtol
    eye = torch.eye(len(theta), dtype=F64)
    hessian = torch.func.jacrev(torch.func.grad(train), chunk_size=256)
    theta, gnorm = _chord(
        train, theta, lam, torch.linalg.lu_factor(hessian(theta) + lam * eye), cfg["gtol"]
    )
    seconds_train = time.perf_counter() - t0
    print(f"trained: gradient norm {gnorm:.1e} ({seconds_train:.1f} s)", flush=True)
    with torch.no_grad():
        sizes = [math.prod(s) for s in shapes]
        for p, v in zip(model.parameters(), torch.split(theta, sizes), strict=True):
            p.copy_(v.view(p.shape))
    b = torch.func.grad(test)(theta)

    # --- the matrix-free solve and every training point's influence
    H = HessianOperator(model, torch.nn.CrossEntropyLoss(), (X, y))
    t0 = time.perf_counter()
    solver = inverse(H, damping=lam, rtol=1e-10, method="minres")
    s = solver @ b
    seconds_solve = time.perf_counter() - t0
    print(f"solved: {solver.info.num_matvecs} Hessian products ({seconds_solve:.1f} s)", flush=True)
    per_sample = torch.func.vmap(
        torch.func.grad(lambda th, x1, y1: _flat_loss(model, names, shapes, x1[None], y1[None], torch.ones(1, dtype=F64))(th)),
        in_dims=(None, 0, 0),
    )(theta, X, y)  # fmt: skip
    predicted = per_sample @ s / N

    # --- dense reference: reverse-over-reverse Hessian, one solve
    t0 = time.perf_counter()
    Hd = hessian(theta)
    Hd = (Hd + Hd.T) / 2
    s_dense = torch.linalg.solve(Hd + lam * eye, b)
    seconds_dense = time.perf_counter() - t0
    print(f"dense Hessian and solve ({seconds_dense:.1f} s)", flush=True)
    eig = torch.linalg.eigvalsh(Hd)
    predicted_dense = per_sample @ s_dense / N

    # --- leave-one-out retraining on the most influential and on random points
    order = torch.argsort(predicted.abs(), descending=True)
    top = order[: cfg["loo_top"]].tolist()
    rest = order[cfg["loo_top"] :]
    g = torch.Generator().manual_seed(seed)
    rand = rest[torch.randperm(len(rest), generator=g)[: cfg["loo_random"]]].tolist()
    base = float(test(theta))
    lu = torch.linalg.lu_factor(Hd + lam * eye)
    actual, loo_gnorm = [], []  # (a retraining that misses gtol is reported, not dropped)
    t0 = time.perf_counter()
    for i in top + rand:
        w = torch.full((N,), 1.0 / N, dtype=F64)
        w[i] = 0.0
        fn = _flat_loss(model, names, shapes, X, y, w)
        th_i, gi = _chord(fn, theta, lam, lu, cfg["gtol"])
        if gi > cfg["gtol"]:  # far from theta*: L-BFGS, then the chord at the new point's Hessian
            th_i, _ = _minimise(fn, th_i, lam, 1e-7)
            H_i = torch.func.jacrev(torch.func.grad(fn), chunk_size=256)(th_i)
            lu_i = torch.linalg.lu_factor(H_i + lam * eye)
            th_i, gi = _chord(fn, th_i, lam, lu_i, cfg["gtol"])
        actual.append(float(test(th_i)) - base)
        loo_gnorm.append(gi)
    seconds_loo = time.perf_counter() - t0
    print(f"{len(actual)} leave-one-out retrainings ({seconds_loo:.1f} s)", flush=True)
    pred_sub = predicted[top + rand].numpy()
    act = np.asarray(actual)

    def corr(idx: slice) -> dict:
        p, a = pred_sub[idx], act[idx]
        if len(p) < 3:
            return {"pearson": None, "spearman": None}
        return {
            "pearson": float(stats.pearsonr(p, a)[0]),
            "spearman": float(stats.spearmanr(p, a)[0]),
        }

    # --- certified bounds on b^T (A + lam I)^{-1} b
    exact_h = float(b @ s_dense)
    G = GGNOperator(model, torch.nn.CrossEntropyLoss(), (X, y))
    Gd = G.to_dense()
    exact_g = float(b @ torch.linalg.solve(Gd + lam * eye, b))
    a_h = 0.99 * float(eig[0] + lam)
    bounds = []
    for m in cfg["bound_steps"]:
        bh = quadratic_form_bounds(H, b, damping=lam, num_steps=m, spectrum_lower=a_h)
        bg = quadratic_form_bounds(G, b, damping=lam, num_steps=m)  # a = lam, certified
        bounds.append({
            "num_steps": m,
            "hessian_lower": float(bh.lower[0]), "hessian_upper": float(bh.upper[0]),
            "ggn_lower": float(bg.lower[0]), "ggn_upper": float(bg.upper[0]),
            "hessian_contains_exact": bool(bh.lower[0] <= exact_h <= bh.upper[0]),
            "ggn_contains_exact": bool(bg.lower[0] <= exact_g <= bg.upper[0]),
        })  # fmt: skip

    k = cfg["loo_top"]
    return {
        "config": cfg,
        "num_params": len(theta),
        "num_train": N,
        "num_test": len(Xt),
        "train_grad_norm": gnorm,
        "test_loss": base,
        "hessian_lambda_min": float(eig[0]),
        "hessian_lambda_max": float(eig[-1]),
        "solve_num_matvecs": solver.info.num_matvecs,
        "solve_relative_error_vs_dense": float((s - s_dense).norm() / s_dense.norm()),
        "influence_max_abs_diff_vs_dense": float((predicted - predicted_dense).abs().max()),
        "influence_max_abs": float(predicted.abs().max()),
        "loo_indices": top + rand,
        "loo_predicted": pred_sub.tolist(),
        "loo_actual": actual,
        "loo_grad_norm_max": max(loo_gnorm),
        "loo_grad_norms": loo_gnorm,
        "train_grad_tolerance": cfg["gtol"],
        "correlation_all": corr(slice(None)),
        "correlation_top": corr(slice(0, k)),
        "correlation_random": corr(slice(k, None)),
        "quadratic_form_exact_hessian": exact_h,
        "quadratic_form_exact_ggn": exact_g,
        "bounds": bounds,
        "seconds_train": seconds_train,
        "seconds_solve": seconds_solve,
        "seconds_dense_hessian_and_solve": seconds_dense,
        "seconds_loo_retraining": seconds_loo,
    }


def plot(res: dict, path: Path, quick: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    k = res["config"]["loo_top"]
    p, a = np.asarray(res["loo_predicted"]), np.asarray(res["loo_actual"])
    ax1.scatter(p[:k], a[:k], label="most influential", color="C3")
    ax1.scatter(p[k:], a[k:], label="random", color="C0")
    lim = float(max(np.abs(p).max(), np.abs(a).max())) * 1.1
    ax1.plot([-lim, lim], [-lim, lim], color="gray", lw=0.8)
    c = res["correlation_all"]
    ax1.set(
        xlabel="predicted change of test loss (influence)",
        ylabel="actual change (leave-one-out retraining)",
        title=f"Pearson {c['pearson']:.3f}, Spearman {c['spearman']:.3f}",
    )
    ax1.legend()
    steps = [b["num_steps"] for b in res["bounds"]]
    for key, exact, col in (("hessian", res["quadratic_form_exact_hessian"], "C3"),
                            ("ggn", res["quadratic_form_exact_ggn"], "C0")):  # fmt: skip
        lo = [b[f"{key}_lower"] / exact for b in res["bounds"]]
        up = [b[f"{key}_upper"] / exact for b in res["bounds"]]
        ax2.fill_between(steps, lo, up, alpha=0.3, color=col, label=f"{key}: Gauss..Radau / exact")
    ax2.axhline(1.0, color="gray", lw=0.8)
    ax2.set(xscale="log", yscale="log", xlabel="Lanczos steps", ylabel="bound / exact value",
            title=r"certified bounds on $b^T(A+\lambda I)^{-1}b$")  # fmt: skip
    ax2.legend()
    fig.suptitle(smoke_title("Influence functions on the digits MLP", quick))
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)


def summary(res: dict) -> str:
    c, ct, cr = res["correlation_all"], res["correlation_top"], res["correlation_random"]

    def f(x: float | None) -> str:
        return "-" if x is None else f"{x:.3f}"

    lines = [
        f"digits MLP (tanh, {res['num_params']} parameters), {res['num_train']} training points, "
        f"lambda {res['config']['lam']:g}; train gradient norm {res['train_grad_norm']:.1e}",
        f"inverse-Hessian product: {res['solve_num_matvecs']} Hessian products (MINRES, rtol "
        f"1e-10), relative error vs dense solve {res['solve_relative_error_vs_dense']:.1e}; "
        f"influences differ from the dense ones by at most {res['influence_max_abs_diff_vs_dense']:.1e} "
        f"(largest |influence| {res['influence_max_abs']:.2e})",
        f"leave-one-out on {len(res['loo_actual'])} points: Pearson {f(c['pearson'])}, Spearman "
        f"{f(c['spearman'])} (most influential: {f(ct['pearson'])} / {f(ct['spearman'])}; "
        f"random: {f(cr['pearson'])} / {f(cr['spearman'])})",
        "",
        "| steps | Hessian lower | Hessian upper | GGN lower | GGN upper |",
        "|---|---|---|---|---|",
    ]
    for b in res["bounds"]:
        lines.append(
            f"| {b['num_steps']} | {b['hessian_lower']:.6g} | {b['hessian_upper']:.6g} "
            f"| {b['ggn_lower']:.6g} | {b['ggn_upper']:.6g} |"
        )
    lines.append(
        f"| exact | {res['quadratic_form_exact_hessian']:.6g} | | "
        f"{res['quadratic_form_exact_ggn']:.6g} | |"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a smaller model and fewer retrainings")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("results/influence"))
    args = p.parse_args(argv)
    started = time.time()
    torch.set_num_threads(1)  # small tensors: one thread is faster, and steady on a shared CPU
    meta = run_metadata(quick=args.quick, seed=args.seed, argv=argv)
    res = run(args.quick, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {**meta, **({"smoke_note": SMOKE_NOTE} if args.quick else {}), **res}
    write_text_atomic(args.out / "influence.json", json.dumps(payload, indent=2) + "\n")
    plot(res, args.out / "influence.png", args.quick)
    if args.quick:
        print(SMOKE_NOTE)
    print(summary(res))
    print_written("influence.py", args.out, since=started)


if __name__ == "__main__":
    main()
