"""linops.inverse against dense float64 solves (torch.linalg.solve), and its failure policy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from linops import GGNOperator, aslinearoperator
from linops.inverse import (
    InverseNoConvergence,
    InverseOperator,
    NystromPreconditioner,
    inverse,
    nystrom_preconditioner,
)

F64 = torch.float64


def _spd(n: int, cond: float, seed: int = 0, dtype: torch.dtype = F64) -> torch.Tensor:
    """Symmetric positive definite with eigenvalues log-spaced in [1/cond, 1]."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    ev = torch.logspace(0, -float(np.log10(cond)), n, dtype=F64)
    return ((Q * ev) @ Q.T).to(dtype)


def _rhs(n: int, k: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _rel(X: torch.Tensor, ref: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(X - ref) / torch.linalg.matrix_norm(ref))


def _sym_with(ev: torch.Tensor, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(len(ev), len(ev), generator=g, dtype=F64))
    return (Q * ev) @ Q.T


def _jacobi(A: torch.Tensor, lam: float) -> torch.Tensor:
    return torch.diag(1.0 / (torch.diagonal(A) + lam))


@pytest.mark.parametrize("pc", [None, "nystrom", "jacobi"])
@pytest.mark.parametrize("method", ["cg", "cg-columns", "minres", "lsmr", "neumann"])
def test_every_method_matches_a_dense_solve(method: str, pc: str | None) -> None:
    block = False if method == "cg-columns" else None  # "cg": block CG for 5 columns
    method = method.removesuffix("-columns")
    if method == "lsmr" and pc is not None:
        pytest.skip("lsmr takes no preconditioner")
    n, lam = 40, 0.02 if method == "neumann" else 1e-3
    A = _spd(n, 1e3)
    B = _rhs(n, 5)
    B[:, 3] = 0.0  # a zero right-hand side is solved by x = 0
    M = {"nystrom": "nystrom", "jacobi": _jacobi(A, lam), None: None}[pc]
    if method == "neumann" and pc == "jacobi":
        with pytest.raises(ValueError, match="preconditioner: method='neumann' expected a Nys"):
            inverse(A, damping=lam, method=method, preconditioner=M) @ B
        return
    maxiter = 5000 if method == "neumann" else None  # Richardson needs ~ cond * log(1/rtol)
    Ainv = inverse(
        A, damping=lam, method=method, rtol=1e-12, preconditioner=M, seed=0, maxiter=maxiter,
        block=block,
    )  # fmt: skip
    X = Ainv @ B
    ref = torch.linalg.solve(A + lam * torch.eye(n, dtype=F64), B)
    assert _rel(X, ref) < 1e-10
    info = Ainv.info
    true = torch.linalg.vector_norm(B - (A + lam * torch.eye(n, dtype=F64)) @ X, dim=0)
    assert info.converged and info.x is None
    # the reported residuals are the true ones (up to the rounding of recomputing them)
    assert bool(((info.residuals - true).abs() <= 1e-14 * B.norm(dim=0) + 1e-6 * true).all())
    assert bool((info.residuals <= info.tolerances).all())
    assert torch.allclose(info.tolerances, 1e-12 * torch.linalg.vector_norm(B, dim=0))
    assert info.num_matvecs >= info.iterations > 0


def test_vectors_numpy_and_accumulated_counts() -> None:
    A = _spd(30, 100.0)
    Ainv = inverse(A, damping=0.1, rtol=1e-12)
    b = _rhs(30, 1)[:, 0]
    ref = torch.linalg.solve(A + 0.1 * torch.eye(30, dtype=F64), b)
    x = Ainv @ b.numpy()
    assert isinstance(x, np.ndarray) and x.shape == (30,)
    assert np.abs(x - ref.numpy()).max() / np.abs(ref.numpy()).max() < 1e-10
    first = Ainv.info.num_matvecs
    assert first == 3 + Ainv.info.iterations + 1  # symmetry probe, iterations, true residual
    Ainv @ b
    assert Ainv.num_matvecs == first + Ainv.info.num_matvecs and Ainv.info.num_matvecs < first
    assert isinstance(Ainv, InverseOperator) and Ainv.is_symmetric


def test_minres_indefinite_and_lsmr_nonsymmetric() -> None:
    n = 40
    g = torch.Generator().manual_seed(3)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    S = (Q * torch.linspace(-1, 1, n, dtype=F64).add(0.0123)) @ Q.T
    B = _rhs(n, 3)
    X = inverse(S, method="minres", rtol=1e-12) @ B
    assert _rel(X, torch.linalg.solve(S, B)) < 1e-10
    with pytest.raises(ValueError, match="A: expected A \\+ damping I positive definite"):
        inverse(S, method="cg") @ B
    N = torch.randn(n, n, generator=g, dtype=F64) + 8 * torch.eye(n, dtype=F64)
    Ninv = inverse(N, method="lsmr", damping=0.5, rtol=1e-13)
    shifted = N + 0.5 * torch.eye(n, dtype=F64)
    assert _rel(Ninv @ B, torch.linalg.solve(shifted, B)) < 1e-10
    assert _rel(Ninv.T @ B, torch.linalg.solve(shifted.T, B)) < 1e-10
    assert not Ninv.is_symmetric
    with pytest.raises(ValueError, match="A: expected a symmetric operator for method='cg'"):
        inverse(N) @ B


def test_model_operator() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    X, y = torch.randn(20, 4, dtype=F64), torch.randint(0, 3, (20,))
    G = GGNOperator(model, nn.CrossEntropyLoss(), (X, y))
    dense = G.to_dense()
    lam = 1e-3 * float(torch.linalg.eigvalsh(dense).max())
    B = _rhs(G.shape[0], 4)
    ref = torch.linalg.solve(dense + lam * torch.eye(G.shape[0], dtype=F64), B)
    for pc in (None, "nystrom"):
        Ginv = inverse(G, damping=lam, rtol=1e-12, preconditioner=pc, seed=0)
        assert _rel(Ginv @ B, ref) < 1e-10


def test_no_convergence_carries_the_partial_result() -> None:
    A, B = _spd(40, 1e4), _rhs(40, 2)
    Ainv = inverse(A, damping=1e-4, rtol=1e-10, maxiter=5)
    with pytest.raises(InverseNoConvergence, match="reached maxiter=5 after 5 iterations") as e:
        Ainv @ B
    res = e.value.result
    assert isinstance(e.value, RuntimeError) and not res.converged
    assert res.x.shape == (40, 2) and res.iterations == 5
    true = torch.linalg.vector_norm(B - (A + 1e-4 * torch.eye(40, dtype=F64)) @ res.x, dim=0)
    assert torch.allclose(res.residuals, true) and bool((res.residuals > res.tolerances).all())
    assert Ainv.info is not None and not Ainv.info.converged


def test_float32_unreachable_tolerance_is_an_error() -> None:
    A, B = _spd(50, 1e3, dtype=torch.float32), _rhs(50, 3).float()
    with pytest.raises(ValueError, match="rtol: expected a tolerance at least 4 eps"):
        inverse(A, rtol=1e-7) @ B
    with pytest.raises(InverseNoConvergence, match="below what torch.float32 reaches") as e:
        inverse(A, rtol=1e-6) @ B
    assert not e.value.result.converged and e.value.result.x.dtype == torch.float32
    Ainv = inverse(A, rtol=1e-4)
    X = Ainv @ B
    true = torch.linalg.vector_norm(B - A @ X, dim=0)
    assert bool((true <= 1e-4 * torch.linalg.vector_norm(B, dim=0) * 1.01).all())
    assert Ainv.info.converged
    # default rtol: sqrt(eps) of the dtype
    Ainv = inverse(A.double())
    Ainv @ B.double()
    expected = torch.finfo(F64).eps ** 0.5 * torch.linalg.vector_norm(B.double(), dim=0)
    assert torch.allclose(Ainv.info.tolerances, expected)
    assert Ainv.to(torch.float32).torch_dtype == torch.float32


def test_nystrom_preconditioner_formula_and_effect() -> None:
    n, mu = 60, 1e-4
    A = _spd(n, 1e6, seed=4)
    P = nystrom_preconditioner(A, 20, damping=mu, seed=0)
    assert isinstance(P, NystromPreconditioner) and P.rank == 20 and P.num_matvecs == 30
    U, lam = P.eigenvectors, P.eigenvalues
    Pinv = (lam.min() + mu) * (U * (1 / (lam + mu))) @ U.T + torch.eye(n, dtype=F64) - U @ U.T
    assert _rel(P.to_dense(), Pinv) < 1e-12
    half = P.sqrt_inverse().to_dense()
    assert _rel(half @ half, Pinv) < 1e-12
    # the adaptive rank: doubled from 16 until the smallest kept eigenvalue is below 10 mu
    Pa = nystrom_preconditioner(A, damping=mu, seed=0)
    assert float(Pa.eigenvalues.min()) <= 10 * mu and Pa.rank == 32
    assert Pa.num_matvecs == 32 + 10  # the sketch grew from 26 to 42 columns, none redone
    top = torch.linalg.eigvalsh(A)[-5:]
    assert torch.allclose(Pa.eigenvalues[-5:], top, rtol=1e-3)  # Nystrom: below, close at the top
    assert bool((Pa.eigenvalues[-5:] <= top * (1 + 1e-12)).all())
    U, lam = Pa.eigenvectors, Pa.eigenvalues
    assert torch.allclose(U.T @ U, torch.eye(32, dtype=F64), atol=1e-12)
    B = _rhs(n, 3)
    plain, pre = inverse(A, damping=mu), inverse(A, damping=mu, preconditioner=Pa)
    plain @ B, pre @ B
    # the counts move by an iteration with the BLAS's rounding: 15 against 44 on an AMD EPYC
    # (MKL, AVX-512), at least 45 on the CPUs of earlier runs
    assert 2.5 * pre.info.iterations <= plain.info.iterations


def test_errors() -> None:
    A = _spd(10, 10.0)
    with pytest.raises(ValueError, match="A: expected a square operator, got shape"):
        inverse(torch.zeros(3, 4, dtype=F64))
    with pytest.raises(ValueError, match="damping: expected a number >= 0, got -1"):
        inverse(A, damping=-1)
    with pytest.raises(ValueError, match="method: expected one of"):
        inverse(A, method="gmres")
    with pytest.raises(ValueError, match="preconditioner: expected None with method='lsmr'"):
        inverse(A, method="lsmr", preconditioner="nystrom")
    with pytest.raises(ValueError, match="preconditioner: expected one of"):
        inverse(A, preconditioner="jacobi")
    with pytest.raises(ValueError, match="preconditioner: expected shape"):
        inverse(A, preconditioner=torch.eye(3, dtype=F64))
    with pytest.raises(ValueError, match="rtol: expected a number in \\[0, 1\\)"):
        inverse(A, rtol=2.0)
    with pytest.raises(ValueError, match="atol: expected a number >= 0"):
        inverse(A, atol=-1.0)
    with pytest.raises(ValueError, match="maxiter: expected an integer >= 1"):
        inverse(A, maxiter=0)
    with pytest.raises(ValueError, match="damping: expected a number > 0, got 0"):
        nystrom_preconditioner(A, damping=0)
    with pytest.raises(ValueError, match="A: expected a square \\(PSD\\) operator"):
        nystrom_preconditioner(aslinearoperator(torch.zeros(3, 4, dtype=F64)), damping=1.0)
    with pytest.raises(ValueError, match="A: method='neumann' expected a positive definite"):
        inverse(-A, method="neumann") @ torch.ones(10, dtype=F64)


def test_block_cg_pays_with_many_right_hand_sides() -> None:
    """One block Krylov space resolves 20 outlying eigenvalues k at a time."""
    n = 200
    ev = torch.cat(
        [torch.logspace(0, -1, 20, dtype=F64), torch.logspace(-3, -4, n - 20, dtype=F64)]
    )
    g = torch.Generator().manual_seed(8)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    A = (Q * ev) @ Q.T
    B = _rhs(n, 16)
    ref = torch.linalg.solve(A, B)
    block, columns = inverse(A, rtol=1e-10), inverse(A, rtol=1e-10, block=False)
    assert _rel(block @ B, ref) < 1e-7 and _rel(columns @ B, ref) < 1e-7
    assert 4 * block.info.num_matvecs < columns.info.num_matvecs
    with pytest.raises(TypeError, match="block: expected True, False or None"):
        inverse(A, block=1)


def test_damping_takes_numpy_and_torch_scalars() -> None:
    """np.float32(0.01) or torch.tensor(0.01) was refused as 'expected a number >= 0'."""
    A = torch.diag(torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64))
    b = torch.ones(3, dtype=torch.float64)
    want = b / (torch.diagonal(A) + 0.25)
    for d in (0.25, np.float32(0.25), np.float64(0.25), torch.tensor(0.25)):
        torch.testing.assert_close(inverse(A, damping=d, rtol=1e-12) @ b, want)
    for bad in (True, float("nan"), float("inf"), -1.0, torch.tensor([0.1, 0.2]), "0.1"):
        with pytest.raises(ValueError, match="damping: expected a number >= 0"):
            inverse(A, damping=bad)


def test_a_diverging_solve_says_so_and_names_the_method_to_use() -> None:
    """Neumann on an indefinite matrix diverged (relative residual 5.6e131) with the advice
    'raise maxiter'; a float64 solve below its floor was advised to use float64."""
    A = torch.diag(torch.tensor([-0.5, 1.0, 2.0], dtype=torch.float64))
    b = torch.ones(3, dtype=torch.float64)
    with pytest.raises(InverseNoConvergence, match="diverged.*use method='minres'") as err:
        inverse(A, method="neumann", maxiter=200) @ b
    assert "raise maxiter" not in str(err.value)
    x = inverse(A, method="minres", rtol=1e-12) @ b
    torch.testing.assert_close(A @ x, b)


def test_a_damping_below_float32_rounding_is_named_as_the_cause() -> None:
    """MINRES diverging on a float32 rank-10 matrix with damping 1e-6 was told to 'use a damping
    > 0': the damping is positive, but below the products' rounding (eps ||A|| = 1.2e-5)."""
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(40, 40, generator=g, dtype=torch.float64))
    d = torch.zeros(40, dtype=torch.float64)
    d[:10] = torch.logspace(0, 2, 10, dtype=torch.float64)
    A, b = ((Q * d) @ Q.T).float(), torch.randn(40, generator=g)
    with pytest.raises(InverseNoConvergence, match="diverged") as err:
        inverse(A, damping=1e-6, method="minres", rtol=1e-4, maxiter=2000) @ b
    assert "singular to torch.float32's rounding of the products (a damping of 1e-06" in str(
        err.value
    )
    assert "use a damping > 0" not in str(err.value)


def test_lsmr_and_neumann_failures_name_the_real_cause() -> None:
    """LSMR on a singular system with b outside the range was told to use method='lsmr';
    Neumann crawling on a slightly indefinite matrix was only told to raise maxiter."""
    d = torch.cat([torch.zeros(2), torch.linspace(1, 10, 28)]).double()
    b = _rhs(30, 1)[:, 0]
    with pytest.raises(InverseNoConvergence, match="diverged") as err:
        inverse(_sym_with(d), method="lsmr", rtol=1e-10) @ b
    assert "or method='lsmr'" not in str(err.value) and "b outside its range" in str(err.value)
    A = torch.diag(torch.cat([torch.tensor([-1e-3]), torch.linspace(0.5, 2, 9)]).double())
    with pytest.raises(InverseNoConvergence, match="converges only for a positive definite"):
        inverse(A, method="neumann", rtol=1e-10, maxiter=300) @ torch.ones(10, dtype=torch.float64)


def test_a_solve_out_of_budget_whose_true_residuals_passed_is_converged() -> None:
    """CG ending at maxiter by its own residual estimate while the true residuals are within
    tolerance must return the solve, not fail (a max() over no failing column crashed)."""
    n = 200
    ev = torch.cat(
        [torch.logspace(0, -1, 20, dtype=F64), torch.logspace(-3, -4, n - 20, dtype=F64)]
    )
    A = _sym_with(ev, seed=8)
    B = _rhs(n, 2)
    for maxiter in (47, 60, 100):
        op = inverse(A, rtol=1e-10, maxiter=maxiter)
        try:
            X = op @ B
        except InverseNoConvergence as err:
            assert bool((err.result.residuals > err.result.tolerances).any())
            continue
        assert bool((op.info.residuals <= op.info.tolerances).all())
        torch.testing.assert_close(A @ X, B, rtol=0, atol=1e-8)


def test_block_cg_that_crawls_to_maxiter_names_block_false() -> None:
    """[b, b + 1e-6 e] at condition 1e4: block CG loses the conjugacy of its blocks and
    reaches maxiter at 6e-9 relative; the error names block=False, which converges."""
    A = _spd(40, 1e4)
    b, e = _rhs(40, 1)[:, 0], _rhs(40, 1, seed=2)[:, 0]
    B = torch.stack([b, b + 1e-6 * e], dim=1)
    with pytest.raises(InverseNoConvergence, match="or block=False"):
        inverse(A, rtol=1e-10) @ B
    X = inverse(A, rtol=1e-10, block=False) @ B
    torch.testing.assert_close(X, torch.linalg.solve(A, B), rtol=1e-8, atol=0)
