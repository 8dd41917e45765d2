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
from trainers.setups import digits_mlp_run

__all__ = ["plot_training_jacobian_report", "training_jacobian_report"]


def training_jacobian_report(quick: bool = True, *, workers: int = 1) -> dict[str, Any]:
    r"""Run a small training-Jacobian study for ``linops report``: JSON-ready numbers.

    ``quick=True``: the paper's setup (:func:`trainers.setups.digits_mlp_run`) shrunk to a hidden width of 16 and 2 epochs (1210
    parameters, 50 steps; a few seconds). ``quick=False``: the full 4810-parameter, 625-step
    run (minutes). Returns the dense-build time, the spectrum, region counts at several
    thresholds, left/right cosines, test accuracy and a matrix-free
    :math:`\operatorname{rank}(J - I)` (block Krylov, half the products of a dense build)
    against the dense count.

    Examples
    --------
    >>> r = training_jacobian_report()  # doctest: +SKIP
    >>> sorted(r)[:3]  # doctest: +SKIP
    ['dim', 'left_right_cosine', 'mean_cosine_bulk']
    """
    setup = digits_mlp_run(width=16, epochs=2) if quick else digits_mlp_run()
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
    return {
        "dim": setup.run.dim,
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


def plot_training_jacobian_report(result: Mapping[str, Any], path: str | Path) -> Path:
    """Figure of a :func:`training_jacobian_report`: spectrum (the paper's figure 1a) and cosines (1b).

    Returns
    -------
    Path
        ``path``, where the PNG was written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    ax[0].semilogy(result["singular_values"])
    ax[0].axhline(1.0, color="k", ls="--", lw=0.8)
    ax[0].set(
        xlabel="index", ylabel="singular value", title=f"training Jacobian ({result['dim']} params)"
    )
    ax[1].plot(result["left_right_cosine"], ".", ms=2)
    ax[1].set(xlabel="index", ylabel=r"$u_i^\top v_i$", title="left/right singular vector cosine")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
