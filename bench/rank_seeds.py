"""Spread of the matrix-free rank(J - I) count over estimator seeds, against the dense count.

Runs :func:`estimators.counting.singular_value_count` on ``J - I`` (a dense matrix, so each run
takes seconds) with the budget of ``bench/training_jacobian.py`` (``m // 2`` products per
threshold) for several seeds and reports mean, spread and worst relative error per threshold.
``J`` is a ``.npy`` file or a ``linops`` column-checkpoint directory (``examples/
training_jacobian.py`` leaves one per training run under ``results/training_jacobian/``).

Usage::

    python bench/rank_seeds.py [J.npy | checkpoint_dir ...] [--seeds 10] [--smoothing 0.1]
        [--out DIR]   # writes DIR/rank_seeds.json (default results/rank_seeds)
    python bench/rank_seeds.py --quick   # synthetic 600 x 600 matrix, for smoke tests
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/_harness.py

from _harness import markdown_table, parser, write_json, write_markdown  # noqa: E402

from estimators.counting import singular_value_count  # noqa: E402
from linops.testing import with_singular_values  # noqa: E402


def load(path: Path) -> np.ndarray:
    if path.is_dir():
        files = sorted(path.glob("cols_*.npy"))
        if not files:
            raise FileNotFoundError(f"{path}: no cols_*.npy column files")
        return np.concatenate([np.load(f) for f in files], axis=1)
    return np.load(path)


def synthetic(n: int = 600) -> np.ndarray:
    s = torch.logspace(1, -3, n, dtype=torch.float64)
    return (with_singular_values(s) + torch.eye(n, dtype=torch.float64)).numpy()


def study(J: np.ndarray, taus: list[float], seeds: int, smoothing: float) -> dict:
    A = torch.from_numpy(J.astype(np.float64)) - torch.eye(J.shape[0], dtype=torch.float64)
    s = torch.linalg.svdvals(A)
    dense = np.array([int((s > t).sum()) for t in taus])
    errs, products = [], 0
    for seed in range(seeds):
        res = singular_value_count(A, taus, A.shape[0] // 2, smoothing=smoothing, seed=seed)
        errs.append((res.counts.numpy() - dense) / np.maximum(dense, 1))
        products = res.num_matvecs
    E = np.array(errs)
    return {
        "thresholds": taus,
        "dense": dense.tolist(),
        "products_per_threshold": products,
        "mean_error": E.mean(0).tolist(),
        "sd_error": E.std(0).tolist(),
        "max_abs_error": np.abs(E).max(0).tolist(),
        "within_2_percent": (np.abs(E) <= 0.02).sum(0).tolist(),
        "seeds": seeds,
        "smoothing": smoothing,
    }


def main() -> None:
    p = parser(__doc__, ROOT / "results" / "rank_seeds")
    p.add_argument("matrices", type=Path, nargs="*")
    p.add_argument("--thresholds", type=float, nargs="+", default=[3.0, 2.0, 1.0, 0.5])
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--smoothing", type=float, default=0.1)
    args = p.parse_args()
    torch.set_num_threads(2)
    if args.quick:
        runs = {"synthetic": synthetic()}
        args.seeds = 2
    else:
        paths = args.matrices or [ROOT / "results" / "bench_training_jacobian" / "J_linops.npy"]
        runs = {str(path): load(path) for path in paths}
    results, parts = {}, []
    for name, J in runs.items():
        r = study(J, args.thresholds, args.seeds, args.smoothing)
        results[name] = r
        parts.append(
            f"## {name}: m = {J.shape[0]}, {r['products_per_threshold']} products per threshold"
        )
        parts.append(
            markdown_table(
                ["tau", "dense", "mean error", "sd", "max", "within 2%"],
                [
                    (
                        f"{t:g}",
                        r["dense"][i],
                        f"{100 * r['mean_error'][i]:+.2f}%",
                        f"{100 * r['sd_error'][i]:.2f}%",
                        f"{100 * r['max_abs_error'][i]:.2f}%",
                        f"{r['within_2_percent'][i]}/{r['seeds']}",
                    )
                    for i, t in enumerate(r["thresholds"])
                ],
            )
        )
    write_json(args.out, "rank_seeds", results)
    write_markdown(
        args.out, "rank_seeds", "bench/rank_seeds.py: numerical rank over seeds", "\n\n".join(parts)
    )


if __name__ == "__main__":
    main()
