"""Models: parameter counts, the documented scalings, and errors."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trainers.models import MLP, LeNet5, SmallCNN, activation


def test_parameter_counts_of_the_papers_models() -> None:
    assert sum(p.numel() for p in MLP(64, 10, (64,), activation="gelu").parameters()) == 4810
    assert sum(p.numel() for p in LeNet5().parameters()) == 61706
    assert LeNet5()(torch.zeros(2, 1, 32, 32)).shape == (2, 10)
    assert SmallCNN(1, 10, image_size=8)(torch.zeros(3, 1, 8, 8)).shape == (3, 10)


@pytest.mark.parametrize("kind", ["standard", "ntk", "mean_field"])
def test_initial_weight_scale_and_multiplier_follow_the_docstring(kind: str) -> None:
    fan_in, beta = 400, 2.0
    g = torch.Generator().manual_seed(0)
    net = MLP(fan_in, 3, (500,), parameterization=kind, beta=beta, seed=g)
    first, last = net.linear_layers()
    std = float(first.weight.std())
    expected_std = beta / math.sqrt(fan_in) if kind == "standard" else beta
    assert std == pytest.approx(expected_std, rel=0.02)
    expected_last = {"standard": 1.0, "ntk": 1 / math.sqrt(500), "mean_field": 1 / 500}[kind]
    assert last.multiplier == pytest.approx(expected_last)
    assert float(first.bias.abs().max()) == 0.0


@settings(max_examples=20, deadline=None)
@given(st.floats(0.1, 100.0), st.sampled_from(["standard", "ntk", "mean_field"]))
def test_output_is_linear_in_kappa(kappa: float, kind: str) -> None:
    x = torch.randn(4, 5, dtype=torch.float64)
    base = MLP(5, 2, (7, 7), parameterization=kind, seed=torch.Generator().manual_seed(1)).double()
    scaled = MLP(
        5, 2, (7, 7), parameterization=kind, kappa=kappa, seed=torch.Generator().manual_seed(1)
    ).double()
    torch.testing.assert_close(scaled(x), kappa * base(x))


def test_ntk_hidden_preactivations_are_order_one_at_any_width() -> None:
    x = torch.randn(64, 16)
    x = x / x.norm(dim=1, keepdim=True) * 4.0
    for width in (64, 4096):
        net = MLP(16, 1, (width,), parameterization="ntk", seed=torch.Generator().manual_seed(0))
        pre = net.layers[0](x)
        assert 0.5 < float(pre.std()) < 2.0


def test_errors() -> None:
    with pytest.raises(
        ValueError, match="parameterization: expected 'standard', 'ntk' or 'mean_field'"
    ):
        MLP(3, 1, parameterization="muP")
    with pytest.raises(ValueError, match="beta: expected 3 values, got 2"):
        MLP(3, 1, (4, 4), beta=[1.0, 1.0])
    with pytest.raises(ValueError, match="activation: expected one of"):
        MLP(3, 1, activation="swish")
    with pytest.raises(ValueError, match="activation: expected one of"):
        activation("nope")
