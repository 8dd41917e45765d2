"""Axis helpers shared by the report's and the examples' figures, so they read at a glance.

matplotlib's default log axis labels every decade as ``10^k`` and, on a short range, every
minor tick as ``2 x 10^1``, ``3 x 10^1`` ... (overlapping); counts such as checkpoints or
epochs get fractional ticks (0.2, 0.4, ...). These helpers put labels where the data are.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = ["integer_ticks", "log_ticks_at"]


def log_ticks_at(ax: Axes, values: Sequence[float], axis: str = "x") -> None:
    """Make ``axis`` of ``ax`` logarithmic with plain labels at ``values`` only (no minor labels).

    Parameters
    ----------
    ax
        A matplotlib ``Axes``.
    values
        The positions to label, e.g. the widths or sizes swept (``16, 64, 256``); labelled as
        plain numbers (``:g``).
    axis
        ``"x"`` or ``"y"``.

    Raises
    ------
    ValueError
        If ``axis`` is not ``"x"`` or ``"y"``.
    """
    from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator

    target = _axis(ax, axis)
    (ax.set_xscale if axis == "x" else ax.set_yscale)("log")
    ticks = sorted({float(v) for v in values if float(v) > 0})
    target.set_major_locator(FixedLocator(ticks))
    target.set_major_formatter(_plain_formatter())
    target.set_minor_locator(NullLocator())
    target.set_minor_formatter(NullFormatter())
    if len(ticks) > 8 and axis == "x":  # many sweeps: tilt so neighbours do not overlap
        for label in ax.get_xticklabels():
            label.set_rotation(45)


def _plain_formatter() -> Any:
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda v, _pos: f"{v:,.0f}" if v >= 1000 else f"{v:g}")


def integer_ticks(ax: Axes, axis: str = "x") -> None:
    """Put ticks of ``axis`` of ``ax`` on integers only (for counts: checkpoints, epochs, ranks).

    Raises
    ------
    ValueError
        If ``axis`` is not ``"x"`` or ``"y"``.
    """
    from matplotlib.ticker import MaxNLocator

    _axis(ax, axis).set_major_locator(MaxNLocator(integer=True))


def _axis(ax: Axes, axis: str) -> Any:
    """Return ``ax.xaxis`` or ``ax.yaxis``; refuse any other ``axis``."""
    if axis not in ("x", "y"):
        raise ValueError(f"axis: expected 'x' or 'y', got {axis!r}")
    return ax.xaxis if axis == "x" else ax.yaxis
