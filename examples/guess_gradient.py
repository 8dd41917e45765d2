r"""Guessing gradients ("How to Guess a Gradient", arXiv:2312.04709) on scikit-learn digits and a synthetic set.

Reproduces the shape of the paper's results with this toolkit's guessers
(:mod:`estimators.guesses`), quality measures (:mod:`estimators.guess_quality`) and
:class:`trainers.ForwardGradientTrainer`:

1. **Figure 1 table**: along a backprop (AdamW) trajectory of an MLP, the cosine of every
   method's guess to the true gradient (per layer and whole model) and its 1-step
   effectiveness (loss reduction relative to backprop, each at its best step size on a grid).
2. **Table 2 shape**: train / test accuracy of every method for MLPs of a few depths and widths
   (digits, and one synthetic Gaussian-blob set), all with AdamW at one learning rate.
3. **Figure 4 left**: cosine of the average of K guesses as K grows (bias saturation).
4. **Figure 5**: self-sharpening: cosine along training and the effective rank of the first
   weight matrix, against 1-layer downstream and W^T.
5. **Section 5 and Figure 2 right**: relative bias :math:`\|(\mathrm{Cov}(y) - I) g\| / \|g\|`
   of W^T / downstream per layer, and the overlap of activation and gradient subspaces.

Run ``python examples/guess_gradient.py [--quick] [--out DIR]``; writes
``DIR/guess_gradient.json``, ``DIR/guess_gradient.md`` and PNGs beside them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import linops
from estimators.guess_bias import GuessCovarianceOperator, GuessNoiseOperator, guess_bias
from estimators.guess_quality import (
    activation_gradient_overlap,
    cosine_saturation,
    guess_cosine,
    one_step_effectiveness,
    true_gradient,
)
from estimators.guesses import make_guesser
from linops.params import ParamSpace
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
from trainers import BackpropTrainer, ForwardGradientTrainer, GuessCosine
from trainers.data import digits, synthetic_classification
from trainers.models import MLP

F = torch.nn.functional
METHODS = [
    "directional_descent",
    "activation_perturbation",
    "activation_mixing",
    "w_transpose",
    "downstream",
    "self_sharpening",
]
GUESS_ORDER = [*METHODS, "backprop"]


def _mlp(d_in: int, d_out: int, depth: int, width: int, seed: int) -> MLP:
    """``depth`` linear layers (``depth - 1`` hidden ReLU layers of ``width``)."""
    g = torch.Generator().manual_seed(seed)
    return MLP(d_in, d_out, (width,) * (depth - 1), seed=g)


def _effective_rank(W: torch.Tensor) -> float | None:
    """Roy-Vetterli effective rank through ``linops.effective_rank`` (None until it exists)."""
    if not hasattr(linops, "effective_rank"):
        return None
    res = linops.effective_rank(W.detach().double())
    return float(getattr(res, "effective_rank", res))


class EffectiveRank:
    """Callback: effective rank of one weight matrix every ``every`` steps (Figure 5)."""

    def __init__(self, name: str, every: int) -> None:
        self.name, self.every = name, every

    def __call__(self, trainer: Any, step: int) -> dict[str, float] | None:
        if step % self.every:
            return None
        r = _effective_rank(trainer.values[self.name])
        return None if r is None else {"effective_rank": r}


# ----------------------------------------------------------------------------- Figure 1
def figure1(ds, cfg: dict, gen: torch.Generator) -> dict:
    """Cosine and 1-step effectiveness of every method along a backprop trajectory."""
    net = _mlp(64, 10, cfg["fig1_depth"], cfg["fig1_width"], seed=0)
    trainer = BackpropTrainer(net, F.cross_entropy, optimizer="adamw", lr=1e-3)
    guessers = {m: make_guesser(m) for m in METHODS}
    rec: dict[str, dict[str, list]] = {
        m: {"cos_layer": [], "cos_whole": [], "eff": []} for m in METHODS
    }
    checkpoints = []
    bs = cfg["batch_size"]
    order = torch.randperm(len(ds.X_train), generator=gen)
    bar = tqdm(
        total=cfg["fig1_checkpoints"], desc="figure 1: checkpoints", unit="checkpoint", leave=False
    )
    for c in range(cfg["fig1_checkpoints"]):
        if c:  # advance the backprop trajectory by fig1_epochs_between epochs
            trainer.fit(
                ds.X_train,
                ds.y_train,
                epochs=cfg["fig1_epochs_between"],
                batch_size=bs,
                seed=c,
                progress=False,
            )
        idx = order[(c * bs) % len(order) :][:bs]
        x, y = ds.X_train[idx], ds.y_train[idx]
        space, params = trainer.space, trainer.values
        _, grad = true_gradient(space, params, x, y, F.cross_entropy)
        checkpoints.append(trainer.steps_done)
        for m, guesser in guessers.items():
            for _ in range(cfg["fig1_repeats"]):
                g = guesser(space, params, x, y, F.cross_entropy, seed=gen).grads
                cos = guess_cosine(g, grad)
                rec[m]["cos_layer"].append(float(np.mean(list(cos.per_layer.values()))))
                rec[m]["cos_whole"].append(cos.whole_model)
                eff = one_step_effectiveness(space, params, x, y, F.cross_entropy, g, grad=grad)
                rec[m]["eff"].append(eff.effectiveness)
        bar.update(1)
    bar.close()
    out = {
        "steps": checkpoints,
        "model": f"ReLU MLP, {cfg['fig1_depth']} layers of width {cfg['fig1_width']}",
    }
    for m, r in rec.items():
        out[m] = {
            "cosine_per_layer_mean": float(np.mean(r["cos_layer"])),
            "cosine_per_layer_std": float(np.std(r["cos_layer"])),
            "cosine_whole_model_mean": float(np.mean(r["cos_whole"])),
            "cosine_whole_model_std": float(np.std(r["cos_whole"])),
            "one_step_effectiveness": float(np.mean(r["eff"])),
            "one_step_effectiveness_std": float(np.std(r["eff"])),
            "cosine_whole_model_trace": r["cos_whole"],
        }
    out["_trainer"] = trainer  # reused by the bias analyses (dropped before writing JSON)
    return out


# ----------------------------------------------------------------------------- Table 2
def train_all(ds, name: str, depth: int, width: int, cfg: dict, track: bool, extra: dict) -> dict:
    """Train every method (and backprop) on one dataset / architecture; accuracies and curves."""
    d_in, d_out = ds.X_train.shape[1], ds.num_classes
    rows = {}
    methods = {**{m: m for m in METHODS}, "backprop": None, **extra}
    for m, spec in methods.items():
        net = _mlp(d_in, d_out, depth, width, seed=1)
        if spec is None:
            t = BackpropTrainer(net, F.cross_entropy, optimizer="adamw", lr=cfg["lr"])
        else:
            guesser = make_guesser(spec) if isinstance(spec, str) else spec
            t = ForwardGradientTrainer(
                net, F.cross_entropy, guesser=guesser, optimizer="adamw", lr=cfg["lr"], seed=2
            )
        callbacks = []
        if track and spec is not None:
            every = cfg["track_every"]
            callbacks = [GuessCosine(every), EffectiveRank("layers.0.weight", every)]
        start = time.perf_counter()
        h = t.fit(
            ds.X_train,
            ds.y_train,
            epochs=cfg["epochs"],
            batch_size=cfg["batch_size"],
            validation=(ds.X_test, ds.y_test),
            callbacks=callbacks,
            progress=False,
        )
        rows[m] = {
            "train_accuracy": h.metrics["train_accuracy"][-1],
            "test_accuracy": h.metrics["test_accuracy"][-1],
            "train_accuracy_curve": h.metrics["train_accuracy"],
            "test_accuracy_curve": h.metrics["test_accuracy"],
            "seconds_train": time.perf_counter() - start,
        }
        if track and spec is not None:
            rows[m]["cosine_trace"] = h.metrics.get("cosine", [])
            rows[m]["effective_rank_trace"] = h.metrics.get("effective_rank", [])
            rows[m]["trace_every_steps"] = cfg["track_every"]
        tqdm.write(
            f"  {name} D{depth} W{width} {m:24s} train {rows[m]['train_accuracy']:.3f} "
            f"test {rows[m]['test_accuracy']:.3f} ({rows[m]['seconds_train']:.0f} s)"
        )
    return rows


# ----------------------------------------------------------------------------- bias
def bias_analyses(trainer, ds, cfg: dict, gen: torch.Generator) -> dict:
    """Figure 4 left (saturation), section 5 (Cov(y) bias) and Figure 2 right (overlap)."""
    space, params = trainer.space, trainer.values
    x, y = ds.X_train[: cfg["sat_batch"]], ds.y_train[: cfg["sat_batch"]]
    sat = {}
    for m in ["activation_perturbation", "activation_mixing", "w_transpose", "downstream"]:
        r = cosine_saturation(
            make_guesser(m), space, params, x, y, F.cross_entropy,
            counts=cfg["sat_counts"], max_replicas=cfg["sat_replicas"], seed=gen,
        )  # fmt: skip
        sat[m] = {"counts": r.counts, "cosine": r.cosine}
    # section 5: E[g_hat_s] = Cov(y) g_s per layer, averaged over a few examples
    n_layers = cfg["fig1_depth"]
    sec5: dict[str, dict[str, list[float]]] = {}
    for m in ["w_transpose", "downstream", "activation_perturbation"]:
        rel, cos = [], []
        for layer in range(n_layers - 1):
            rl, cl = [], []
            for b in range(cfg["bias_examples"]):
                xb, yb = ds.X_train[b : b + 1], ds.y_train[b : b + 1]
                A = GuessNoiseOperator(space, params, xb, layer, method=m)
                g = _preactivation_grad(space, params, xb, yb, layer)
                if float(g.norm()) == 0:
                    continue
                res = guess_bias(GuessCovarianceOperator(A), g)
                rl.append(res.relative_bias)
                cl.append(res.cosine_expected)
            rel.append(float(np.mean(rl)) if rl else float("nan"))
            cos.append(float(np.mean(cl)) if cl else float("nan"))
        sec5[m] = {"relative_bias_per_layer": rel, "cosine_expected_per_layer": cos}
    overlap = {}
    if hasattr(linops, "principal_angles"):
        xo, yo = ds.X_train[: cfg["overlap_batch"]], ds.y_train[: cfg["overlap_batch"]]
        for layer in range(1, n_layers):
            r = activation_gradient_overlap(
                space, params, xo, yo, F.cross_entropy, layer, ks=cfg["overlap_ks"], seed=gen
            )
            overlap[f"layer_{layer}"] = r._asdict()
    return {"saturation": sat, "section5": sec5, "overlap": overlap}


def _preactivation_grad(space: ParamSpace, params, x, y, layer: int) -> torch.Tensor:
    """True dL/ds_layer for one example (backprop through hooks; reference only)."""
    mod = space.model.linear_layers()[layer]
    store = {}

    def hook(m, a, out):
        store["s"] = out.detach().requires_grad_(True)
        return store["s"]

    h = mod.register_forward_hook(hook)
    leaves = {n: p.detach() for n, p in params.items()}
    try:
        with torch.enable_grad():
            loss = F.cross_entropy(space.functional_call(leaves, x), y)
            (g,) = torch.autograd.grad(loss, store["s"])
    finally:
        h.remove()
    return g.reshape(-1)


# ----------------------------------------------------------------------------- plots / report
def plots(res: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    smoke = bool(res.get("smoke"))
    cfg = res["config"]
    f1 = res["figure1"]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for m in METHODS:
        trace = np.abs(f1[m]["cosine_whole_model_trace"]) + 1e-6
        ax.semilogy(np.arange(len(trace)) / cfg["fig1_repeats"], trace, ".-", label=m)
    ax.set(
        xlabel=f"checkpoint ({cfg['fig1_epochs_between']} epoch(s) of AdamW apart)",
        ylabel="|cosine| to the true gradient",
        title=smoke_title(f"Figure 1: guess cosines along training\n{f1['model']}, digits", smoke),
    )
    integer_ticks(ax)
    ax.title.set_fontsize(10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, out / "figure1_cosine.png", dpi=120)
    plt.close(fig)

    runs = res["table2"]
    fig, axes = plt.subplots(1, len(runs), figsize=(4 * len(runs), 4), squeeze=False)
    for ax, run in zip(axes[0], runs, strict=True):
        names = list(run["methods"])
        xs = np.arange(len(names))
        ax.bar(xs - 0.2, [run["methods"][n]["train_accuracy"] for n in names], 0.4, label="train")
        ax.bar(xs + 0.2, [run["methods"][n]["test_accuracy"] for n in names], 0.4, label="test")
        ax.set_xticks(xs, names, rotation=70, fontsize=7)
        ax.set(
            title=f"{run['dataset']}: ReLU MLP, {run['depth']} layers of width {run['width']}",
            ylim=(0, 1),
        )
        ax.title.set_fontsize(9)
    axes[0][0].legend()
    axes[0][0].set_ylabel(f"accuracy after {cfg['epochs']} epochs")
    fig.suptitle(smoke_title("Table 2: accuracy of forward-gradient training", smoke), fontsize=10)
    fig.tight_layout()
    save_figure(fig, out / "table2_accuracy.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for m, r in res["bias"]["saturation"].items():
        ax.semilogx(r["counts"], r["cosine"], "o-", label=m)
    ax.set(
        xlabel="number of guesses averaged",
        ylabel="cosine to the true gradient",
        title=smoke_title(f"Figure 4 left: bias saturation\n{f1['model']}, digits", smoke),
    )
    log_ticks_at(ax, cfg["sat_counts"])
    ax.title.set_fontsize(10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, out / "bias_saturation.png", dpi=120)
    plt.close(fig)

    track = next(r for r in runs if r.get("tracked"))
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for m in ["self_sharpening", "downstream", "w_transpose", "directional_descent"]:
        r = track["methods"][m]
        every = r["trace_every_steps"]
        axes[0].plot(np.arange(len(r["cosine_trace"])) * every, r["cosine_trace"], label=m)
        if r["effective_rank_trace"]:
            steps = np.arange(len(r["effective_rank_trace"])) * every
            axes[1].plot(steps, r["effective_rank_trace"], label=m)
        axes[2].plot(r["train_accuracy_curve"], label=f"{m} train")
    axes[0].set(xlabel="step", ylabel="cosine to the true gradient", title="guess cosine")
    axes[1].set(xlabel="step", ylabel="effective rank of W_1", title="effective rank")
    axes[2].set(xlabel="epoch", ylabel="train accuracy", title="training")
    integer_ticks(axes[2])
    for a in axes:
        a.legend(fontsize=7)
        a.grid(alpha=0.3)
    title = (
        f"Figure 5, self-sharpening: {track['dataset']}, ReLU MLP with {track['depth']} layers "
        f"of width {track['width']}"
    )
    fig.suptitle(smoke_title(title, smoke), fontsize=10)
    fig.tight_layout()
    save_figure(fig, out / "self_sharpening.png", dpi=120)
    plt.close(fig)

    if res["bias"]["overlap"]:
        fig, ax = plt.subplots(figsize=(6, 4))
        for k, r in res["bias"]["overlap"].items():
            (line,) = ax.plot(r["ks"], r["cosine_activation"], "o-", label=f"{k} activation PCs")
            ax.plot(r["ks"], r["cosine_random"], "x--", color=line.get_color(), label=f"{k} random")
        ax.set(
            xlabel="subspace dimension k",
            ylabel="cosine of projected gradient",
            title=smoke_title(
                f"Figure 2 right: activation subspaces\n{f1['model']}, digits", smoke
            ),
        )
        log_ticks_at(ax, cfg["overlap_ks"])
        ax.title.set_fontsize(10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        save_figure(fig, out / "activation_overlap.png", dpi=120)
        plt.close(fig)


def summary(res: dict) -> str:
    lines = ["# guess_gradient: results\n"]
    if res.get("smoke"):
        lines.append(f"**{SMOKE_NOTE}**\n")
    f1 = res["figure1"]
    lines.append(f"## Figure 1 table ({f1['model']}, digits, backprop AdamW trajectory)\n")
    lines.append(
        "| method | cosine per layer | cosine whole model | 1-step effectiveness | test accuracy |"
    )
    lines.append("|---|---|---|---|---|")
    for m in GUESS_ORDER:
        r = res["methods"][m]
        lines.append(
            f"| {m} | {r['cosine_per_layer_mean']:.4f} | {r['cosine_whole_model_mean']:.4f} | "
            f"{r['one_step_effectiveness']:.3g} | {r['test_accuracy']:.3f} |"
        )
    lines.append("\n## Table 2 shape (final train / test accuracy)\n")
    for run in res["table2"]:
        lines.append(f"### {run['dataset']}, depth {run['depth']}, width {run['width']}\n")
        lines.append("| method | train | test |")
        lines.append("|---|---|---|")
        for m, r in run["methods"].items():
            lines.append(f"| {m} | {r['train_accuracy']:.3f} | {r['test_accuracy']:.3f} |")
        lines.append("")
    lines.append("## Bias saturation (Figure 4 left): cosine of the mean of K guesses\n")
    sat = res["bias"]["saturation"]
    counts = next(iter(sat.values()))["counts"]
    lines.append("| method | " + " | ".join(f"K={k}" for k in counts) + " |")
    lines.append("|---|" + "---|" * len(counts))
    for m, r in sat.items():
        lines.append(f"| {m} | " + " | ".join(f"{c:.3f}" for c in r["cosine"]) + " |")
    lines.append("\n## Section 5: relative bias ||(Cov(y) - I) g|| / ||g|| per layer\n")
    for m, r in res["bias"]["section5"].items():
        rb = ", ".join(f"{v:.3g}" for v in r["relative_bias_per_layer"])
        ce = ", ".join(f"{v:.3f}" for v in r["cosine_expected_per_layer"])
        lines.append(f"- {m}: relative bias [{rb}]; cosine of E[g_hat] to g [{ce}]")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("results/guess_gradient"))
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: small nets, 3 epochs (about 12 CPU-seconds measured)",
    )
    p.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1: fastest for these sizes)"
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    quick = args.quick
    cfg = {
        "batch_size": 128,
        "lr": 1e-3,
        "fig1_depth": 4 if quick else 6,
        "fig1_width": 64 if quick else 256,
        "fig1_checkpoints": 2 if quick else 8,
        "fig1_epochs_between": 1 if quick else 3,
        "fig1_repeats": 1 if quick else 3,
        "epochs": 3 if quick else 60,
        "track_every": 5,
        "configs": [(3, 64)] if quick else [(3, 128), (6, 128), (3, 512)],
        "synthetic": (3, 64) if quick else (3, 128),
        "sat_batch": 4,
        "sat_counts": [2, 8, 32] if quick else [2**k for k in range(1, 13)],
        "sat_replicas": 512,
        "bias_examples": 2 if quick else 8,
        "overlap_batch": 256,
        "overlap_ks": [1, 2, 4, 8, 16, 32],
    }
    sections = Sections("guess_gradient")
    if quick:
        print(f"guess_gradient: {SMOKE_NOTE}", flush=True)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    ds = digits()
    with sections("figure 1", "guess cosines and 1-step effectiveness along a backprop run"):
        f1 = figure1(ds, cfg, gen)
    trainer = f1.pop("_trainer")
    with sections("bias", "saturation, bias and activation-subspace overlap of the guesses"):
        bias = bias_analyses(trainer, ds, cfg, gen)
    wt_cos = f1["w_transpose"]["cosine_whole_model_mean"]
    table2 = []
    for i, (depth, width) in enumerate(cfg["configs"]):
        track = i == (1 if len(cfg["configs"]) > 1 else 0)
        extra = {}
        if track:  # section 4: matched-cosine control at W^T's measured cosine
            extra = {"matched_cosine": make_guesser("matched_cosine", cosine=max(wt_cos, 1e-3))}
        what = f"every method trained {cfg['epochs']} epochs, MLP depth {depth} width {width}"
        with sections(f"table 2 digits D{depth} W{width}", what):
            rows = train_all(ds, "digits", depth, width, cfg, track, extra)
        table2.append(
            {"dataset": "digits", "depth": depth, "width": width, "tracked": track, "methods": rows}
        )
    syn = synthetic_classification(1024, d=32, num_classes=8, n_test=512, seed=0)
    d, w = cfg["synthetic"]
    with sections(f"table 2 synthetic D{d} W{w}", f"every method trained {cfg['epochs']} epochs"):
        rows = train_all(syn, "synthetic", d, w, cfg, False, {})
    table2.append(
        {
            "dataset": "synthetic_blobs_d32_c8",
            "depth": d,
            "width": w,
            "tracked": False,
            "methods": rows,
        }
    )
    main_run = table2[0]["methods"]
    methods = {}
    for m in GUESS_ORDER:
        if m == "backprop":
            fig = {
                "cosine_per_layer_mean": 1.0,
                "cosine_whole_model_mean": 1.0,
                "one_step_effectiveness": 1.0,
            }
        else:
            fig = {k: v for k, v in f1[m].items() if not k.endswith("_trace")}
        methods[m] = {
            **fig,
            "test_accuracy": main_run[m]["test_accuracy"],
            "train_accuracy": main_run[m]["train_accuracy"],
        }
    res = {
        **run_metadata(quick=quick, seed=0),
        **({"smoke_note": SMOKE_NOTE} if quick else {}),
        "seconds_sections": sections.seconds,
        "config": cfg,
        "methods": methods,
        "figure1": f1,
        "table2": table2,
        "bias": bias,
        "seconds_total": time.perf_counter() - start,
    }
    write_text_atomic(args.out / "guess_gradient.json", json.dumps(res, indent=1, default=float))
    plots(res, args.out)
    text = summary(res)
    write_text_atomic(args.out / "guess_gradient.md", text)
    print(text)
    print_written(f"guess_gradient ({res['seconds_total']:.0f} s)", args.out)
    return res


if __name__ == "__main__":
    main()
