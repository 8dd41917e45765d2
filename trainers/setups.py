"""The digits-MLP training run of "Understanding Gradient Descent through the Training Jacobian".

The setup of section 3 of that paper (an anonymous submission under double-blind review; no
arXiv id given), shared by the example, the benchmark and the report:

scikit-learn's digits, 1600 train / 197 test (``random_state=0``), inputs divided by 16; an MLP
64-64-10 with GELU and LeCun-normal weights (4810 parameters); mean cross-entropy; batch 64 in a
fixed order; 25 epochs (625 steps) of SGD with momentum 0.9 and cosine decay from 0.1.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from trainers.data import Dataset, digits
from trainers.functional import SGD, CosineLR, DataSchedule, TrainingRun
from trainers.models import MLP

__all__ = ["DigitsSetup", "digits_mlp_run"]


class DigitsSetup(NamedTuple):
    """A training run with its data and initial parameters.

    Attributes
    ----------
    run
        The differentiable training run.
    theta0
        Its initial parameters, flat.
    data
        The dataset (train and test splits).
    model
        The network whose parameters ``theta0`` holds.
    """

    run: TrainingRun
    theta0: torch.Tensor
    data: Dataset
    model: MLP


def digits_mlp_run(
    *,
    width: int = 64,
    epochs: int = 25,
    batch_size: int = 64,
    lr: float = 0.1,
    momentum: float = 0.9,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    n_train: int = 1600,
    shuffle_labels: bool = False,
    white_noise: bool = False,
    checkpoint_every: int | None = None,
) -> DigitsSetup:
    """Set up the paper's run (defaults) or a variant of it.

    Parameters
    ----------
    width
        Hidden width (64: 4810 parameters).
    epochs, batch_size, lr, momentum
        Training schedule: cosine decay from ``lr`` over all ``epochs * ceil(n_train / batch_size)``
        steps, fixed batch order.
    seed
        Seed of the LeCun-normal initialisation (and of label shuffling / noise inputs).
    dtype
        Floating dtype of the parameters and inputs.
    n_train
        Training-set size (the rest of the 1797 digits is the test set).
    shuffle_labels
        Train on randomly permuted labels (the paper's section 3.5).
    white_noise
        Train on uniform white-noise inputs instead of the digits (the paper's figure 5b).
    checkpoint_every
        Passed to :class:`trainers.functional.TrainingRun`.
    """
    data = digits(n_train=n_train, dtype=dtype)
    X, y = data.X_train, data.y_train
    g = torch.Generator().manual_seed(10_000 + seed)
    if shuffle_labels:
        y = y[torch.randperm(len(y), generator=g)]
    if white_noise:
        X = torch.rand(X.shape, generator=g, dtype=torch.float64).to(dtype)
    model = MLP(
        64, 10, widths=(width,), activation="gelu", seed=torch.Generator().manual_seed(seed)
    )
    model = model.to(dtype)
    sched = DataSchedule(X, y, batch_size, epochs=epochs)
    run = TrainingRun(
        model,
        "cross_entropy",
        sched,
        SGD(momentum),
        CosineLR(lr, total_steps=sched.num_steps),
        checkpoint_every=checkpoint_every,
    )
    return DigitsSetup(run, run.initial_values(), data, model)
