"""Data that change between passes are refused, never turned into a wrong matrix.

Found by a helper audit of loaders and streamed operators: a random batch sampler passed as
``batch_sampler=``, noise in a dataset's ``__getitem__``, targets redrawn at every product, an
order changed by ``DistributedSampler.set_epoch`` under forward-mode ``J v``, and tensor data
changed in place gave silently wrong products (0.07 to 1.47 relative); an ``ignore_index`` at
or above the number of classes crashed the closed-form cross-entropy.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    DistributedSampler,
    RandomSampler,
    TensorDataset,
)

import linops
from tests.linops.references import Reference

F64 = torch.float64
TINY = 1  # bytes: every batch streamed, every graph rebuilt


def _data(n: int = 23) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 4, generator=g, dtype=F64), torch.randint(0, 3, (n,), generator=g)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


class _Noisy(Dataset):
    """A dataset that adds fresh noise to its inputs (``inputs``) or flips labels (``labels``)."""

    def __init__(self, X: torch.Tensor, y: torch.Tensor, what: str) -> None:
        self.X, self.y, self.what = X, y, what

    def __len__(self) -> int:
        return len(self.X)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.what == "inputs":
            return self.X[i] + 0.1 * torch.randn(4, dtype=F64), self.y[i]
        return self.X[i], torch.randint(0, 3, ())


def test_a_random_batch_sampler_passed_as_batch_sampler_is_refused() -> None:
    """As ``sampler=``, the same random sampler was refused; as ``batch_sampler=`` the operator
    was the Hessian of a random subset (drop_last), 0.29-0.58 off."""
    X, y = _data()
    ds = TensorDataset(X, y)
    loader = DataLoader(ds, batch_sampler=BatchSampler(RandomSampler(ds), 5, drop_last=True))
    with pytest.raises(ValueError, match="BatchSampler of a RandomSampler"):
        linops.HessianOperator(_mlp(), nn.CrossEntropyLoss(), loader)
    fixed = DataLoader(ds, batch_sampler=BatchSampler(range(23), 5, drop_last=False))
    H = linops.HessianOperator(_mlp(), nn.CrossEntropyLoss(), fixed)
    ref = linops.HessianOperator(_mlp(), nn.CrossEntropyLoss(), (X, y))
    v = torch.randn(H.shape[1], dtype=F64)
    assert torch.allclose(H @ v, ref @ v, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("what", ["inputs", "labels"])
@pytest.mark.parametrize("kw", [{}, {"cache": True}, {"cache": False}, {"memory_budget": TINY}])
def test_a_dataset_that_draws_other_data_at_each_pass_is_refused(
    what: str, kw: dict[str, Any]
) -> None:
    """Noise in ``__getitem__``: kept, the operator was one random draw (0.07-0.13 from the
    clean Hessian); streamed, noisy labels gave another matrix at every product (0.27-0.40)."""
    X, y = _data()
    loader = DataLoader(_Noisy(X, y, what), batch_size=5)
    with pytest.raises(RuntimeError, match="differs from its first draw"):
        H = linops.HessianOperator(_mlp(), nn.CrossEntropyLoss(), loader, **kw)
        for _ in range(2):
            H @ torch.ones(H.shape[1], dtype=F64)
    # the opt-out keeps the old behaviour for users who want one draw
    H = linops.HessianOperator(_mlp(), nn.CrossEntropyLoss(), loader, allow_reshuffle=True)
    H @ torch.ones(H.shape[1], dtype=F64)


def test_an_order_changed_by_set_epoch_is_refused_by_forward_mode_products() -> None:
    """``J v`` by forward AD (a CNN) iterated the batches without any check: after
    ``set_epoch(1)`` it returned the rows in another order (error 1.0)."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c, self.lin = nn.Conv1d(1, 2, 3), nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(torch.tanh(self.c(x[:, None, :])).flatten(1))

    X, y = _data()
    torch.manual_seed(0)
    model = Net().double()
    sampler = DistributedSampler(TensorDataset(X, y), num_replicas=1, rank=0, shuffle=True)
    loader = DataLoader(TensorDataset(X, y), batch_size=5, sampler=sampler)
    J = linops.JacobianOperator(model, loader, memory_budget=TINY)
    v = torch.randn(J.shape[1], dtype=F64)
    first = J @ v
    assert torch.equal(J @ v, first)
    sampler.set_epoch(1)
    with pytest.raises(RuntimeError, match="differs from its first draw"):
        J @ v


@pytest.mark.parametrize("what", ["inputs", "targets"])
def test_tensor_data_changed_in_place_after_the_operator_kept_it_is_refused(what: str) -> None:
    """Kept batches are views of the given tensors: after ``X.add_(...)`` the chain route mixed
    the old activations with the new inputs (0.36 from the old Hessian, 0.16 from the new)."""
    X, y = _data()
    H = linops.HessianOperator(_mlp(), nn.CrossEntropyLoss(), (X, y), batch_size=8)
    v = torch.randn(H.shape[1], dtype=F64)
    H @ v
    if what == "inputs":
        X[10:].add_(0.5)
    else:
        y[3] = (y[3] + 1) % 3
    with pytest.raises(RuntimeError, match="changed in place"):
        H @ v


def test_a_single_use_iterable_is_named_at_its_empty_second_pass() -> None:
    """An iterable whose ``__iter__`` gives its batches once was refused as an empty dataset."""
    X, y = _data()

    class Once:
        def __init__(self) -> None:
            self.batches = iter([(X[:12], y[:12]), (X[12:], y[12:])])

        def __iter__(self) -> Any:
            return self.batches

    H = linops.HessianOperator(_mlp(), nn.CrossEntropyLoss(), Once(), memory_budget=TINY)
    with pytest.raises(ValueError, match="single-use iterable"):
        for _ in range(2):
            H @ torch.ones(H.shape[1], dtype=F64)


@pytest.mark.parametrize("cls", [linops.HessianOperator, linops.GGNOperator])
def test_an_ignore_index_at_or_above_the_classes_is_exact(cls: Any) -> None:
    """``CrossEntropyLoss(ignore_index=255)`` (segmentation's convention) crashed the chain
    route's closed form and every GGN in ``one_hot``."""
    X, y = _data()
    y[[1, 2, 8]] = 255
    loss = nn.CrossEntropyLoss(ignore_index=255)
    model = _mlp()
    op = cls(model, loss, (X, y)).to_dense()
    ref = Reference(model, ["0.weight", "0.bias", "2.weight", "2.bias"], X)
    dense = ref.hessian(loss, y) if cls is linops.HessianOperator else ref.ggn(loss, y)
    assert torch.allclose(torch.as_tensor(op), dense, rtol=1e-10, atol=1e-12)
    assert float(dense.abs().max()) > 1e-3


def test_a_write_elsewhere_in_the_tensor_the_batches_view_is_no_change() -> None:
    """Views share their base's version counter: filling other rows of a buffer (a replay
    buffer) moved it although the operator's rows did not change (refused by 00cdefb)."""
    X, y = _data(40)
    buffer = torch.zeros(60, 4, dtype=F64)
    buffer[:23] = X[:23]
    H = linops.HessianOperator(_mlp(), nn.CrossEntropyLoss(), (buffer[:23], y[:23]), batch_size=8)
    v = torch.randn(H.shape[1], dtype=F64)
    before = H @ v
    buffer[23:] = 1.0
    assert torch.equal(H @ v, before)
    buffer[0, 0] += 1.0  # one of the operator's own rows
    with pytest.raises(RuntimeError, match="changed in place"):
        H @ v


def test_clear_cache_takes_data_changed_on_purpose() -> None:
    X, y = _data()
    H = linops.HessianOperator(_mlp(), nn.CrossEntropyLoss(), (X, y), batch_size=8)
    v = torch.randn(H.shape[1], dtype=F64)
    H @ v
    X.mul_(0.5)
    H.clear_cache()
    fresh = linops.HessianOperator(_mlp(), nn.CrossEntropyLoss(), (X.clone(), y), batch_size=8)
    assert torch.equal(H @ v, fresh @ v)


def test_inference_tensors_and_complex_data_are_read_without_error_or_warning() -> None:
    """Inference tensors have no version counter (``_version`` raised); complex inputs were
    cast to real for the print, with a warning and without their imaginary parts."""
    X, y = _data()
    with torch.inference_mode():
        Xi = X * 1.0
    model = _mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        H = linops.HessianOperator(model, nn.CrossEntropyLoss(), (Xi, y), params=["2.weight"])
        v = torch.randn(H.shape[1], dtype=F64)
        ref = linops.HessianOperator(model, nn.CrossEntropyLoss(), (X, y), params=["2.weight"])
        assert torch.equal(H @ v, ref @ v)
        H @ v

        class Modulus(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.lin = nn.Linear(4, 3).double()

            def forward(self, z: torch.Tensor) -> torch.Tensor:
                return self.lin(z.abs())

        Z = torch.complex(X, torch.ones_like(X))

        class Loader:  # re-iterable, not held: drawn at every product and printed
            def __iter__(self) -> Any:
                return iter([(Z[:12], y[:12]), (Z[12:], y[12:])])

        streamed = linops.HessianOperator(
            Modulus(), nn.CrossEntropyLoss(), Loader(), memory_budget=TINY
        )
        u = torch.randn(streamed.shape[1], dtype=F64)
        assert torch.equal(streamed @ u, streamed @ u)


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
def test_sparse_inputs_are_taken_as_before() -> None:
    """Sparse tensors have no reshape (CSR no version counter): the prints of kept batches
    raised at the first product (00cdefb); they are not printed."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = _mlp()

        def forward(self, x: torch.Tensor, adj: torch.Tensor | None = None) -> torch.Tensor:
            x = x.to_dense() if x.layout != torch.strided else x
            return self.net(torch.sparse.mm(adj, x) if adj is not None else x)

    X, y = _data(24)
    v = torch.randn(43, dtype=F64)
    ref = linops.HessianOperator(Net(), nn.CrossEntropyLoss(), (X, y)) @ v
    adj = torch.eye(24, dtype=F64).to_sparse()
    for data in (
        [(X.to_sparse(), y)],
        [(X.to_sparse_csr(), y)],
        [{"x": X, "adj": adj, "labels": y}],
    ):
        H = linops.HessianOperator(Net(), nn.CrossEntropyLoss(), data, label_key="labels")
        assert torch.allclose(H @ v, ref, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("shape", [(1, 3, 112, 112), (40000,), (3, 50000)])
def test_a_print_does_not_depend_on_the_number_of_threads(shape: tuple[int, ...]) -> None:
    """torch splits one sum of more than 32,768 elements among its threads: a streamed batch
    of one large sample was refused after ``torch.set_num_threads`` changed between passes."""
    from linops._data import _batch_print

    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    y = torch.arange(shape[0]) % 7
    threads = torch.get_num_threads()
    try:
        prints = []
        for n in (1, 4, 3):
            torch.set_num_threads(n)
            prints.append(_batch_print((x, y), {}))
    finally:
        torch.set_num_threads(threads)
    assert prints[0] == prints[1] == prints[2]
    assert prints[0] != _batch_print((x.flip(-1), y), {})  # a flipped sample prints otherwise


@pytest.mark.parametrize("loader", [False, True])
def test_data_made_under_inference_mode_is_taken(loader: bool) -> None:
    """Features computed under ``torch.inference_mode`` (a frozen backbone's) raised torch's
    "Inference tensors cannot be saved for backward" at the first product."""
    X, y = _data()
    with torch.inference_mode():
        Xi, yi = X * 1.0, y.clone()
    data: Any = DataLoader(TensorDataset(Xi, yi), batch_size=8) if loader else (Xi, yi)
    H = linops.HessianOperator(_mlp(), nn.CrossEntropyLoss(), data)
    ref = linops.HessianOperator(_mlp(), nn.CrossEntropyLoss(), (X, y), batch_size=8)
    v = torch.randn(H.shape[1], dtype=F64)
    assert torch.allclose(H @ v, ref @ v, rtol=1e-13, atol=1e-15)


def test_inputs_that_require_grad_are_data() -> None:
    """``X.requires_grad_()`` (for an input-gradient analysis elsewhere): products over several
    batches raised "a view was created in no_grad mode" and came back with a ``grad_fn``."""
    X, y = _data()
    H = linops.HessianOperator(
        _mlp(), nn.CrossEntropyLoss(), (X.clone().requires_grad_(), y), batch_size=6
    )
    ref = linops.HessianOperator(_mlp(), nn.CrossEntropyLoss(), (X, y), batch_size=6)
    v = torch.randn(H.shape[1], dtype=F64)
    out = H @ v
    assert out.grad_fn is None
    assert torch.allclose(out, ref @ v, rtol=1e-13, atol=1e-15)
