"""Dict batches and keyword inputs (issue 23, item 5): models called as ``model(**batch)``.

The operators of a model called with keyword inputs, the targets under ``label_key``, must
equal those of the same network called on tensors, in float64.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from linops import GGNOperator, HessianOperator, JacobianOperator
from linops.params import KeywordInputs

Tensor = torch.Tensor
F64 = torch.float64


def _body() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


class KeywordModel(nn.Module):
    """Hugging Face style: keyword inputs, an optional mask and flag, a dict of outputs."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(
        self, features: Tensor, mask: Tensor | None = None, return_dict: bool = True
    ) -> Any:
        out = self.body(features)
        if mask is not None:
            out = out * mask[:, None].to(out.dtype)
        return {"logits": out} if return_dict else out


def _tensors(n: int = 10) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(n, 4, generator=g, dtype=F64), torch.randint(0, 3, (n,), generator=g)


def _dict_batches(X: Tensor, y: Tensor, size: int = 4) -> list[dict[str, Any]]:
    return [
        {
            "features": X[i : i + size],
            "mask": torch.ones(len(X[i : i + size]), dtype=torch.long),
            "return_dict": True,
            "labels": y[i : i + size],
        }
        for i in range(0, len(X), size)
    ]


def _tensor_batches(X: Tensor, y: Tensor, size: int = 4) -> list[tuple[Tensor, Tensor]]:
    return [(X[i : i + size], y[i : i + size]) for i in range(0, len(X), size)]


def _logits(out: Any) -> Tensor:
    return out["logits"]


class _Samples(Dataset):
    def __init__(self, X: Tensor, y: Tensor) -> None:
        self.X, self.y = X, y

    def __len__(self) -> int:
        return len(self.X)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"features": self.X[i], "labels": self.y[i]}


def _close(a: Tensor, b: Tensor) -> bool:
    return bool(torch.allclose(a, b, rtol=1e-12, atol=1e-14))


@pytest.mark.parametrize("cls", [HessianOperator, GGNOperator])
@pytest.mark.parametrize("route", ["autograd", "auto"])
def test_loss_operators_on_dicts_equal_those_on_tensors(cls: Any, route: str) -> None:
    body, (X, y) = _body(), _tensors()
    loss = nn.CrossEntropyLoss()
    A = cls(body, loss, _tensor_batches(X, y), route=route)
    for data, kw in [
        (_dict_batches(X, y), {}),  # a list of dict batches
        (DataLoader(_Samples(X, y), batch_size=4), {}),  # a loader collating dicts
        ({"features": X, "labels": y}, {"batch_size": 4}),  # one dict of tensors, split
    ]:
        B = cls(KeywordModel(body), loss, data, output=_logits, label_key="labels", **kw)
        dense = B.to_dense()
        assert _close(dense, A.to_dense())
        if route == "autograd":  # the same computation on the same route: the same numbers
            assert torch.equal(dense, A.to_dense())
        assert B.route is not None and B.route.startswith("autograd")


def test_jacobian_on_dicts_equals_that_on_tensors_and_drops_the_labels() -> None:
    body, (X, y) = _body(), _tensors()
    J = JacobianOperator(body, _tensor_batches(X, y), route="autograd")
    Jd = JacobianOperator(
        KeywordModel(body), _dict_batches(X, y), output=_logits, label_key="labels"
    )
    assert Jd.shape == J.shape
    assert torch.equal(Jd.to_dense(), J.to_dense())
    U = torch.randn(J.shape[0], 3, generator=torch.Generator().manual_seed(4), dtype=F64)
    assert _close(Jd.T @ U, J.T @ U)
    # without label_key a dict's every key is an input: the model refuses 'labels', named
    with pytest.raises(ValueError, match="labels"):
        JacobianOperator(KeywordModel(body), _dict_batches(X, y), output=_logits)


@pytest.mark.parametrize("cls", [HessianOperator, GGNOperator])
@pytest.mark.parametrize("stream", [{"memory_budget": 1}, {"cache": False}])
def test_streamed_dict_batches_equal_cached_bitwise(cls: Any, stream: dict) -> None:
    """The GGN with ``cache=False`` cleared the kept batch's inputs with its graph after the
    first pass: "'KeywordInputs' object has no attribute 'values'" at the next product."""
    body, (X, y) = _body(), _tensors()
    kw: dict[str, Any] = {"output": _logits, "label_key": "labels", "max_vectors": 2}
    model = KeywordModel(body)
    H = cls(model, nn.CrossEntropyLoss(), _dict_batches(X, y), **kw)
    Hs = cls(model, nn.CrossEntropyLoss(), _dict_batches(X, y), **stream, **kw)
    V = torch.randn(H.shape[1], 3, generator=torch.Generator().manual_seed(5), dtype=F64)
    assert torch.equal(Hs @ V, H @ V)
    assert torch.equal(Hs @ V, H @ V)  # a second pass over the same (kept or redrawn) batches
    assert Hs.cache_info().graphs_cached == 0


def test_float32_dict_inputs_are_cast_and_integer_ones_kept() -> None:
    body, (X, y) = _body(), _tensors()
    G = GGNOperator(
        KeywordModel(copy.deepcopy(body)).float(),
        nn.CrossEntropyLoss(),
        _dict_batches(X, y),
        output=_logits,
        label_key="labels",
    )
    x, _ = G.batches.first()
    assert isinstance(x, KeywordInputs)
    assert x["features"].dtype == torch.float32 and x["mask"].dtype == torch.long
    assert x["return_dict"] is True and len(x) == 4
    ref = GGNOperator(body, nn.CrossEntropyLoss(), _tensor_batches(X, y)).to_dense()
    assert torch.allclose(G.to_dense().double(), ref, rtol=1e-4, atol=1e-6)


def test_missing_label_key_is_a_clear_error_naming_the_keys() -> None:
    body, (X, y) = _body(), _tensors()
    model = KeywordModel(body)
    with pytest.raises(ValueError, match=r"keys \['features', 'mask', 'return_dict', 'labels'\]"):
        HessianOperator(
            model, nn.CrossEntropyLoss(), _dict_batches(X, y), output=_logits
        ).to_dense()
    with pytest.raises(ValueError, match=r"label_key='label' is not one"):
        HessianOperator(
            model, nn.CrossEntropyLoss(), _dict_batches(X, y), output=_logits, label_key="label"
        ).to_dense()


def test_other_bad_dict_inputs() -> None:
    body, (X, y) = _body(), _tensors()
    with pytest.raises(ValueError, match="route: 'chain' needs tensor inputs"):
        HessianOperator(
            KeywordModel(body), nn.CrossEntropyLoss(), _dict_batches(X, y), output=_logits,
            label_key="labels", route="chain",
        ).to_dense()  # fmt: skip
    ragged = [{"features": X[:4], "mask": torch.ones(3), "labels": y[:4]}]
    with pytest.raises(ValueError, match="same number of samples"):
        HessianOperator(
            KeywordModel(body), nn.CrossEntropyLoss(), ragged, output=_logits, label_key="labels"
        ).to_dense()
    with pytest.raises(TypeError, match="label_key"):
        HessianOperator(body, nn.CrossEntropyLoss(), (X, y), label_key=3)  # type: ignore[arg-type]


def test_fisher_diagonal_on_dicts_equals_that_on_tensors() -> None:
    from linops import EmpiricalFisherOperator, FisherOperator

    X, y = _tensors()
    body = _body()
    for cls in (FisherOperator, EmpiricalFisherOperator):
        on_tensors = cls(body, nn.CrossEntropyLoss(), _tensor_batches(X, y))
        on_dicts = cls(
            KeywordModel(copy.deepcopy(body)),
            nn.CrossEntropyLoss(),
            _dict_batches(X, y),
            output=_logits,
            label_key="labels",
        )
        want = on_tensors.diagonal(max_samples=3)
        got = on_dicts.diagonal(max_samples=3)
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-15)
        dense = torch.diagonal(on_tensors.to_dense())
        assert torch.allclose(want, dense, rtol=1e-10, atol=1e-14)


class _TinyLM(nn.Module):
    def __init__(self, vocab: int = 7, d: int = 4) -> None:
        super().__init__()
        self.emb, self.head = nn.Embedding(vocab, d), nn.Linear(d, vocab)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.emb(input_ids)))  # (N, T, vocab)


def test_a_language_models_fisher_from_one_dict_with_flattened_labels() -> None:
    """One dict batch whose labels are (N T,) (shifted and flattened, for (N T, C) logits) was
    refused as "tensors with the same number of samples", though nothing is split."""
    from linops import FisherOperator

    torch.manual_seed(0)
    model = _TinyLM().double()
    ids = torch.randint(0, 7, (3, 5))
    batch = {"input_ids": ids, "labels": ids[:, 1:].reshape(-1)}
    kw: dict[str, Any] = {"label_key": "labels", "output": lambda o: o[:, :-1].flatten(0, 1)}
    F = FisherOperator(model, nn.CrossEntropyLoss(), batch, **kw)
    G = GGNOperator(model, nn.CrossEntropyLoss(), [batch], **kw)
    assert _close(F.to_dense(), G.to_dense())
    with pytest.raises(ValueError, match="same number of samples to split into batch_size=2"):
        FisherOperator(model, nn.CrossEntropyLoss(), batch, batch_size=2, **kw).to_dense()
    sequence = {"input_ids": ids, "labels": ids}  # (N, C, T) logits: torch's CE takes them
    with pytest.raises(ValueError, match=r"fold the positions into the batch: \(N T, C\) logits"):
        FisherOperator(
            model, nn.CrossEntropyLoss(), sequence, label_key="labels",
            output=lambda o: o.transpose(1, 2),
        ).to_dense()  # fmt: skip
