"""Reproduced: "Understanding Gradient Descent through the Training Jacobian" (anonymous
submission), the training Jacobian of an MLP on digits and its bulk (sections 3.1-3.6).

Setup (the paper's section 3): scikit-learn digits, 1600 train / 197 test (``random_state=0``),
inputs / 16; MLP 64-64-10 with GELU and LeCun-normal weights (4810 parameters); mean
cross-entropy; batch 64 in a fixed order; 25 epochs (625 steps) of SGD with momentum 0.9 and
cosine decay from 0.1. The dense 4810 x 4810 training Jacobian is built with
``TrainingJacobianOperator.to_dense`` (checkpointed, resumable), then

* 3.1 its SVD: region counts at several thresholds, cosine of left/right singular vectors;
* 3.2 linearity along a bulk direction and the top direction (stimuli 1e-3 .. 1e3);
* 3.3 KL divergence of predictions when the final parameters move along singular directions,
  on the test set, the inverted test set and white noise; parameter change per direction;
* 3.4 the parameter-function Jacobian's approximate nullspace against the bulk;
* 3.5 bulk similarity across seeds and with shuffled labels; the white-noise spectrum;
* 3.6 training restricted to bulk / chaotic / stable / complement / random subspaces.

Usage::

    python examples/training_jacobian.py [--quick] [--out DIR] [--workers 2] [--no-similarity]

Writes ``DIR/training_jacobian.json`` and ``DIR/fig*.png`` and prints the region table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from estimators.perturbation import (  # noqa: E402
    bulk_overlap,
    kl_perturbation,
    linearity_test,
    ood_inputs,
    parameter_function_jacobian,
    random_subspace_similarity,
)
from estimators.spectrum import (  # noqa: E402
    bulk_order,
    region_table,
    spectral_regions,
    svd_training_jacobian,
)
from linops import TrainingJacobianOperator  # noqa: E402
from reports.plotting import log_ticks_at  # noqa: E402
from reports.runs import (  # noqa: E402
    SMOKE_NOTE,
    Sections,
    human_bytes,
    print_written,
    run_metadata,
    save_figure,
    smoke_title,
    write_text_atomic,
)
from trainers.setups import digits_mlp_run  # noqa: E402
from trainers.subspace import SubspaceTrainer, subspace_basis  # noqa: E402

NAME = "training_jacobian"
TOLS = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5)


def dense_jacobian(setup, out: Path, tag: str, args) -> tuple[torch.Tensor, float]:
    """Build the dense training Jacobian; checkpointed under ``out`` except with ``--quick``.

    A quick run's chunks go through a temporary folder that is removed (nothing is left
    behind); a full run's stay in ``out/checkpoint_TAG`` so an interrupted run resumes.
    """
    op = TrainingJacobianOperator(setup.run, setup.theta0)
    m = op.shape[0]
    ckpt = None if args.quick else out / f"checkpoint_{tag}"
    where = "no checkpoint (--quick)" if ckpt is None else f"checkpoints in {ckpt}"
    print(f"  dense {m} x {m} training Jacobian ({tag}): {m} columns, {where}", flush=True)
    t0 = time.perf_counter()
    J = op.to_dense(
        max_vectors=args.chunk, checkpoint_dir=ckpt, progress=True, workers=args.workers
    )
    return J, time.perf_counter() - t0


def accuracy(setup, theta: torch.Tensor) -> tuple[float, float]:
    space, d = setup.run.space, setup.data
    with torch.no_grad():
        logits = space.functional_call(space.unflatten(theta), d.X_test)
        loss = float(torch.nn.functional.cross_entropy(logits, d.y_test))
        return float((logits.argmax(-1) == d.y_test).double().mean()), loss


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "results" / NAME)
    p.add_argument(
        "--quick",
        action="store_true",
        help=(
            "smoke run: width 8, 1 epoch (610 parameters, 25 steps), 4 stimuli in 3.2, 64 "
            "inputs in 3.4, no checkpoints kept"
        ),
    )
    p.add_argument(
        "--workers", type=int, default=2, help="processes building the dense Jacobian (default: 2)"
    )
    p.add_argument(
        "--chunk", type=int, default=128, help="columns of the Jacobian per pass (default: 128)"
    )
    p.add_argument(
        "--no-similarity", action="store_true", help="skip section 3.5 (three more dense Jacobians)"
    )
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    sections = Sections(NAME)
    if args.quick:
        print(f"{NAME}: {SMOKE_NOTE}", flush=True)
    cfg = {"width": 8, "epochs": 1} if args.quick else {"width": 64, "epochs": 25}
    setup = digits_mlp_run(**cfg)
    run, theta0 = setup.run, setup.theta0
    m = run.dim
    res: dict = {
        **run_metadata(quick=args.quick, seed=0),
        **({"smoke_note": SMOKE_NOTE} if args.quick else {}),
        "config": {**cfg, "dim": m, "steps": run.num_steps, "dtype": "float32"},
        "model": (
            f"GELU MLP 64-{cfg['width']}-10 ({m} parameters), LeCun-normal init (seed 0), "
            f"SGD momentum 0.9, cosine decay from 0.1, batch 64 in a fixed order, "
            f"{cfg['epochs']} epoch(s) = {run.num_steps} steps, on digits (1600 / 197)"
        ),
    }

    # ---------------------------------------------------------------- 3.1 spectrum
    sections.step("3.1 spectrum", "dense training Jacobian and its SVD")
    J, res["seconds_dense_jacobian"] = dense_jacobian(setup, args.out, "seed0", args)
    t0 = time.perf_counter()
    svd = svd_training_jacobian(J)
    res["seconds_svd"] = time.perf_counter() - t0
    s, U, V, cos = svd
    thetaT = run.trajectory(theta0).final
    res["test_accuracy"], res["test_loss"] = accuracy(setup, thetaT)
    res["singular_values"] = s.tolist()
    res["left_right_cosine"] = cos.tolist()
    res["region_table"] = [r._asdict() for r in region_table(s, TOLS)]
    res["regions"] = spectral_regions(s)._asdict()
    order = bulk_order(s)
    bulk = (s - 1).abs() <= 1e-3
    res["mean_cosine_bulk"] = float(cos[bulk].mean()) if bulk.any() else float("nan")
    res["mean_cosine_chaotic"] = float(cos[s > 1.1].mean())
    res["mean_cosine_stable"] = float(cos[s < 0.9].mean())

    # ---------------------------------------------------------------- 3.2 linearity
    sections.step("3.2 linearity", "response to stimuli along a bulk and the top direction")
    g = torch.Generator().manual_seed(0)
    ib = int(order[torch.randint(0, max(1, int(bulk.sum())), (1,), generator=g)])
    res["linearity"] = {}
    for label, i in (("bulk", ib), ("top", 0)):
        lin = linearity_test(
            run,
            theta0,
            U[:, i].float(),
            V[:, i].float(),
            float(s[i]),
            final=thetaT,
            stimuli=np.logspace(-3, 3, 4 if args.quick else 13),
        )
        res["linearity"][label] = {
            "index": i,
            "sigma": float(s[i]),
            **{k: np.asarray(v).tolist() for k, v in lin._asdict().items()},
        }

    # ---------------------------------------------------------------- 3.3 does the bulk matter?
    sections.step("3.3 KL", "predictions moved along chaotic / bulk / stable directions")
    k = 20 if args.quick else 100
    groups = {"chaotic": torch.arange(k), "bulk": order[:k], "stable": torch.arange(m - k, m)}
    sets = ood_inputs(setup.data.X_test, seed=1)
    res["kl"] = {
        name: {
            grp: kl_perturbation(run.space, thetaT, U[:, idx].float(), X).tolist()
            for grp, idx in groups.items()
        }
        for name, X in sets._asdict().items()
    }
    change = (V.T.float() @ (thetaT - theta0)).abs()
    res["parameter_change"] = {grp: change[idx].tolist() for grp, idx in groups.items()}

    # ---------------------------------------------------------------- 3.4 parameter-function Jacobian
    sections.step("3.4 parameter-function Jacobian", "its nullspace against the bulk")
    ks = sorted({int(x) for x in np.linspace(max(1, m // 40), m, 20)})
    res["pfj"] = {"k": ks}
    Vb = V[:, order]
    for name in ("test", "noise"):
        inputs = getattr(sets, name)[: 64 if args.quick else None].double()
        P = parameter_function_jacobian(run.space, theta0.double(), inputs)
        _, sp, Vh = torch.linalg.svd(P, full_matrices=True)
        null = Vh.T.flip(1)  # ascending singular value (the exact nullspace first)
        res["pfj"][name] = {
            "singular_values": sp.tolist(),
            "overlap": bulk_overlap(null, Vb, ks).tolist(),
        }
    res["pfj"]["random"] = random_subspace_similarity(Vb, ks, seed=2).tolist()

    # ---------------------------------------------------------------- 3.5 seeds, labels, noise
    if not args.no_similarity:
        sections.step("3.5 similarity", "three more dense Jacobians: seed 1, shuffled, noise")
        res["similarity"] = {"k": ks, "random": res["pfj"]["random"]}
        variants = {
            "seed1": digits_mlp_run(seed=1, **cfg),
            "shuffled_labels": digits_mlp_run(shuffle_labels=True, **cfg),
            "white_noise": digits_mlp_run(white_noise=True, **cfg),
        }
        for tag, other in variants.items():
            J2, sec = dense_jacobian(other, args.out, tag, args)
            if tag != "white_noise":
                s2, _, V2, _ = svd_training_jacobian(J2)
            else:
                s2 = torch.linalg.svdvals(J2.double())
            entry = {
                "seconds_dense_jacobian": sec,
                "region_table": [r._asdict() for r in region_table(s2, TOLS)],
            }
            if tag != "white_noise":
                entry["overlap"] = bulk_overlap(V2[:, bulk_order(s2)], Vb, ks).tolist()
            else:
                entry["singular_values"] = s2.tolist()
            res["similarity"][tag] = entry
            del J2

    # ---------------------------------------------------------------- 3.6 subspace training
    sections.step("3.6 subspace training", "training restricted to 5 kinds of subspace")
    sub_ks = [20, 100] if args.quick else [100, 300, 1000, 2000, 3000, 4000]
    res["subspace"] = {"k": sub_ks}
    X, y = setup.data.X_train, setup.data.y_train
    for kind in ("bulk", "chaotic", "stable", "complement", "random"):
        rows = []
        for kk in tqdm(sub_ks, desc=f"3.6 {kind} subspaces", unit="subspace", leave=False):
            Pk = subspace_basis(kind, kk, sigma=s, vectors=V, dim=m, seed=3).float()
            tr = SubspaceTrainer(
                setup.model,
                torch.nn.functional.cross_entropy,
                Pk,
                theta0=theta0,
                lr=run.schedule,
                momentum=0.9,
            )
            tr.fit(X, y, epochs=cfg["epochs"], batch_size=64, shuffle=False, progress=False)
            acc, loss = accuracy(setup, tr.theta().detach())
            rows.append(
                {
                    "k": kk,
                    "test_accuracy": acc,
                    "test_loss": loss,
                    "train_loss": tr.history.metrics["train_loss"][-1],
                }
            )
        res["subspace"][kind] = rows
    res["subspace"]["full"] = {"test_accuracy": res["test_accuracy"], "test_loss": res["test_loss"]}
    sections.end()
    res["seconds_sections"] = sections.seconds

    write_text_atomic(args.out / f"{NAME}.json", json.dumps(res))
    plot(res, args.out)
    summary(res)
    checkpoints = sorted(args.out.glob("checkpoint_*"))
    if checkpoints:
        size = sum(f.stat().st_size for c in checkpoints for f in c.rglob("*") if f.is_file())
        print(
            f"{NAME}: the dense Jacobians' checkpoints ({human_bytes(size)}) stay in "
            f"{args.out}/checkpoint_* so a rerun resumes; delete them when done"
        )
    print_written(NAME, args.out)
    return res


def plot(res: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = np.asarray(res["singular_values"])
    fig, ax = plt.subplots(1, 2, figsize=(11, 3.8))
    ax[0].semilogy(s)
    ax[0].axhline(1.0, color="k", ls="--", lw=0.8)
    ax[0].set(
        xlabel="index", ylabel="singular value", title="Fig. 1a: spectrum of the training Jacobian"
    )
    ax[1].plot(res["left_right_cosine"], ".", ms=1)
    ax[1].set(xlabel="index", ylabel=r"$u_i^\top v_i$", title="Fig. 1b: left/right cosine")
    _save(fig, res, out / "fig1_spectrum.png")

    fig, ax = plt.subplots(1, 2, figsize=(11, 3.8))
    for a, (label, r) in zip(ax, res["linearity"].items(), strict=True):
        lam = np.asarray(r["stimulus"])
        a.loglog(lam, np.abs(r["response"]), "o-", label=r"$|u_i^\top\delta|$")
        a.loglog(lam, r["orthogonal"], "s-", label=r"$\|\delta_\perp\|$")
        a.loglog(lam, np.abs(r["predicted"]), "k--", label=r"$\lambda\sigma_i$")
        a.set(
            xlabel=r"stimulus $\lambda$",
            title=f"Fig. 2: {label} direction (sigma={r['sigma']:.4g})",
        )
        a.legend()
    _save(fig, res, out / "fig2_linearity.png")

    fig, ax = plt.subplots(1, 4, figsize=(16, 3.6))
    for a, name in zip(ax[:3], ("test", "inverted", "noise"), strict=True):
        a.boxplot(
            [res["kl"][name][g] for g in ("chaotic", "bulk", "stable")],
            tick_labels=["chaotic", "bulk", "stable"],
        )
        a.set(yscale="log", title=f"Fig. 3: KL on {name} inputs")
    ax[3].boxplot(
        [res["parameter_change"][g] for g in ("chaotic", "bulk", "stable")],
        tick_labels=["chaotic", "bulk", "stable"],
    )
    ax[3].set(yscale="log", title=r"Fig. 3c: $|v_i^\top(\theta_T - \theta_0)|$")
    _save(fig, res, out / "fig3_kl.png")

    pf = res["pfj"]
    fig, ax = plt.subplots(1, 2, figsize=(11, 3.8))
    for name in ("test", "noise"):
        ax[0].semilogy(pf[name]["singular_values"], label=name)
        ax[1].plot(pf["k"], pf[name]["overlap"], "o-", label=f"PFJ nullspace ({name})")
    ax[1].plot(pf["k"], pf["random"], "k--", label="random subspace")
    ax[0].set(title="Fig. 4a: PFJ singular values", xlabel="index")
    ax[1].set(
        title="Fig. 4b: overlap with the bulk at k", xlabel="k", ylabel="mean cos principal angles"
    )
    ax[0].legend()
    ax[1].legend()
    _save(fig, res, out / "fig4_pfj.png")

    if "similarity" in res:
        sim = res["similarity"]
        fig, ax = plt.subplots(1, 2, figsize=(11, 3.8))
        for tag in ("seed1", "shuffled_labels"):
            ax[0].plot(sim["k"], sim[tag]["overlap"], "o-", label=tag)
        ax[0].plot(sim["k"], sim["random"], "k--", label="random subspace")
        ax[0].set(
            title="Fig. 5a: bulk similarity at k", xlabel="k", ylabel="mean cos principal angles"
        )
        ax[0].legend()
        ax[1].semilogy(np.abs(np.asarray(res["singular_values"]) - 1), label="digits")
        ax[1].semilogy(
            np.abs(np.asarray(sim["white_noise"]["singular_values"]) - 1), label="white noise"
        )
        ax[1].set(title=r"Fig. 5b: $|\sigma_i - 1|$", xlabel="index")
        ax[1].legend()
        _save(fig, res, out / "fig5_similarity.png")

    sub = res["subspace"]
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for kind in ("bulk", "chaotic", "stable", "complement", "random"):
        ax.plot(sub["k"], [r["test_loss"] for r in sub[kind]], "o-", label=kind)
    ax.axhline(sub["full"]["test_loss"], color="k", ls="--", label="full training")
    ax.set(
        xlabel="subspace dimension k",
        ylabel="test loss",
        yscale="log",
        title="Fig. 6: training in a subspace",
    )
    log_ticks_at(ax, sub["k"])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, res, out / "fig6_subspace.png")


def _save(fig, res: dict, path: Path) -> None:
    c = res["config"]
    title = (
        f"Training Jacobian of a GELU MLP 64-{c['width']}-10 on digits ({c['dim']} params, "
        f"{c['steps']} SGD steps)"
    )
    if fig.get_figwidth() < 9:  # a narrow figure: two lines, or the title is cut
        title = title.replace(" on digits", "\non digits")
    fig.suptitle(smoke_title(title, bool(res.get("smoke"))), fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)


def summary(res: dict) -> None:
    c = res["config"]
    print(
        f"training Jacobian {c['dim']} x {c['dim']}, {c['steps']} steps: dense {res['seconds_dense_jacobian']:.0f} s, SVD {res['seconds_svd']:.0f} s"
    )
    print(f"test accuracy {res['test_accuracy']:.4f}")
    print(
        f"{'tol':>8s} {'chaotic':>8s} {'bulk':>8s} {'stable':>8s}   (sigma > 1+tol, |sigma-1| <= tol, sigma < 1-tol)"
    )
    for r in res["region_table"]:
        print(f"{r['threshold']:8.0e} {r['chaotic']:8d} {r['bulk']:8d} {r['stable']:8d}")
    print(
        f"mean cos(u_i, v_i): bulk(1e-3) {res['mean_cosine_bulk']:.4f}, chaotic(>1.1) {res['mean_cosine_chaotic']:.3f}, "
        f"stable(<0.9) {res['mean_cosine_stable']:.3f}"
    )


if __name__ == "__main__":
    main()
