"""Seeded model / data cases shared by the operator tests (float64, small)."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from trainers.models import SmallCNN


class Case(NamedTuple):
    name: str
    model: nn.Module
    X: torch.Tensor
    y: torch.Tensor
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    params: list[str] | None


def _mlp(act: type[nn.Module], d_in: int, d_out: int) -> nn.Module:
    return nn.Sequential(nn.Linear(d_in, 6), act(), nn.Linear(6, 5), act(), nn.Linear(5, d_out))


def make_cases() -> list[Case]:
    """The cases of the operator-core issue: tanh and ReLU MLPs, a small CNN, several outputs,
    a parameter subset; classification (cross-entropy) and regression (MSE)."""
    torch.manual_seed(0)
    cases = []
    X = torch.randn(9, 4, dtype=torch.float64)
    y_cls = torch.randint(0, 3, (9,))
    cases.append(
        Case("tanh-mlp-ce", _mlp(nn.Tanh, 4, 3).double(), X, y_cls, nn.CrossEntropyLoss(), None)
    )
    cases.append(
        Case(
            "relu-mlp-mse-sum",
            _mlp(nn.ReLU, 4, 2).double(),
            X,
            torch.randn(9, 2, dtype=torch.float64),
            nn.MSELoss(reduction="sum"),
            None,
        )
    )
    cnn = SmallCNN(1, 3, channels=(2, 3), image_size=8).double()
    Xi = torch.randn(5, 1, 8, 8, dtype=torch.float64)
    cases.append(
        Case("small-cnn-ce", cnn, Xi, torch.randint(0, 3, (5,)), nn.functional.cross_entropy, None)
    )
    multi = _mlp(nn.Tanh, 4, 4).double()
    cases.append(
        Case(
            "single-output-mse",
            _mlp(nn.GELU, 4, 1).double(),
            X,
            torch.randn(9, 1, dtype=torch.float64),
            nn.MSELoss(),
            None,
        )
    )
    cases.append(
        Case(
            "param-subset",
            multi,
            X,
            torch.randint(0, 4, (9,)),
            nn.CrossEntropyLoss(),
            ["2.weight", "4.bias"],
        )
    )
    return cases


CASES = make_cases()
