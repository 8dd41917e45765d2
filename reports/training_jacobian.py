r"""The training-Jacobian section of ``linops report``: JSON-ready numbers and a figure.

Reproduces, at a small scale, the spectrum analysis of "Understanding Gradient Descent through
the Training Jacobian" (an anonymous submission under double-blind review; no arXiv id given)
with :mod:`estimators.spectrum` and :mod:`estimators.dimension`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from estimators.dimension import training_dimension, training_dimension_dense
from estimators.spectrum import region_table, svd_training_jacobian
from linops import TrainingJacobianOperator
from reports.runs import save_figure
from trainers.setups import digits_mlp_run

__all__ = ["plot_training_jacobian_report", "training_jacobian_report"]


def training_jacobian_report(
    quick: bool = True,
    *,
    width: int | None = None,
    epochs: int | None = None,
    seed: int = 0,
    workers: int = 1,
) -> dict[str, Any]:
    r"""Run a small training-Jacobian study for ``linops report``: JSON-ready numbers.

    ``quick=True``: the paper's setup (:func:`trainers.setups.digits_mlp_run`) shrunk to a hidden
    width of 16 and 2 epochs (1210 parameters, 50 steps; a few seconds). ``quick=False``: the
    full 4810-parameter, 625-step run (minutes). ``width`` and ``epochs``, when given, replace
    the chosen run's. Returns the dense-build time, the spectrum, region counts at several
    thresholds, left/right cosines, test accuracy and a matrix-free
    :math:`\operatorname{rank}(J - I)` (block Krylov, half the products of a dense build)
    against the dense count, and under ``models`` / ``datasets`` a description of the model
    and data it used.

    Examples
    --------
    >>> r = training_jacobian_report()  # doctest: +SKIP
    >>> sorted(r)[:3]  # doctest: +SKIP
    ['datasets', 'dim', 'left_right_cosine']
    """
    width = width if width is not None else (16 if quick else 64)
    epochs = epochs if epochs is not None else (2 if quick else 25)
    setup = digits_mlp_run(width=width, epochs=epochs, seed=seed)
    op = TrainingJacobianOperator(setup.run, setup.theta0)
    t0 = time.perf_counter()
    J = op.to_dense(workers=workers)
    seconds = time.perf_counter() - t0
    res = svd_training_jacobian(J)
    s, cos = res.singular_values, res.cosine
    space, data = setup.run.space, setup.data
    with torch.no_grad():
        logits = space.functional_call(space.unflatten(op.final_params()), data.X_test)
    taus = [2.0, 3.0]
    dim = training_dimension(TrainingJacobianOperator(setup.run, setup.theta0), taus)
    dense_rank = [training_dimension_dense(J, t) for t in taus]
    bulk = (s - 1).abs() <= 1e-3
    model = {
        "architecture": f"MLP 64-{width}-10 (one hidden layer of {width}), GELU",
        "num_parameters": setup.run.dim,
        "initialisation": f"LeCun normal weights, zero biases (seed {seed})",
        "training": (
            f"functional SGD, momentum 0.9, cosine decay from 0.1, batch 64 in a fixed order, "
            f"{epochs} epoch(s) = {setup.run.num_steps} steps, mean cross-entropy"
        ),
        "dataset": "digits_paper_split",
        "used_by": ["training_jacobian"],
    }
    dataset = {
        "source": "scikit-learn load_digits: 1797 8x8 grey images of the digits 0-9",
        "inputs": "flattened to 64 values, divided by 16 (range [0, 1])",
        "num_train": len(data.X_train),
        "num_test": len(data.X_test),
        "split": "train_test_split(random_state=0), the paper's 1600 / 197 split",
    }
    return {
        "models": {"training_jacobian": model},
        "datasets": {"digits_paper_split": dataset},
        "dim": setup.run.dim,
        "width": width,
        "epochs": epochs,
        "steps": setup.run.num_steps,
        "seconds_dense_jacobian": seconds,
        "test_accuracy": float((logits.argmax(-1) == data.y_test).double().mean()),
        "singular_values": s.tolist(),
        "left_right_cosine": cos.tolist(),
        "region_table": [
            {"tol": r.threshold, "chaotic": r.chaotic, "bulk": r.bulk, "stable": r.stable}
            for r in region_table(s)
        ],
        "mean_cosine_bulk": float(cos[bulk].mean()) if bool(bulk.any()) else float("nan"),
        "rank_thresholds": taus,
        "rank_dense": dense_rank,
        "rank_matrix_free": [int((dim.singular_values > t).sum()) for t in taus],
        "products_matrix_free": dim.num_matvecs,
    }


def plot_training_jacobian_report(
    result: Mapping[str, Any], path: str | Path, *, smoke: bool = False
) -> Path:
    """Figure of a :func:`training_jacobian_report`: spectrum (the paper's figure 1a) and cosines (1b).

    The title names the model (width, parameters, steps); ``smoke`` marks it as a smoke run.

    Returns
    -------
    Path
        ``path``, where the PNG was written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from reports.runs import smoke_title

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.8))
    s = result["singular_values"]
    index = range(1, len(s) + 1)
    ax[0].semilogy(index, s)
    ax[0].axhline(1.0, color="k", ls="--", lw=0.8, label="sigma = 1 (bulk)")
    ax[0].set(xlabel="index i", ylabel="singular value sigma_i", title="spectrum (fig. 1a)")
    ax[0].legend(fontsize=8)
    ax[1].plot(index, result["left_right_cosine"], ".", ms=2)
    ax[1].set(xlabel="index i", ylabel=r"$u_i^\top v_i$", title="left/right cosine (fig. 1b)")
    width = result.get("width")
    what = f"MLP 64-{width}-10 on digits, " if width is not None else ""
    title = (
        f"Training Jacobian of {what}{result['dim']} params, "
        f"{result['steps']} SGD steps ({result.get('epochs', '?')} epoch(s))"
    )
    fig.suptitle(smoke_title(title, smoke), fontsize=10)
    fig.tight_layout()
    path = Path(path)
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path
