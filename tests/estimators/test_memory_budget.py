"""Every estimator takes ``memory_budget=``: probes in groups that fit, sketches refused."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from estimators import diagonal, hutchinson_trace, hutchpp_trace, logdet, xtrace
from estimators.blockwise import blockwise_spectra
from estimators.diagonal import frobenius_norm, xdiag
from linops import HessianOperator, TorchLinearOperator
from tests.estimators.probes import rademacher

F64 = torch.float64


class _Widths(TorchLinearOperator):
    """A dense symmetric matrix that records the width of every block it is applied to."""

    is_symmetric = True

    def __init__(self, A: torch.Tensor) -> None:
        super().__init__(A.shape, dtype=A.dtype, device=A.device)
        self.A, self.widths = A, []

    def _matmat_torch(self, X: torch.Tensor) -> torch.Tensor:
        self.widths.append(X.shape[1])
        return self.A @ X


def _sym(n: int = 40, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    return (Q * torch.linspace(0.1, 3.0, n, dtype=F64)) @ Q.T


def _bytes(vectors: int, n: int = 40) -> int:
    return vectors * n * 8


def test_hutchinson_probes_go_in_groups_within_the_budget() -> None:
    A = torch.diag(torch.linspace(1.0, 2.0, 40, dtype=F64))
    op = _Widths(A)
    est = hutchinson_trace(op, 10, seed=0, memory_budget=_bytes(7))  # 3 vectors per probe
    assert max(op.widths) == 2 and sum(op.widths) == 10 and est.num_matvecs == 10
    assert est.estimate == pytest.approx(float(A.trace()), rel=1e-14)  # Rademacher, diagonal


def test_grouped_diagonal_combines_means_and_variances_exactly() -> None:
    """Chan's group-wise combination equals the mean and standard deviation of all samples."""
    A = _sym()
    op = _Widths(A)
    est = diagonal(op, 9, method="hutchinson", seed=1, memory_budget=_bytes(8))  # 2 per group
    assert max(op.widths) == 2 and sum(op.widths) == 9
    gen = torch.Generator().manual_seed(1)  # one draw of 40 numbers per probe
    Z = rademacher(40, 9, gen, F64)
    samples = Z * (A @ Z)
    torch.testing.assert_close(est.estimate, samples.mean(dim=1), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(
        est.stderr, samples.std(dim=1) / math.sqrt(9), rtol=1e-10, atol=1e-14
    )


def test_frobenius_norm_in_groups_is_exact_on_a_diagonal() -> None:
    A = torch.diag(torch.linspace(-2.0, 3.0, 40, dtype=F64))
    op = _Widths(A)
    est = frobenius_norm(op, 6, seed=0, memory_budget=_bytes(4))
    assert max(op.widths) == 2
    assert est.estimate == pytest.approx(float(torch.linalg.matrix_norm(A)), rel=1e-14)


def test_sketches_that_do_not_fit_are_refused_with_what_they_need() -> None:
    A = _sym()
    for call in (
        lambda: xtrace(A, 20, seed=0, memory_budget=_bytes(10)),
        lambda: hutchpp_trace(A, 21, seed=0, memory_budget=_bytes(10)),
        lambda: xdiag(A, 20, seed=0, memory_budget=_bytes(10)),
    ):
        with pytest.raises(ValueError, match="its sketch holds about .* vectors of n=40"):
            call()
    with pytest.raises(ValueError, match="use method='hutchinson'"):
        diagonal(A, 30, seed=0, memory_budget=_bytes(10))
    with pytest.raises(ValueError, match="one probe with its product"):
        hutchinson_trace(A, 4, seed=0, memory_budget=_bytes(2))
    assert xtrace(A, 20, seed=0, memory_budget=_bytes(50)).num_matvecs == 20  # fits


def test_slq_in_groups_equals_all_probes_at_once() -> None:
    A = _sym()
    whole = logdet(A, num_probes=6, num_steps=8, seed=2)
    op = _Widths(A)
    # the probes with their images (6 x (1 + 1) vectors) and two 9-vector bases
    parts = logdet(op, num_probes=6, num_steps=8, seed=2, memory_budget=_bytes(12 + 18))
    assert max(op.widths) == 2
    assert parts.estimate == pytest.approx(whole.estimate, rel=1e-12)
    assert parts.stderr == pytest.approx(whole.stderr, rel=1e-10)
    assert (parts.lower, parts.upper) == pytest.approx(
        (whole.lower, whole.upper), rel=1e-12, nan_ok=True
    )
    with pytest.raises(ValueError, match="one probe's Lanczos basis"):
        logdet(A, num_probes=6, num_steps=8, seed=2, memory_budget=_bytes(14))


def test_blockwise_passes_shrink_to_the_budget_with_the_same_results() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    net = net.double()
    X, y = torch.randn(16, 4, dtype=F64), torch.arange(16) % 3
    H = HessianOperator(net, torch.nn.CrossEntropyLoss(), (X, y), max_vectors=8)
    n = H.shape[0]
    kw = {"k": 2, "num_probes": 2, "num_steps": 4, "seed": 1}
    wide = blockwise_spectra(H, max_vectors=8, **kw)
    # two full-length columns each way, and 40 vectors of its size for every block's runs
    narrow = blockwise_spectra(H, max_vectors=8, memory_budget=(2 * 2 + 40) * n * 8, **kw)
    assert narrow.num_passes > wide.num_passes  # two columns per pass instead of eight
    for name, b in wide.blocks.items():
        torch.testing.assert_close(narrow.blocks[name].eigenvalues, b.eigenvalues)
        torch.testing.assert_close(narrow.blocks[name].density, b.density)


def _blockwise_problem() -> HessianOperator:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 5))
    X, y = torch.randn(20, 6, dtype=F64), torch.arange(20) % 5
    return HessianOperator(net.double(), torch.nn.CrossEntropyLoss(), (X, y), max_vectors=1)


def test_blockwise_runs_share_what_the_columns_leave_of_the_budget(monkeypatch) -> None:
    import estimators.blockwise as bw

    H = _blockwise_problem()
    n = H.shape[0]
    seen: dict[str, list[int]] = {"eig": [], "slq": []}
    lanczos, density = bw.lanczos, bw._spectral_density

    def lanczos_spy(A, *args, memory_budget=None, **kwargs):
        seen["eig"].append(memory_budget)
        return lanczos(A, *args, memory_budget=memory_budget, **kwargs)

    def density_spy(A, *args, memory_budget=None, **kwargs):
        seen["slq"].append(memory_budget)
        return density(A, *args, memory_budget=memory_budget, **kwargs)

    monkeypatch.setattr(bw, "lanczos", lanczos_spy)
    monkeypatch.setattr(bw, "_spectral_density", density_spy)
    budget = (2 + 12) * n * 8  # one column each way, 12 vectors of n for the blocks
    with pytest.warns(RuntimeWarning, match="without reorthogonalisation") as caught:
        res = bw.blockwise_spectra(
            H, k=2, ncv=20, num_probes=2, num_steps=8, memory_budget=budget, seed=0
        )
    lean = [w for w in caught if "reorthogonalisation" in str(w.message)]
    assert len(lean) == 1 and "2 of 2 blocks" in str(lean[0].message)  # once, for all blocks
    assert len(seen["eig"]) == len(seen["slq"]) == len(res.blocks) == 2
    assert sum(seen["eig"]) + sum(seen["slq"]) <= budget - 2 * n * 8
    # 12 vectors of each block's size: half cannot hold one SLQ basis (8), so SLQ runs
    # on 3 vectors per probe and Lanczos gets 6, a basis of 3 (= k + 1) without A V
    assert not any(b.reorthogonalized for b in res.blocks.values())
    dense = H.to_dense()
    start = 0
    for b in res.blocks.values():
        block = dense[start : start + b.dim, start : start + b.dim]
        start += b.dim
        top = torch.linalg.eigvalsh(block)[-2:]
        torch.testing.assert_close(b.eigenvalues, top, rtol=1e-6, atol=1e-9)


def test_blockwise_refuses_a_budget_without_room_for_the_blocks() -> None:
    H = _blockwise_problem()
    n = H.shape[0]
    with pytest.raises(ValueError, match="cannot hold its SLQ runs"):
        blockwise_spectra(H, k=2, num_probes=2, num_steps=6, memory_budget=(2 + 4) * n * 8)


def test_the_same_seed_gives_the_same_estimate_whatever_the_groups() -> None:
    """Probes were drawn as one (n, group) block, so the group size (the budget, max_vectors,
    or a model operator's measured pass after its first product) changed the draws: the
    same call twice on one Hessian gave 2.68 and 1.92. Now each probe is its own draw."""
    from torch import nn

    import linops

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    X, y = torch.randn(7, 3, dtype=F64), torch.randint(0, 2, (7,))
    H = linops.HessianOperator(model, nn.CrossEntropyLoss(), (X, y))
    calls = {
        "trace": lambda op, **kw: hutchinson_trace(op, 24, seed=3, **kw).estimate,
        "frobenius": lambda op, **kw: frobenius_norm(op, 24, seed=3, **kw).estimate,
        "diagonal": lambda op, **kw: diagonal(op, 24, method="hutchinson", seed=3, **kw).estimate,
        "deflated": lambda op, **kw: diagonal(op, 24, method="deflated", seed=3, **kw).estimate,
    }
    for name, call in calls.items():
        first = call(H)
        variants = [
            call(H),  # after the operator has measured a pass
            call(linops.HessianOperator(model, nn.CrossEntropyLoss(), (X, y), max_vectors=1)),
            call(linops.HessianOperator(model, nn.CrossEntropyLoss(), (X, y), max_vectors=5)),
            call(H, memory_budget=_bytes(24)),  # groups of 6-8 probes
        ]
        for got in variants:
            torch.testing.assert_close(
                torch.as_tensor(got), torch.as_tensor(first), rtol=1e-12, atol=1e-14, msg=name
            )


class _ColumnByColumn(_Widths):
    """Each column's product on its own (``A @ x``): the same bits whatever the block.

    Each column is copied first: BLAS's matrix-vector product can round differently with
    where the vector lies in memory, which differs from column to column of a block.
    """

    def _matmat_torch(self, X: torch.Tensor) -> torch.Tensor:
        self.widths.append(X.shape[1])
        return torch.stack([self.A @ X[:, j].clone() for j in range(X.shape[1])], dim=1)


class _Scaling(_Widths):
    """``diag(d) X`` entry by entry: the same bits whatever the block."""

    def __init__(self, d: torch.Tensor) -> None:
        TorchLinearOperator.__init__(self, (len(d), len(d)), dtype=d.dtype, device=d.device)
        self.A, self.widths = d, []

    def _matmat_torch(self, X: torch.Tensor) -> torch.Tensor:
        self.widths.append(X.shape[1])
        return self.A[:, None] * X


@pytest.mark.parametrize("case", ["real", "float32", "complex", "long float32"])
def test_the_sums_over_probes_do_not_depend_on_the_groups(case: str) -> None:
    """The estimators' sums are taken probe by probe: with products that do not depend on
    the block, every group size gives the same bits (the groups of a streamed operator change
    after its first product; the sums over a group's block, Chan's group-wise combination
    of ``diagonal``, ``sum(dim=0)``, whose threads split a long column by the number of
    columns, and a strided column's sum, which torch adds in another order than a contiguous
    one's, gave other last digits for other groups)."""
    n = 23
    if case == "long float32":  # long enough for torch to split a column's sum over threads
        n = 200_000
        g = torch.Generator().manual_seed(4)
        d = torch.rand(n, generator=g, dtype=torch.float32) + 0.5
    else:
        A = _sym(23, seed=4)  # its products come back row-major: strided columns
        if case == "complex":
            A = A + 1j * torch.triu(_sym(23, seed=5), 1)
        if case == "float32":
            A = A.float()
    complex_ = case == "complex"
    calls: dict[Any, int] = {  # n-vectors held per probe
        lambda op, *a, **kw: diagonal(op, *a, method="hutchinson", **kw): 4,
        frobenius_norm: 2,
    }
    if not complex_:  # the trace estimators refuse complex operators
        calls[hutchinson_trace] = 3
    threads = torch.get_num_threads()
    if case == "long float32":
        torch.set_num_threads(2)  # the tests run on one; the split needs two
    try:
        results = _grouped_estimates(calls, n, case, d if case == "long float32" else A)
    finally:
        torch.set_num_threads(threads)
    for got in results[1:]:
        for a, b in zip(got, results[0], strict=True):
            assert torch.equal(torch.as_tensor(a), torch.as_tensor(b))


def _grouped_estimates(
    calls: dict[Any, int], n: int, case: str, A: torch.Tensor
) -> list[list[Any]]:
    results = []
    for probes_per_group in (1, 2, 3, 7, 30):
        row = []
        for call, arrays in calls.items():
            op = _Scaling(A) if case == "long float32" else _ColumnByColumn(A)
            budget = arrays * probes_per_group * n * op.torch_dtype.itemsize
            est = call(op, 30, seed=0, memory_budget=budget)
            assert max(op.widths) == probes_per_group
            row += [est.estimate, est.stderr]
        results.append(row)
    return results


class _Counted:
    """A re-iterable loader of seeded batches that counts its passes."""

    def __init__(self) -> None:
        self.passes = 0

    def __iter__(self):  # type: ignore[no-untyped-def]
        self.passes += 1
        for i in range(4):
            g = torch.Generator().manual_seed(i)
            yield torch.randn(6, 5, generator=g, dtype=F64), torch.randint(0, 3, (6,), generator=g)


@pytest.mark.parametrize(
    "estimate",
    [
        lambda H: hutchinson_trace(H, 10, seed=0).estimate,
        lambda H: float(diagonal(H, 10, method="hutchinson", seed=0).estimate.sum()),
        lambda H: frobenius_norm(H, 10, seed=0).estimate,
    ],
)
def test_a_streamed_operator_takes_the_probes_after_its_first_group_in_one_visit(
    estimate: object,
) -> None:
    """A streamed operator (graphs rebuilt) takes a block wider than a pass in one visit of
    the data; once a first product has shown that, the probes go in one group (they went in
    groups of 3: every graph built 4 times for 10 probes), and the estimate is the cached
    operator's. With a budget of one byte the groups stay one pass wide."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    model = model.double()
    loss = torch.nn.CrossEntropyLoss()
    data = _Counted()
    cached = HessianOperator(model, loss, data, max_vectors=3)
    for budget, visits in ((None, 1), (1, 4)):
        streamed = HessianOperator(
            model, loss, data, cache=False, memory_budget=budget, max_vectors=3
        )
        assert not streamed._visits_data_once_per_block()  # not known before a first pass
        first = estimate(streamed)  # type: ignore[operator]
        assert streamed._visits_data_once_per_block()
        before = streamed.cache_info().graphs_built
        again = estimate(streamed)  # type: ignore[operator]
        assert streamed.cache_info().graphs_built - before == 4 * visits  # 4 batches
        assert again == pytest.approx(first, rel=1e-12)
        assert again == pytest.approx(estimate(cached), rel=1e-12)  # type: ignore[operator]
    assert not cached._visits_data_once_per_block()


def test_single_vector_passes_keep_their_groups_until_a_block_pass_is_decided() -> None:
    """At ``max_vectors=1`` an estimator's groups are single products; a wider group on a
    streamed operator would be its first many-vector product, which probes the batched pass:
    a repeated 2-probe estimate built 12 graphs instead of 8 (audit /tmp/audit21)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    H = HessianOperator(
        model.double(), torch.nn.CrossEntropyLoss(), _Counted(), cache=False, max_vectors=1,
        route="autograd",
    )  # fmt: skip
    built = []
    for _ in range(3):
        before = H.cache_info().graphs_built
        hutchinson_trace(H, 2, seed=0)
        built.append(H.cache_info().graphs_built - before)
    assert built == [8, 8, 8]  # 2 single products over 4 batches each
    assert not H._visits_data_once_per_block()
