"""reports: the top layer. JSON-ready summaries and figures for ``linops report`` and examples.

Nothing in :mod:`linops`, :mod:`estimators` or :mod:`trainers` imports this package; it may
import all three (and matplotlib, lazily, for the figures).
"""

from reports.density import density_report, plot_spectral_density
from reports.laziness import laziness_report
from reports.training_jacobian import plot_training_jacobian_report, training_jacobian_report

__all__ = [
    "density_report",
    "laziness_report",
    "plot_spectral_density",
    "plot_training_jacobian_report",
    "training_jacobian_report",
]
