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


@pytest.mark.parametrize("conv", [False, True])
def test_products_over_some_parameters_carry_no_graph(conv: bool) -> None:
    """Parameters outside ``params=`` still require grad; no product may record through them.

    A graph recorded into a product costs memory and made the operators' own checks warn
    ("Converting a tensor with requires_grad=True to a scalar").
    """
    import warnings

    import linops

    torch.manual_seed(0)
    if conv:
        model = torch.nn.Sequential(
            torch.nn.Conv2d(1, 2, 3), torch.nn.Tanh(), torch.nn.Flatten(), torch.nn.Linear(8, 3)
        ).double()
        X = torch.randn(5, 1, 4, 4, dtype=torch.float64)
    else:  # a Linear over the last axis of 3-d inputs: the autograd route
        model = torch.nn.Sequential(
            torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3), torch.nn.Flatten()
        ).double()
        X = torch.randn(5, 2, 3, dtype=torch.float64)
    first = ["0.weight"]
    loss = torch.nn.MSELoss()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        ops = [
            linops.JacobianOperator(model, X, params=first),
            linops.GGNOperator(model, loss, (X, torch.zeros_like(model(X))), params=first),
        ]
        for op in ops:
            for V in (torch.ones(op.shape[1]).double(), torch.eye(op.shape[1]).double()):
                assert not torch.as_tensor(op @ V).requires_grad, (type(op).__name__, op.route)


def test_tied_parameter_named_by_its_second_name_is_the_same_parameter() -> None:
    """``lm_head.weight`` tied to ``emb.weight``: either name selects the one tensor."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(5, 3), torch.nn.Linear(3, 5, bias=False))
    model[1].weight = model[0].weight
    assert ParamSpace(model).names == ["0.weight"]
    assert ParamSpace(model, ["1.weight"]).names == ["0.weight"]
    assert ParamSpace(model, {"1.weight": torch.ones(5, 3)}).names == ["0.weight"]
    assert ParamSpace(model, [model[1]]).names == ["0.weight"]
    with pytest.raises(ValueError, match=r"params\['0.weight'\]: expected shape \(5, 3\)"):
        ParamSpace(model, {"1.weight": torch.ones(3)})
