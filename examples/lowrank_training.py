"""Algorithm 1 of "Leveraging Low Rank Structure in the Lazy Regime" (anonymous ICLR 2025 submission) on digits: backprop vs exact linearized vs low-rank Jacobian training.

Answers the paper's reviewers' questions (OpenReview, ICLR 2025) with measurements:

1. training / test curves of :class:`trainers.BackpropTrainer`, :class:`trainers.LinearizedTrainer`
   and :class:`trainers.LowRankJacobianTrainer` across MLP widths and ranks ``r``;
2. the effect of the reference-set strategy, of ``r``, of the projection (the paper's
   ``"sample"`` against the sound ``"parameter"``) and of centring on the final accuracy and on
   the cosine between the low-rank update and (a) the true network gradient, (b) the exact
   linearized gradient :math:`J_0^\\top a`;
3. the effect of refreshing the factors (every ``k`` steps, or on drift);
4. a small CNN (parameter sharing).

Run ``python examples/lowrank_training.py [--quick] [--out DIR]``; writes
``DIR/lowrank_training.json`` and PNGs, and prints summary tables.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from linops.jacobian import JacobianOperator
from reports.plotting import integer_ticks, log_ticks_at
from reports.runs import (
    SMOKE_NOTE,
    Sections,
    print_written,
    run_metadata,
    save_figure,
    smoke_title,
    write_text_atomic,
)
from trainers import BackpropTrainer, LinearizedTrainer, LowRankJacobianTrainer
from trainers.data import digits
from trainers.models import MLP, SmallCNN

NAME = "lowrank_training"
CE = torch.nn.functional.cross_entropy


def make_model(kind: str, width: int, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    if kind == "mlp":
        return MLP(64, 10, width, activation="relu", seed=g)
    torch.manual_seed(seed)  # nn.Conv2d initialises from the global generator
    return SmallCNN(channels=(width, 2 * width), image_size=8)


def make_trainer(spec: dict[str, Any], model: torch.nn.Module, X: torch.Tensor, cfg: dict) -> Any:
    kw = {"optimizer": "sgd", "lr": cfg["lr"], "momentum": cfg["momentum"]}
    if spec["trainer"] == "backprop":
        return BackpropTrainer(model, CE, **kw)
    if spec["trainer"] == "linearized":
        return LinearizedTrainer(model, CE, **kw)
    opts = {k: v for k, v in spec.items() if k not in ("trainer", "label")}
    return LowRankJacobianTrainer(model, CE, X, **opts, **kw)


def gradient_cosines(trainer: LowRankJacobianTrainer, X: torch.Tensor, y: torch.Tensor) -> dict:
    """Cosines of the low-rank update with the network gradient and the exact linearized one."""
    idx = torch.arange(len(X))
    _, g_hat, out = trainer.approximate_gradient(idx, y, X)
    params = {n: p.detach().requires_grad_(True) for n, p in trainer.values.items()}
    loss = CE(trainer.forward(X, params), y)
    g_net = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(params.values()))])
    out = out.requires_grad_(True)
    (a,) = torch.autograd.grad(CE(out, y), out)
    F = trainer.factors
    ref = dict(zip(trainer.space.names, trainer.space.unflatten(F.w_ref).values(), strict=True))
    J = JacobianOperator(trainer.model, X, ref)
    g_lin = J._apply(a.reshape(-1, 1), adjoint=True)[:, 0]

    def cos(u: torch.Tensor, v: torch.Tensor) -> float:
        return float(u @ v / (u.norm() * v.norm()).clamp_min(1e-30))

    return {"cos_true_gradient": cos(g_hat, g_net), "cos_linearized_gradient": cos(g_hat, g_lin)}


def run(spec: dict, kind: str, width: int, data: Any, cfg: dict, cosines: bool = False) -> dict:
    model = make_model(kind, width, cfg["seed"])
    Xtr, Xte = (data.X_train, data.X_test)
    trainer = make_trainer(spec, model, Xtr, cfg)
    start = time.perf_counter()
    hist = trainer.fit(
        Xtr,
        data.y_train,
        epochs=cfg["epochs"],
        batch_size=cfg["batch_size"],
        validation=(Xte, data.y_test),
        progress=False,
        seed=cfg["seed"],
    )
    seconds = time.perf_counter() - start
    m = hist.metrics
    row = {
        "label": spec["label"],
        "model": kind,
        "width": width,
        "num_params": trainer.space.dim,
        "train_accuracy": m["train_accuracy"],
        "test_accuracy": m["test_accuracy"],
        "train_loss": m["train_loss"],
        "final_test_accuracy": m["test_accuracy"][-1],
        "final_train_accuracy": m["train_accuracy"][-1],
        "final_train_loss": m["train_loss"][-1],
        "seconds_total": seconds,
    }
    if isinstance(trainer, LowRankJacobianTrainer):
        row.update(
            seconds_preprocess=sum(trainer.seconds_preprocess),
            refreshes=len(trainer.refresh_steps),
            stored_rank=sum(trainer.factors.ranks),
        )
        if cosines:
            row.update(gradient_cosines(trainer, Xtr, data.y_train))
    if isinstance(trainer, LinearizedTrainer):  # the network itself at the trained weights
        trainer.evaluate_linearized = False
        row["final_test_accuracy_network"] = trainer.evaluate(Xte, data.y_test)["accuracy"]
    return row


def lowrank(label: str, **kw: Any) -> dict:
    base = {"trainer": "lowrank", "label": label, "rank": 16, "strategy": "random"}
    return {**base, **kw}


def experiments(quick: bool) -> dict[str, Any]:
    """Sizes of the sweeps (the full run takes minutes on 2 CPU cores)."""
    if quick:
        return {
            "widths": [16, 64],
            "ranks": [4],
            "strategies": ["random", "magnitude"],
            "strategy_width": 64,
            "refresh": [None, 5],
            "cnn_channels": [4],
            "variant_ranks": [4],
            "cfg": {"epochs": 2, "batch_size": 256, "lr": 0.05, "momentum": 0.9, "seed": 0},
        }
    return {
        "widths": [16, 64, 256],
        "ranks": [4, 16, 64],
        "strategies": ["random", "magnitude", "gradient", "leverage"],
        "strategy_width": 64,
        "refresh": [None, 50, 10],
        "cnn_channels": [8],
        "variant_ranks": [16],
        "cfg": {"epochs": 10, "batch_size": 128, "lr": 0.05, "momentum": 0.9, "seed": 0},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=f"results/{NAME}")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 400 samples, 2 epochs (about 8 CPU-seconds measured)",
    )
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: robust timings)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    quick = args.quick
    sections = Sections(NAME)
    if quick:
        print(f"{NAME}: {SMOKE_NOTE}", flush=True)
    E = experiments(quick)
    cfg = E["cfg"]
    flat, img = digits(), digits(image=True)
    if args.quick:
        flat = type(flat)(flat.X_train[:400], flat.y_train[:400], flat.X_test, flat.y_test)
        img = type(img)(img.X_train[:400], img.y_train[:400], img.X_test, img.y_test)
    jobs: list[tuple[str, dict, str, int, Any, bool]] = []
    for w in E["widths"]:  # 1. widths x trainers x ranks
        jobs.append(("widths", {"trainer": "backprop", "label": "backprop"}, "mlp", w, flat, False))
        jobs.append(
            ("widths", {"trainer": "linearized", "label": "linearized"}, "mlp", w, flat, False)
        )
        for r in E["ranks"]:
            jobs.append(("widths", lowrank(f"lowrank r={r}", rank=r), "mlp", w, flat, True))
    sw = E["strategy_width"]  # 2. strategy x rank (+ paper variants)
    for s in E["strategies"]:
        for r in E["ranks"]:
            jobs.append(
                ("strategy", lowrank(f"{s} r={r}", rank=r, strategy=s), "mlp", sw, flat, True)
            )
    for r in E["variant_ranks"]:
        variants = (
            ("paper (sample, centred)", {"projection": "sample", "center": True}),
            ("sample, uncentred", {"projection": "sample"}),
            ("parameter, centred", {"center": True}),
            ("joint over outputs", {"per_unit": False, "rank": 10 * r}),
        )
        for label, kw in variants[:2] if quick else variants:
            spec = lowrank(f"{label} r={r}", **{"rank": r, **kw})
            jobs.append(("variants", spec, "mlp", sw, flat, True))
    for k in E["refresh"]:  # 3. refresh schedule
        spec = lowrank(f"refresh every {k}" if k else "no refresh", refresh_every=k)
        jobs.append(("refresh", spec, "mlp", sw, flat, True))
    jobs.append(
        ("refresh", lowrank("refresh on drift > 0.3", refresh_tol=0.3), "mlp", sw, flat, True)
    )
    for c in E["cnn_channels"]:  # 4. CNN
        jobs.append(("cnn", {"trainer": "backprop", "label": "backprop"}, "cnn", c, img, False))
        jobs.append(("cnn", {"trainer": "linearized", "label": "linearized"}, "cnn", c, img, False))
        for r in E["ranks"]:
            jobs.append(("cnn", lowrank(f"lowrank r={r}", rank=r), "cnn", c, img, True))
    results: dict[str, list[dict]] = {}
    for name in dict.fromkeys(job[0] for job in jobs):
        mine = [job for job in jobs if job[0] == name]
        with sections(name, f"{len(mine)} training runs of {cfg['epochs']} epochs"):
            for section, spec, kind, w, data, cos in tqdm(
                mine, desc=f"{name}: training runs", unit="run", leave=False
            ):
                try:
                    row = run(spec, kind, w, data, cfg, cosines=cos)
                except FloatingPointError as err:  # a diverged run is a result too
                    row = {"label": spec["label"], "model": kind, "width": w, "error": str(err)}
                results.setdefault(section, []).append(row)
    payload = {
        **run_metadata(quick=quick, seed=cfg["seed"]),
        **({"smoke_note": SMOKE_NOTE} if quick else {}),
        "seconds_sections": sections.seconds,
        "config": {**cfg, "quick": args.quick, "num_train": len(flat.X_train)},
        **results,
    }
    write_text_atomic(out / f"{NAME}.json", json.dumps(payload, indent=1))
    plots(results, out, quick=quick)
    if quick:
        print(SMOKE_NOTE)
    summary(results)
    print_written(NAME, out)


def _model_name(kind: str, width: int) -> str:
    if kind == "mlp":
        return f"ReLU MLP 64-{width}-10"
    return f"small CNN ({width}, {2 * width} channels)"


def plots(results: dict[str, list[dict]], out: Path, *, quick: bool = False) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for section, key in (("widths", "width"), ("cnn", "width")):
        rows = [r for r in results.get(section, []) if "error" not in r]
        groups = sorted({r[key] for r in rows})
        if not groups:
            continue
        size = (max(6.0, 4.0 * len(groups)), 3.8)
        fig, axes = plt.subplots(1, len(groups), figsize=size, squeeze=False)
        for ax, gval in zip(axes[0], groups, strict=True):
            for r in (r for r in rows if r[key] == gval):
                ep = range(1, len(r["test_accuracy"]) + 1)
                (line,) = ax.plot(ep, r["test_accuracy"], label=r["label"])
                ax.plot(ep, r["train_accuracy"], ls=":", color=line.get_color())
            kind = next(r["model"] for r in rows if r[key] == gval)
            ax.set(title=_model_name(kind, gval), xlabel="epoch", ylim=(0, 1.02))
            integer_ticks(ax)
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("accuracy (solid test, dotted train)")
        axes[0][-1].legend(fontsize=7)
        what = "widths" if section == "widths" else "a CNN (parameter sharing)"
        title = (
            f"Backprop vs exact linearized vs low-rank (Algorithm 1)\ntraining on digits: {what}"
        )
        fig.suptitle(smoke_title(title, quick), fontsize=10)
        fig.tight_layout()
        save_figure(fig, out / f"{NAME}_{section}.png", dpi=110)
        plt.close(fig)
    rows = [r for r in results.get("strategy", []) if "error" not in r]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for s in sorted({r["label"].split(" r=")[0] for r in rows}):
        sel = [r for r in rows if r["label"].split(" r=")[0] == s]
        ranks = [int(r["label"].split("r=")[1]) for r in sel]
        axes[0].plot(ranks, [r["final_test_accuracy"] for r in sel], "o-", label=s)
        axes[1].plot(ranks, [r["cos_true_gradient"] for r in sel], "o-", label=s)
    axes[0].set(xlabel="rank r", ylabel="final test accuracy")
    axes[1].set(xlabel="rank r", ylabel="cos(low-rank update, true gradient)")
    all_ranks = sorted({int(r["label"].split("r=")[1]) for r in rows})
    for ax in axes:
        log_ticks_at(ax, all_ranks)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    width = rows[0]["width"] if rows else 0
    title = f"Reference-set strategy and rank r, low-rank training of a ReLU MLP 64-{width}-10"
    fig.suptitle(smoke_title(title, quick), fontsize=10)
    fig.tight_layout()
    save_figure(fig, out / f"{NAME}_strategy.png", dpi=110)
    plt.close(fig)
    rows = [r for r in results.get("refresh", []) if "error" not in r]
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for r in rows:
        ax.plot(range(1, len(r["test_accuracy"]) + 1), r["test_accuracy"], label=r["label"])
    width = rows[0]["width"] if rows else 0
    title = f"Refresh schedule of the factors\n(low-rank training, ReLU MLP 64-{width}-10)"
    ax.set(xlabel="epoch", ylabel="test accuracy", title=smoke_title(title, quick))
    integer_ticks(ax)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, out / f"{NAME}_refresh.png", dpi=110)
    plt.close(fig)


def summary(results: dict[str, list[dict]]) -> None:
    for section, rows in results.items():
        print(f"\n== {section}")
        print(
            f"{'label':34s} {'model':5s} {'width':>5s} {'params':>7s} {'test':>6s} "
            f"{'train':>6s} {'cos_g':>6s} {'cos_lin':>7s} {'s_pre':>6s} {'s_tot':>6s}"
        )
        for r in rows:
            if "error" in r:
                print(f"{r['label']:34s} {r['model']:5s} {r['width']:5d}  diverged: {r['error']}")
                continue

            def f(key: str, fmt: str = "6.3f", r: dict = r) -> str:
                v = r.get(key)
                return format(v, fmt) if isinstance(v, float) and math.isfinite(v) else "     -"

            print(
                f"{r['label']:34s} {r['model']:5s} {r['width']:5d} {r['num_params']:7d} "
                f"{f('final_test_accuracy')} {f('final_train_accuracy')} "
                f"{f('cos_true_gradient')} {f('cos_linearized_gradient', '7.3f')} "
                f"{f('seconds_preprocess', '6.1f')} {f('seconds_total', '6.1f')}"
            )


if __name__ == "__main__":
    main()
