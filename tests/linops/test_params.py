"""ParamSpace: selection, flat ordering, flatten/unflatten round trips, functional calls."""

import pytest
import torch

from linops import ParamSpace


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))


def test_default_selection_and_order() -> None:
    space = ParamSpace(_model())
    assert space.names == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert space.dim == 12 + 4 + 8 + 2


def test_subset_by_name_and_by_tensor_and_frozen_parameters() -> None:
    model = _model()
    assert ParamSpace(model, ["2.bias"]).dim == 2
    assert ParamSpace(model, [model[0].weight]).names == ["0.weight"]
    model[0].requires_grad_(False)
    assert ParamSpace(model).names == ["2.weight", "2.bias"]


def test_flatten_unflatten_round_trip_single_and_batched() -> None:
    space = ParamSpace(_model())
    v = torch.arange(space.dim, dtype=torch.float32)
    parts = space.unflatten(v)
    assert parts["0.bias"].tolist() == [12.0, 13.0, 14.0, 15.0]
    assert torch.equal(space.flatten(parts), v)
    V = torch.randn(space.dim, 3)
    batched = space.unflatten(V)
    assert batched["0.weight"].shape == (3, 4, 3)
    assert torch.equal(space.flatten(batched), V)


def test_functional_call_uses_given_values_and_keeps_the_rest() -> None:
    model = _model()
    space = ParamSpace(model, ["2.bias"])
    x = torch.randn(5, 3)
    out = space.functional_call({"2.bias": torch.full((2,), 10.0)}, x)
    torch.testing.assert_close(out - model(x), torch.full((5, 2), 10.0) - model[2].bias.detach())


def test_errors() -> None:
    model = _model()
    with pytest.raises(
        ValueError, match=r"params: 'x' is neither a parameter nor a submodule of the model"
    ):
        ParamSpace(model, ["x"])
    with pytest.raises(ValueError, match=r"params\['2.bias'\]: expected shape \(2,\), got \(3,\)"):
        ParamSpace(model, {"2.bias": torch.ones(3)})
    with pytest.raises(ValueError, match="params: expected at least one parameter"):
        ParamSpace(model, [])
    with pytest.raises(TypeError, match="params: expected names, tensors or modules, got int"):
        ParamSpace(model, [3])
    with pytest.raises(ValueError, match="expected a vector of length 26"):
        ParamSpace(model).unflatten(torch.ones(5))


def test_functional_call_leaves_a_model_with_a_shared_module_intact() -> None:
    """torch.func.functional_call replaces the parameters of a module registered twice."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 3)
    model = torch.nn.Sequential(lin, torch.nn.Tanh(), lin).double()
    weight = model[0].weight
    X = torch.randn(4, 3, dtype=torch.float64)
    space = ParamSpace(model)
    doubled = {n: 2 * v for n, v in space.values().items()}
    out = space.functional_call(doubled, X)
    W, b = 2 * weight.detach(), 2 * lin.bias.detach()
    want = torch.tanh(X @ W.T + b) @ W.T + b
    assert torch.allclose(out, want)
    assert model[0].weight is weight and model[2].weight is weight
    assert isinstance(model[0].weight, torch.nn.Parameter) and weight.requires_grad
    assert torch.allclose(model(X), torch.tanh(X @ weight.T + lin.bias) @ weight.T + lin.bias)
