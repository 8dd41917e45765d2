"""Figure 2 of "Leveraging Low Rank Structure in the Lazy Regime" (anonymous ICLR 2025 submission): reference-set Jacobian rank against reference-set size, on digits.

Two tanh MLPs (two hidden layers of 155 and 376 units: 35,815 and 169,962 parameters) at
initialisation, output unit 0, row-centred reference matrices ``[J~]_{:, 0, R}`` of size
``n x r`` for nested random reference sets R. For each r: the effective numerical rank with the
paper's threshold (Gram eigenvalues above ``r eps lambda_1``) and with the SVD rule
(``sigma_i > max(n, r) eps sigma_1``), the rank-to-model-size ratio of the paper and the
rank-to-reference-size ratio; and the exact numerical rank of the full centred ``n x m``
Jacobian for comparison.

Usage: ``python examples/reference_rank.py [--out DIR] [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from estimators.jacobian_rank import exact_jacobian_rank
from estimators.reference import reference_jacobian, reference_rank
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
from trainers.data import digits
from trainers.models import MLP

NAME = "reference_rank"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("results") / NAME)
    ap.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: widths 40/120, 200 samples (about 10-16 CPU-seconds measured)",
    )
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    sections = Sections(NAME)
    if args.quick:
        print(f"{NAME}: {SMOKE_NOTE}", flush=True)
    torch.manual_seed(0)
    n = 200 if args.quick else 1600
    X = digits(n_train=n if n < 1797 else 1600).X_train[:n]
    widths = {"small": 40, "large": 120} if args.quick else {"small": 155, "large": 376}
    sizes = [16, 64, 256] if args.quick else [25, 50, 100, 200, 400, 800, 1600, 3200]
    out: dict = {
        **run_metadata(quick=args.quick, seed=0),
        **({"smoke_note": SMOKE_NOTE} if args.quick else {}),
        "num_samples": n,
        "output_index": 0,
        "reference_sizes": sizes,
        "networks": {},
    }
    for name, h in widths.items():
        with sections(f"{name} network", f"tanh MLP 64-{h}-{h}-10, reference ranks and exact rank"):
            out["networks"][name] = _network(name, h, X, sizes)
    out["seconds_sections"] = sections.seconds
    write_text_atomic(args.out / f"{NAME}.json", json.dumps(out, indent=2))
    _plot(out, args.out)
    _table(out)
    print_written(NAME, args.out)


def _network(name: str, h: int, X: torch.Tensor, sizes: list[int]) -> dict:
    net = MLP(64, 10, (h, h), activation="tanh", seed=torch.Generator().manual_seed(0))
    m = sum(p.numel() for p in net.parameters())
    order = torch.randperm(m, generator=torch.Generator().manual_seed(1))[: sizes[-1]]
    t0 = time.perf_counter()
    A = reference_jacobian(net, X, order, output_index=0, method="vjp")
    paper, svd = [], []
    for r in tqdm(sizes, desc=f"{name}: rank at each reference size", unit="size", leave=False):
        paper.append(reference_rank(A[:, :r], center=True))
        svd.append(reference_rank(A[:, :r], rule="svd", center=True))
    t_ref = time.perf_counter() - t0
    t0 = time.perf_counter()
    exact = exact_jacobian_rank(net, X, output_index=0, center=True)
    exact_paper_rule = exact_jacobian_rank(
        net, X, output_index=0, center=True, rtol=(m * torch.finfo(torch.float32).eps) ** 0.5
    )
    t_exact = time.perf_counter() - t0
    return {
        "hidden_width": h,
        "num_parameters": m,
        "rank_paper_rule": paper,
        "rank_svd_rule": svd,
        "rank_to_model_size_paper_rule": [k / m for k in paper],
        "rank_to_reference_size_paper_rule": [k / r for k, r in zip(paper, sizes, strict=True)],
        "exact_rank_svd_rule": exact,
        "exact_rank_paper_rule": exact_paper_rule,
        "seconds_reference": t_ref,
        "seconds_exact": t_exact,
    }


def _plot(out: dict, folder: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    sizes = out["reference_sizes"]
    for (name, res), c in zip(out["networks"].items(), ["C0", "C1"], strict=False):
        lab = f"{name} ({res['num_parameters']:,} params)"
        axes[0].plot(sizes, res["rank_to_model_size_paper_rule"], "o-", color=c, label=lab)
        axes[0].axhline(res["exact_rank_paper_rule"] / res["num_parameters"], color=c, ls=":")
        axes[1].plot(sizes, res["rank_paper_rule"], "o-", color=c, label=f"{lab}, paper rule")
        axes[1].plot(sizes, res["rank_svd_rule"], "s--", color=c, label=f"{lab}, SVD rule")
        axes[1].axhline(res["exact_rank_svd_rule"], color=c, ls=":", label=f"{name}: exact rank")
    axes[0].set(
        xlabel="reference-set size r",
        ylabel="rank / model size",
        title="rank / model size (dotted: full Jacobian)",
    )
    axes[1].plot(
        sizes, [min(s, out["num_samples"]) for s in sizes], "k-", lw=0.8, label="min(n, r)"
    )
    axes[1].set(xlabel="reference-set size r", ylabel="numerical rank", title="numerical rank")
    ranks = [
        v
        for res in out["networks"].values()
        for v in (*res["rank_paper_rule"], *res["rank_svd_rule"], res["exact_rank_svd_rule"])
    ]
    log_ticks_at(axes[1], _few(ranks), axis="y")
    for ax in axes:
        log_ticks_at(ax, sizes)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    nets = ", ".join(f"{r['hidden_width']}" for r in out["networks"].values())
    title = (
        f"Fig. 2 (low rank in the lazy regime): tanh MLPs 64-h-h-10 (h = {nets}) at "
        f"initialisation, digits, output 0, n = {out['num_samples']}"
    )
    fig.suptitle(smoke_title(title, out.get("smoke", False)), fontsize=10)
    fig.tight_layout()
    save_figure(fig, folder / f"{NAME}.png", dpi=120)
    plt.close(fig)


def _few(values: list[int]) -> list[int]:
    """The 1-2-5 series (10, 20, 50, 100, ...) over the range of ``values``: log labels that read."""
    lo, hi = min(v for v in values if v > 0), max(values)
    series = [k * 10**e for e in range(7) for k in (1, 2, 5)]
    inside = [v for v in series if lo <= v <= hi]
    return inside if len(inside) >= 2 else [lo, hi]


def _table(out: dict) -> None:
    if out.get("smoke"):
        print(SMOKE_NOTE)
    print(
        f"{'net':>6} {'m':>7} "
        + " ".join(f"r={s:>5}" for s in out["reference_sizes"])
        + "  exact(svd/paper)"
    )
    for name, res in out["networks"].items():
        ranks = " ".join(f"{k:>7}" for k in res["rank_paper_rule"])
        print(
            f"{name:>6} {res['num_parameters']:>7} {ranks}  "
            f"{res['exact_rank_svd_rule']}/{res['exact_rank_paper_rule']}"
        )
        svd = " ".join(f"{k:>7}" for k in res["rank_svd_rule"])
        print(f"{'(svd)':>6} {'':>7} {svd}")


if __name__ == "__main__":
    main()
