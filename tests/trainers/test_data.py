"""Offline datasets: seed 004's digits split, resizing, synthetic sets."""

import pytest
import torch

from trainers.data import digits, synthetic_classification, synthetic_regression


def test_digits_split_matches_seed_004() -> None:
    d = digits()
    assert d.X_train.shape == (1600, 64) and d.X_test.shape == (197, 64)
    assert float(d.X_train.max()) == 1.0 and float(d.X_train.min()) == 0.0  # divided by 16
    assert d.y_train.dtype == torch.int64 and d.num_classes == 10
    again = digits()
    assert torch.equal(d.X_train, again.X_train)  # random_state fixes the split


def test_digits_as_images_and_upsampled() -> None:
    assert digits(image=True).X_train.shape == (1600, 1, 8, 8)
    big = digits(size=32, dtype=torch.float64)
    assert big.X_test.shape == (197, 1, 32, 32) and big.X_test.dtype == torch.float64


def test_synthetic_sets_are_seeded_and_shaped() -> None:
    r = synthetic_regression(50, 6, 2, n_test=10, seed=3)
    assert r.X_train.shape == (50, 6) and r.y_test.shape == (10, 2)
    torch.testing.assert_close(r.X_train.norm(dim=1), torch.ones(50))
    assert torch.equal(r.y_train, synthetic_regression(50, 6, 2, n_test=10, seed=3).y_train)
    c = synthetic_classification(40, 3, 4, seed=1)
    assert c.num_classes <= 4 and c.y_train.dtype == torch.int64


def test_digits_rejects_a_bad_split() -> None:
    with pytest.raises(ValueError, match=r"n_train: expected an integer in \[1, 1796\], got 0"):
        digits(n_train=0)
