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
from trainers.data import digits
from trainers.models import MLP

NAME = "reference_rank"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("results") / NAME)
    ap.add_argument("--quick", action="store_true", help="small smoke run")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    n = 200 if args.quick else 1600
    X = digits(n_train=n if n < 1797 else 1600).X_train[:n]
    widths = {"small": 40, "large": 120} if args.quick else {"small": 155, "large": 376}
    sizes = [16, 64, 256] if args.quick else [25, 50, 100, 200, 400, 800, 1600, 3200]
    out: dict = {"num_samples": n, "output_index": 0, "reference_sizes": sizes, "networks": {}}
    for name, h in widths.items():
        net = MLP(64, 10, (h, h), activation="tanh", seed=torch.Generator().manual_seed(0))
        m = sum(p.numel() for p in net.parameters())
        order = torch.randperm(m, generator=torch.Generator().manual_seed(1))[: sizes[-1]]
        t0 = time.perf_counter()
        A = reference_jacobian(net, X, order, output_index=0, method="vjp")
        paper, svd = [], []
        for r in tqdm(sizes, desc=f"{name} ranks", leave=False):
            paper.append(reference_rank(A[:, :r], center=True))
            svd.append(reference_rank(A[:, :r], rule="svd", center=True))
        t_ref = time.perf_counter() - t0
        t0 = time.perf_counter()
        exact = exact_jacobian_rank(net, X, output_index=0, center=True)
        exact_paper_rule = exact_jacobian_rank(
            net, X, output_index=0, center=True, rtol=(m * torch.finfo(torch.float32).eps) ** 0.5
        )
        t_exact = time.perf_counter() - t0
        out["networks"][name] = {
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
    (args.out / f"{NAME}.json").write_text(json.dumps(out, indent=2))
    _plot(out, args.out)
    _table(out)


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
        xscale="log",
        xlabel="reference-set size r",
        ylabel="rank / model size",
        title="Fig. 2, low rank in the lazy regime (dotted: full Jacobian)",
    )
    axes[1].plot(
        sizes, [min(s, out["num_samples"]) for s in sizes], "k-", lw=0.8, label="min(n, r)"
    )
    axes[1].set(
        xscale="log",
        yscale="log",
        xlabel="reference-set size r",
        ylabel="numerical rank",
        title=f"output 0, n = {out['num_samples']}",
    )
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / f"{NAME}.png", dpi=120)


def _table(out: dict) -> None:
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
