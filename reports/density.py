"""The spectral-density section of ``linops report``: SLQ density and XTrace trace, and a plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from scipy.sparse.linalg import LinearOperator

from estimators.density import SpectralDensity, spectral_density
from estimators.seeding import Seed
from estimators.trace import xtrace
from reports.runs import save_figure

__all__ = ["DENSITY_DECADES", "density_report", "plot_spectral_density"]


def density_report(
    A: LinearOperator,
    *,
    num_matvecs: int = 400,
    num_probes: int = 8,
    seed: Seed = 0,
    png: str | Path | None = None,
    title: str = "Hessian spectral density",
) -> dict[str, Any]:
    """Spectral density and trace estimates of a symmetric operator as a JSON-ready dict.

    Spends about half of ``num_matvecs`` on SLQ (``num_probes`` probes) and half on
    :func:`estimators.trace.xtrace`; writes the density plot to ``png`` when given. Meant for
    ``linops report`` on a ``HessianOperator``.

    Returns
    -------
    dict
        JSON-ready: the grid and density, the SLQ and XTrace trace estimates with their
        standard errors, the extreme quadrature nodes and the products used.
    """
    n = A.shape[0]
    steps = max(1, min(n, num_matvecs // (2 * num_probes)))
    sd = spectral_density(A, num_probes=num_probes, num_steps=steps, seed=seed)
    tr = xtrace(A, max(4, num_matvecs - num_probes * steps), seed=seed)
    nodes = torch.as_tensor(sd.nodes)
    report = {
        "grid": torch.as_tensor(sd.grid).tolist(),
        "density": torch.as_tensor(sd.density).tolist(),
        "sigma": sd.sigma,
        "method": f"slq ({num_probes} probes x {steps} Lanczos steps, Gaussian broadening sigma)",
        "num_probes": num_probes,
        "num_steps": steps,
        "lambda_min_estimate": float(nodes.min()),
        "lambda_max_estimate": float(nodes.max()),
        "trace_slq": sd.trace.estimate,
        "trace_slq_stderr": sd.trace.stderr,
        "trace_estimate": tr.estimate,
        "trace_stderr": tr.stderr,
        "trace_method": tr.method,
        "num_matvecs": sd.num_matvecs + tr.num_matvecs,
    }
    if png is not None:
        plot_spectral_density(sd, png, title=title)
    return report


#: decades of the density shown below its peak (the Gaussian tails fall far lower, to no purpose)
DENSITY_DECADES = 6


def plot_spectral_density(
    sd: SpectralDensity, path: str | Path, *, title: str = "spectral density"
) -> None:
    """Save the density of a :func:`estimators.spectral_density` as a PNG at ``path``.

    Log scale, as is usual for Hessian spectra, cut at :data:`DENSITY_DECADES` decades below the
    peak. The legend states the method (stochastic Lanczos quadrature, probes x steps) and the
    Gaussian broadening; ticks at the bottom mark the quadrature nodes (Ritz values).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    x = torch.as_tensor(sd.grid).detach().cpu().double().numpy()
    y = torch.as_tensor(sd.density).detach().cpu().double().numpy()
    node_grid = torch.as_tensor(sd.nodes).detach().cpu().double()
    probes, steps = node_grid.shape[0], node_grid.shape[-1]
    nodes = node_grid.numpy().ravel()
    floor = float(y.max()) * 10.0**-DENSITY_DECADES if y.max() > 0 else 1e-12
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    label = (
        f"SLQ: {probes} probes x {steps} Lanczos steps,\nGaussian broadening sigma = {sd.sigma:.3g}"
    )
    shown = np.where(y >= floor, y, np.nan)  # the curve ends at the floor, no flat segments
    ax.semilogy(x, shown, label=label)
    ax.plot(nodes, [floor * 1.5] * len(nodes), "|", color="C3", ms=8, label="quadrature nodes")
    ax.set_ylim(floor, float(y.max()) * 3 if y.max() > 0 else 1.0)
    ax.set(xlabel="eigenvalue", ylabel="density (integrates to 1)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)
