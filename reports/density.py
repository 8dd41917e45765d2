"""The spectral-density section of ``linops report``: SLQ density and XTrace trace, and a plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from estimators.density import SpectralDensity, spectral_density
from estimators.seeding import Seed
from estimators.trace import xtrace

__all__ = ["density_report", "plot_spectral_density"]


def density_report(
    A: Any,
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


def plot_spectral_density(
    sd: SpectralDensity, path: str | Path, *, title: str = "spectral density"
) -> None:
    """Save the density of a :func:`estimators.spectral_density` as a PNG at ``path``.

    Log scale, as is usual for Hessian spectra.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x, y = torch.as_tensor(sd.grid).cpu(), torch.as_tensor(sd.density).cpu()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.semilogy(x.numpy(), (y.clamp(min=1e-12)).numpy())
    ax.set(xlabel="eigenvalue", ylabel="density", title=title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
