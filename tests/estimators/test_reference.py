"""Reference-set Jacobians (seed 000 section 3.1-3.2) against dense float64 references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import functional_call, jacrev

from estimators.jacobian_rank import exact_jacobian_rank
from estimators.reference import (
    ReferenceGram,
    rank_curve,
    reference_gram_eigh,
    reference_jacobian,
    reference_rank,
)
from estimators.selection import jacobian_column_norms, select_reference_set
from trainers.models import MLP

F64 = torch.float64


def _net(seed: int = 0, d_in: int = 5, d_out: int = 3, width: int = 7) -> MLP:
    g = torch.Generator().manual_seed(seed)
    return MLP(d_in, d_out, (width,), activation="tanh", seed=g).double()


def _dense_jacobian(model: torch.nn.Module, X: torch.Tensor) -> torch.Tensor:
    p = {k: v.detach() for k, v in model.named_parameters()}
    J = jacrev(lambda q: functional_call(model, q, (X,)))(p)
    rows = X.shape[0] * functional_call(model, p, (X[:1],)).numel()
    return torch.cat([J[k].reshape(rows, -1) for k in p], dim=1)


@pytest.fixture
def case() -> tuple[MLP, torch.Tensor, torch.Tensor]:
    net = _net()
    X = torch.randn(6, 5, dtype=F64, generator=torch.Generator().manual_seed(1))
    return net, X, _dense_jacobian(net, X)


@pytest.mark.parametrize("method", ["jvp", "vjp", "auto"])
@pytest.mark.parametrize("output_index", [None, 0, 2])
def test_reference_jacobian_matches_dense_columns(case, method, output_index) -> None:
    net, X, J = case
    idx = select_reference_set(net, X, 11, "random", seed=3)
    A = reference_jacobian(net, X, idx, output_index=output_index, method=method)
    ref = J[:, idx] if output_index is None else J.reshape(6, 3, -1)[:, output_index][:, idx]
    torch.testing.assert_close(A, ref, rtol=1e-12, atol=1e-12)


def test_reference_jacobian_centering_and_dtype(case) -> None:
    net, X, J = case
    idx = torch.tensor([0, 4, 9, 20, 30])
    A = reference_jacobian(net, X, idx, center=True)
    ref = J[:, idx] - J[:, idx].mean(1, keepdim=True)
    torch.testing.assert_close(A, ref, rtol=1e-12, atol=1e-12)
    assert reference_jacobian(net.float(), X.float(), idx, dtype=F64).dtype == F64


def test_proposition_3_1_against_dense_covariance_eigh() -> None:
    g = torch.Generator().manual_seed(0)
    A = torch.randn(40, 9, dtype=F64, generator=g)
    res = reference_gram_eigh(A, center=True)
    At = A - A.mean(1, keepdim=True)
    C = (At @ At.T).numpy()
    w = np.linalg.eigh(C)[0][::-1]
    k = res.rank
    assert k == 8  # centring removes one direction (rows sum to zero over 9 columns)
    np.testing.assert_allclose(res.eigenvalues[:k].numpy(), w[:k], rtol=1e-10)
    V = res.left_vectors
    assert V.shape == (40, k)
    torch.testing.assert_close(V.T @ V, torch.eye(k, dtype=F64), atol=1e-10, rtol=0)
    resid = torch.as_tensor(C) @ V - V * res.eigenvalues[:k]
    assert float(resid.norm()) <= 1e-9 * float(res.eigenvalues[0])
    # psi = A^T phi / sqrt(lambda) for the dense phi
    psi = At.T @ V / res.eigenvalues[:k].sqrt()
    torch.testing.assert_close(psi.abs(), res.right_vectors[:, :k].abs(), atol=1e-10, rtol=0)


@settings(max_examples=20, deadline=None)
@given(
    n=st.integers(8, 30),
    d=st.integers(2, 12),
    k=st.integers(1, 6),
    seed=st.integers(0, 2**16),
)
def test_planted_rank_linear_model(n: int, d: int, k: int, seed: int) -> None:
    k = min(k, d, n)
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, k, dtype=F64, generator=g) @ torch.randn(k, d, dtype=F64, generator=g)
    lin = torch.nn.Linear(d, 1, bias=False).double()
    idx = torch.arange(d)
    A = reference_jacobian(lin, X, idx)  # = X for f = w^T x
    torch.testing.assert_close(A, X)
    assert reference_rank(A) == k
    assert reference_rank(A, rule="svd") == k
    assert exact_jacobian_rank(lin, X) == k


@settings(max_examples=15, deadline=None)
@given(n=st.integers(2, 20), r=st.integers(1, 25), seed=st.integers(0, 2**16))
def test_rank_never_exceeds_min_n_r(n: int, r: int, seed: int) -> None:
    A = torch.randn(n, r, dtype=F64, generator=torch.Generator().manual_seed(seed))
    for rule in ("paper", "svd"):
        assert reference_rank(A, rule=rule) <= min(n, r)
        assert reference_rank(A, rule=rule, center=True) <= min(n, r - 1 if r > 1 else 1)
    assert reference_gram_eigh(A).rank <= min(n, r)


def test_rank_of_product_of_known_factors() -> None:
    g = torch.Generator().manual_seed(5)
    U = torch.linalg.qr(torch.randn(50, 4, dtype=F64, generator=g)).Q
    V = torch.linalg.qr(torch.randn(30, 4, dtype=F64, generator=g)).Q
    A = U @ torch.diag(torch.tensor([1.0, 1e-2, 1e-4, 1e-6], dtype=F64)) @ V.T
    assert reference_rank(A, rule="svd") == 4
    assert reference_rank(A, rule="svd", rtol=1e-3) == 2
    # the paper's Gram threshold r*eps*lambda_1 resolves sigma down to sqrt(30 eps) ~ 8e-8
    assert reference_rank(A) == 4
    assert reference_rank(A, rtol=1e-6) == 2  # eigenvalues 1, 1e-4 above 1e-6
    assert reference_rank(A, atol=0.5) == 1
    gram = reference_gram_eigh(A)
    assert reference_rank(gram) == gram.rank == 4
    assert reference_rank(gram, rtol=1e-6) == 2


def test_svd_rule_matches_numpy_matrix_rank() -> None:
    g = torch.Generator().manual_seed(2)
    A = torch.randn(20, 3, dtype=F64, generator=g) @ torch.randn(3, 15, dtype=F64, generator=g)
    assert reference_rank(A, rule="svd") == np.linalg.matrix_rank(A.numpy()) == 3


def test_exact_rank_matches_dense_matrix_rank(case) -> None:
    net, X, J = case
    assert exact_jacobian_rank(net, X, method="dense") == int(torch.linalg.matrix_rank(J))
    assert exact_jacobian_rank(net, X, method="gram") == int(torch.linalg.matrix_rank(J))
    Jc = J - J.mean(1, keepdim=True)
    assert exact_jacobian_rank(net, X, center=True) == int(torch.linalg.matrix_rank(Jc))


def test_strategies(case) -> None:
    net, X, J = case
    m = J.shape[1]
    theta = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    mag = select_reference_set(net, X, 6, "magnitude")
    assert set(mag.tolist()) == set(torch.topk(theta.abs(), 6).indices.tolist())
    norms = jacobian_column_norms(net, X)
    torch.testing.assert_close(norms, J.norm(dim=0))
    grad = select_reference_set(net, X, 6, "gradient")
    assert set(grad.tolist()) == set(torch.topk(J.norm(dim=0), 6).indices.tolist())
    torch.testing.assert_close(
        jacobian_column_norms(net, X, output_index=1), J.reshape(6, 3, -1)[:, 1].norm(dim=0)
    )
    for strategy in ("random", "leverage"):
        a = select_reference_set(net, X, 9, strategy, seed=4)
        b = select_reference_set(net, X, 9, strategy, seed=4)
        assert torch.equal(a, b) and a.unique().numel() == 9
        assert a.dtype == torch.long and 0 <= int(a.min()) and int(a.max()) < m
    given_idx = select_reference_set(net, X, 3, [7, 1, 4])
    assert given_idx.tolist() == [1, 4, 7]


def test_leverage_prefers_the_columns_that_span_the_range() -> None:
    # a linear model whose inputs live on the first 3 of 10 coordinates: only those
    # weights have non-zero leverage
    g = torch.Generator().manual_seed(0)
    X = torch.zeros(40, 10, dtype=F64)
    X[:, :3] = torch.randn(40, 3, dtype=F64, generator=g)
    lin = torch.nn.Linear(10, 1, bias=False).double()
    idx = select_reference_set(lin, X, 3, "leverage", seed=1)
    assert idx.tolist() == [0, 1, 2]


def test_rank_curve_is_monotone_and_bounded(case) -> None:
    net, X, _ = case
    curve = rank_curve(net, X, [2, 5, 10, 20, 40], "random", output_index=0)
    assert curve.sizes == [2, 5, 10, 20, 40]
    assert all(a <= b for a, b in zip(curve.ranks, curve.ranks[1:], strict=False))
    assert all(k <= min(curve.num_rows, s) for k, s in zip(curve.ranks, curve.sizes, strict=True))
    assert curve.num_rows == 6 and curve.model_size == sum(p.numel() for p in net.parameters())
    assert curve.rank_to_model_size[-1] == curve.ranks[-1] / curve.model_size


def test_errors(case) -> None:
    net, X, _ = case
    with pytest.raises(ValueError, match="r: expected an integer in"):
        select_reference_set(net, X, 0)
    with pytest.raises(ValueError, match="strategy: expected one of"):
        select_reference_set(net, X, 3, "bogus")
    with pytest.raises(ValueError, match="r: expected 2"):
        select_reference_set(net, X, 3, [0, 1])
    with pytest.raises(ValueError, match="indices: expected values in"):
        reference_jacobian(net, X, [0, 10_000])
    with pytest.raises(ValueError, match="indices: expected distinct"):
        reference_jacobian(net, X, [1, 1])
    with pytest.raises(ValueError, match="indices: expected a non-empty 1-d"):
        reference_jacobian(net, X, [[1, 2]])
    with pytest.raises(ValueError, match="method: expected 'auto', 'jvp' or 'vjp'"):
        reference_jacobian(net, X, [1], method="x")
    with pytest.raises(ValueError, match="output_index: expected an integer in"):
        reference_jacobian(net, X, [1], output_index=3)
    with pytest.raises(TypeError, match="output_index: expected an int or None"):
        reference_jacobian(net, X, [1], output_index=1.0)
    with pytest.raises(TypeError, match="inputs: expected a tensor"):
        reference_jacobian(net, "x", [1])
    with pytest.raises(ValueError, match="inputs: expected at least one sample"):
        reference_jacobian(net, X[:0], [1])
    with pytest.raises(TypeError, match="A: expected a torch tensor"):
        reference_gram_eigh(np.ones((2, 2)))
    with pytest.raises(ValueError, match="A: expected a non-empty 2-d"):
        reference_gram_eigh(torch.ones(3))
    with pytest.raises(TypeError, match="A: expected a floating dtype"):
        reference_rank(torch.ones(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="rule: expected 'paper' or 'svd'"):
        reference_rank(torch.ones(3, 2), rule="x")
    with pytest.raises(ValueError, match="rule: expected 'paper' for a ReferenceGram"):
        reference_rank(reference_gram_eigh(torch.ones(3, 2)), rule="svd")
    with pytest.raises(ValueError, match="rtol, atol: expected non-negative"):
        reference_rank(torch.ones(3, 2), rtol=-1.0)
    with pytest.raises(ValueError, match="sizes: expected at least one"):
        rank_curve(net, X, [])
    with pytest.raises(
        ValueError, match="method: expected 'auto', 'dense', 'gram' or 'matrix_free'"
    ):
        exact_jacobian_rank(net, X, method="x")
    assert isinstance(reference_gram_eigh(torch.ones(3, 2, dtype=F64)), ReferenceGram)


def test_rank_of_a_jacobian_with_repeated_samples_and_batches_as_a_list() -> None:
    """Two repeated samples make J 24 x 38 of rank 20: the gram method counted its zero
    singular values (5e-9 sigma_1 from the Gram's rounding) and said 22; two input batches
    of different lengths were read as an (X, y) pair and gave the rank of the first batch
    alone (refused now; a DataLoader's [X, y] stays a pair); the matrix-free method failed on
    fewer than 10 rows (range_finder's default block)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)
    ).double()
    X = torch.randn(12, 3, dtype=F64)
    X[10:] = X[:2]
    rank = int(torch.linalg.matrix_rank(_dense_jacobian(net, X)))
    assert rank == 20
    for method in ("dense", "gram", "matrix_free"):
        assert exact_jacobian_rank(net, X, method=method) == rank
    with pytest.raises(ValueError, match="read as an \\(X, y\\) pair, got 2 entries"):
        exact_jacobian_rank(net, [X[:5], X[5:]], method="dense")
    y = torch.randn(12, 2, dtype=F64)  # a DataLoader's [X, y] batch: the pair
    assert exact_jacobian_rank(net, [X, y], method="dense") == rank
    small = X[:3]
    assert exact_jacobian_rank(net, small, method="matrix_free") == exact_jacobian_rank(
        net, small, method="dense"
    )


def _dense_jacobian(net: torch.nn.Module, X: torch.Tensor) -> torch.Tensor:
    params = dict(net.named_parameters())
    flat = torch.cat([p.detach().reshape(-1) for p in params.values()])

    def f(theta: torch.Tensor) -> torch.Tensor:
        parts, i = {}, 0
        for n, p in params.items():
            parts[n] = theta[i : i + p.numel()].reshape(p.shape)
            i += p.numel()
        return torch.func.functional_call(net, parts, (X,)).reshape(-1)

    return torch.func.jacrev(f)(flat)


def test_gram_rank_of_a_full_rank_jacobian_down_to_1e7() -> None:
    """Singular values down to 1e-7 sigma_1 over 24 rows: the float64 Gram resolves them and
    the gram method must count all 24 (a floor of 4 sqrt(rows eps) = 2.9e-7 counted 22)."""

    class Fixed(torch.nn.Module):
        def __init__(self, J: torch.Tensor) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(J.shape[1], dtype=F64))
            self.register_buffer("J", J)

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: each sample's row index
            rows = self.J.reshape(12, 2, -1)[x[:, 0].long()]
            return rows @ self.w

    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(24, 24, generator=g, dtype=F64))
    V, _ = torch.linalg.qr(torch.randn(40, 24, generator=g, dtype=F64))
    J = (U * torch.logspace(0, -7, 24, dtype=F64)) @ V.T
    X = torch.arange(12, dtype=F64)[:, None]
    for method in ("dense", "gram"):
        assert exact_jacobian_rank(Fixed(J), X, method=method) == 24
