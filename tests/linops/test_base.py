"""The operator core: conversions, composition, validation, chunking, and operator laws."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import scipy.sparse.linalg as sla
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import linops
from linops.base import TorchLinearOperator
from linops.testing import check_operator, dense_operators, hessian_operators, jacobian_operators

F64 = torch.float64


def _mat(m: int, n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=F64)


class Counting(TorchLinearOperator):
    """A dense operator that records the column count of every hook call."""

    def __init__(self, A: torch.Tensor, **kw) -> None:
        super().__init__(A.shape, dtype=A.dtype, device=A.device, **kw)
        self.A, self.calls = A, []

    def _matmat_torch(self, X: torch.Tensor) -> torch.Tensor:
        self.calls.append(X.shape[1])
        return self.A @ X

    def _rmatmat_torch(self, Y: torch.Tensor) -> torch.Tensor:
        self.calls.append(Y.shape[1])
        return self.A.T @ Y


def test_numpy_in_numpy_out_torch_in_torch_out() -> None:
    A = _mat(4, 3)
    op = linops.aslinearoperator(A)
    x = np.arange(3.0)
    out = op @ x
    assert isinstance(out, np.ndarray) and out.dtype == np.float64
    np.testing.assert_allclose(out, A.numpy() @ x)
    t = op @ torch.arange(3.0, dtype=F64)
    assert isinstance(t, torch.Tensor) and t.dtype == F64
    assert isinstance(op.matmat(np.ones((3, 2))), np.ndarray)
    assert (op @ np.arange(3)).dtype == np.float64  # integer input: numpy's promotion
    np.testing.assert_allclose(np.ones(4) @ op, np.ones(4) @ A.numpy())  # x @ A = (A^T x^T)^T


def test_complex_vectors_on_a_real_operator() -> None:
    A = _mat(3, 3)
    op = linops.aslinearoperator(A)
    z = np.array([1 + 2j, -1j, 0.5])
    np.testing.assert_allclose(op @ z, A.numpy() @ z)


def test_composition_matches_dense_algebra() -> None:
    A, B, C = _mat(4, 4, 1), _mat(4, 4, 2), _mat(4, 3, 3)
    a, b, c = (linops.aslinearoperator(M) for M in (A, B, C))
    expr = (2.0 * a @ b - a.T + b / 4.0) @ c
    dense = (2.0 * A @ B - A.T + B / 4.0) @ C
    torch.testing.assert_close(expr.to_dense(), dense, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(expr.H.to_dense(), dense.T, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close((-a).to_dense(), -A)
    torch.testing.assert_close((a - b).to_dense(), A - B)
    assert isinstance(a @ b @ c, TorchLinearOperator)
    assert len((a @ b @ c).ops) == 3  # product chains are flattened
    assert a.T.T is a


def test_mixing_with_scipy_and_sparse_operators() -> None:
    A = _mat(3, 3)
    S = sp.random(3, 3, density=0.5, random_state=0, format="csr")
    op = linops.aslinearoperator(A) + linops.aslinearoperator(S)
    np.testing.assert_allclose(op.to_dense().numpy(), A.numpy() + S.toarray())
    scipy_op = sla.aslinearoperator(A.numpy())
    mixed = linops.aslinearoperator(A) @ scipy_op
    np.testing.assert_allclose(mixed @ np.ones(3), A.numpy() @ A.numpy() @ np.ones(3))
    op = linops.aslinearoperator(A)
    sp_op = op.to_scipy()
    assert sp_op is op and isinstance(sp_op, sla.LinearOperator)  # to_scipy() is simply self
    np.testing.assert_allclose(sp_op.rmatvec(np.arange(3.0)), A.numpy().T @ np.arange(3.0))
    np.testing.assert_allclose(
        sla.lsqr(sp_op, A.numpy() @ np.ones(3), atol=1e-14, btol=1e-14)[0], np.ones(3), rtol=1e-8
    )


def test_identity_and_symmetric_adjoint() -> None:
    eye = linops.IdentityOperator(3, dtype=F64)
    assert eye.H is eye
    torch.testing.assert_close(eye.to_dense(), torch.eye(3, dtype=F64))


@pytest.mark.parametrize("shape", [(4,), (4, 1), (4, 3)])
@pytest.mark.parametrize("kind", ["torch", "numpy"])
def test_identity_products_are_new_arrays(shape: tuple[int, ...], kind: str) -> None:
    """I @ V returned V itself (as SciPy's identity does): writing into the product changed V."""
    eye = linops.IdentityOperator(4, dtype=F64)
    V = torch.arange(float(np.prod(shape)), dtype=F64).reshape(shape)
    kept = V.clone()
    x = V.numpy() if kind == "numpy" else V
    for out in (eye @ x, eye.T @ x, eye.matvec(x) if len(shape) == 1 else eye.matmat(x)):
        assert not np.shares_memory(np.asarray(out), V.numpy())
        out[...] = -1.0
        assert torch.equal(V, kept)


def test_many_vector_products_are_chunked_by_the_memory_bound() -> None:
    A = _mat(5, 6)
    op = Counting(A, max_vectors=4)
    X = _mat(6, 10)
    torch.testing.assert_close(op @ X, A @ X)
    assert op.calls == [4, 4, 2]
    bounded = Counting(A, memory_budget=3 * (5 + 6) * 8)  # three vectors' worth
    bounded @ X
    assert max(bounded.calls) == 3
    unbounded = Counting(A)
    unbounded @ X
    assert unbounded.calls == [10]  # one batched pass


def test_scipy_solvers_accept_the_operator() -> None:
    A = _mat(6, 6)
    S = A @ A.T + 6 * torch.eye(6, dtype=F64)
    op = linops.aslinearoperator(S)
    x, info = sla.cg(op, np.ones(6), rtol=1e-12)
    assert info == 0
    np.testing.assert_allclose(x, np.linalg.solve(S.numpy(), np.ones(6)), rtol=1e-9)
    vals = sla.eigsh(op, k=2, which="LA")[0]
    np.testing.assert_allclose(np.sort(vals), np.linalg.eigvalsh(S.numpy())[-2:], rtol=1e-10)
    s = sla.svds(linops.aslinearoperator(_mat(5, 4)), k=2, random_state=0)[1]
    np.testing.assert_allclose(
        np.sort(s), np.linalg.svd(_mat(5, 4).numpy(), compute_uv=False)[:2][::-1]
    )


def test_float32_operator_returns_the_promoted_dtype_for_float64_input() -> None:
    op = linops.aslinearoperator(torch.ones(2, 2))
    assert op.dtype == np.float32
    assert (op @ np.ones(2)).dtype == np.float64  # numpy's promotion, as SciPy returns it
    assert (op @ np.ones(2, dtype=np.float32)).dtype == np.float32
    assert (op @ torch.ones(2, dtype=F64)).dtype == F64  # the same policy for torch inputs


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (lambda op: op @ torch.ones(4, dtype=F64), ValueError, r"x: dimension mismatch"),
        (lambda op: op.rmatvec(np.ones(2)), ValueError, r"y: dimension mismatch"),
        (lambda op: op.matvec(np.ones((3, 2))), ValueError, r"x: expected a vector of length 3"),
        (lambda op: op.matmat(np.ones(3)), ValueError, r"x: expected a matrix with 3 rows"),
        (
            lambda op: op @ np.ones(3, dtype=np.longdouble),
            TypeError,
            "x: expected float16, float32, float64, complex64 or complex128, got float128",
        ),
        (lambda op: op @ np.array(["a", "b", "c"]), TypeError, "x: expected a numeric array"),
        (lambda op: op @ np.array([1.0, np.nan, 0]), ValueError, "x: contains NaN or inf"),
        (lambda op: op @ 2.0, ValueError, "scalar operands are not allowed"),
        (
            lambda op: op + linops.aslinearoperator(_mat(2, 2)),
            ValueError,
            "cannot add operators of shapes",
        ),
        (
            lambda op: op @ linops.aslinearoperator(_mat(2, 2)),
            ValueError,
            r"dimension mismatch in product",
        ),
        (lambda op: op / np.ones(2), ValueError, "can only divide an operator by a scalar"),
    ],
)
def test_bad_input_gets_a_clear_error(call, exc, match) -> None:
    op = linops.aslinearoperator(_mat(4, 3))
    with pytest.raises(exc, match=match):
        call(op)


def test_bad_constructor_arguments() -> None:
    with pytest.raises(ValueError, match="shape: expected two non-negative integers"):
        TorchLinearOperator((3,), dtype=F64, device="cpu")
    with pytest.raises(ValueError, match="max_vectors: expected a positive integer"):
        TorchLinearOperator((3, 3), dtype=F64, device="cpu", max_vectors=0)
    with pytest.raises(TypeError, match="expected a floating or complex torch dtype"):
        TorchLinearOperator((3, 3), dtype=torch.int64, device="cpu")
    with pytest.raises(TypeError, match="A: expected a TorchLinearOperator"):
        linops.aslinearoperator("matrix")
    with pytest.raises(ValueError, match="A: expected a 2-d array"):
        linops.aslinearoperator(torch.ones(3))


def test_cupy_round_trip_when_available() -> None:
    cupy = pytest.importorskip("cupy")
    if not torch.cuda.is_available():
        pytest.skip("CuPy without a CUDA device")
    A = _mat(4, 3).cuda()
    op = linops.aslinearoperator(A)
    x = cupy.arange(3, dtype=cupy.float64)
    out = op @ x
    assert isinstance(out, cupy.ndarray)
    cupy.testing.assert_allclose(
        out, cupy.asarray((A @ torch.arange(3.0, dtype=F64).cuda()).cpu().numpy())
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_stay_on_device() -> None:
    A = _mat(4, 3).cuda()
    op = linops.aslinearoperator(A)
    assert (op @ torch.ones(3, dtype=F64, device="cuda")).device.type == "cuda"


# ------------------------------------------------------------------ property-based laws
@settings(max_examples=25, deadline=None)
@given(dense_operators())
def test_laws_hold_for_random_dense_operators(op) -> None:
    check_operator(op)


@settings(max_examples=15, deadline=None)
@given(
    dense_operators(symmetric=False),
    dense_operators(symmetric=False),
    st.floats(-3, 3, allow_subnormal=False),  # a subnormal scale leaves too few bits for 2e-13
)
def test_composition_laws(a, b, c) -> None:
    if a.shape[1] != b.shape[0]:
        b = linops.aslinearoperator(torch.ones(a.shape[1], 2, dtype=F64))
    Da, Db = a.to_dense(), b.to_dense()
    torch.testing.assert_close((a @ b).to_dense(), Da @ Db)
    torch.testing.assert_close((a @ b).H.to_dense(), Db.T @ Da.T)
    torch.testing.assert_close((c * a + a).to_dense(), (c + 1) * Da)
    check_operator(c * (a @ b))


@settings(max_examples=12, deadline=None)
@given(jacobian_operators())
def test_laws_hold_for_random_jacobians(J) -> None:
    check_operator(J)


@settings(max_examples=12, deadline=None)
@given(hessian_operators())
def test_laws_hold_for_random_hessians(H) -> None:
    report = check_operator(H)
    assert report.symmetry <= 1e-12


def test_check_operator_catches_a_wrong_adjoint() -> None:
    class WrongAdjoint(Counting):
        def _rmatmat_torch(self, Y):
            return 2 * self.A.T @ Y

    with pytest.raises(AssertionError, match="adjoint identity"):
        check_operator(WrongAdjoint(_mat(4, 3)))


def test_check_operator_catches_nonlinearity_and_false_symmetry() -> None:
    class Affine(Counting):
        def _matmat_torch(self, X):
            return self.A @ X + 1.0

    with pytest.raises(AssertionError, match="linearity"):
        check_operator(Affine(_mat(3, 3)))
    op = linops.aslinearoperator(_mat(3, 3))
    op.is_symmetric = True
    with pytest.raises(AssertionError, match="adjoint identity|symmetry"):
        check_operator(op)


def test_finite_check_does_not_mistake_an_overflowing_sum_for_inf() -> None:
    op = linops.aslinearoperator(torch.eye(2))
    big = torch.tensor([3e38, 3e38])  # finite float32 entries whose sum overflows
    torch.testing.assert_close(op @ big, big)
    with pytest.raises(ValueError, match="contains NaN or inf"):
        op @ torch.tensor([float("inf"), float("-inf")])  # the sum is NaN


def test_conversion_and_composition_refusals() -> None:
    op = linops.aslinearoperator(_mat(2, 2))
    with pytest.raises(
        TypeError, match="A: expected a floating or complex dtype, got torch.bfloat16"
    ):
        linops.aslinearoperator(torch.ones(2, 2, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="dtype: expected a floating or complex dtype, got <U"):
        op.to(np.str_)
    with pytest.raises(TypeError, match="alpha: expected a real or complex number, got 'a'"):
        "a" * op
    with pytest.raises(ValueError, match="x: expected a tensor on device cpu, got meta"):
        op @ torch.ones(2, dtype=F64, device="meta")
    meta = linops.aslinearoperator(torch.ones(2, 2, dtype=F64, device="meta"))
    with pytest.raises(ValueError, match="operands live on different devices"):
        op + meta


def test_to_keeps_instance_flags_and_bounds() -> None:
    op = linops.aslinearoperator(_mat(3, 3) + _mat(3, 3).T)
    op.is_symmetric, op.check_finite, op.max_vectors = True, False, 2
    new = op.to(torch.float32)
    assert (new.is_symmetric, new.check_finite, new.max_vectors) == (True, False, 2)
    assert op.dtype == np.float64  # unchanged


def test_bfloat16_inputs_promote_as_torch_promotes_them() -> None:
    op = linops.aslinearoperator(torch.eye(2))
    out = op @ torch.ones(2, dtype=torch.bfloat16)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.ones(2))


def test_memory_limit_bytes_is_a_deprecated_name_of_memory_budget() -> None:
    A = _mat(5, 6)
    with pytest.warns(DeprecationWarning, match="memory_budget"):
        op = Counting(A, memory_limit_bytes=3 * (5 + 6) * 8)
    assert op.memory_budget == op.memory_limit_bytes == 3 * (5 + 6) * 8
    op @ _mat(6, 10)
    assert max(op.calls) == 3
    with pytest.raises(ValueError, match="memory_budget: expected a positive number"):
        Counting(A, memory_budget=0)


def test_a_big_row_major_block_is_gathered_chunk_by_chunk_into_one_output() -> None:
    """Over an eighth of the budget, no whole-block copy: each chunk is made contiguous."""

    class ColumnMajor(Counting):
        column_major_blocks = True

        def _matmat_torch(self, X: torch.Tensor) -> torch.Tensor:
            assert X.stride(0) == 1  # every hook call gets contiguous columns
            return super()._matmat_torch(X)

    A, X = _mat(5, 40), _mat(40, 6)  # row-major: 40 x 6 doubles = 1920 bytes
    for budget in (10**6, 8 * 1920 - 1):  # whole-block copy, then chunk by chunk
        op = ColumnMajor(A, max_vectors=4, memory_budget=budget)
        out = op @ X
        torch.testing.assert_close(out, A @ X)
        assert out.stride(0) == 1 and op.calls == [4, 2]
