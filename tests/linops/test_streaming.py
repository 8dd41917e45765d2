"""Streamed datasets (issue 22, item 3): a loader drawn at every product, one batch at a time.

A budget too small for any cache streams every batch and rebuilds every graph; the products
must equal the cached operator's bit for bit in float64 on the CPU (the same batches, prepared
and differentiated by the same code), and the dense reference on the concatenated data.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from linops import (
    GGNOperator,
    HessianOperator,
    JacobianOperator,
    NTKOperator,
    OutputHessianOperator,
)
from linops.fisher import EmpiricalFisherOperator, FisherOperator
from tests.linops.references import Reference
from tests.linops.zoo import _resnet

Tensor = torch.Tensor
F64 = torch.float64
TINY = 1  # bytes: nothing fits, every batch is streamed and every graph rebuilt


class Synthetic:
    """A re-iterable loader that makes batch ``i`` from seed ``i`` when drawn (never stored)."""

    def __init__(self, shape: tuple[int, ...], classes: int, batches: int, size: int) -> None:
        self.shape, self.classes, self.num, self.size = shape, classes, batches, size
        self.passes = 0

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        self.passes += 1
        for i in range(self.num):
            g = torch.Generator().manual_seed(1000 + i)
            n = self.size - (i == self.num - 1)  # a shorter last batch
            x = torch.randn(n, *self.shape, generator=g, dtype=F64)
            yield x, torch.randint(0, self.classes, (n,), generator=g)

    def tensors(self) -> tuple[Tensor, Tensor]:
        xs, ys = zip(*list(self), strict=True)
        self.passes -= 1
        return torch.cat(xs), torch.cat(ys)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return _resnet().double().eval()


CASES = {
    "mlp-chain": (_mlp, (5,), "auto"),
    "mlp-autograd": (_mlp, (5,), "autograd"),
    "resnet-bn": (_cnn, (1, 5, 5), "auto"),
}


def _pair(make: Any, cls: Any, case: str, **kw: Any) -> tuple[Any, Any, Synthetic]:
    build, shape, route = CASES[case]
    model = build()
    data = Synthetic(shape, 3, batches=4, size=5)
    cached = make(cls, model, data, route=route, **kw)
    streamed = make(cls, model, data, route=route, memory_budget=TINY, **kw)
    return cached, streamed, data


def _loss_op(cls: Any, model: nn.Module, data: Any, **kw: Any) -> Any:
    return cls(model, nn.CrossEntropyLoss(), data, **kw)


def _jac_op(cls: Any, model: nn.Module, data: Any, **kw: Any) -> Any:
    return cls(model, data, **kw)


def _vectors(n: int, k: int) -> Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(7), dtype=F64)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("cls", [HessianOperator, GGNOperator, EmpiricalFisherOperator])
def test_streamed_loss_operator_equals_cached_bitwise(case: str, cls: Any) -> None:
    cached, streamed, _ = _pair(_loss_op, cls, case, max_vectors=3)
    V = _vectors(cached.shape[1], 5)
    for _ in range(2):  # the second product replays the cache / streams again
        assert torch.equal(streamed @ V, cached @ V)
        assert torch.equal(streamed @ V[:, 0], cached @ V[:, 0])
    info = streamed.cache_info()
    assert (info.batches_cached, info.graphs_cached, info.num_batches) == (0, 0, 4)
    full = cached.cache_info()
    assert (full.batches_cached, full.graphs_cached) == (4, 4)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("cls", [HessianOperator, GGNOperator, EmpiricalFisherOperator])
def test_cache_false_takes_the_cached_route_and_equals_it_bitwise(case: str, cls: Any) -> None:
    """cache=False rebuilt the first graph under the forward-print hook, which the chain
    recogniser read as a user's hook: the route fell back to autograd (last-bit differences)."""
    cached, _, data = _pair(_loss_op, cls, case)
    rebuilt = _loss_op(cls, cached.model, data, route=CASES[case][2], cache=False)
    V = _vectors(cached.shape[1], 3)
    assert torch.equal(rebuilt @ V, cached @ V)
    routes = {op.route.split(",")[0] for op in (rebuilt, cached)}
    assert routes == {"chain" if case == "mlp-chain" else "autograd"}


@pytest.mark.parametrize("case", list(CASES))
def test_streamed_jacobian_and_ntk_equal_cached_bitwise(case: str) -> None:
    J, Js, _ = _pair(_jac_op, JacobianOperator, case, max_vectors=3)
    V, U = _vectors(J.shape[1], 4), _vectors(J.shape[0], 4)
    assert torch.equal(Js @ V, J @ V)
    assert torch.equal(Js.T @ U, J.T @ U)
    JtJ, JtJs = J.T @ J, Js.T @ Js
    assert torch.equal(JtJs @ V, JtJ @ V)
    build, shape, route = CASES[case]
    data = Synthetic(shape, 3, batches=4, size=5)
    K = NTKOperator(build(), data, route=route, max_vectors=3)
    Ks = NTKOperator(build(), data, route=route, max_vectors=3, memory_budget=TINY)
    assert torch.equal(Ks @ U, K @ U)


def test_streamed_mc_fisher_draws_the_same_labels() -> None:
    model, data = _mlp(), Synthetic((5,), 3, batches=4, size=5)
    kw: dict[str, Any] = {"mc_samples": 2, "seed": 3, "max_vectors": 2}
    cached = FisherOperator(model, nn.CrossEntropyLoss(), data, **kw)
    streamed = FisherOperator(model, nn.CrossEntropyLoss(), data, memory_budget=TINY, **kw)
    V = _vectors(cached.shape[1], 3)
    first = streamed @ V
    assert torch.equal(first, cached @ V)
    assert torch.equal(streamed @ V, first)  # rebuilt graphs draw the same labels again


@pytest.mark.parametrize("case", ["mlp-chain", "resnet-bn"])
def test_streamed_hessian_matches_dense_reference(case: str) -> None:
    build, shape, route = CASES[case]
    model, data = build(), Synthetic(shape, 3, batches=4, size=5)
    H = HessianOperator(model, nn.CrossEntropyLoss(), data, route=route, memory_budget=TINY)
    X, y = data.tensors()
    ref = Reference(model, [n for n, _ in model.named_parameters()], X)
    dense = ref.hessian(nn.CrossEntropyLoss(), y)
    assert torch.allclose(H.to_dense(), dense, rtol=1e-10, atol=1e-12)


def test_a_streamed_loader_is_drawn_once_per_product() -> None:
    model, data = _mlp(), Synthetic((5,), 3, batches=4, size=5)
    H = HessianOperator(model, nn.CrossEntropyLoss(), data, memory_budget=TINY, max_vectors=8)
    H @ _vectors(H.shape[1], 3)  # the first product also draws the data for the loss weights
    before = data.passes
    for k in (1, 3):
        H @ _vectors(H.shape[1], k)
    assert data.passes - before == 2
    Hc = HessianOperator(model, nn.CrossEntropyLoss(), data, max_vectors=8)
    Hc @ _vectors(H.shape[1], 3)
    before = data.passes
    Hc @ _vectors(H.shape[1], 3)
    assert data.passes == before  # cached: the loader is not drawn again


def test_partial_cache_equals_full_cache_bitwise() -> None:
    """A budget that keeps some graphs: the first ones replayed, the rest rebuilt."""
    model, data = _mlp(), Synthetic((5,), 3, batches=4, size=5)
    full = GGNOperator(model, nn.CrossEntropyLoss(), data, max_vectors=4)
    V = _vectors(full.shape[1], 4)
    expected = full @ V
    per_batch = full.cache_info().bytes_batches + full.cache_info().bytes_graphs
    # half of the budget is for caches: room for about two batches and their graphs
    budget = int(2 * per_batch / 4 * 2.5)
    part = GGNOperator(model, nn.CrossEntropyLoss(), data, max_vectors=4, memory_budget=budget)
    assert torch.equal(part @ V, expected)
    info = part.cache_info()
    assert 0 < info.graphs_cached < 4 and info.batches_cached >= info.graphs_cached
    assert torch.equal(part @ V, expected)


def test_dataloader_and_tensor_pair_stream_like_they_cache() -> None:
    model = _mlp()
    X, y = Synthetic((5,), 3, batches=3, size=6).tensors()
    loader = DataLoader(TensorDataset(X, y), batch_size=6, shuffle=False)
    V = _vectors(sum(p.numel() for p in model.parameters()), 3)
    ref = HessianOperator(model, nn.CrossEntropyLoss(), loader, max_vectors=3) @ V
    for data, kw in [(loader, {}), ((X, y), {"batch_size": 6})]:
        H = HessianOperator(
            model, nn.CrossEntropyLoss(), data, memory_budget=TINY, max_vectors=3, **kw
        )
        assert torch.equal(H @ V, ref)


class _Chunks(torch.utils.data.IterableDataset):
    """Batches of 6 from its own ``__iter__``: a loader over it has a sampler without end."""

    def __init__(self, X: torch.Tensor, y: torch.Tensor) -> None:
        self.X, self.y = X, y

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(0, len(self.X), 6):
            yield self.X[i : i + 6], self.y[i : i + 6]


@pytest.mark.parametrize("budget", [None, TINY])
def test_a_loader_over_an_iterable_dataset_equals_its_batches(budget: int | None) -> None:
    """The reshuffle check drew the loader's ``_InfiniteConstantSampler`` without end (hang)."""
    model = _mlp()
    X, y = Synthetic((5,), 3, batches=3, size=6).tensors()
    loader = DataLoader(_Chunks(X, y), batch_size=None)
    V = _vectors(sum(p.numel() for p in model.parameters()), 3)
    H = HessianOperator(model, nn.CrossEntropyLoss(), loader, memory_budget=budget, max_vectors=3)
    expected = HessianOperator(model, nn.CrossEntropyLoss(), list(_Chunks(X, y)), max_vectors=3)
    assert torch.equal(H @ V, expected @ V)


def test_one_shot_iterator_is_kept_whatever_the_budget() -> None:
    model, data = _mlp(), Synthetic((5,), 3, batches=3, size=5)
    H = HessianOperator(model, nn.CrossEntropyLoss(), iter(data), memory_budget=TINY, max_vectors=2)
    V = _vectors(H.shape[1], 2)
    expected = HessianOperator(model, nn.CrossEntropyLoss(), data, max_vectors=2) @ V
    assert torch.equal(H @ V, expected)
    assert torch.equal(H @ V, expected)  # drawn once, kept: the second product is the same
    assert H.cache_info().batches_cached == 3


def test_streamed_float32_operator_casts_each_batch() -> None:
    model, data = _mlp(), Synthetic((5,), 3, batches=3, size=5)
    kw: dict[str, Any] = {"dtype": torch.float32, "max_vectors": 2}
    H = HessianOperator(model, nn.CrossEntropyLoss(), data, memory_budget=TINY, **kw)
    Hc = HessianOperator(model, nn.CrossEntropyLoss(), data, **kw)
    V = _vectors(H.shape[1], 2).float()
    assert torch.equal(H @ V, Hc @ V)
    H64 = H.to(F64)  # a converted operator streams too
    H64c = HessianOperator(model, nn.CrossEntropyLoss(), data, max_vectors=2)
    assert torch.equal(H64 @ V.double(), H64c @ V.double())
    assert H64.cache_info().graphs_cached == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_streamed_cuda_operator_equals_cached() -> None:  # pragma: no cover - CPU CI
    model, data = _mlp(), Synthetic((5,), 3, batches=3, size=5)
    kw: dict[str, Any] = {"device": "cuda", "max_vectors": 2}
    H = HessianOperator(model, nn.CrossEntropyLoss(), data, memory_budget=TINY, **kw)
    Hc = HessianOperator(model, nn.CrossEntropyLoss(), data, **kw)
    V = _vectors(H.shape[1], 2).cuda()
    assert torch.equal(H @ V, Hc @ V)


class _Noisy(nn.Module):
    """An MLP whose forward pass adds noise: a different function at every call."""

    def __init__(self, noise: float) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.l1, self.l2, self.noise = nn.Linear(5, 7), nn.Linear(7, 3), noise

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.l1(x))
        return self.l2(h + self.noise * torch.randn_like(h))


@pytest.mark.parametrize("cls", [HessianOperator, GGNOperator])
def test_a_random_forward_is_refused_when_its_graphs_are_rebuilt(cls: Any) -> None:
    data = Synthetic((5,), 3, batches=3, size=8)
    # kept graphs: refused at the first product (a second forward pass differs) ...
    kept = cls(_Noisy(0.1).double(), nn.CrossEntropyLoss(), data)
    v = torch.randn(kept.shape[1], dtype=F64)
    with pytest.raises(RuntimeError, match="two forward passes of the model on the first batch"):
        kept @ v
    # ... unless one draw of the noise, a fixed matrix, is what is asked for
    kept = cls(_Noisy(0.1).double(), nn.CrossEntropyLoss(), data, allow_train_mode=True)
    assert torch.equal(kept @ v, kept @ v)
    streamed = cls(
        _Noisy(0.1).double(), nn.CrossEntropyLoss(), data, memory_budget=TINY, allow_train_mode=True
    )
    streamed @ v  # the first pass records each batch's output
    with pytest.raises(RuntimeError, match="differs from the first pass"):
        streamed @ v
    # without noise the same model streams, equal to its cached operator
    quiet = cls(_Noisy(0.0).double(), nn.CrossEntropyLoss(), data, memory_budget=TINY)
    cached = cls(_Noisy(0.0).double(), nn.CrossEntropyLoss(), data)
    assert torch.equal(quiet @ v, quiet @ v)
    assert torch.equal(quiet @ v, cached @ v)


class _FunctionalDropout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(5, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        return self.b(nn.functional.dropout(h, 0.5, training=self.training))


@pytest.mark.parametrize("cls", [HessianOperator, GGNOperator, JacobianOperator])
def test_functional_dropout_in_training_mode_is_refused_with_kept_graphs(cls: Any) -> None:
    """No dropout module to find: two operators built alike differed by 1.05 (relative),
    each the matrix of one random mask; eval mode gives the deterministic operator."""
    torch.manual_seed(0)
    model = _FunctionalDropout().double()
    data = Synthetic((5,), 3, batches=2, size=8)
    args = (model, data) if cls is JacobianOperator else (model, nn.CrossEntropyLoss(), data)
    op = cls(*args)
    v = torch.randn(op.shape[1], dtype=F64)
    with pytest.raises(RuntimeError, match="allow_train_mode=True to accept one draw"):
        op @ v
    model.eval()
    assert torch.equal(cls(*args) @ v, cls(*args) @ v)


class _MaskedScores(nn.Module):
    """Logits and, unused by the loss, attention scores masked with -inf: a sum of -inf."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        scores = (x @ x.T).masked_fill(torch.eye(len(x), dtype=torch.bool), float("-inf"))
        return self.lin(x), scores


@pytest.mark.parametrize("kw", [{}, {"cache": False}])
def test_an_infinite_output_the_loss_does_not_use_is_no_random_forward(kw: dict) -> None:
    """Two sums of -inf compared as different (-inf - -inf is NaN): refused as random."""
    torch.manual_seed(0)
    model = _MaskedScores().double()
    data = Synthetic((5,), 3, batches=2, size=8)
    G = GGNOperator(model, nn.CrossEntropyLoss(), data, output=lambda o: o[0], **kw)
    v = torch.randn(G.shape[1], dtype=F64)
    assert torch.equal(G @ v, G @ v)
    # the same outputs with noise in the logits: the finite entries still tell
    noisy = _MaskedScores().double()
    noisy.lin.register_forward_hook(lambda m, a, out: out + 0.1 * torch.randn_like(out))
    G = GGNOperator(noisy, nn.CrossEntropyLoss(), data, output=lambda o: o[0], **kw)
    with pytest.raises(RuntimeError, match="two forward passes of the model on the first batch"):
        G @ v


def test_clear_cache_forgets_the_recorded_forward_passes() -> None:
    data = Synthetic((5,), 3, batches=2, size=8)
    model = _Noisy(0.0).double()
    H = HessianOperator(model, nn.CrossEntropyLoss(), data, memory_budget=TINY)
    v = torch.randn(H.shape[1], dtype=F64)
    H @ v
    with torch.no_grad():  # the model changed on purpose: the operator is refused until told
        model.l2.weight.mul_(2.0)
    with pytest.raises(RuntimeError, match="clear_cache"):
        H @ v
    H.clear_cache()
    torch.testing.assert_close(H @ v, HessianOperator(model, nn.CrossEntropyLoss(), data) @ v)


@pytest.mark.parametrize("kw", [{"cache": False}, {"memory_budget": TINY}])
def test_a_streamed_operator_reports_the_route_of_the_cached_one(kw: dict) -> None:
    """Each rebuilt graph reset ``op.route`` to "autograd", dropping ", one vector per pass"."""
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(48, 3)
    ).double()
    model.eval()
    X, y = torch.randn(12, 1, 6, 6, dtype=F64), torch.randint(0, 3, (12,))
    ops = [
        HessianOperator(model, nn.CrossEntropyLoss(), (X, y), batch_size=6, max_vectors=4, **k)
        for k in ({}, kw)
    ]
    V = torch.randn(ops[0].shape[0], 4, dtype=F64)
    torch.testing.assert_close(ops[1] @ V, ops[0] @ V)
    assert ops[0].route == ops[1].route == "autograd, one vector per pass"


def test_a_numpy_integer_batch_size_is_an_integer() -> None:
    """``batch_size=np.int64(4)`` was refused while ``memory_budget=np.int64(...)`` was taken."""
    import numpy as np

    model = _mlp()
    X, y = Synthetic((5,), 3, batches=3, size=6).tensors()
    v = _vectors(sum(p.numel() for p in model.parameters()), 1)
    ops = [
        HessianOperator(model, nn.CrossEntropyLoss(), (X, y), batch_size=b)
        for b in (4, np.int64(4))
    ]
    assert torch.equal(ops[0] @ v, ops[1] @ v)
    assert ops[1].batches.batch_size == 4 and type(ops[1].batches.batch_size) is int
    assert ops[1].cache_info().num_batches == 5


def test_labels_as_a_python_list_are_labels() -> None:
    """Inputs must be tensors or arrays (a list is a list of batches); labels may be a list."""
    model = _mlp()
    X, y = Synthetic((5,), 3, batches=2, size=6).tensors()
    v = _vectors(sum(p.numel() for p in model.parameters()), 2)
    H = HessianOperator(model, nn.CrossEntropyLoss(), (X, y), batch_size=4)
    Hl = HessianOperator(model, nn.CrossEntropyLoss(), (X, y.tolist()), batch_size=4)
    assert torch.equal(Hl @ v, H @ v)


class _Watched(Synthetic):
    """Synthetic batches that read, at each draw after the first, what a probe says is alive."""

    def __init__(self, probe: Any, *args: Any) -> None:
        super().__init__(*args)
        self.probe, self.alive = probe, []

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for i, batch in enumerate(super().__iter__()):
            alive = self.probe()
            if i and alive is not None:
                self.alive.append(alive)
            yield batch


@pytest.mark.parametrize("route", ["auto", "autograd"])
@pytest.mark.parametrize("cls", [HessianOperator, GGNOperator, JacobianOperator])
def test_a_streamed_pass_holds_nothing_of_a_batch_when_it_draws_the_next(
    route: str, cls: Any
) -> None:
    """Between two batches of a streamed product only its running sum is held (and the batch).

    A batch's product, or a running sum first copied or made while a batch's graph was alive,
    would be allocated amid that graph's temporaries and outlive them, pinning glibc's heap
    where the next graph's large blocks go (``bench/streaming.py``: a streamed ResNet's peak
    over 40 batches 1.64x one batch's instead of 1.37x in float64).
    """
    from linops.memory import PeakMemory

    model = _mlp()
    state: dict[str, Any] = {}
    data = _Watched(lambda: state["peak"].current if "peak" in state else None, (5,), 3, 4, 5)
    op = (
        cls(model, data, route=route, memory_budget=TINY, max_vectors=3)
        if cls is JacobianOperator
        else cls(model, nn.CrossEntropyLoss(), data, route=route, memory_budget=TINY, max_vectors=3)
    )
    directions = [op.T, op] if cls is JacobianOperator else [op]
    for k, A in itertools.product((1, 3, 5), directions):  # 5: in slots of 3 and 2
        x = _vectors(A.shape[1], k).T.contiguous().T
        product = lambda x=x, A=A: A @ x  # noqa: E731
        product()  # the first product decides routes and measures: not watched
        with PeakMemory() as state["peak"]:
            product()
        del state["peak"]
        # the running sum, a block's input laid out per parameter, the last batch and the one
        # being drawn (inputs and labels), and a few bytes of the loss; a batch's product
        # held over would add 8 rows k bytes
        held = 8 * A.shape[0] * k * (1 if k == 1 else 2) + 2 * (8 * 5 * 5 + 8 * 5) + 128
        assert len(data.alive) == 3  # one pass of k vectors (max_vectors), 4 batches
        assert max(data.alive) <= held, (k, data.alive)
        data.alive.clear()


@pytest.mark.parametrize("cls", [HessianOperator, FisherOperator])
def test_a_streamed_block_of_one_vector_passes_builds_each_graph_once(cls: Any) -> None:
    """Convolutions take one vector per pass; streamed, a block still draws the loader once.

    A loop of single products outside the batches rebuilt every batch's graph once per column
    (k loader passes for a k-column block); each column is what its single product gives.
    """
    cached, streamed, data = _pair(_loss_op, cls, "resnet-bn")
    V = _vectors(cached.shape[1], 4)
    streamed @ V[:, 0]  # the loss weights' pass
    before = data.passes
    first = streamed @ V  # decides the block pass: one vector per pass
    assert streamed.batched[False] is False
    # the measured first column (whose graph shows the convolutions: no probe), the other three
    assert data.passes - before == 2
    before = data.passes
    block = streamed @ V
    assert data.passes - before == 1
    assert torch.equal(block, first)
    assert torch.equal(block, cached @ V)
    for j in range(4):
        assert torch.equal(block[:, j], streamed @ V[:, j])


def test_a_streamed_adjoint_jacobian_block_builds_each_graph_once() -> None:
    """``J^T U`` through convolutions goes one vector per pass; streamed, every column goes
    through each batch's graph before the next batch is drawn (it drew the loader once per
    column), and each column is what its own single product gives, bit for bit."""
    cached, streamed, data = _pair(_jac_op, JacobianOperator, "resnet-bn")
    U = _vectors(cached.shape[0], 4)
    streamed.T @ U[:, 0]
    before = data.passes
    first = streamed.T @ U  # decides the block pass: one vector per pass
    assert streamed.batched[True] is False
    assert data.passes - before == 2  # the measured first column, then the other three
    before = data.passes
    block = streamed.T @ U
    assert data.passes - before == 1
    assert torch.equal(block, first)
    assert torch.equal(block, cached.T @ U)
    for j in range(4):
        assert torch.equal(block[:, j], streamed.T @ U[:, j])


def _chunks_alone(op: Any, W: Tensor, width: int) -> Tensor:
    """The block's product chunk by chunk, each chunk a product of its own."""
    return torch.cat([op @ W[:, a : a + width] for a in range(0, W.shape[1], width)], dim=1)


def _graphs_built(op: Any, product: Any) -> tuple[Tensor, int]:
    """``product()`` and the number of batch graphs ``op`` built for it."""
    before = op.cache_info().graphs_built
    out = product()
    return out, op.cache_info().graphs_built - before


@pytest.mark.parametrize("case", ["mlp-chain", "mlp-autograd"])
@pytest.mark.parametrize(
    "cls", [HessianOperator, GGNOperator, EmpiricalFisherOperator, FisherOperator]
)
def test_a_streamed_block_wider_than_a_pass_draws_the_loader_once(case: str, cls: Any) -> None:
    """7 columns in passes of 3 (``max_vectors``): 3, 3 and 1 columns through each batch's
    graph before the next batch is drawn; a loop over the chunks drew the loader and built
    every graph once per chunk. Each chunk is what its own product gives, bit for bit.

    A row-major block over an eighth of the budget is gathered chunk by chunk (graphs built
    once per chunk), as before; not with a budget it fits in (here ``cache=False``)."""
    cached, streamed, data = _pair(_loss_op, cls, case, max_vectors=3)
    rebuilt = _loss_op(cls, cached.model, data, route=CASES[case][2], cache=False, max_vectors=3)
    V = _vectors(cached.shape[1], 7)
    C = V.T.contiguous().T  # column-major
    row_major = 1 if case == "mlp-chain" else 3  # the chain reads it where it lies
    for op, W, passes in ((streamed, C, 1), (streamed, V, row_major), (rebuilt, V, 1)):
        op @ W  # the first block decides the block pass
        before = data.passes
        block, built = _graphs_built(op, lambda op=op, W=W: op @ W)
        assert built == 4 * passes  # 4 batches
        assert data.passes - before == (passes if op is streamed else 0)
        assert torch.equal(block, cached @ W)
        assert torch.equal(block, _chunks_alone(op, W, 3))


@pytest.mark.parametrize("case", ["mlp-chain", "mlp-autograd"])
def test_a_streamed_adjoint_jacobian_block_wider_than_a_pass_draws_the_loader_once(
    case: str,
) -> None:
    cached, streamed, data = _pair(_jac_op, JacobianOperator, case, max_vectors=3)
    rebuilt = _jac_op(JacobianOperator, cached.model, data, route=CASES[case][2], cache=False,
                      max_vectors=3)  # fmt: skip
    U = _vectors(cached.shape[0], 7)
    C = U.T.contiguous().T
    row_major = 1 if case == "mlp-chain" else 3
    for op, W, passes in ((streamed, C, 1), (streamed, U, row_major), (rebuilt, U, 1)):
        op.T @ W
        before = data.passes
        block, built = _graphs_built(op, lambda op=op, W=W: op.T @ W)
        assert built == 4 * passes
        assert data.passes - before == (passes if op is streamed else 0)
        assert torch.equal(block, cached.T @ W)
        assert torch.equal(block, _chunks_alone(op.T, W, 3))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("k", [7, 6])
def test_a_streamed_jacobian_block_wider_than_a_pass_visits_each_batch_once(
    case: str, k: int
) -> None:
    """``J V`` in passes of 3: the loader is drawn once per block. On the chain route every
    graph is built once per block; on the autograd route the many-vector slots take forward
    mode (no graph), and with 7 columns the last slot is one vector, which takes the single
    products' way: the retained graph on the MLP (built once per block), forward AD on the
    convolutional model (no graph). Each chunk is what its own product gives, bit for bit."""
    cached, streamed, data = _pair(_jac_op, JacobianOperator, case, max_vectors=3)
    V = _vectors(cached.shape[1], k).T.contiguous().T
    streamed @ V[:, 0]  # decides the way of single products
    streamed @ V  # and of many-vector ones
    before = data.passes
    block, built = _graphs_built(streamed, lambda: streamed @ V)
    assert data.passes - before == 1
    graphs = streamed.route.startswith("chain") or (case == "mlp-autograd" and k == 7)
    assert built == (4 if graphs else 0)
    assert torch.equal(block, cached @ V)
    assert torch.equal(block, _chunks_alone(streamed, V, 3))


def _conv_bn() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(75, 3)
    ).double()  # fmt: skip
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 1.5)
    return model.eval()


def _samples(n: int, shape: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, *shape, generator=g, dtype=F64), torch.randint(0, 3, (n,), generator=g)


@pytest.mark.parametrize("kw", [{}, {"cache": False}, {"memory_budget": TINY}])
@pytest.mark.parametrize("route", ["auto", "autograd"])
@pytest.mark.parametrize(
    "cls", [HessianOperator, GGNOperator, EmpiricalFisherOperator, FisherOperator, JacobianOperator]
)
def test_a_complex_block_at_one_vector_per_pass_is_its_real_and_imaginary_parts(
    cls: Any, route: str, kw: dict
) -> None:
    """With ``max_vectors=1`` the batched pass's one-column probe of a complex block is two
    real columns, wider than a pass: taken in slots while probing, it raised on the chain
    route (tangents batched in a one-vector slot) and made the autograd route give up its
    batched pass with a warning (found by an audit of the slots, /tmp/audit20)."""
    X, y = _samples(19, (5,))
    if cls is JacobianOperator:
        op = cls(_mlp(), X, batch_size=5, max_vectors=1, route=route, **kw)
        op @ torch.ones(op.shape[1], dtype=F64)  # decides single products' way
    else:
        op = cls(_mlp(), nn.CrossEntropyLoss(), (X, y), batch_size=5, max_vectors=1, route=route,
                 **kw)  # fmt: skip
    g = torch.Generator().manual_seed(2)
    V = torch.randn(op.shape[1], 3, generator=g, dtype=torch.complex128)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        out = op @ V
    assert op.batched[False] is True
    assert torch.equal(out, torch.complex(op @ V.real, op @ V.imag))


@pytest.mark.parametrize("kw", [{"cache": False}, {"memory_budget": TINY}])
@pytest.mark.parametrize("seed", range(4))
def test_one_vector_per_pass_reads_a_strided_last_column_as_a_single_product_does(
    kw: dict, seed: int
) -> None:
    """A row-major 2-column block through convolutions (one vector per pass): its second
    column reached the slots as a strided view (the single product copies it contiguous),
    which changed its last bits where a batch has one sample (19 samples in batches of 6)."""
    X, y = _samples(19, (1, 5, 5))
    loss = nn.CrossEntropyLoss(reduction="sum")
    streamed = HessianOperator(_conv_bn(), loss, (X, y), batch_size=6, route="autograd", **kw)
    cached = HessianOperator(_conv_bn(), loss, (X, y), batch_size=6, route="autograd")
    g = torch.Generator().manual_seed(seed)
    V = torch.randn(streamed.shape[1], 2, generator=g, dtype=F64)
    out = streamed @ V
    assert torch.equal(out, cached @ V)
    assert torch.equal(out[:, 1], streamed @ V[:, 1])


@pytest.mark.parametrize("kw", [{"cache": False}, {"memory_budget": TINY}])
def test_a_one_vector_slot_waits_for_the_way_of_single_products(kw: dict) -> None:
    """A GGN through convolutions takes single products' ``J v`` by forward AD, decided at the
    first single product; a slot of one vector taken while that is undecided would take the
    retained graph's ``J v`` instead (last bits differed from the cached operator's, found by
    an audit of the slots). Every first product decides it today, so the undecided state is
    set by hand here: the block then goes chunk by chunk, and its last chunk decides."""
    X, y = _samples(20, (1, 5, 5))
    loss = nn.CrossEntropyLoss()
    streamed, cached = (
        GGNOperator(_conv_bn(), loss, (X, y), batch_size=5, max_vectors=3, route="autograd", **c)
        for c in (kw, {})
    )
    for k in (6, 7):
        V = torch.randn(k, cached.shape[1], generator=torch.Generator().manual_seed(k), dtype=F64).T
        streamed @ V[:, :6]
        streamed._single_forward_mode = None
        assert torch.equal(streamed @ V, cached @ V)
        # 6 columns: slots of 3, none of one vector; 7: chunks, the last one decides
        assert streamed._single_forward_mode is (None if k == 6 else True)


def test_cache_info_counts_the_graphs_built() -> None:
    """``cache_info().graphs_built``: kept graphs are built once, streamed ones at every
    product (once per batch, however many passes of vectors a block takes)."""
    cached, streamed, _ = _pair(_loss_op, HessianOperator, "mlp-chain", max_vectors=2)
    V = _vectors(cached.shape[1], 5)
    for _ in range(2):
        cached @ V
        streamed @ V
    assert cached.cache_info().graphs_built == 4  # 4 batches
    before = streamed.cache_info().graphs_built
    streamed @ V
    assert streamed.cache_info().graphs_built - before == 4
    assert streamed.to(torch.float32).cache_info().graphs_built == 0


@pytest.mark.parametrize("case", ["mlp-chain", "resnet-bn"])
def test_a_streamed_output_hessian_equals_the_cached_one(case: str) -> None:
    """Its one graph was freed before its product (AttributeError) when not kept."""
    build, shape, _ = CASES[case]
    model = build()
    x = torch.randn(3, *shape, dtype=torch.float64)
    cached = OutputHessianOperator(model, x, 1)
    streamed = OutputHessianOperator(model, x, 1, cache=False)
    V = _vectors(cached.shape[1], 3)
    assert torch.equal(streamed @ V, cached @ V)
    assert torch.equal(streamed @ V[:, 0], cached @ V[:, 0])
