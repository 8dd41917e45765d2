"""A zoo of the models researchers study, small and float64, for the operator tests.

Each :class:`ZooCase` builds a seeded model, its data and loss, and says how the operators
are called (``params=``, ``output=``, a loader of several batches) and how the independent
reference is computed (:mod:`tests.linops.references`). The zoo holds the architectures of the
issue on arbitrary models (attention of every kind, normalization layers, recurrent nets,
custom forwards, parametrizations, weight sharing, unused and frozen parameters, tuple/dict
outputs) and the losses users train with (class weights, ``ignore_index``, label smoothing,
soft targets, KL divergence, BCE with ``pos_weight``, Huber, sequence cross-entropy).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor


@dataclass
class ZooCase:
    name: str
    build: Callable[[], tuple[nn.Module, Tensor, Tensor, Any]]
    #: extra keyword arguments of every operator (``params``, ``output``, ``reduction``, ...)
    kwargs: dict[str, Any] = field(default_factory=dict)
    #: split the data into a DataLoader of this batch size (several batches)
    loader_batch: int | None = None
    #: the reference's own model call (for models whose second derivatives torch gets wrong)
    reference_call: Callable[[nn.Module], Callable[[dict[str, Tensor], Any], Any]] | None = None
    #: operators skipped for a reason (e.g. outputs not real-valued per sample)
    skip: tuple[str, ...] = ()
    #: the selected parameters' names for the reference, when ``params`` is not a list of names
    names: Callable[[nn.Module], list[str]] | None = None
    #: whether autograd's Hessian is the finite difference of its gradient (not through a
    #: ``.detach()``, which autograd's derivatives treat as a constant and the values do not)
    finite_difference: bool = True


def _seed(s: int = 0) -> None:
    torch.manual_seed(s)


# ------------------------------------------------------------------ attention models
class _Pool(nn.Module):
    """Mean over the sequence dimension, then a linear head."""

    def __init__(self, d: int, c: int) -> None:
        super().__init__()
        self.head = nn.Linear(d, c)

    def forward(self, h: Tensor) -> Tensor:
        return self.head(h.mean(dim=1))


class EncoderClassifier(nn.Module):
    def __init__(self, d: int = 8, heads: int = 2, c: int = 3, **layer: Any) -> None:
        super().__init__()
        self.inp = nn.Linear(4, d)
        self.enc = nn.TransformerEncoderLayer(
            d, heads, dim_feedforward=12, dropout=0.0, batch_first=True, **layer
        )
        self.pool = _Pool(d, c)

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(self.enc(self.inp(x)))


class DecoderClassifier(nn.Module):
    def __init__(self, d: int = 8, heads: int = 2, c: int = 3) -> None:
        super().__init__()
        self.inp = nn.Linear(4, d)
        self.mem = nn.Linear(4, d)
        self.dec = nn.TransformerDecoderLayer(
            d, heads, dim_feedforward=12, dropout=0.0, batch_first=True
        )
        self.pool = _Pool(d, c)

    def forward(self, x: Tensor) -> Tensor:
        T = x.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(T, dtype=x.dtype)
        return self.pool(self.dec(self.inp(x), self.mem(x.flip(1)), tgt_mask=mask))


class MHAModel(nn.Module):
    def __init__(self, d: int = 8, heads: int = 2, c: int = 3) -> None:
        super().__init__()
        self.inp = nn.Linear(4, d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.pool = _Pool(d, c)

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x)
        a, _ = self.attn(h, h, h)
        return self.pool(torch.tanh(a + h))


class SDPAModel(nn.Module):
    """A hand-written causal attention block calling ``F.scaled_dot_product_attention``."""

    def __init__(self, d: int = 8, heads: int = 2, c: int = 3) -> None:
        super().__init__()
        self.heads = heads
        self.inp = nn.Linear(4, d)
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.pool = _Pool(d, c)

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x)
        n, T, d = h.shape
        q, k, v = self.qkv(h).split(d, dim=2)
        q, k, v = (t.reshape(n, T, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.pool(h + self.out(a.transpose(1, 2).reshape(n, T, d)))


class TinyGPT(nn.Module):
    """Embedding, learned positions, a causal pre-norm block, final LayerNorm, tied head."""

    def __init__(self, vocab: int = 7, d: int = 8, heads: int = 2, T: int = 5) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(0.1 * torch.randn(T, d))
        self.block = nn.TransformerEncoderLayer(
            d,
            heads,
            dim_feedforward=16,
            dropout=0.0,
            batch_first=True,
            norm_first=True,
            activation="gelu",
        )
        self.ln = nn.LayerNorm(d)

    def forward(self, ids: Tensor) -> Tensor:
        T = ids.shape[1]
        h = self.emb(ids) + self.pos[:T]
        mask = nn.Transformer.generate_square_subsequent_mask(T, dtype=h.dtype)
        h = self.ln(self.block(h, src_mask=mask, is_causal=True))
        return (h @ self.emb.weight.T).transpose(1, 2)  # (N, vocab, T) for sequence CE


class TinyViT(nn.Module):
    def __init__(self, d: int = 8, heads: int = 2, c: int = 3) -> None:
        super().__init__()
        self.patch = nn.Conv2d(1, d, kernel_size=4, stride=4)
        self.cls = nn.Parameter(0.1 * torch.randn(1, 1, d))
        self.pos = nn.Parameter(0.1 * torch.randn(1, 5, d))
        self.enc = nn.TransformerEncoderLayer(
            d, heads, dim_feedforward=12, dropout=0.0, batch_first=True, norm_first=True
        )
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, c)

    def forward(self, x: Tensor) -> Tensor:
        p = self.patch(x).flatten(2).transpose(1, 2)  # (n, 4, d)
        h = torch.cat([self.cls.expand(len(x), -1, -1), p], dim=1) + self.pos
        return self.head(self.norm(self.enc(h))[:, 0])


# ------------------------------------------------------------------ CNNs, norms, RNNs
class ResBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(x + self.bn2(self.conv2(h)))


def _resnet() -> nn.Module:
    net = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        ResBlock(3),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(3, 3),
    )
    for m in net.modules():  # non-trivial running statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return net


class RNNClassifier(nn.Module):
    def __init__(self, cell: type[nn.Module], c: int = 3) -> None:
        super().__init__()
        self.rnn = cell(4, 5, batch_first=True)
        self.head = nn.Linear(5, c)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


class ResidualLNMLP(nn.Module):
    def __init__(self, d: int = 6, c: int = 3) -> None:
        super().__init__()
        self.inp = nn.Linear(4, d)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d), nn.GELU()) for _ in range(2)
        )
        self.head = nn.Linear(d, c)

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x)
        for b in self.blocks:
            h = h + b(h)
        return self.head(h)


# ------------------------------------------------------------------ custom forwards
class DetachingSequential(nn.Sequential):
    """A Sequential whose own forward stops gradients after the first layer's activation."""

    def forward(self, x: Tensor) -> Tensor:
        h = self[1](self[0](x)).detach()
        for m in list(self)[2:]:
            h = m(h)
        return h


class ScaledLinear(nn.Linear):
    """A Linear subclass with its own forward (twice the affine map)."""

    def forward(self, x: Tensor) -> Tensor:
        return 2.0 * super().forward(x)


class TupleModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        out = self.net(x)
        return out, out.detach().sum()


class DictModel(TupleModel):
    def forward(self, x: Tensor) -> dict[str, Tensor]:  # type: ignore[override]
        return {"logits": self.net(x), "hidden": x}


class SharedWeights(nn.Module):
    """The same Linear applied twice (weight sharing)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 5)
        self.shared = nn.Linear(5, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.shared(h))
        return self.head(torch.tanh(self.shared(h)))


class UnusedFrozen(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 5)
        self.frozen = nn.Linear(5, 5)
        self.frozen.requires_grad_(False)
        self.unused = nn.Linear(5, 2)
        self.b = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(torch.tanh(self.frozen(torch.tanh(self.a(x)))))


def _mlp(act: type[nn.Module] = nn.Tanh, c: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 6), act(), nn.Linear(6, 5), act(), nn.Linear(5, c))


def _conv_geometry() -> nn.Sequential:
    """Strided, dilated, grouped, bias-free and circularly padded convolutions, and a Conv1d."""
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, stride=2, padding=1),
        nn.Tanh(),
        nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=2, bias=False),
        nn.Softplus(),
        nn.Conv2d(4, 2, (2, 3), padding=1, padding_mode="circular"),
        nn.Flatten(2),
        nn.Conv1d(2, 3, 3, stride=2),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(27, 3),
    )


def _batch_norm_mlp() -> nn.Sequential:
    """BatchNorm1d with and without affine parameters, non-trivial running statistics."""
    net = nn.Sequential(
        nn.Linear(4, 6),
        nn.BatchNorm1d(6),
        nn.Tanh(),
        nn.Linear(6, 5),
        nn.BatchNorm1d(5, affine=False),
        nn.GELU(),
        nn.Linear(5, 3),
    )
    for m in net.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.3, 2.0)
            if m.affine:
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.uniform_(-0.2, 0.2)
    return net


def _weight_norm_call(model: nn.Module) -> Callable[[dict[str, Tensor], Any], Any]:
    """The weight-normalised MLP written out by hand: ``W = g v / ||v||`` per output row."""

    def call(p: dict[str, Tensor], x: Tensor) -> Tensor:
        h = x
        for i in (0, 2, 4):
            pre = f"{i}.parametrizations.weight."
            g, v = p[pre + "original0"], p[pre + "original1"]
            W = g * v / v.norm(dim=1, keepdim=True)
            h = F.linear(h, W, p[f"{i}.bias"])
            if i < 4:
                h = torch.tanh(h)
        return h

    return call


def _weight_norm_mlp() -> nn.Module:
    net = _mlp()
    for i in (0, 2, 4):
        nn.utils.parametrizations.weight_norm(net[i])
    return net


class Prototypes(nn.Module):
    """Distances to learned prototypes by ``torch.cdist`` (no second derivative in torch)."""

    def __init__(self, c: int = 3) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 5)
        self.protos = nn.Parameter(torch.randn(c, 5))

    def forward(self, x: Tensor) -> Tensor:
        return -torch.cdist(torch.tanh(self.embed(x)), self.protos)


def _prototypes_call(model: nn.Module) -> Callable[[dict[str, Tensor], Any], Any]:
    """:class:`Prototypes` with the distances written out as sqrt of summed squares."""

    def call(p: dict[str, Tensor], x: Tensor) -> Tensor:
        h = torch.tanh(F.linear(x, p["embed.weight"], p["embed.bias"]))
        return -((h.unsqueeze(1) - p["protos"].unsqueeze(0)) ** 2).sum(-1).sqrt()

    return call


class BagOfWords(nn.Module):
    """``nn.EmbeddingBag`` (mean of each row's tokens, a padding index) and a tanh head."""

    def __init__(self, vocab: int = 9, d: int = 5, c: int = 3) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(vocab, d, mode="mean", padding_idx=0)
        self.head = nn.Linear(d, c)

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(torch.tanh(self.bag(ids)))


def _bag_call(model: nn.Module) -> Callable[[dict[str, Tensor], Any], Any]:
    """:class:`BagOfWords` with the bag mean written out over the non-padding tokens."""

    def call(p: dict[str, Tensor], ids: Tensor) -> Tensor:
        keep = (ids != 0).to(p["bag.weight"].dtype).unsqueeze(-1)
        rows = p["bag.weight"][ids] * keep
        h = rows.sum(1) / keep.sum(1).clamp(min=1)
        return F.linear(torch.tanh(h), p["head.weight"], p["head.bias"])

    return call


def _bag_data() -> tuple[Tensor, Tensor]:
    return torch.randint(0, 9, (6, 4)), torch.randint(0, 3, (6,))


# ------------------------------------------------------------------ data
def _vec(n: int = 6, c: int = 3) -> tuple[Tensor, Tensor]:
    return torch.randn(n, 4), torch.randint(0, c, (n,))


def _seq(n: int = 5, T: int = 4, c: int = 3) -> tuple[Tensor, Tensor]:
    return torch.randn(n, T, 4), torch.randint(0, c, (n,))


def _case(
    name: str,
    model: Callable[[], nn.Module],
    data: Callable[[], tuple[Tensor, Tensor]] = _vec,
    loss: Any = None,
    **kw: Any,
) -> ZooCase:
    def build() -> tuple[nn.Module, Tensor, Tensor, Any]:
        _seed(0)
        m = model().double().eval()
        X, y = data()
        X = X.double() if X.is_floating_point() else X
        y = y.double() if y.is_floating_point() else y
        return m, X, y, loss if loss is not None else nn.CrossEntropyLoss()

    return ZooCase(name, build, **kw)


def _gpt_data() -> tuple[Tensor, Tensor]:
    ids = torch.randint(0, 7, (4, 5))
    return ids, torch.randint(0, 7, (4, 5))


def _image() -> tuple[Tensor, Tensor]:
    return torch.randn(4, 1, 8, 8), torch.randint(0, 3, (4,))


def _soft() -> tuple[Tensor, Tensor]:
    return torch.randn(6, 4), torch.softmax(torch.randn(6, 3), dim=1)


def _binary() -> tuple[Tensor, Tensor]:
    return torch.randn(6, 4), torch.randint(0, 2, (6, 3)).double()


def _regression() -> tuple[Tensor, Tensor]:
    return torch.randn(6, 4), torch.randn(6, 3)


def _ignored() -> tuple[Tensor, Tensor]:
    X, y = torch.randn(7, 4), torch.tensor([0, 2, -100, 1, -100, 2, 0])
    return X, y


def _sequence_targets() -> tuple[Tensor, Tensor]:
    return torch.randn(5, 4, 4), torch.randint(0, 3, (5, 4))


class SequenceTagger(nn.Module):
    """Per-position logits in the ``(N, C, T)`` layout of sequence cross-entropy."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(4, 5, batch_first=True)
        self.head = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.rnn(x)[0]).transpose(1, 2)


def _log_softmax_mlp() -> nn.Module:
    return nn.Sequential(_mlp(), nn.LogSoftmax(dim=1))


def _plain_ce(out: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(out, y, reduction="sum")


def _group_norm_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.SiLU(), nn.Flatten(), nn.Linear(4 * 36, 3)
    )


def _hooked() -> nn.Module:
    net = _mlp()
    net[2].register_forward_hook(lambda mod, inp, out: 0.5 * out)
    return net


def _conv1d() -> nn.Module:
    return nn.Sequential(
        nn.Conv1d(4, 5, 2), nn.Mish(), nn.AdaptiveMaxPool1d(1), nn.Flatten(), nn.Linear(5, 3)
    )


def _conv1d_data() -> tuple[Tensor, Tensor]:
    return torch.randn(5, 4, 6), torch.randint(0, 3, (5,))


def _huber() -> nn.Module:
    return nn.HuberLoss(delta=0.3)


ZOO: list[ZooCase] = [
    # attention
    _case("transformer-post-norm", lambda: EncoderClassifier(), _seq),
    _case(
        "transformer-pre-norm-gelu",
        lambda: EncoderClassifier(norm_first=True, activation="gelu"),
        _seq,
    ),
    _case("transformer-decoder", DecoderClassifier, _seq),
    _case("multihead-attention", MHAModel, _seq),
    _case("sdpa-causal", SDPAModel, _seq),
    _case("gpt-tied-sequence-ce", TinyGPT, _gpt_data),
    _case("vit", TinyViT, _image),
    # normalization, residual, recurrent
    _case("resnet-batchnorm-eval", _resnet, _image),
    _case("mlp-batchnorm1d-eval", _batch_norm_mlp),
    _case("conv-geometry", _conv_geometry, _image),
    _case("group-norm-cnn", _group_norm_cnn, _image),
    _case("residual-layernorm-mlp", ResidualLNMLP),
    _case("lstm", lambda: RNNClassifier(nn.LSTM), _seq),
    _case("gru", lambda: RNNClassifier(nn.GRU), _seq),
    _case("rnn-tanh", lambda: RNNClassifier(nn.RNN), _seq),
    _case("conv1d-mish", _conv1d, _conv1d_data),
    _case("mish-mlp", lambda: _mlp(nn.Mish)),
    # custom forwards, hooks, parametrizations, sharing
    _case(
        "sequential-subclass-detach",
        lambda: DetachingSequential(*_mlp()),
        finite_difference=False,
    ),
    _case("linear-subclass", lambda: nn.Sequential(ScaledLinear(4, 5), nn.Tanh(), nn.Linear(5, 3))),
    _case("forward-hook", _hooked),
    _case("weight-norm", _weight_norm_mlp, reference_call=_weight_norm_call),
    _case("cdist-prototypes", Prototypes, reference_call=_prototypes_call),
    _case("embedding-bag", BagOfWords, _bag_data, reference_call=_bag_call),
    _case("weight-sharing", SharedWeights),
    _case("unused-and-frozen", UnusedFrozen),
    _case("tuple-output", TupleModel, kwargs={"output": lambda out: out[0]}),
    _case("dict-output", DictModel, kwargs={"output": lambda out: out["logits"]}),
    _case(
        "layer-params-module",
        _mlp,
        kwargs={"params": "module:2"},
        names=lambda m: ["2.weight", "2.bias"],
    ),
    _case(
        "layer-params-prefix",
        _mlp,
        kwargs={"params": ["4"]},
        names=lambda m: ["4.weight", "4.bias"],
    ),
    # losses over loaders of several batches
    _case(
        "ce-class-weights-loader",
        _mlp,
        lambda: (torch.randn(9, 4), torch.randint(0, 3, (9,))),
        nn.CrossEntropyLoss(weight=torch.tensor([0.2, 1.0, 3.0], dtype=torch.float64)),
        loader_batch=4,
    ),
    _case("ce-ignore-index-loader", _mlp, _ignored, nn.CrossEntropyLoss(), loader_batch=3),
    _case(
        "ce-label-smoothing-loader",
        _mlp,
        _ignored,
        nn.CrossEntropyLoss(label_smoothing=0.1),
        loader_batch=3,
    ),
    _case("ce-soft-targets-loader", _mlp, _soft, nn.CrossEntropyLoss(), loader_batch=4),
    _case(
        "kl-batchmean-loader",
        _log_softmax_mlp,
        _soft,
        nn.KLDivLoss(reduction="batchmean"),
        loader_batch=4,
    ),
    _case(
        "bce-pos-weight-loader",
        _mlp,
        _binary,
        nn.BCEWithLogitsLoss(pos_weight=torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64)),
        loader_batch=4,
    ),
    _case("huber-loader", _mlp, _regression, _huber(), loader_batch=4),
    _case(
        "sequence-ce-loader",
        SequenceTagger,
        _sequence_targets,
        nn.CrossEntropyLoss(),
        loader_batch=2,
    ),
    _case(
        "plain-function-loss", _mlp, _vec, _plain_ce, kwargs={"reduction": "sum"}, loader_batch=4
    ),
]

BY_NAME = {c.name: c for c in ZOO}
assert len(BY_NAME) == len(ZOO), "zoo names must be unique"
del math
