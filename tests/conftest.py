"""Test-session settings.

Tiny problems run fastest (and without oversubscription) on one thread. The kernels of
:mod:`linops._double_backward` are taken at every size, so that the tests' small models
exercise them (their default threshold is tested in ``tests/linops/test_double_backward.py``).
"""

import pytest
import torch

from linops import _double_backward

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _double_backward_kernels_at_every_size(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        _double_backward, "MIN_ELEMENTS", dict.fromkeys(_double_backward.MIN_ELEMENTS, 0)
    )
