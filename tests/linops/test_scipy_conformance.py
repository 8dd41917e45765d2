"""linops operators against SciPy's own ``aslinearoperator(matrix)``, entry point by entry point.

Each case pairs a linops operator with a SciPy reference built from the same matrix by SciPy
alone (``scipy.sparse.linalg.aslinearoperator`` of a numpy matrix, and SciPy's composites of
those); model operators are referenced by dense Jacobians from ``torch.func.jacrev``. The
behaviours walked are those SciPy documents for ``LinearOperator``: products from the right
(``matvec``, ``matmat``, ``rmatvec``, ``rmatmat``, ``dot``, ``@``, ``*``, ``__call__``) and
from the left (``x @ A``, ``x * A``), on 1-d and 2-d arrays, lists, nested lists, ``np.matrix``
and numpy scalars of every kind; adjoint and transpose; sums, products, scaling and powers;
``.args``; dtype determination; wrapping SciPy operators; and SciPy's solvers. Torch inputs
are checked against SciPy's answer for the same numbers: a tensor of the dtype SciPy returns.
The deliberate deviations listed in the README are checked as clear refusals.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import scipy.sparse as sp
import scipy.sparse.linalg as sla
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch.func import functional_call, jacrev

import linops
from linops.base import TorchLinearOperator

# np.matrix is part of the protocol under test
pytestmark = pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")

DTYPES = [np.float32, np.float64, np.complex64, np.complex128]
TORCH = {
    np.dtype(np.float16): torch.float16,
    np.dtype(np.float32): torch.float32,
    np.dtype(np.float64): torch.float64,
    np.dtype(np.complex64): torch.complex64,
    np.dtype(np.complex128): torch.complex128,
}


# --------------------------------------------------------------------------- cases
def _random(shape: tuple[int, ...], dtype: Any, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape)
    if np.issubdtype(dtype, np.complexfloating):
        x = x + 1j * rng.standard_normal(shape)
    return x.astype(dtype)


def _mlp() -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    X = torch.randn(5, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return model.double().eval(), X


def _jacobian_reference(model: torch.nn.Module, X: torch.Tensor) -> np.ndarray:
    """Dense J (sample-major rows, parameters in named_parameters order) by torch.func."""
    named = dict(model.named_parameters())
    sizes = [p.numel() for p in named.values()]
    theta = torch.cat([p.detach().reshape(-1) for p in named.values()])

    def f(th: torch.Tensor) -> torch.Tensor:
        parts = torch.split(th, sizes)
        params = {n: t.reshape(p.shape) for (n, p), t in zip(named.items(), parts, strict=True)}
        return functional_call(model, params, (X,)).reshape(-1)

    return jacrev(f)(theta).detach().numpy()


def _dense(dtype: Any) -> tuple[TorchLinearOperator, sla.LinearOperator]:
    M = _random((3, 4), dtype, 0)
    return linops.aslinearoperator(M), sla.aslinearoperator(M)


def _composite(dtype: Any) -> tuple[TorchLinearOperator, sla.LinearOperator]:
    """Sum, product, scaling, power and adjoint, built the same way by both libraries."""
    A, B, C, D = (_random(s, dtype, i) for i, s in enumerate([(3, 4), (4, 4), (3, 4), (4, 3)]))

    def build(wrap: Callable[[np.ndarray], Any]) -> Any:
        a, b, c, d = map(wrap, (A, B, C, D))
        return 0.5 * (a @ b**2) - c + a * 2 + d.H

    return build(linops.aslinearoperator), build(sla.aslinearoperator)


def _mixed(dtype: Any) -> tuple[TorchLinearOperator, sla.LinearOperator]:
    """A linops composite with SciPy operators on either side of its operations."""
    A, B, C = (_random(s, dtype, i) for i, s in enumerate([(3, 4), (4, 4), (3, 4)]))
    sA, sB, sC = map(sla.aslinearoperator, (A, B, C))
    ours = sA @ linops.aslinearoperator(B) + sC  # scipy_op @ L, then L + scipy_op
    return ours, sA @ sB + sC


def _jacobian() -> tuple[TorchLinearOperator, sla.LinearOperator]:
    model, X = _mlp()
    return linops.JacobianOperator(model, X), sla.aslinearoperator(_jacobian_reference(model, X))


def _ntk() -> tuple[TorchLinearOperator, sla.LinearOperator]:
    model, X = _mlp()
    J = _jacobian_reference(model, X)
    return linops.NTKOperator(model, X), sla.aslinearoperator(J @ J.T)


CASES: dict[str, Callable[[], tuple[TorchLinearOperator, sla.LinearOperator]]] = {
    **{f"dense-{np.dtype(d).name}": (lambda d=d: _dense(d)) for d in DTYPES},
    "composite-float64": lambda: _composite(np.float64),
    "composite-complex128": lambda: _composite(np.complex128),
    "mixed-float32": lambda: _mixed(np.float32),
    "mixed-complex64": lambda: _mixed(np.complex64),
    "jacobian": _jacobian,
    "ntk": _ntk,
}
_BUILT: dict[str, tuple[TorchLinearOperator, sla.LinearOperator]] = {}


@pytest.fixture(params=list(CASES))
def case(request: pytest.FixtureRequest) -> tuple[TorchLinearOperator, sla.LinearOperator]:
    if request.param not in _BUILT:  # model operators keep their graphs between tests
        _BUILT[request.param] = CASES[request.param]()
    return _BUILT[request.param]


# --------------------------------------------------------------------------- comparison
def _tolerance(*dtypes: Any) -> float:
    """A few hundred ulps of the least precise dtype involved."""
    eps = max(
        np.finfo(np.result_type(d, np.float16) if d is not None else np.float64).eps for d in dtypes
    )
    return 300 * float(eps)


def assert_like_scipy(ours: Any, ref: Any, *, torch_input: bool, op_dtype: Any) -> None:
    """Same kind, dtype, shape and values as SciPy's answer (a tensor for a torch input)."""
    if torch_input:
        assert isinstance(ours, torch.Tensor), f"expected a torch tensor, got {type(ours)}"
        assert ours.dtype == TORCH[np.asarray(ref).dtype], (ours.dtype, np.asarray(ref).dtype)
        ours = ours.numpy()
    else:
        assert type(ours) is type(ref), f"expected {type(ref).__name__}, got {type(ours)}"
        assert ours.dtype == ref.dtype, f"expected dtype {ref.dtype}, got {ours.dtype}"
    assert ours.shape == ref.shape, f"expected shape {ref.shape}, got {ours.shape}"
    rtol = _tolerance(op_dtype, np.asarray(ref).dtype)
    scale = float(np.abs(np.asarray(ref)).max(initial=0.0)) + 1.0
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=rtol, atol=rtol * scale)


def _inputs(n: int, complex_op: bool) -> dict[str, Any]:
    """Right-hand sides of length ``n`` in every form SciPy accepts (and torch tensors)."""
    v = _random((n,), np.float64, 7)
    V = _random((n, 2), np.float64, 8)
    z = _random((n,), np.complex128, 9)
    forms: dict[str, Any] = {
        "1d": v,
        "column": v[:, None],
        "matrix2d": V,
        "list": v.tolist(),
        "nested-list": V.tolist(),
        "np.matrix-column": np.asmatrix(v[:, None]),
        "np.matrix": np.asmatrix(V),
        "int64": np.arange(1, n + 1),
        "int8-2d": np.ones((n, 2), dtype=np.int8),
        "float32": v.astype(np.float32),
        "float16": v.astype(np.float16),
        "complex128": z,
        "complex64-2d": _random((n, 2), np.complex64, 10),
    }
    if complex_op:
        forms["complex64"] = z.astype(np.complex64)
    return forms


TORCHABLE = ["1d", "matrix2d", "int64", "float32", "complex128", "column"]


def _as_torch(x: Any) -> torch.Tensor:
    return torch.from_numpy(np.array(x))


RIGHT = {
    "matvec": lambda A, x: A.matvec(x),
    "matmat": lambda A, x: A.matmat(x),
    "dot": lambda A, x: A.dot(x),
    "@": lambda A, x: A @ x,
    "*": lambda A, x: A * x,
    "call": lambda A, x: A(x),
    "rmatvec": lambda A, x: A.rmatvec(x),
    "rmatmat": lambda A, x: A.rmatmat(x),
}


def _applies(entry: str, x: Any) -> bool:
    ndim = np.ndim(x)
    if entry in ("matvec", "rmatvec"):
        return ndim == 1 or np.shape(x)[1] == 1
    if entry in ("matmat", "rmatmat"):
        return ndim == 2
    return True


# --------------------------------------------------------------------------- right products
@pytest.mark.parametrize("entry", list(RIGHT))
def test_right_products_match_scipy(case, entry: str) -> None:
    ours, ref = case
    n = ours.shape[0] if entry.startswith("r") else ours.shape[1]
    for form, x in _inputs(n, ours.dtype.kind == "c").items():
        if not _applies(entry, x):
            continue
        expected = RIGHT[entry](ref, x)
        try:
            assert_like_scipy(
                RIGHT[entry](ours, x), expected, torch_input=False, op_dtype=ours.dtype
            )
            if form in TORCHABLE:
                got = RIGHT[entry](ours, _as_torch(x))
                assert_like_scipy(got, expected, torch_input=True, op_dtype=ours.dtype)
        except AssertionError as err:
            raise AssertionError(f"{entry} on {form}: {err}") from None


def test_shape_errors_match_scipy(case) -> None:
    ours, ref = case
    m, n = ours.shape
    bad = [
        ("matvec", np.ones(n + 1)),
        ("matvec", np.ones((n, 2))),
        ("matmat", np.ones(n)),
        ("matmat", np.ones((n + 1, 2))),
        ("rmatvec", np.ones(m + 1)),
        ("dot", np.ones((n, 2, 1))),
        ("@", np.ones(n + 1)),
    ]
    for entry, x in bad:
        with pytest.raises(ValueError):
            RIGHT[entry](ref, x)
        with pytest.raises(ValueError):
            RIGHT[entry](ours, x)
    for scalar in (2, 2.0, np.float32(2), 2j):
        with pytest.raises(ValueError, match="scalar operands are not allowed"):
            ours @ scalar
        with pytest.raises(ValueError, match="scalar operands are not allowed"):
            scalar @ ours
    with pytest.raises(ValueError, match="x: dimension mismatch"):
        np.ones(m + 1) @ ours


# --------------------------------------------------------------------------- left products
def _left_inputs(m: int) -> dict[str, Any]:
    v = _random((m,), np.float64, 11)
    V = _random((2, m), np.float64, 12)
    return {
        "1d": v,
        "row": v[None, :],
        "matrix2d": V,
        "list": v.tolist(),
        "row-list": [v.tolist()],
        "nested-list": V.tolist(),
        "np.matrix": np.asmatrix(V),
        "int64": np.arange(1, m + 1),
        "complex128": _random((2, m), np.complex128, 13),
        "float32": V.astype(np.float32),
    }


LEFT = {
    "x @ A": lambda A, x: x @ A,
    "x * A": lambda A, x: x * A,
    "A.__rmatmul__": lambda A, x: A.__rmatmul__(x),
    "A.T.dot(x.T).T": lambda A, x: A.T.dot(np.asarray(x).T).T,
}


@pytest.mark.parametrize("entry", list(LEFT))
def test_left_products_match_scipy(case, entry: str) -> None:
    ours, ref = case
    for form, x in _left_inputs(ours.shape[0]).items():
        expected = LEFT[entry](ref, x)
        try:
            assert_like_scipy(
                LEFT[entry](ours, x), expected, torch_input=False, op_dtype=ours.dtype
            )
            if form in ("1d", "matrix2d", "complex128", "float32") and entry != "A.T.dot(x.T).T":
                got = LEFT[entry](ours, _as_torch(x))
                assert_like_scipy(got, expected, torch_input=True, op_dtype=ours.dtype)
        except AssertionError as err:
            raise AssertionError(f"{entry} on {form}: {err}") from None


def test_arrays_times_adjoints_as_scipy_defines_them(case) -> None:
    ours, ref = case
    m, n = ours.shape
    b, B = _random((n,), np.complex128, 3), _random((2, n), np.float64, 4)
    y = _random((m,), np.float64, 5)
    pairs = [
        (lambda A: b * A.H, "b * A.H"),
        (lambda A: b @ A.H, "b @ A.H"),
        (lambda A: B @ A.adjoint(), "B @ A.adjoint()"),
        (lambda A: A.T.dot(y), "A.T.dot(y)"),
        (lambda A: A.H.dot(y), "A.H.dot(y)"),
        (lambda A: y @ A, "y @ A"),
        (lambda A: A.transpose() @ y, "A.transpose() @ y"),
    ]
    for f, what in pairs:
        try:
            assert_like_scipy(f(ours), f(ref), torch_input=False, op_dtype=ours.dtype)
        except AssertionError as err:
            raise AssertionError(f"{what}: {err}") from None


def test_one_dimensional_tensor_on_the_left_warns_nothing(case) -> None:
    ours, ref = case
    y = torch.ones(ours.shape[0], dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's deprecation of x.T on a 1-d tensor included
        out = y @ ours
        out2 = y * ours
    expected = np.ones(ours.shape[0]) @ ref
    assert_like_scipy(out, expected, torch_input=True, op_dtype=ours.dtype)
    assert_like_scipy(out2, expected, torch_input=True, op_dtype=ours.dtype)


# --------------------------------------------------------------------------- transposes
def _dense_of(A: Any) -> np.ndarray:
    return np.asarray(A.matmat(np.eye(A.shape[1])))


def test_adjoint_and_transpose_of_every_kind(case) -> None:
    ours, ref = case
    views = {
        "H": lambda A: A.H,
        "T": lambda A: A.T,
        "adjoint()": lambda A: A.adjoint(),
        "transpose()": lambda A: A.transpose(),
        "H.H": lambda A: A.H.H,
        "T.T": lambda A: A.T.T,
        "T.H": lambda A: A.T.H,
        "H.T": lambda A: A.H.T,
    }
    tol = _tolerance(ours.dtype)
    for what, view in views.items():
        V, R = view(ours), view(ref)
        assert isinstance(V, TorchLinearOperator), what
        assert V.shape == R.shape and V.dtype == R.dtype, what
        np.testing.assert_allclose(_dense_of(V), _dense_of(R), rtol=tol, atol=tol, err_msg=what)
    if not hasattr(ours, "ops"):  # composites rebuild their adjoints, as SciPy's do
        assert ours.T.T is ours and ours.H.H is ours


# --------------------------------------------------------------------------- scalars
SCALARS = [
    2,
    -1,
    2.5,
    2j,
    1 + 2j,
    np.float16(2),
    np.float32(2.5),
    np.float64(2.5),
    np.complex64(2j),
    np.complex128(1 - 2j),
    np.int8(3),
    np.int64(3),
    np.uint8(2),
]


@pytest.mark.parametrize("alpha", SCALARS, ids=repr)
def test_scalars_of_every_type(case, alpha: Any) -> None:
    ours, ref = case
    x_own = _random((ours.shape[1],), ours.dtype, 5)
    y64 = _random((ours.shape[0],), np.float64, 6)
    made = {
        "alpha * A": lambda A: alpha * A,
        "A * alpha": lambda A: A * alpha,
        "A.dot(alpha)": lambda A: A.dot(alpha),
        "A / alpha": lambda A: A / alpha,
    }
    for what, make in made.items():
        S, R = make(ours), make(ref)
        assert isinstance(S, TorchLinearOperator), what
        # numpy scalars: SciPy's dtype; Python scalars are weak (NEP 50), which is what
        # SciPy's products return (its declared dtype follows type(alpha): see the README)
        expected = R.dtype if isinstance(alpha, np.generic) else np.result_type(ours.dtype, alpha)
        assert S.dtype == expected, f"{what}: expected dtype {expected}, got {S.dtype}"
        # SciPy scales after its product in the operator's dtype: tolerances of that dtype
        for x in (x_own, x_own.astype(np.float64) if ours.dtype.kind == "f" else x_own):
            assert_like_scipy(S @ x, R @ x, torch_input=False, op_dtype=ours.dtype)
            got = S @ _as_torch(x)
            assert_like_scipy(got, R @ x, torch_input=True, op_dtype=ours.dtype)
        tol = _tolerance(ours.dtype) * (np.abs(R.H @ y64).max() + 1)
        np.testing.assert_allclose(S.H @ y64, R.H @ y64, rtol=tol, atol=tol, err_msg=what)
        np.testing.assert_allclose(y64 @ S, y64 @ R, rtol=tol, atol=tol, err_msg=what)


def test_complex_scalars_make_real_operators_complex() -> None:
    A = linops.aslinearoperator(np.array([[1.0, 2.0], [3.0, 4.0]]))
    for S in (2j * A, A * 2j, A / 2j, A.dot(2j), np.complex64(2j) * A):
        assert S.dtype == np.complex128
    assert (2j * linops.aslinearoperator(np.eye(2, dtype=np.float32))).dtype == np.complex64
    np.testing.assert_allclose((A / 2j) @ [1, 1], [-1.5j, -3.5j])
    np.testing.assert_allclose((2j * A).H @ [1, 1], [-8j, -12j])
    np.testing.assert_allclose((2j * A).T @ [1, 1], [8j, 12j])


def test_scaling_of_scaled_operators_multiplies_the_scales() -> None:
    A = linops.aslinearoperator(np.eye(2))
    S = 3 * (2 * A)
    assert S.args[0] is A and S.args[1] == 6
    assert (np.float32(0.5) * (4 * A)).args[1] == 2.0


# --------------------------------------------------------------------------- composition
def test_sums_products_and_powers_match_scipy(case) -> None:
    ours, ref = case
    m, n = ours.shape
    Bm = _random((n, n), np.float64, 20)
    sq, sq_ref = ours.H @ ours, ref.H @ ref
    pairs = {
        "A + A": (ours + ours, ref + ref),
        "A - A/2": (ours - ours / 2, ref - ref / 2),
        "-A": (-ours, -ref),
        "A @ B": (ours @ linops.aslinearoperator(Bm), ref @ sla.aslinearoperator(Bm)),
        "A.dot(B)": (ours.dot(sla.aslinearoperator(Bm)), ref.dot(sla.aslinearoperator(Bm))),
        "A * B": (ours * sla.aslinearoperator(Bm), ref * sla.aslinearoperator(Bm)),
        "(A^H A) ** 0": (sq**0, sq_ref**0),
        "(A^H A) ** 1": (sq**1, sq_ref**1),
        "(A^H A) ** 3": (sq**3, sq_ref**3),
        "(A^H A) ** np.int64(2)": (sq ** np.int64(2), sq_ref ** np.int64(2)),
        "((A^H A) ** 2).H": ((sq**2).H, (sq_ref**2).H),
    }
    x = _random((n,), np.complex128, 21)
    for what, (L, R) in pairs.items():
        assert isinstance(L, TorchLinearOperator), what
        # Python scalars (the 2 of A/2, the -1 of -A) are weak here: see the deviations
        weak = what in ("A - A/2", "-A")
        assert L.shape == R.shape and L.dtype == (ours.dtype if weak else R.dtype), what
        tol = _tolerance(ours.dtype) * (30 if "**" in what else 1)  # powers amplify rounding
        scale = np.abs(R @ x).max() + 1
        np.testing.assert_allclose(L @ x, R @ x, rtol=tol, atol=tol * scale, err_msg=what)
        assert isinstance(L @ torch.from_numpy(x), torch.Tensor), what
    x0 = np.arange(n, dtype=np.float64)
    assert not np.shares_memory(sq**0 @ x0, x0)  # A ** 0 copies, as SciPy's does


def test_power_errors_match_scipy() -> None:
    A, R = _dense(np.float64)
    S = linops.aslinearoperator(np.eye(3))
    for p in (-1, 1.5, 2.0):
        with pytest.raises(ValueError):
            sla.aslinearoperator(np.eye(3)) ** p
        with pytest.raises(ValueError, match="p: expected a non-negative integer"):
            S**p
    with pytest.raises(ValueError, match="p: powers need a square operator"):
        A**2
    with pytest.raises(TypeError):
        S ** np.ones(2)


def test_args_as_scipy_defines_them() -> None:
    M = np.arange(6.0).reshape(2, 3)
    A, B = linops.aslinearoperator(M), linops.aslinearoperator(M + 1)
    R = sla.aslinearoperator(M)
    np.testing.assert_array_equal(np.asarray(A.args[0]), R.args[0])
    assert len(A.args) == len(R.args) == 1
    for L in (A + B, A - B):
        assert L.args[0] is A and len(L.args) == 2
    assert (A + B).args == (A, B)
    C = linops.aslinearoperator(np.ones((3, 3)))
    assert (A @ C).args == (A, C) and A.dot(C).args == (A, C)
    assert (A * 3).args == (A, 3) and (3 * A).args == (A, 3)
    assert (C**2).args == (C, 2)
    assert A.H.args == (A,)
    Z = linops.aslinearoperator(M * 1j)
    assert Z.T.args == (Z,) and Z.H.args == (Z,)
    ((A + B) + A).args[0].args == (A, B)  # noqa: B015 - the binary structure is kept
    assert len(((A + B) + A).ops) == 3  # while products and sums are flattened inside
    s = sla.aslinearoperator(M)
    assert (s + A).args == (s, A) and (A + s).args == (A, s)
    assert linops.IdentityOperator(2).args == ()


# --------------------------------------------------------------------------- dtype
def test_dtype_determination_matches_scipy(case) -> None:
    ours, ref = case
    assert ours.dtype == ref.dtype
    for L, R in [
        (ours + ours, ref + ref),
        (ours.H, ref.H),
        (ours.T, ref.T),
        (ours @ ours.H, ref @ ref.H),
    ]:
        assert L.dtype == R.dtype
    assert (-ours).dtype == ours.dtype  # SciPy declares type(-1)'s promotion: see the deviations


@pytest.mark.parametrize("op_dtype", [np.float16, *DTYPES])
@pytest.mark.parametrize(
    "x_dtype",
    [np.bool_, np.int8, np.uint8, np.int16, np.int32, np.int64, np.float16, *DTYPES],
)
def test_one_dtype_policy_for_numpy_and_torch_inputs(op_dtype: Any, x_dtype: Any) -> None:
    M = _random((3, 3), op_dtype, 30)
    A = linops.aslinearoperator(M)
    x = (np.arange(1, 4) % 2 if x_dtype is np.bool_ else np.arange(1, 4)).astype(x_dtype)
    expected = np.result_type(op_dtype, x_dtype)
    out_np, out_t = A @ x, A @ torch.from_numpy(x)
    assert out_np.dtype == expected
    assert out_t.dtype == TORCH[expected]
    # dense operators compute in the promoted dtype: as accurate as numpy's own product
    exact = M.astype(expected) @ x.astype(expected)
    np.testing.assert_allclose(out_np, exact, rtol=_tolerance(expected), atol=_tolerance(expected))
    np.testing.assert_array_equal(out_t.numpy(), out_np)


def test_float32_dense_operator_computes_float64_products_in_float64() -> None:
    M = _random((10, 8), np.float32, 31)
    x = _random((8,), np.float64, 32)
    A = linops.aslinearoperator(M)
    exact = M.astype(np.float64) @ x
    np.testing.assert_allclose(A @ x, exact, rtol=1e-14)
    np.testing.assert_allclose((A @ torch.from_numpy(x)).numpy(), exact, rtol=1e-14)
    np.testing.assert_allclose((2.0 * A + A) @ x, 3 * exact, rtol=1e-14)  # composites too


def test_model_operators_compute_in_their_own_dtype_and_return_the_promoted_one() -> None:
    model, X = _mlp()
    J32 = linops.JacobianOperator(model, X, dtype=torch.float32)
    x = _random((J32.shape[1],), np.float64, 33)
    out = J32 @ x
    assert out.dtype == np.float64
    own = (J32 @ x.astype(np.float32)).astype(np.float64)
    np.testing.assert_array_equal(out, own)  # the float32 product, promoted
    np.testing.assert_array_equal((J32 @ torch.from_numpy(x)).numpy(), own)
    ref = _jacobian_reference(model, X) @ x
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_to_returns_a_new_operator_in_the_asked_dtype() -> None:
    M = _random((3, 4), np.float32, 34)
    A = linops.aslinearoperator(M)
    assert A.to() is A and A.to(torch.float32) is A
    A64 = A.to(torch.float64)
    assert A64 is not A and A64.dtype == np.float64 and A.dtype == np.float32
    np.testing.assert_array_equal(A64.to_dense().numpy(), M.astype(np.float64))
    Z = A.to(np.complex128)
    assert Z.dtype == np.complex128
    comp = 2j * (A @ linops.aslinearoperator(np.eye(4, dtype=np.float32))) + A
    comp64 = comp.to(torch.complex128, device="cpu")
    assert comp64.dtype == np.complex128 and comp.dtype == np.complex64
    x = _random((4,), np.float64, 35)
    np.testing.assert_allclose(comp64 @ x, (2j + 1) * (M.astype(np.float64) @ x), rtol=1e-14)
    eye = linops.IdentityOperator(3, dtype=torch.float32).to(torch.float64)
    assert isinstance(eye, linops.IdentityOperator) and eye.dtype == np.float64
    for L in (A.H, A.T, A + A, A**0 if False else (A.H @ A) ** 2, -A):
        assert L.to(torch.float64).dtype == np.float64
        np.testing.assert_allclose(
            L.to(torch.float64).to_dense().numpy(), L.to_dense().numpy(), rtol=1e-5, atol=1e-5
        )
    wrapped = linops.aslinearoperator(sp.csr_array(M)).to(torch.float64)
    np.testing.assert_allclose(wrapped @ x, M.astype(np.float64) @ x, rtol=1e-14)


def test_to_refusals() -> None:
    Z = linops.aslinearoperator(np.eye(2, dtype=np.complex64))
    with pytest.raises(TypeError, match="dtype: expected a complex dtype for a complex operator"):
        Z.to(torch.float64)
    with pytest.raises(TypeError, match="dtype: expected a floating or complex"):
        Z.to("cuda")
    with pytest.raises(TypeError, match="complex256|float128"):
        Z.to(np.clongdouble)

    class NoHook(TorchLinearOperator):
        def _matmat_torch(self, X: torch.Tensor) -> torch.Tensor:
            return X

    with pytest.raises(NotImplementedError, match="NoHook.to: .* _to\\(dtype, device\\) hook"):
        NoHook((2, 2), dtype=torch.float32, device="cpu").to(torch.float64)


def test_model_operator_to_float64() -> None:
    model, X = _mlp()
    J32 = linops.JacobianOperator(model, X, dtype=torch.float32)
    J64 = J32.to(torch.float64)
    assert J32.dtype == np.float32 and J64.dtype == np.float64
    x = _random((J32.shape[1],), np.float64, 36)
    np.testing.assert_allclose(J64 @ x, _jacobian_reference(model, X) @ x, rtol=1e-12)
    np.testing.assert_allclose(J32 @ x, J64 @ x, rtol=1e-5)  # J32 itself is unchanged
    K64 = linops.NTKOperator(model, X, dtype=torch.float32).to(torch.float64)
    D = _jacobian_reference(model, X)
    np.testing.assert_allclose(K64 @ x[: K64.shape[1]], D @ (D.T @ x[: K64.shape[1]]), rtol=1e-12)


# --------------------------------------------------------------------------- wrapping scipy
def _scipy_operators() -> dict[str, tuple[Any, np.ndarray]]:
    M = np.array([[1, 2], [3, 4]])
    return {
        "int8-inferred LinearOperator": (
            sla.LinearOperator((2, 2), matvec=lambda x: 2 * x, rmatvec=lambda x: 2 * x),
            2 * np.eye(2),
        ),
        "integer csr_array": (sp.csr_array(M), M),
        "integer MatrixLinearOperator": (sla.aslinearoperator(M), M),
        "integer ndarray": (M, M),
        "integer list": (M.tolist(), M),
        "integer tensor": (torch.from_numpy(M), M),
        "bool ndarray": (M > 2, (M > 2).astype(float)),
    }


@pytest.mark.parametrize("name", list(_scipy_operators()))
def test_integer_and_int8_inferred_operators_are_promoted(name: str) -> None:
    S, dense = _scipy_operators()[name]
    L = linops.aslinearoperator(S)
    assert L.dtype == np.float64
    x = np.array([1.0, -2.0])
    np.testing.assert_allclose(L @ x, dense @ x)
    np.testing.assert_allclose(L.H @ x, dense.T @ x)
    t = torch.tensor([1.0, -2.0], dtype=torch.float64)
    E = linops.aslinearoperator(np.eye(2))
    if isinstance(S, sla.LinearOperator):
        for mixed in (E + S, S + E, S @ E, E @ S, S - E, S * E, S.dot(E)):
            assert isinstance(mixed, TorchLinearOperator) and mixed.dtype == np.float64
            assert isinstance(mixed @ t, torch.Tensor)
        np.testing.assert_allclose((S + E) @ t, dense @ x + x)
        np.testing.assert_allclose((S @ E) @ t, dense @ x)
        np.testing.assert_allclose((S - E) @ t, dense @ x - x)


def test_composites_stay_linops_operators_when_either_side_is_one() -> None:
    M = _random((3, 3), np.float32, 40)
    L = linops.aslinearoperator(M)
    s = sla.aslinearoperator(M.astype(np.float64))
    t = torch.ones(3, dtype=torch.float32)
    made = {
        "s + L": s + L,
        "L + s": L + s,
        "s - L": s - L,
        "L - s": L - s,
        "s @ L": s @ L,
        "L @ s": L @ s,
        "s * L": s * L,
        "s.dot(L)": s.dot(L),
        "L ** 2": L**2,
        "L.__radd__(s)": L.__radd__(s),
        "L.__rmatmul__(s)": L.__rmatmul__(s),
        "L.__rmul__(s)": L.__rmul__(s),
        "(s + L) @ L": (s + L) @ L,
    }
    for what, C in made.items():
        assert isinstance(C, TorchLinearOperator), what
        out = C @ t
        expected = TORCH[np.result_type(C.dtype, np.float32)]
        assert isinstance(out, torch.Tensor) and out.dtype == expected, what
        assert C.dtype == (np.float32 if what == "L ** 2" else np.float64), what
    assert type(s + s).__module__.startswith("scipy")  # SciPy's own sums are untouched
    assert type(s @ s).__module__.startswith("scipy")


# --------------------------------------------------------------------------- regressions
def test_regression_nested_list_on_the_left_is_transposed() -> None:
    for A in (
        linops.aslinearoperator(np.array([[1, 2, 3], [4, 5, 6]])),
        linops.aslinearoperator(torch.tensor([[1.0, 2, 3], [4, 5, 6]])),
    ):
        np.testing.assert_array_equal([[1, 2], [3, 4]] @ A, [[9, 12, 15], [19, 26, 33]])
        np.testing.assert_array_equal([[1, 2]] @ A, [[9, 12, 15]])
        np.testing.assert_array_equal([1, 2] @ A, [9, 12, 15])


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.complex64, np.complex128])
def test_regression_numpy_complex64_scalar_is_not_dropped(dtype: Any) -> None:
    M = np.array([[1, 2, 3], [4, 5, 6]], dtype=dtype)
    A = linops.aslinearoperator(M)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's ComplexWarning included
        out = (np.complex64(2j) * A) @ [1, 1, 1]
    np.testing.assert_allclose(out, [12j, 30j], rtol=1e-6)
    assert out.dtype == np.result_type(dtype, np.complex64, np.int64)  # the list is int64


# --------------------------------------------------------------------------- deviations
def test_deviation_nan_and_inf_inputs_are_refused() -> None:
    A = linops.aslinearoperator(np.eye(2))
    for x in (np.array([1.0, np.nan]), np.array([np.inf, 0.0]), torch.tensor([np.nan, 0.0])):
        with pytest.raises(ValueError, match="x: contains NaN or inf"):
            A @ x
        with pytest.raises(ValueError, match="x: contains NaN or inf"):
            x @ A


def test_deviation_longdouble_is_refused() -> None:
    A = linops.aslinearoperator(np.eye(2))
    msg = "expected float16, float32, float64, complex64 or complex128, got (float128|complex256)"
    with pytest.raises(TypeError, match="x: " + msg):
        A @ np.ones(2, dtype=np.longdouble)
    with pytest.raises(TypeError, match="y: " + msg):
        A.rmatvec(np.ones(2, dtype=np.clongdouble))
    with pytest.raises(TypeError, match="x: " + msg):
        np.ones(2, dtype=np.longdouble) @ A
    with pytest.raises(TypeError, match="A: " + msg):
        linops.aslinearoperator(np.eye(2, dtype=np.longdouble))
    with pytest.raises(TypeError, match="alpha: " + msg):
        np.longdouble(2) * A


def test_deviation_sparse_right_hand_sides_are_refused() -> None:
    A = linops.aslinearoperator(np.eye(2))
    with pytest.raises(TypeError, match="x: expected a dense array, got a SciPy sparse"):
        A @ sp.csr_array(np.eye(2))


def test_deviation_one_dimensional_arrays_are_not_operators() -> None:
    assert sla.aslinearoperator(np.ones(3)).shape == (1, 3)  # SciPy reads a row
    with pytest.raises(ValueError, match="A: expected a 2-d array, got shape \\(3,\\)"):
        linops.aslinearoperator(np.ones(3))


def test_deviation_python_scalars_are_weak_in_the_declared_dtype() -> None:
    A32 = linops.aslinearoperator(np.eye(2, dtype=np.float32))
    R32 = sla.aslinearoperator(np.eye(2, dtype=np.float32))
    assert (2.0 * R32).dtype == np.float64 and (-R32).dtype == np.float64  # type(alpha)
    assert (2.0 * A32).dtype == np.float32 and (-A32).dtype == np.float32  # NEP 50
    x = np.ones(2, dtype=np.float32)
    assert ((2.0 * A32) @ x).dtype == ((2.0 * R32) @ x).dtype == np.float32  # products agree
    C64 = linops.aslinearoperator(np.eye(2, dtype=np.complex64))
    assert (2j * C64).dtype == np.complex64  # SciPy declares complex128, computes complex64
    assert ((2j * C64) @ x).dtype == (
        (2j * sla.aslinearoperator(np.eye(2, dtype=np.complex64))) @ x
    ).dtype


def test_deviation_zero_dimensional_tensors_are_scalars() -> None:
    A = linops.aslinearoperator(np.eye(2))
    two = torch.tensor(2.0, dtype=torch.float64)
    for S in (A * two, two * A, A.dot(two), A / (1 / two)):
        assert isinstance(S, TorchLinearOperator)
        np.testing.assert_allclose(S @ np.ones(2), [2.0, 2.0])
    with pytest.raises(ValueError, match="scalar operands are not allowed"):
        A @ two
    with pytest.raises(ValueError):  # SciPy: a 0-d array is neither vector nor matrix
        sla.aslinearoperator(np.eye(2)).dot(np.array(2.0))


# --------------------------------------------------------------------------- hypothesis
@settings(max_examples=60, deadline=None)
@given(
    m=st.integers(1, 4),
    n=st.integers(1, 4),
    dtype=st.sampled_from(DTYPES),
    x_dtype=st.sampled_from([np.int64, np.float32, np.float64, np.complex64, np.complex128]),
    k=st.sampled_from([None, 1, 3]),
    entry=st.sampled_from(["matvec", "matmat", "dot", "@", "rmatvec", "rmatmat", "left"]),
    kind=st.sampled_from(["numpy", "list", "np.matrix", "torch"]),
    seed=st.integers(0, 2**16),
)
def test_random_products_match_scipy(m, n, dtype, x_dtype, k, entry, kind, seed) -> None:
    M = _random((m, n), dtype, seed)
    ours, ref = linops.aslinearoperator(M), sla.aslinearoperator(M)
    adjoint = entry.startswith("r") or entry == "left"
    length = m if adjoint else n
    shape = (length,) if k is None else (length, k)
    if entry == "left":
        shape = shape[::-1]
    x = (_random(shape, np.float64, seed + 1) * 4).astype(x_dtype)
    assume(_applies(entry, x if entry != "left" else x.T))
    call = (lambda A, v: v @ A) if entry == "left" else RIGHT[entry]
    expected = call(ref, x)
    if kind == "torch":
        got = call(ours, torch.from_numpy(x))
    else:
        xin = (
            x.tolist()
            if kind == "list"
            else (np.asmatrix(x) if kind == "np.matrix" and x.ndim == 2 else x)
        )
        expected = call(ref, xin)
        got = call(ours, xin)
    assert_like_scipy(got, expected, torch_input=kind == "torch", op_dtype=dtype)


# --------------------------------------------------------------------------- solvers
def _spd(n: int, dtype: Any) -> np.ndarray:
    G = _random((n, n), np.float64, 50)
    return (G @ G.T / n + np.eye(n)).astype(dtype)


def _residual(M: np.ndarray, x: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(M.astype(np.float64) @ x - b) / np.linalg.norm(b))


SOLVE_RTOL = 1e-10


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    "solver", [sla.cg, sla.gmres, sla.minres, sla.bicgstab], ids=lambda s: s.__name__
)
def test_krylov_solvers_reach_scipys_residuals(dtype: Any, solver: Any) -> None:
    S = _spd(20, dtype)
    b = _random((20,), np.float64, 51)  # a float64 right-hand side on a float32 operator
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x, info = solver(linops.aslinearoperator(S), b, rtol=SOLVE_RTOL)
    x_ref, info_ref = solver(sla.aslinearoperator(S), b, rtol=SOLVE_RTOL)
    assert info == info_ref == 0
    assert x.dtype == x_ref.dtype == np.float64
    res, res_ref = _residual(S, x, b), _residual(S, x_ref, b)
    # cg, gmres and bicgstab stop at ||b - A x|| <= rtol ||b||; minres at a test scaled by
    # ||A|| ||x||, so only its agreement with SciPy is asserted
    assert solver is sla.minres or res <= SOLVE_RTOL
    assert res <= 10 * max(res_ref, 1e-15), f"residual {res:.2e}, SciPy's {res_ref:.2e}"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("solver", [sla.lsmr, sla.lsqr], ids=lambda s: s.__name__)
def test_least_squares_solvers_reach_scipys_accuracy(dtype: Any, solver: Any) -> None:
    M = _random((10, 8), dtype, 52)
    b = _random((10,), np.float64, 53)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "overflow encountered in cast"
        out = solver(linops.aslinearoperator(M), b, atol=SOLVE_RTOL, btol=SOLVE_RTOL)
    ref = solver(sla.aslinearoperator(M), b, atol=SOLVE_RTOL, btol=SOLVE_RTOL)
    exact = np.linalg.lstsq(M.astype(np.float64), b, rcond=None)[0]
    assert out[1] == ref[1]  # istop
    err = np.linalg.norm(out[0] - exact) / np.linalg.norm(exact)
    err_ref = np.linalg.norm(ref[0] - exact) / np.linalg.norm(exact)
    assert out[0].dtype == ref[0].dtype == np.float64
    assert err <= max(100 * err_ref, 1e-12)


def _eig_tol(dtype: Any) -> float:
    return 1e-4 if np.dtype(dtype) == np.float32 else 1e-10


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_eigensolvers_match_scipy(dtype: Any) -> None:
    S = _spd(20, dtype)
    N = _random((20, 20), dtype, 54)
    L, R = linops.aslinearoperator(S), sla.aslinearoperator(S)
    v0 = np.ones(20, dtype=dtype)
    w, V = sla.eigsh(L, k=3, which="LA", v0=v0)
    w_ref, _ = sla.eigsh(R, k=3, which="LA", v0=v0)
    assert w.dtype == w_ref.dtype
    np.testing.assert_allclose(w, w_ref, rtol=_eig_tol(dtype))
    np.testing.assert_allclose(S @ V, V * w, atol=10 * _eig_tol(dtype) * w.max())
    e, _ = sla.eigs(linops.aslinearoperator(N), k=3, which="LM", v0=v0)
    e_ref, _ = sla.eigs(sla.aslinearoperator(N), k=3, which="LM", v0=v0)
    assert e.dtype == e_ref.dtype
    np.testing.assert_allclose(np.sort_complex(e), np.sort_complex(e_ref), rtol=_eig_tol(dtype))
    X0 = _random((20, 2), np.float64, 55)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # lobpcg's notes on small problems
        lw, _ = sla.lobpcg(L, X0, tol=1e-8, maxiter=200)
        lw_ref, _ = sla.lobpcg(R, X0, tol=1e-8, maxiter=200)
    assert lw.dtype == lw_ref.dtype
    np.testing.assert_allclose(np.sort(lw), np.sort(lw_ref), rtol=_eig_tol(dtype))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("svd_solver", ["arpack", "propack", "lobpcg"])
def test_svds_with_every_solver_matches_scipy(dtype: Any, svd_solver: str) -> None:
    M = _random((24, 20), dtype, 56)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        U, s, Vh = sla.svds(linops.aslinearoperator(M), k=3, solver=svd_solver, random_state=0)
        _, s_ref, _ = sla.svds(sla.aslinearoperator(M), k=3, solver=svd_solver, random_state=0)
    assert s.dtype == s_ref.dtype
    np.testing.assert_allclose(s, s_ref, rtol=_eig_tol(dtype))
    np.testing.assert_allclose(
        np.sort(s),
        np.linalg.svd(M.astype(np.float64), compute_uv=False)[:3][::-1],
        rtol=_eig_tol(dtype),
    )
    np.testing.assert_allclose(M @ Vh.T, U * s, atol=10 * _eig_tol(dtype) * s.max())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def _same_draws(f: Callable[[Any], Any], *ops: Any) -> list[Any]:
    """``f(op)`` for each operator from the same state of numpy's global generator.

    SciPy's ``onenormest`` (also inside ``expm_multiply``) draws its sign vectors from
    ``np.random``; replaying one state gives both libraries the same draws.
    """
    state = np.random.get_state()  # noqa: NPY002 - the legacy generator SciPy draws from
    out = []
    for op in ops:
        np.random.set_state(state)  # noqa: NPY002
        out.append(f(op))
    return out


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_expm_multiply_and_onenormest_match_scipy(dtype: Any) -> None:
    S = _spd(20, dtype) * dtype(0.1)
    b = _random((20,), np.float64, 57)
    L, R = linops.aslinearoperator(S), sla.aslinearoperator(S)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "trace will be estimated", in both
        y, y_ref = _same_draws(lambda A: sla.expm_multiply(A, b), L, R)
    assert y.dtype == y_ref.dtype
    np.testing.assert_allclose(y, y_ref, rtol=1e-12)
    norm, norm_ref = _same_draws(sla.onenormest, L, R)
    assert np.asarray(norm).dtype == np.asarray(norm_ref).dtype
    np.testing.assert_allclose(norm, norm_ref, rtol=1e-12)
    assert norm <= np.abs(S.astype(np.float64)).sum(axis=0).max() * (1 + 1e-6)  # a lower bound


# --------------------------------------------------------------------------- figures
def solver_figures() -> list[str]:
    """The residuals and errors the solver tests compare, one line per dtype and solver."""
    lines = []
    for dtype in (np.float32, np.float64):
        S, b = _spd(20, dtype), _random((20,), np.float64, 51)
        for solver in (sla.cg, sla.gmres, sla.minres, sla.bicgstab):
            cells = []
            for op in (linops.aslinearoperator(S), sla.aslinearoperator(S)):
                x, info = solver(op, b, rtol=SOLVE_RTOL)
                cells.append(f"info={info} residual={_residual(S, x, b):.1e}")
            lines.append(
                f"{np.dtype(dtype).name:8} {solver.__name__:9} linops {cells[0]:25} scipy {cells[1]}"
            )
        M, c = _random((10, 8), dtype, 52), _random((10,), np.float64, 53)
        exact = np.linalg.lstsq(M.astype(np.float64), c, rcond=None)[0]
        for solver in (sla.lsmr, sla.lsqr):
            cells = []
            for op in (linops.aslinearoperator(M), sla.aslinearoperator(M)):
                out = solver(op, c, atol=SOLVE_RTOL, btol=SOLVE_RTOL)
                err = np.linalg.norm(out[0] - exact) / np.linalg.norm(exact)
                cells.append(f"istop={out[1]} error={err:.1e}")
            lines.append(
                f"{np.dtype(dtype).name:8} {solver.__name__:9} linops {cells[0]:25} scipy {cells[1]}"
            )
    return lines


if __name__ == "__main__":  # python3 -m tests.linops.test_scipy_conformance
    print("\n".join(solver_figures()))
