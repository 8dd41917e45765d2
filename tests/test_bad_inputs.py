"""Bad input at every public entry point: a clear error that names the argument.

Each case calls one entry point (operators, algorithms, estimators, trainers) with a wrong
shape, dtype, non-finite value, empty data or an out-of-range argument, and asserts the error
type and that the message names what was wrong. The command line's bad arguments are in
``tests/test_cli.py``; checkpoints' faults in ``tests/linops/test_checkpoint.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import estimators
import linops

F64 = torch.float64


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()


def _data(n: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(n, 3, dtype=F64), torch.randint(0, 2, (n,))


def _nan(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[0] = float("nan")
    return t


def _sym() -> Any:
    M = torch.randn(6, 6, dtype=F64, generator=torch.Generator().manual_seed(0))
    op = linops.aslinearoperator(M + M.T)
    op.is_symmetric = True
    return op


def _hessian(**kw: Any) -> Any:
    X, y = _data()
    return linops.HessianOperator(_mlp(), nn.CrossEntropyLoss(), (X, y), **kw)


def _product(op: Any) -> Any:
    return op @ torch.ones(op.shape[1], dtype=F64)


def _nan_weights() -> Any:
    model = _mlp()
    with torch.no_grad():
        model[0].weight[0, 0] = float("inf")
    return linops.JacobianOperator(model, _data()[0])


def _nan_buffer() -> Any:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).double().eval()
    model[1].running_var[0] = float("nan")
    return linops.JacobianOperator(model, _data()[0])


def _run() -> Any:
    from trainers.functional import SGD, DataSchedule, TrainingRun
    from trainers.models import MLP

    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(8, 3, generator=g, dtype=F64), torch.arange(8) % 2
    torch.manual_seed(0)
    model = MLP(3, 2, widths=4).double()
    return TrainingRun(model, "cross_entropy", DataSchedule(X, y, 4), SGD(0.9), 0.1)


def _loader_with_nan() -> Any:
    X, y = _data(6)
    X[4, 1] = float("inf")
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=2)
    return _product(linops.HessianOperator(_mlp(), nn.CrossEntropyLoss(), loader))


CASES: dict[str, tuple[Callable[[], Any], type[Exception], str]] = {
    # ------------------------------------------------------------ operators: data and model
    "NaN inputs": (
        lambda: linops.JacobianOperator(_mlp(), _nan(_data()[0])),
        ValueError,
        "data: inputs contain NaN or inf",
    ),
    "NaN targets": (
        lambda: linops.HessianOperator(
            _mlp(), nn.MSELoss(), (_data()[0], _nan(torch.randn(5, 2, dtype=F64)))
        ),
        ValueError,
        "data: targets contain NaN or inf",
    ),
    "inf in a loader batch": (_loader_with_nan, ValueError, r"data: batch 2 inputs contain NaN"),
    "inf weights": (_nan_weights, ValueError, r"params\['0.weight'\]: contains NaN or inf"),
    "NaN buffer": (_nan_buffer, ValueError, "model buffer '1.running_var': contains NaN"),
    "empty data": (
        lambda: linops.JacobianOperator(_mlp(), torch.zeros(0, 3, dtype=F64)),
        ValueError,
        "data: expected at least one sample",
    ),
    "string array": (
        lambda: linops.JacobianOperator(_mlp(), np.array([["a"] * 3] * 4)),
        TypeError,
        "data: expected numeric arrays for the inputs, got dtype <U1",
    ),
    "feature mismatch": (
        lambda: linops.JacobianOperator(_mlp(), torch.randn(4, 5, dtype=F64)),
        ValueError,
        "inputs: expected 3 features per sample, got 5",
    ),
    "integer inputs to a float model": (
        lambda: linops.JacobianOperator(_mlp(), torch.ones(4, 3, dtype=torch.int64)),
        ValueError,
        "inputs: the model's forward pass raised on inputs of shape .* and dtype torch.int64",
    ),
    "inputs and targets of different lengths": (
        lambda: _product(
            linops.HessianOperator(_mlp(), nn.CrossEntropyLoss(), (_data()[0], torch.zeros(4)))
        ),
        ValueError,
        "data: expected inputs and targets of equal length",
    ),
    "not a module": (
        lambda: linops.JacobianOperator(lambda x: x, _data()[0]),
        TypeError,
        "model: expected a torch.nn.Module",
    ),
    "one-argument loss": (
        lambda: _product(linops.HessianOperator(_mlp(), lambda out: out.sum(), _data())),
        TypeError,
        r"loss_fn: expected a callable loss_fn\(outputs, targets\)",
    ),
    "loss that is not callable": (
        lambda: linops.HessianOperator(_mlp(), "ce", _data()),
        TypeError,
        "loss_fn: expected a callable",
    ),
    "loss without reduction": (
        lambda: _product(
            linops.HessianOperator(_mlp(), nn.CrossEntropyLoss(reduction="none"), _data())
        ),
        ValueError,
        "loss_fn: CrossEntropyLoss has reduction='none'",
    ),
    "NaN theta0": (
        lambda: linops.TrainingJacobianOperator(_run(), _nan(_run().initial_values())),
        ValueError,
        "theta0: contains NaN or inf",
    ),
    "theta0 of the wrong shape": (
        lambda: linops.TrainingJacobianOperator(_run(), torch.zeros(3, dtype=F64)),
        ValueError,
        r"theta0: expected a tensor of shape \(26,\), got \(3,\)",
    ),
    # ------------------------------------------------------------ operators: arguments
    "output_index of the wrong type": (
        lambda: linops.JacobianOperator(_mlp(), _data()[0], output_index="1"),
        TypeError,
        "output_index: expected an integer, got str",
    ),
    "output_index out of range": (
        lambda: linops.JacobianOperator(_mlp(), _data()[0], output_index=-1),
        ValueError,
        r"output_index: expected an integer in \[0, 1\], got -1",
    ),
    "batch_size zero": (
        lambda: _hessian(batch_size=0),
        ValueError,
        "batch_size: expected a positive",
    ),
    "batch_size float": (
        lambda: _hessian(batch_size=2.5),
        ValueError,
        "batch_size: expected a positive integer or None, got 2.5",
    ),
    "batch_size with a loader (was ignored)": (
        lambda: linops.HessianOperator(
            _mlp(),
            nn.CrossEntropyLoss(),
            torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*_data()), batch_size=5),
            batch_size=2,
        ),
        ValueError,
        r"batch_size: expected None for data that gives its own batches \(a DataLoader\), got 2",
    ),
    "batch_size with a list of batches (was ignored)": (
        lambda: linops.HessianOperator(_mlp(), nn.CrossEntropyLoss(), [_data()], batch_size=2),
        ValueError,
        r"batch_size: expected None for data that gives its own batches \(a list\)",
    ),
    "batches of three (x, y, w)": (
        lambda: _product(
            linops.HessianOperator(_mlp(), nn.CrossEntropyLoss(), [(*_data(), torch.ones(5))])
        ),
        TypeError,
        r"got a tuple of 3 \(per-sample weights: weight the loss instead",
    ),
    "loss class for its instance": (
        lambda: linops.HessianOperator(_mlp(), nn.CrossEntropyLoss, _data()),
        TypeError,
        r"loss_fn: .* got the class CrossEntropyLoss: pass CrossEntropyLoss\(\)",
    ),
    "loss class for its instance (KFAC)": (
        lambda: linops.KFACOperator(_mlp(), nn.MSELoss, _data()),
        TypeError,
        r"got the class MSELoss: pass MSELoss\(\)",
    ),
    "model on the meta device": (
        lambda: linops.HessianOperator(_mlp().to("meta"), nn.CrossEntropyLoss(), _data()),
        ValueError,
        r"params\['0.weight'\]: expected values, got a tensor on the 'meta' device",
    ),
    "data on the meta device": (
        lambda: linops.JacobianOperator(_mlp(), _data()[0].to("meta")),
        ValueError,
        r"data: inputs: expected values, got a tensor on the 'meta' device",
    ),
    "batch_size with a tuple of input batches (was ignored)": (
        lambda: linops.JacobianOperator(_mlp(), tuple(_data(9)[0].split(3)), batch_size=2),
        ValueError,
        r"batch_size: expected None for data that gives its own batches \(a tuple\)",
    ),
    "inputs as Python lists (read as batches of numbers)": (
        lambda: _product(linops.JacobianOperator(_mlp(), _data()[0].tolist())),
        TypeError,
        r"got a list of Python numbers \(inputs given as Python lists are read as a list of "
        r"batches\): pass tensors or numpy arrays",
    ),
    "(X, y) as Python lists": (
        lambda: _product(
            linops.HessianOperator(
                _mlp(), nn.CrossEntropyLoss(), tuple(t.tolist() for t in _data())
            )
        ),
        TypeError,
        r"of Python numbers .* pass tensors or numpy arrays",
    ),
    "dtype as a bad string": (
        lambda: _hessian(dtype="double precision"),
        TypeError,
        "dtype: expected a floating torch dtype",
    ),
    "integer dtype": (lambda: _hessian(dtype=torch.int64), TypeError, "dtype: expected a floating"),
    "cuda without CUDA": (
        lambda: _hessian(device="cuda") if not torch.cuda.is_available() else _hessian(device="x"),
        ValueError,
        "device: expected",
    ),
    "unknown route": (lambda: _hessian(route="fast"), ValueError, "route: expected one of"),
    "bad reduction": (lambda: _hessian(reduction="avg"), ValueError, "reduction: expected"),
    "max_vectors zero": (lambda: _hessian(max_vectors=0), ValueError, "max_vectors: expected"),
    "finite-difference step zero": (
        lambda: linops.OutputHessianOperator(
            _mlp(), _data()[0][:1], 0, method="finite_difference", eps=0
        ),
        ValueError,
        r"eps: expected a relative step in \(0, 1\), got 0",
    ),
    "unknown parameter": (
        lambda: linops.JacobianOperator(_mlp(), _data()[0], params=["9.weight"]),
        ValueError,
        "params: '9.weight' is neither a parameter nor a submodule",
    ),
    "parameter of another model": (
        lambda: linops.JacobianOperator(_mlp(), _data()[0], params=[torch.zeros(2)]),
        ValueError,
        "params: a tensor of shape",
    ),
    "tuple output without a selector": (
        lambda: linops.JacobianOperator(_TupleNet(), _data()[0]),
        TypeError,
        "model: expected the forward pass to return a tensor, got a tuple of 2",
    ),
    # ------------------------------------------------------------ products
    "vector of the wrong length": (
        lambda: _hessian() @ torch.ones(5, dtype=F64),
        ValueError,
        "x: dimension mismatch",
    ),
    "NaN vector": (
        lambda: _hessian() @ _nan(torch.ones(26, dtype=F64)),
        ValueError,
        "x: contains NaN",
    ),
    "division by zero": (lambda: _hessian() / 0, ZeroDivisionError, "divisor: expected a non-zero"),
    "to_dense with max_vectors -1": (
        lambda: _hessian().to_dense(max_vectors=-1),
        ValueError,
        "max_vectors: expected a positive integer",
    ),
    # ------------------------------------------------------------ algorithms
    "lanczos k zero": (lambda: linops.lanczos(_sym(), 0), ValueError, "k: expected an integer"),
    "lanczos which": (lambda: linops.lanczos(_sym(), 2, which="XX"), ValueError, "which: expected"),
    "lanczos non-square": (
        lambda: linops.lanczos(linops.aslinearoperator(torch.randn(3, 4)), 1),
        ValueError,
        "A: expected a square",
    ),
    "lanczos negative tol": (
        lambda: linops.lanczos(_sym(), 2, rtol=-1),
        ValueError,
        "tol: expected",
    ),
    "lanczos seed string": (
        lambda: linops.lanczos(_sym(), 2, seed="x"),
        TypeError,
        "seed: expected",
    ),
    "svds k too large": (
        lambda: linops.svds(_sym(), 10),
        ValueError,
        r"k: expected an integer >= 1 and <= 6, got 10",
    ),
    "randomized_svd rank zero": (
        lambda: linops.randomized_svd(_sym(), 0),
        ValueError,
        "rank: expected an integer",
    ),
    "range_finder negative tol": (
        lambda: linops.range_finder(_sym(), atol=-1.0),
        ValueError,
        "tol: expected a positive finite number",
    ),
    "numerical_rank rtol": (
        lambda: linops.numerical_rank(torch.randn(4, 4), rtol=-1),
        ValueError,
        r"rtol: expected a number in \[0, 1\)",
    ),
    "principal angles shapes": (
        lambda: linops.principal_angles(torch.randn(5, 2), torch.randn(4, 2)),
        ValueError,
        "U, V: expected bases with the same number of rows",
    ),
    "principal angles NaN": (
        lambda: linops.principal_angles(_nan(torch.randn(5, 2)), torch.randn(5, 2)),
        ValueError,
        "U: expected finite entries",
    ),
    # ------------------------------------------------------------ estimators
    "xtrace budget": (lambda: estimators.xtrace(_sym(), 1), ValueError, "num_matvecs: expected"),
    "hutchinson budget": (
        lambda: estimators.hutchinson_trace(_sym(), 0),
        ValueError,
        "num_matvecs: expected an integer >= 1",
    ),
    "spectral density probes": (
        lambda: estimators.spectral_density(_sym(), num_probes=0),
        ValueError,
        "num_probes: expected an integer >= 1",
    ),
}


class _TupleNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2).double()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lin(x), x


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gets_a_named_error(name: str) -> None:
    call, kind, pattern = CASES[name]
    with pytest.raises(kind, match=pattern):
        call()


def test_products_never_change_the_model_in_training_mode() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).double()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    H = linops.HessianOperator(
        model, nn.CrossEntropyLoss(), _data(8), allow_train_mode=True, cache=False
    )
    for _ in range(3):
        _product(H)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_overflowing_products_raise_instead_of_returning_inf() -> None:
    model = nn.Sequential(nn.Linear(3, 2)).double()
    with torch.no_grad():
        model[0].weight.fill_(1.0)
    X, y = 1e3 * torch.ones(2, 3, dtype=F64), torch.zeros(2, 2, dtype=F64)
    H = linops.HessianOperator(model, lambda out, t: out.exp().sum(), (X, y), reduction="sum")
    with pytest.raises(FloatingPointError, match="the product contains NaN or inf"):
        _product(H)


def test_zero_column_blocks_give_empty_results() -> None:
    H = _hessian()
    assert tuple((H @ torch.zeros(26, 0, dtype=F64)).shape) == (26, 0)
