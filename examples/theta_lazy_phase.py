"""The theta-lazy phase diagram of "Demystifying Lazy Training of Neural Networks from a
Macroscopic Viewpoint" (arXiv:2404.04859) over width m and output scale kappa = m^alpha.

One-hidden-layer tanh MLPs in the mean-field parameterization, f(x) = kappa / m * sum_k a_k
tanh(w_k . x / sqrt(d)), (no biases, as in the paper) so that the paper's exponent is alpha = log(kappa) / log(m): alpha = 1/2
is the NTK scaling, alpha = 0 the mean-field one, and the theta-lazy regime is alpha > 0.
Full-batch gradient descent on a synthetic regression set (inputs on the sphere), with the
learning rate lr = eta * m / kappa^2 so that the function-space dynamics run on the same time
scale at every (m, kappa). Recorded: the sup over training of the largest per-layer relative
distance RD and of the NTK drift, the final training loss, and per alpha the fitted slope of
log sup RD against log m (theta-lazy theory: negative for alpha > 0, about -min(alpha, 1/2)).

Usage: ``python examples/theta_lazy_phase.py [--out DIR] [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from estimators.kernel import gram_drift, relative_distance
from reports.plotting import log_ticks_at
from reports.runs import (
    SMOKE_NOTE,
    Sections,
    print_written,
    run_metadata,
    save_figure,
    smoke_title,
    write_text_atomic,
)
from trainers.backprop import BackpropTrainer
from trainers.data import synthetic_regression
from trainers.models import MLP

NAME = "theta_lazy_phase"


def run(m: int, alpha: float, data, steps: int, every: int, eta: float) -> dict:
    kappa = float(m) ** alpha
    net = MLP(
        data.X_train.shape[1],
        1,
        (m,),
        activation="tanh",
        parameterization="mean_field",
        kappa=kappa,
        bias=False,  # an unscaled output bias would carry kappa^2, not kappa^2 / m, of the NTK
        seed=torch.Generator().manual_seed(m),
    ).double()
    t = BackpropTrainer(net, torch.nn.functional.mse_loss, lr=eta * m / kappa**2)
    X, y = data.X_train.double(), data.y_train.double()
    rd_sup, gram_sup = 0.0, 0.0
    for _ in range(steps // every):
        try:
            t.fit(X, y, epochs=every, progress=False)
        except FloatingPointError:
            return {"m": m, "alpha": alpha, "kappa": kappa, "diverged": True}
        rd_sup = max(rd_sup, max(relative_distance(t.values, t.initial_values).per_layer.values()))
        gram_sup = max(gram_sup, gram_drift(net, X, t.values, method="dense"))
    return {
        "m": m,
        "alpha": alpha,
        "kappa": kappa,
        "diverged": False,
        "rd_sup": rd_sup,
        "ntk_drift_sup": gram_sup,
        "final_train_loss": t.history.loss[-1],
        "initial_train_loss": t.history.loss[0],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("results") / NAME)
    ap.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 3 widths x 3 alphas, 60 steps (about 14 CPU-seconds measured)",
    )
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    sections = Sections(NAME)
    if args.quick:
        print(f"{NAME}: {SMOKE_NOTE}", flush=True)
    torch.manual_seed(0)
    if args.quick:
        widths, alphas, steps, every = [16, 64, 256], [-0.25, 0.0, 0.5], 60, 20
    else:
        widths = [16, 32, 64, 128, 256, 512, 1024]
        alphas, steps, every = [-0.25, 0.0, 0.25, 0.5, 0.75], 400, 50
    data = synthetic_regression(n=32, d=8, seed=0)
    eta = 0.5
    rows = []
    for a in alphas:
        with sections(f"alpha {a}", f"{len(widths)} widths x {steps} steps of full-batch GD"):
            for m in tqdm(widths, desc=f"alpha {a}: widths", unit="width", leave=False):
                rows.append(run(m, a, data, steps, every, eta))
    slopes = {}
    for a in alphas:
        ok = [r for r in rows if r["alpha"] == a and not r["diverged"]]
        if len(ok) >= 2:
            slopes[str(a)] = float(
                np.polyfit(np.log([r["m"] for r in ok]), np.log([r["rd_sup"] for r in ok]), 1)[0]
            )
    out = {
        **run_metadata(quick=args.quick, seed=0),
        **({"smoke_note": SMOKE_NOTE} if args.quick else {}),
        "seconds_sections": sections.seconds,
        "widths": widths,
        "alphas": alphas,
        "steps": steps,
        "eta": eta,
        "learning_rate_rule": "eta * m / kappa^2",
        "num_samples": 32,
        "rows": rows,
        "slope_log_rd_sup_vs_log_m": slopes,
    }
    write_text_atomic(args.out / f"{NAME}.json", json.dumps(out, indent=2))
    _plot(out, args.out)
    if args.quick:
        print(SMOKE_NOTE)
    print(f"{'alpha':>6} " + " ".join(f"m={m:>5}" for m in widths) + "   slope (sup RD)")
    for a in alphas:
        vals = [r for r in rows if r["alpha"] == a]
        cells = " ".join("   div " if r["diverged"] else f"{r['rd_sup']:>7.3g}" for r in vals)
        print(f"{a:>6} {cells}   {slopes.get(str(a), float('nan')):.3f}")
    print_written(NAME, args.out)


def _grid(out: dict, key: str) -> np.ndarray:
    G = np.full((len(out["alphas"]), len(out["widths"])), np.nan)
    for r in out["rows"]:
        if not r["diverged"]:
            G[out["alphas"].index(r["alpha"]), out["widths"].index(r["m"])] = r[key]
    return G


def _plot(out: dict, folder: Path) -> None:
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    for ax, key, title in zip(
        axes[:3],
        ["rd_sup", "ntk_drift_sup", "final_train_loss"],
        ["sup_t RD (max layer)", "sup_t NTK drift", "final train loss"],
        strict=True,
    ):
        im = ax.imshow(np.log10(_grid(out, key)), origin="lower", aspect="auto", cmap="viridis")
        ax.set_xticks(range(len(out["widths"])), out["widths"])
        ax.set_yticks(range(len(out["alphas"])), out["alphas"])
        ax.set(xlabel="width m", ylabel="alpha = log kappa / log m", title=f"log10 {title}")
        fig.colorbar(im, ax=ax)
    ax = axes[3]
    for a in out["alphas"]:
        ok = [r for r in out["rows"] if r["alpha"] == a and not r["diverged"]]
        ax.plot(
            [r["m"] for r in ok],
            [r["rd_sup"] for r in ok],
            "o-",
            label=f"alpha={a}: slope {out['slope_log_rd_sup_vs_log_m'].get(str(a), np.nan):.2f}",
        )
    ax.set(yscale="log", xlabel="width m", ylabel="sup_t RD", title="RD vs width")
    log_ticks_at(ax, out["widths"])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    title = (
        "theta-lazy phase diagram: one-hidden-layer tanh MLPs (mean-field, no biases, "
        f"kappa = m^alpha), {out['num_samples']} synthetic regression samples, "
        f"{out['steps']} steps of full-batch GD"
    )
    fig.suptitle(smoke_title(title, out.get("smoke", False)), fontsize=10)
    fig.tight_layout()
    save_figure(fig, folder / f"{NAME}.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
