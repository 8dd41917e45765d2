"""The toolkit's one meaning of ``seed``, for estimators and trainers.

Every random routine of :mod:`linops`, :mod:`estimators` and :mod:`trainers` takes
``seed: int | torch.Generator | None``: an int seeds a fresh ``torch.Generator`` (the same int
gives the same draws), a ``torch.Generator`` is used as it is (its state advances, so a
caller can thread one generator through many calls) and ``None`` draws fresh entropy (never the
global RNG). :func:`make_generator` is linops' own conversion (``linops._krylov``), re-exported
here so that estimators and trainers share it instead of copying it.
"""

from __future__ import annotations

import torch

from linops import Seed
from linops.blocks import make_generator as _make_generator

__all__ = ["Seed", "make_generator"]


def make_generator(seed: Seed, device: torch.device | str = "cpu") -> torch.Generator:
    """Make a ``torch.Generator`` on ``device`` from ``seed`` (see the module docstring).

    Raises
    ------
    TypeError
        If ``seed`` is not an int, a ``torch.Generator`` or None.

    Examples
    --------
    >>> a = torch.randn(2, generator=make_generator(0))
    >>> b = torch.randn(2, generator=torch.Generator().manual_seed(0))
    >>> bool((a == b).all())
    True
    """
    return _make_generator(seed, torch.device(device))
