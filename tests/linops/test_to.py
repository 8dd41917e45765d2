"""``op.to(dtype=..., device=...)``: a new operator, the original and the user's model untouched.

Dense operators convert their matrix, composites recurse into their operands, model operators
rebuild on a converted copy of the model and data, the training Jacobian recasts theta0 on the
same run. Each converted operator is checked against an independent float64 reference
(``torch.autograd.functional`` on a float64 copy of the model, or the float64 matrix), to a
tolerance a float32 computation cannot meet, so a conversion that kept computing in float32
fails.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import linops
from linops.base import TorchLinearOperator
from tests.linops.references import Reference, jacrev

F32, F64 = torch.float32, torch.float64


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).eval()  # float32


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(6, 3, generator=g), torch.arange(6) % 3


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_untouched(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert after[k].dtype == v.dtype and after[k].device == v.device, k
        torch.testing.assert_close(after[k], v, rtol=0, atol=0)


def _reference(model: nn.Module, X: torch.Tensor) -> Reference:
    ref_model = copy.deepcopy(model).double()
    return Reference(ref_model, [n for n, _ in ref_model.named_parameters()], X.double())


# --------------------------------------------------------------------------- dense and composites
def test_dense_operator_converts_its_matrix_and_leaves_the_original() -> None:
    M = torch.randn(4, 3, generator=torch.Generator().manual_seed(2))
    A = linops.aslinearoperator(M)
    assert A.to() is A and A.to(dtype=F32, device="cpu") is A  # nothing to change
    A64 = A.to(dtype=F64)
    assert A64 is not A and A.dtype == np.float32 and A64.dtype == np.float64
    torch.testing.assert_close(A64.to_dense(), M.double(), rtol=0, atol=0)
    assert A.to(dtype=np.float64).dtype == np.float64  # a numpy dtype names it too
    assert A.to_dense() is M  # the original still holds the caller's tensor


def test_dense_operator_moves_to_another_device() -> None:
    A = linops.aslinearoperator(torch.eye(2, dtype=F64))
    meta = A.to(device="meta")  # a device that exists everywhere
    assert meta.device == torch.device("meta") and A.device == torch.device("cpu")
    meta.check_finite = False  # a meta tensor has no values to check
    assert (meta @ torch.ones(2, dtype=F64, device="meta")).device == torch.device("meta")


def _leaves(op: TorchLinearOperator) -> list[TorchLinearOperator]:
    ops = getattr(op, "ops", None)
    return [op] if ops is None else [leaf for o in ops for leaf in _leaves(o)]


def test_composites_recurse_into_every_operand() -> None:
    g = torch.Generator().manual_seed(3)
    M, N = torch.randn(4, 4, generator=g), torch.randn(4, 4, generator=g)
    A, B = linops.aslinearoperator(M), linops.aslinearoperator(N)
    eye = linops.IdentityOperator(4, dtype=F32)
    comp = (0.5 * (A @ B.H) - eye) ** 2 + A.T
    comp64 = comp.to(F64)
    assert comp.dtype == np.float32 and comp64.dtype == np.float64
    assert {leaf.dtype for leaf in _leaves(comp)} == {np.dtype(np.float32)}
    assert {leaf.dtype for leaf in _leaves(comp64)} == {np.dtype(np.float64)}
    M64, N64 = M.double(), N.double()
    dense = torch.linalg.matrix_power(0.5 * M64 @ N64.T - torch.eye(4, dtype=F64), 2) + M64.T
    torch.testing.assert_close(comp64.to_dense(), dense, rtol=1e-13, atol=1e-13)


# --------------------------------------------------------------------------- model operators
@pytest.mark.parametrize("kind", ["J", "NTK", "H", "GGN", "EF"])
def test_model_operators_rebuild_on_a_converted_copy(kind: str) -> None:
    model, (X, y) = _model(), _data()
    before = _state(model)
    ce = nn.CrossEntropyLoss()
    make = {
        "J": lambda: linops.JacobianOperator(model, X),
        "NTK": lambda: linops.NTKOperator(model, X),
        "H": lambda: linops.HessianOperator(model, ce, (X, y)),
        "GGN": lambda: linops.GGNOperator(model, ce, (X, y)),
        "EF": lambda: linops.EmpiricalFisherOperator(model, ce, (X, y)),
    }
    op32 = make[kind]()
    v = torch.randn(op32.shape[1], generator=torch.Generator().manual_seed(4), dtype=F64)
    first = op32 @ v  # a product before the conversion, so graphs exist and must not be shared
    op64 = op32.to(dtype=F64, device="cpu")
    assert op32.dtype == np.float32 and op64.dtype == np.float64
    ref = _reference(model, X)
    yy = y
    J = ref.jacobian()
    dense = {
        "J": lambda: J,
        "NTK": lambda: J @ J.T,
        "H": lambda: ref.hessian(ce, yy),
        "GGN": lambda: ref.ggn(ce, yy),
        "EF": lambda: _empirical_fisher(ref, ce, X.double(), yy),
    }[kind]()
    exact = dense @ v
    err64 = float((op64 @ v - exact).norm() / exact.norm())
    err32 = float((first - exact).norm() / exact.norm())
    assert err64 < 1e-12, err64  # float64 all the way through
    assert err32 > 1e-10, err32  # the float32 operator is visibly float32 (the test can fail)
    torch.testing.assert_close(op32 @ v, first, rtol=0, atol=0)  # the original is unchanged
    _assert_untouched(model, before)


def _empirical_fisher(ref: Reference, loss: nn.Module, X: torch.Tensor, y: torch.Tensor):
    rows = []
    for i in range(len(X)):
        g = jacrev(lambda t, i=i: loss(ref.outputs(t, X[i : i + 1]), y[i : i + 1]))(ref.theta0)
        rows.append(g)
    G = torch.stack(rows)
    return G.T @ G / len(X)  # mean reduction: c = 1/N


def test_model_operator_with_buffers_leaves_the_users_buffers_alone() -> None:
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).eval()
    model[1].running_mean.normal_()
    before = _state(model)
    X, _ = _data()
    J64 = linops.JacobianOperator(model, X).to(F64)
    exact = _reference(model, X).jacobian()
    torch.testing.assert_close(J64.to_dense(), exact, rtol=1e-12, atol=1e-12)
    _assert_untouched(model, before)


def test_to_float32_from_float64() -> None:
    model, (X, y) = _model(), _data()
    H64 = linops.HessianOperator(model.double(), nn.CrossEntropyLoss(), (X.double(), y))
    H32 = H64.to(F32)
    v = torch.randn(H64.shape[1], generator=torch.Generator().manual_seed(6), dtype=F32)
    out = H32 @ v
    assert out.dtype == F32
    torch.testing.assert_close(out, (H64 @ v.double()).float(), rtol=1e-4, atol=1e-5)


def test_training_jacobian_to_float64_matches_jacrev_of_the_run() -> None:
    from trainers.functional import SGD, DataSchedule, TrainingRun
    from trainers.models import MLP

    g = torch.Generator().manual_seed(7)
    X, y = torch.randn(8, 3, generator=g), torch.arange(8) % 2
    run = TrainingRun(MLP(3, 2, widths=4, seed=0), "cross_entropy", DataSchedule(X, y, 4), SGD(0.9))
    J32 = linops.TrainingJacobianOperator(run, run.initial_values())
    J64 = J32.to(dtype=F64)
    assert J32.dtype == np.float32 and J64.dtype == np.float64
    exact = torch.func.jacrev(run)(run.initial_values().double())
    torch.testing.assert_close(J64.to_dense(), exact, rtol=1e-12, atol=1e-12)
    assert float((J32.to_dense().double() - exact).abs().max()) > 1e-10  # float32 before
    with pytest.raises(NotImplementedError, match="build a TrainingRun on meta"):
        J32.to(device="meta")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_model_operator_to_cuda() -> None:  # pragma: no cover - no GPU in CI
    model, (X, y) = _model(), _data()
    before = _state(model)
    H = linops.HessianOperator(model, nn.CrossEntropyLoss(), (X, y))
    Hc = H.to(dtype=F64, device="cuda")
    v = torch.randn(H.shape[1], dtype=F64)
    torch.testing.assert_close((Hc @ v.cuda()).cpu(), H.to(F64) @ v, rtol=1e-10, atol=1e-12)
    _assert_untouched(model, before)


# --------------------------------------------------------------------------- refusals
def test_an_operator_without_the_hook_says_what_to_do() -> None:
    class Plain(TorchLinearOperator):
        def _matmat_torch(self, X: torch.Tensor) -> torch.Tensor:
            return X

    with pytest.raises(NotImplementedError, match=r"Plain.to: .* build it again from inputs"):
        Plain((2, 2), dtype=F32, device="cpu").to(F64)


def test_complex_operator_refuses_a_real_dtype() -> None:
    Z = linops.aslinearoperator(torch.eye(2, dtype=torch.complex64))
    with pytest.raises(TypeError, match="expected a complex dtype for a complex operator"):
        Z.to(dtype=F64)


def test_to_refuses_integer_dtypes_and_model_operators_refuse_complex() -> None:
    """.to(torch.int64) gave a float64 operator (its docstring promised a TypeError); a model
    operator accepted complex128 and failed in the loss at its first product."""
    import numpy as np
    from torch import nn

    import linops

    A = linops.aslinearoperator(torch.eye(3, dtype=torch.float32))
    for bad in (torch.int64, torch.bool, np.int32, "int64"):
        with pytest.raises(TypeError, match="dtype: expected a floating or complex dtype"):
            A.to(bad)
    assert A.to(np.complex128).dtype == np.complex128
    model = nn.Linear(3, 2).double()
    data = (torch.randn(4, 3, dtype=torch.float64), torch.randint(0, 2, (4,)))
    H = linops.HessianOperator(model, nn.CrossEntropyLoss(), data)
    with pytest.raises(TypeError, match="expected a real floating dtype for a model operator"):
        H.to(torch.complex128)
    z = torch.randn(H.shape[1], dtype=torch.complex128)
    torch.testing.assert_close(H @ z, torch.complex(H @ z.real, H @ z.imag))
