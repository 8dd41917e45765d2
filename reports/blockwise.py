"""The figure of :func:`estimators.blockwise_spectra`: every block's Hessian density on one plot."""

from __future__ import annotations

import textwrap
from pathlib import Path

import torch

from estimators.blockwise import BlockwiseSpectra
from reports.runs import save_figure

__all__ = ["plot_blockwise_spectra"]

#: decades of density shown below the highest block's peak
DENSITY_DECADES = 6


def plot_blockwise_spectra(
    res: BlockwiseSpectra, path: str | Path, *, model: str, max_blocks: int = 12
) -> None:
    r"""Save the block densities of a :func:`estimators.blockwise_spectra` result as a PNG.

    One curve per block (the first ``max_blocks``), all on the result's common grid and
    broadening, so the curves compare the spectra themselves. The eigenvalue axis is
    symmetric-logarithmic (linear within the result's ``linthresh`` of zero, or within the
    broadening ``sigma`` for a ``"linear"`` result, logarithmic beyond: Hessian blocks differ
    by orders of magnitude in scale), the density (per unit of the result's axis) logarithmic,
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
    symlog = getattr(res, "axis", "linear") == "symlog"
    ax.set_xscale("symlog", linthresh=res.linthresh if symlog else max(res.sigma, 1e-12))
    ax.set_ylim(floor, peak * 4)
    if symlog:  # the nodes' span and one broadening (5 of them reach far in asinh units)
        t = [torch.asinh(torch.as_tensor(b.nodes).double() / res.linthresh) for _, b in items]
        lo, hi = min(float(x.min()) for x in t), max(float(x.max()) for x in t)
        edges = torch.tensor([lo - res.sigma, hi + res.sigma], dtype=torch.float64)
        left, right = (res.linthresh * torch.sinh(edges)).tolist()
        ax.set_xlim(left, right)
        ax.set_xticks(_decade_ticks(left, right, res.linthresh))
    ax.set(xlabel="eigenvalue of the diagonal block (symlog)", ylabel="density (log)")
    probes, steps = next(iter(res.blocks.values())).nodes.shape
    title = textwrap.fill(f"Blockwise Hessian spectra of {model}", 90)
    ax.set_title(
        f"{title}\nSLQ {probes} probe(s) x {steps} steps per block, sigma = {res.sigma:.3g}"
        + (f" in asinh(eigenvalue / {res.linthresh:.2g})" if symlog else "")
        + "; "
        f"averaged JS distance JS0 = {res.js_mean:.3f}",
        fontsize=8.5,
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)


def _decade_ticks(left: float, right: float, linthresh: float, most: int = 11) -> list[float]:
    """Zero and signed powers of ten beyond ``linthresh`` in ``[left, right]``, thinned to ``most``."""
    import math

    first = math.ceil(math.log10(linthresh))
    pos = [10.0**e for e in range(first, math.floor(math.log10(max(right, linthresh))) + 1)]
    neg = [-(10.0**e) for e in range(first, math.floor(math.log10(max(-left, linthresh))) + 1)]
    pos = [x for x in pos if x <= right]
    neg = [x for x in neg if x >= left]
    step = max(1, math.ceil((len(pos) + len(neg)) / most))
    return sorted([*neg[::step], 0.0, *pos[::step]])
