"""One dtype policy for numpy and torch inputs, on every kind of operator (issue 18, item 6).

The policy (``linops.base``'s module docstring, README "Dtype policy"): a product's dtype is
``np.result_type(op.dtype, x.dtype)`` whichever framework ``x`` comes from, and an input dtype
is accepted or refused the same way from numpy and from torch. This walks it on each public
operator class (float32, so promotion shows), every product entry point and every input dtype
both frameworks have, and checks that the numpy and torch answers are the same numbers.
Dense operators' accuracy in the promoted dtype is checked against numpy in
``tests/linops/test_scipy_conformance.py``; here the model operators are checked to return
their own-dtype product, promoted.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from functools import cache
from typing import Any

import numpy as np
import pytest
import scipy.sparse as sp
import scipy.sparse.linalg as sla
import torch
from torch import nn

import linops
from linops.base import TorchLinearOperator

F32 = torch.float32
INPUT_DTYPES = {
    np.bool_: torch.bool,
    np.int8: torch.int8,
    np.uint8: torch.uint8,
    np.int32: torch.int32,
    np.int64: torch.int64,
    np.uint64: torch.uint64,
    np.float16: torch.float16,
    np.float32: torch.float32,
    np.float64: torch.float64,
    np.complex64: torch.complex64,
    np.complex128: torch.complex128,
}


def _model_and_data() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).eval()
    X = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
    return model, X, torch.arange(4) % 3


def _training_jacobian() -> TorchLinearOperator:
    from trainers.functional import SGD, DataSchedule, TrainingRun
    from trainers.models import MLP

    g = torch.Generator().manual_seed(2)
    X, y = torch.randn(8, 3, generator=g), torch.arange(8) % 2
    run = TrainingRun(MLP(3, 2, widths=3, seed=0), "cross_entropy", DataSchedule(X, y, 4), SGD())
    return linops.TrainingJacobianOperator(run, run.initial_values())


def _builders() -> dict[str, Callable[[], TorchLinearOperator]]:
    ce = nn.CrossEntropyLoss()

    def with_data(cls: Any, **kw: Any) -> Callable[[], TorchLinearOperator]:
        def build() -> TorchLinearOperator:
            model, X, y = _model_and_data()
            return cls(model, ce, (X, y), **kw)

        return build

    def jac(cls: Any) -> Callable[[], TorchLinearOperator]:
        def build() -> TorchLinearOperator:
            model, X, _ = _model_and_data()
            return cls(model, X)

        return build

    def output_hessian() -> TorchLinearOperator:
        model, X, _ = _model_and_data()
        return linops.OutputHessianOperator(model, X[:2])

    def dense() -> TorchLinearOperator:
        return linops.aslinearoperator(
            torch.randn(4, 3, generator=torch.Generator().manual_seed(3))
        )

    def composite() -> TorchLinearOperator:
        H = with_data(linops.GGNOperator)()
        return 0.5 * H - linops.IdentityOperator(H.shape[0], dtype=F32)

    return {
        "dense": dense,
        "identity": lambda: linops.IdentityOperator(3, dtype=F32),
        "scipy sparse": lambda: linops.aslinearoperator(
            sp.random_array((3, 4), density=0.5, rng=4, dtype=np.float32)
        ),
        "composite": composite,
        "JacobianOperator": jac(linops.JacobianOperator),
        "NTKOperator": jac(linops.NTKOperator),
        "HessianOperator": with_data(linops.HessianOperator),
        "GGNOperator": with_data(linops.GGNOperator),
        "OutputHessianOperator": output_hessian,
        "EmpiricalFisherOperator": with_data(linops.EmpiricalFisherOperator),
        "FisherOperator": with_data(linops.FisherOperator),
        "KFACOperator": with_data(linops.KFACOperator),
        "EKFACOperator": with_data(linops.EKFACOperator),
        "InverseOperator": lambda: linops.inverse(with_data(linops.GGNOperator)(), damping=1.0),
        "TrainingJacobianOperator": _training_jacobian,
    }


@cache
def _operator(name: str) -> TorchLinearOperator:
    op = _builders()[name]()
    assert op.dtype == np.float32, name
    return op


ENTRIES: dict[str, Callable[[TorchLinearOperator, Any], Any]] = {
    "A @ x": lambda A, x: A @ x,
    "A.matmat(X)": lambda A, X: A.matmat(X),
    "A.rmatvec(y)": lambda A, y: A.rmatvec(y),
    "y @ A": lambda A, y: y @ A,
}


def _input(entry: str, op: TorchLinearOperator, np_dtype: Any) -> np.ndarray:
    m, n = op.shape
    shape = {"A @ x": (n,), "A.matmat(X)": (n, 2), "A.rmatvec(y)": (m,), "y @ A": (m,)}[entry]
    values = np.arange(np.prod(shape)).reshape(shape) % 3  # small non-negative: fits uint8, bool
    return (values > 0 if np_dtype is np.bool_ else values).astype(np_dtype)


def _outcome(f: Callable[[], Any]) -> tuple[str, Any]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", np.exceptions.ComplexWarning)
            out = f()
    except Exception as e:  # the refusal is part of the policy under test
        return f"{type(e).__name__}: {e}", None
    return "ok", out


@pytest.mark.parametrize("name", list(_builders()))
def test_numpy_and_torch_inputs_get_the_same_dtype_and_numbers(name: str) -> None:
    op = _operator(name)
    for entry, call in ENTRIES.items():
        for np_dtype, t_dtype in INPUT_DTYPES.items():
            x = _input(entry, op, np_dtype)
            xt = (
                torch.from_numpy(x.astype(np.int64)).to(t_dtype)
                if np_dtype is np.uint64
                else torch.from_numpy(x)
            )
            assert xt.dtype == t_dtype
            status_np, out_np = _outcome(lambda x=x, call=call: call(op, x))
            status_t, out_t = _outcome(lambda xt=xt, call=call: call(op, xt))
            where = f"{name}, {entry}, {np.dtype(np_dtype).name}"
            assert status_np == status_t == "ok", (where, status_np, status_t)
            expected = np.result_type(op.dtype, np_dtype)  # SciPy's rule
            assert isinstance(out_np, np.ndarray) and out_np.dtype == expected, where
            assert isinstance(out_t, torch.Tensor), where
            assert out_t.dtype == INPUT_DTYPES[expected.type], where
            np.testing.assert_array_equal(out_t.numpy(), out_np, err_msg=where)


@pytest.mark.parametrize("name", ["JacobianOperator", "HessianOperator", "KFACOperator"])
def test_model_operators_return_their_own_product_promoted(name: str) -> None:
    """The exact scenario of the issue: a float32 operator, float64 vectors from both sides."""
    op = _operator(name)
    x = np.random.default_rng(5).standard_normal(op.shape[1])
    own = op @ x.astype(np.float32)  # the float32 product
    out_np, out_t = op @ x, op @ torch.from_numpy(x)
    assert own.dtype == np.float32 and out_np.dtype == np.float64 and out_t.dtype == torch.float64
    np.testing.assert_array_equal(out_np, own.astype(np.float64))
    np.testing.assert_array_equal(out_t.numpy(), out_np)
    exact = op.to(torch.float64) @ x  # computing in float64 is one op.to away
    assert np.abs(exact - out_np).max() > 0  # ... and it differs: the product was float32


def test_refusals_are_the_same_for_numpy_and_torch() -> None:
    op = _operator("HessianOperator")
    n = op.shape[1]
    bad = np.ones(n)
    bad[1] = np.nan
    for x in (bad, torch.from_numpy(bad)):
        with pytest.raises(ValueError, match="x: contains NaN or inf"):
            op @ x
    for x in (np.ones(n + 1), torch.ones(n + 1)):
        with pytest.raises(ValueError, match="x: dimension mismatch"):
            op @ x
    with pytest.raises(TypeError, match="got float128|got complex256"):
        op @ np.ones(n, dtype=np.longdouble)  # torch has no long double: nothing to compare


def test_scipy_solvers_keep_working_on_a_float32_model_operator() -> None:
    G = _operator("GGNOperator")
    vals = sla.eigsh(G, k=2, which="LA", v0=np.ones(G.shape[0]), tol=1e-4)[0]
    dense = G.to(torch.float64).to_dense().numpy()
    np.testing.assert_allclose(np.sort(vals), np.linalg.eigvalsh(dense)[-2:], rtol=1e-3)


def test_a_loss_with_class_weights_follows_the_operator_dtype() -> None:
    """dtype=float32 on a float64 model whose CrossEntropyLoss holds float64 class weights
    failed in torch ('expected scalar type Float but found Double'): the loss's tensors are
    converted in a copy, the caller's loss unchanged; .to(float64) converts back."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)
    ).double()
    X, y = torch.randn(9, 4, dtype=torch.float64), torch.randint(0, 3, (9,))
    weight = torch.tensor([0.2, 1.0, 3.0], dtype=torch.float64)
    for loss in (
        torch.nn.CrossEntropyLoss(weight=weight),
        torch.nn.BCEWithLogitsLoss(pos_weight=weight),
    ):
        t = y if isinstance(loss, torch.nn.CrossEntropyLoss) else (y[:, None] == torch.arange(3))
        t = t if isinstance(loss, torch.nn.CrossEntropyLoss) else t.double()
        ref = linops.GGNOperator(model, loss, (X, t)).to_dense()
        op = linops.GGNOperator(model, loss, (X, t), dtype=torch.float32)
        assert op.dtype == np.float32
        assert torch.allclose(op.to_dense().double(), ref, rtol=1e-4, atol=1e-6)
        assert loss.weight is None or loss.weight.dtype == torch.float64  # not changed
        back = op.to(torch.float64).to_dense()
        assert torch.allclose(back, ref, rtol=1e-12, atol=1e-14)
