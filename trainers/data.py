"""Offline datasets: scikit-learn's bundled digits and small synthetic sets.

Nothing here downloads anything; every set is built from data shipped with scikit-learn or
from a seeded generator.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from estimators.seeding import Seed, make_generator

__all__ = ["Dataset", "digits", "synthetic_classification", "synthetic_regression"]


class Dataset(NamedTuple):
    """A train / test split of tensors."""

    X_train: torch.Tensor
    y_train: torch.Tensor
    X_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def num_classes(self) -> int:
        """Number of classes (largest label + 1), or 0 for floating (regression) targets."""
        return int(self.y_train.max().item()) + 1 if not self.y_train.is_floating_point() else 0


def digits(
    *,
    n_train: int = 1600,
    seed: Seed = 0,
    image: bool = False,
    size: int = 8,
    dtype: torch.dtype = torch.float32,
) -> Dataset:
    """scikit-learn's 1797 8x8 handwritten digits, inputs divided by 16.

    Parameters
    ----------
    n_train
        Training-set size; the rest (``1797 - n_train``) is the test set. The default 1600 / 197
        split with ``seed=0`` is the setup of "Understanding Gradient Descent through the
        Training Jacobian".
    seed
        Randomness of the shuffled split: an int is ``train_test_split``'s ``random_state``
        (scikit-learn); a generator or None draws one.
    image
        Return inputs as ``(N, 1, size, size)`` images instead of flat 64-vectors.
    size
        Image side; values other than 8 are bilinearly resized (32 for LeNet-5).
    dtype
        Floating dtype of the inputs; labels are int64.

    Returns
    -------
    Dataset
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    if not 0 < n_train < len(X):
        raise ValueError(f"n_train: expected an integer in [1, {len(X) - 1}], got {n_train}")
    state = (
        seed
        if isinstance(seed, int)
        else int(torch.randint(2**31, (1,), generator=make_generator(seed)))
    )
    X_tr, X_te, y_tr, y_te = train_test_split(X, y, train_size=n_train, random_state=state)

    def prep(a: object) -> torch.Tensor:
        t = torch.as_tensor(a, dtype=dtype) / 16.0
        if image or size != 8:
            t = t.reshape(-1, 1, 8, 8)
            if size != 8:
                t = torch.nn.functional.interpolate(
                    t, size=(size, size), mode="bilinear", align_corners=False
                )
        return t

    return Dataset(prep(X_tr), torch.as_tensor(y_tr), prep(X_te), torch.as_tensor(y_te))


def synthetic_regression(
    n: int = 256,
    d: int = 8,
    d_out: int = 1,
    *,
    noise: float = 0.1,
    n_test: int = 0,
    seed: Seed = 0,
    dtype: torch.dtype = torch.float32,
) -> Dataset:
    """Targets from a random two-layer tanh teacher plus Gaussian noise; inputs on the sphere.

    Inputs are normalised to unit norm (bounded, non-parallel samples: Assumption 2 of "Demystifying Lazy Training of Neural
    Networks from a Macroscopic Viewpoint", arXiv:2404.04859).
    """
    g = make_generator(seed)
    X = torch.randn(n + n_test, d, generator=g, dtype=torch.float64)
    X = X / X.norm(dim=1, keepdim=True)
    W1 = torch.randn(d, 32, generator=g, dtype=torch.float64) / d**0.5
    W2 = torch.randn(32, d_out, generator=g, dtype=torch.float64) / 32**0.5
    y = torch.tanh(X @ W1) @ W2 + noise * torch.randn(n + n_test, d_out, generator=g).double()
    X, y = X.to(dtype), y.to(dtype)
    return Dataset(X[:n], y[:n], X[n:], y[n:])


def synthetic_classification(
    n: int = 256,
    d: int = 8,
    num_classes: int = 3,
    *,
    n_test: int = 0,
    seed: Seed = 0,
    dtype: torch.dtype = torch.float32,
) -> Dataset:
    """Gaussian blobs around random class centres, labels int64."""
    g = make_generator(seed)
    centres = 2.0 * torch.randn(num_classes, d, generator=g)
    y = torch.randint(0, num_classes, (n + n_test,), generator=g)
    X = centres[y] + torch.randn(n + n_test, d, generator=g)
    X = X.to(dtype)
    return Dataset(X[:n], y[:n], X[n:], y[n:])
