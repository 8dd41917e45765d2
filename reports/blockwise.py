"""The figure of :func:`estimators.blockwise_spectra`: every block's Hessian density on one plot."""

from __future__ import annotations

import textwrap
from pathlib import Path

import torch

from estimators.blockwise import BlockwiseSpectra

__all__ = ["plot_blockwise_spectra"]

#: decades of density shown below the highest block's peak
DENSITY_DECADES = 6


def plot_blockwise_spectra(
    res: BlockwiseSpectra, path: str | Path, *, model: str, max_blocks: int = 12
) -> None:
    r"""Save the block densities of a :func:`estimators.blockwise_spectra` result as a PNG.

    One curve per block (the first ``max_blocks``), all on the result's common grid and
    broadening, so the curves compare the spectra themselves. The eigenvalue axis is
    symmetric-logarithmic (linear within the broadening ``sigma`` of zero, logarithmic beyond:
    Hessian blocks differ by orders of magnitude in scale), the density axis logarithmic,
    cut at :data:`DENSITY_DECADES` decades below the highest peak. A tick above each curve's
    colour marks the block's largest eigenvalue (when computed). The title names the model and
    gives the averaged Jensen-Shannon distance :math:`\mathrm{JS}_0` (arXiv:2402.16788).

    Parameters
    ----------
    res
        The result to plot.
    path
        Where to write the PNG.
    model
        The model's name, stated in the title (``"GPT-2 small, 2 x 128 tokens"``).
    max_blocks
        Most blocks drawn (a per-layer split of a large model has hundreds).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    x = torch.as_tensor(res.grid).detach().cpu().double().numpy()
    items = list(res.blocks.items())[:max_blocks]
    peak = max(float(torch.as_tensor(b.density).max()) for _, b in items)
    floor = peak * 10.0**-DENSITY_DECADES if peak > 0 else 1e-12
    fig, ax = plt.subplots(figsize=(9.0, 4.8))
    for i, (name, b) in enumerate(items):
        y = torch.as_tensor(b.density).detach().cpu().double().numpy()
        shown = np.where(y >= floor, y, np.nan)
        label = f"{name} ({b.dim:,} params)"
        ax.plot(x, shown, color=f"C{i % 10}", lw=1.3, label=label)
        if len(b.eigenvalues):
            ax.plot([float(b.eigenvalues.max())], [peak * 2], "v", color=f"C{i % 10}", ms=5)
    ax.set_yscale("log")
    ax.set_xscale("symlog", linthresh=max(res.sigma, 1e-12))
    ax.set_ylim(floor, peak * 4)
    ax.set(xlabel="eigenvalue of the diagonal block (symlog)", ylabel="density (log)")
    probes, steps = next(iter(res.blocks.values())).nodes.shape
    title = textwrap.fill(f"Blockwise Hessian spectra of {model}", 90)
    ax.set_title(
        f"{title}\nSLQ {probes} probe(s) x {steps} steps per block, sigma = {res.sigma:.3g}; "
        f"averaged JS distance JS0 = {res.js_mean:.3f}",
        fontsize=8.5,
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
