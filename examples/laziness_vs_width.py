"""Figure 3 of "Leveraging Low Rank Structure in the Lazy Regime" (anonymous ICLR 2025 submission): laziness ratio against width, next to the measured drift in training.

One-hidden-layer tanh MLPs in the NTK parameterization on digits, widths 16 ... 2048. At
initialisation: the laziness ratio ``||H_j(x)|| / ||grad f_j(x)||^2`` (exact Hessian products,
Lanczos) over sampled points and output units, and the paper's variant (denominator: top
singular value squared of the row-centred reference matrix). Then a real training run (SGD,
cross-entropy): the measured Jacobian drift ``||J_T - J_0||_F / ||J_0||_F`` on a probe set, the
NTK drift, the largest per-layer relative distance RD, and the final accuracies.

Usage: ``python examples/laziness_vs_width.py [--out DIR] [--quick]``.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from estimators.kernel import gram_drift, relative_distance
from estimators.laziness import jacobian_drift, laziness_ratio
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
from trainers.data import digits
from trainers.models import MLP

NAME = "laziness_vs_width"


def run_width(width: int, data, probe: torch.Tensor, args) -> dict:
    net = MLP(
        64,
        10,
        (width,),
        activation="tanh",
        parameterization="ntk",
        seed=torch.Generator().manual_seed(width),
    )
    m = sum(p.numel() for p in net.parameters())
    lz = laziness_ratio(
        net,
        data.X_train,
        num_points=args.points,
        output_indices=[0, 3, 7],
        reference_size=min(m, 512),
        seed=0,
    )
    trainer = BackpropTrainer(net, torch.nn.functional.cross_entropy, lr=args.lr)
    trainer.fit(
        data.X_train,
        data.y_train,
        epochs=args.epochs,
        batch_size=128,
        progress=False,
        validation=(data.X_test, data.y_test),
    )
    full_t = dict(trainer.values)
    drift = jacobian_drift(net, probe, full_t, norm="frobenius")
    ntk = gram_drift(net, probe, full_t, output_index=0, method="dense")
    rd = relative_distance(trainer.values, trainer.initial_values).per_layer
    h = trainer.history.metrics
    return {
        "width": width,
        "num_parameters": m,
        "laziness_ratio_mean": lz.mean,
        "laziness_ratio_std": lz.std,
        "laziness_paper_ratio_mean": lz.paper_ratio_mean,
        "hessian_norm_mean": float(lz.hessian_norms.mean()),
        "gradient_norm_mean": float(lz.gradient_norms.mean()),
        "jacobian_drift_frobenius": drift,
        "ntk_drift_output0": ntk,
        "rd_max": max(rd.values()),
        "rd_per_layer": rd,
        "train_accuracy": h["train_accuracy"][-1],
        "test_accuracy": h["test_accuracy"][-1],
        "train_loss": h["train_loss"][-1],
    }


def slope(x: list[float], y: list[float]) -> float:
    return float(np.polyfit(np.log(x), np.log(y), 1)[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("results") / NAME)
    ap.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: widths 16-256, 2 epochs (about 31 CPU-seconds measured)",
    )
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    sections = Sections(NAME)
    if args.quick:
        print(f"{NAME}: {SMOKE_NOTE}", flush=True)
    torch.manual_seed(0)
    data = digits()
    widths = [16, 64, 256] if args.quick else [16, 32, 64, 128, 256, 512, 1024, 2048]
    args.points, args.epochs, args.lr = (2, 2, 1.0) if args.quick else (4, 10, 2.0)
    probe = data.X_train[:64]
    rows = []
    for w in widths:
        what = f"tanh MLP 64-{w}-10 (NTK), laziness at init + {args.epochs} epochs of SGD"
        with sections(f"width {w}", what):
            rows.append(run_width(w, data, probe, args))
    ms = [r["width"] for r in rows]
    out = {
        **run_metadata(quick=args.quick, seed=0),
        **({"smoke_note": SMOKE_NOTE} if args.quick else {}),
        "seconds_sections": sections.seconds,
        "parameterization": "ntk",
        "activation": "tanh",
        "epochs": args.epochs,
        "learning_rate": args.lr,
        "widths": ms,
        "rows": rows,
        "slope_laziness_ratio_vs_width": slope(ms, [r["laziness_ratio_mean"] for r in rows]),
        "slope_paper_ratio_vs_width": slope(ms, [r["laziness_paper_ratio_mean"] for r in rows]),
        "slope_jacobian_drift_vs_width": slope(ms, [r["jacobian_drift_frobenius"] for r in rows]),
        "slope_ntk_drift_vs_width": slope(ms, [r["ntk_drift_output0"] for r in rows]),
        "slope_rd_max_vs_width": slope(ms, [r["rd_max"] for r in rows]),
        "slope_reference_line": -0.5,
    }
    write_text_atomic(args.out / f"{NAME}.json", json.dumps(out, indent=2))
    _plot(out, args.out)
    if args.quick:
        print(SMOKE_NOTE)
    print(
        f"{'width':>6} {'params':>8} {'ratio':>9} {'paper':>9} {'J drift':>9} {'NTK drift':>9} "
        f"{'RD max':>8} {'train acc':>9} {'test acc':>8}"
    )
    for r in rows:
        print(
            f"{r['width']:>6} {r['num_parameters']:>8} {r['laziness_ratio_mean']:>9.3g} "
            f"{r['laziness_paper_ratio_mean']:>9.3g} {r['jacobian_drift_frobenius']:>9.3g} "
            f"{r['ntk_drift_output0']:>9.3g} {r['rd_max']:>8.3g} {r['train_accuracy']:>9.3f} "
            f"{r['test_accuracy']:>8.3f}"
        )
    print({k: round(v, 3) for k, v in out.items() if k.startswith("slope")})
    print_written(NAME, args.out)


def _plot(out: dict, folder: Path) -> None:
    rows, ms = out["rows"], np.array(out["widths"], dtype=float)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    ratio = np.array([r["laziness_ratio_mean"] for r in rows])
    err = np.array([r["laziness_ratio_std"] for r in rows])
    ax.errorbar(ms, ratio, yerr=err, fmt="o-", label="||H|| / ||grad f||^2 (exact)")
    ax.plot(ms, [r["laziness_paper_ratio_mean"] for r in rows], "s--", label="paper's ratio")
    ax.plot(
        ms, [r["jacobian_drift_frobenius"] for r in rows], "^-", label="||J_T - J_0|| / ||J_0||"
    )
    ax.plot(ms, [r["ntk_drift_output0"] for r in rows], "v-", label="NTK drift")
    ax.plot(ms, ratio[0] * np.sqrt(ms[0] / ms), "k:", label="1/sqrt(m)")
    ax.set(yscale="log", xlabel="hidden width m", title="laziness at init, drift after training")
    log_ticks_at(ax, ms)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax = axes[1]
    ax.plot(ms, [r["train_accuracy"] for r in rows], "o-", label="train")
    ax.plot(ms, [r["test_accuracy"] for r in rows], "s-", label="test")
    ax.set(
        xlabel="hidden width m",
        ylabel="accuracy",
        title=f"after {out['epochs']} epochs of SGD (lr {out['learning_rate']:g})",
    )
    log_ticks_at(ax, ms)
    ax.grid(alpha=0.3)
    ax.legend()
    title = (
        "Fig. 3 (low rank in the lazy regime): one-hidden-layer tanh MLPs 64-m-10, "
        "NTK parameterization, on digits"
    )
    fig.suptitle(smoke_title(title, out.get("smoke", False)), fontsize=10)
    fig.tight_layout()
    save_figure(fig, folder / f"{NAME}.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
