"""A tiny GPT-2 from Hugging Face ``transformers`` (built from a config, no weights downloaded).

The model returns an output object; ``output=lambda out: out.logits`` selects the tensor. Its
LM head is tied to the token embedding, its attention goes through torch's SDPA, its blocks
through LayerNorm and GELU: every part of the zoo at once, in the layout users meet. Slow
(dense references of about 1000 parameters); skipped where ``transformers`` is not installed.
"""

from __future__ import annotations

import pytest
import torch

import linops
from tests.linops.references import Reference

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.slow


def _gpt2() -> tuple[torch.nn.Module, torch.Tensor]:
    cfg = transformers.GPT2Config(
        vocab_size=11,
        n_positions=8,
        n_embd=8,
        n_layer=1,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).double().eval()
    ids = torch.randint(0, 11, (3, 6), generator=torch.Generator().manual_seed(1))
    return model, ids


def _sequence_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_tiny_gpt2_operators_match_references() -> None:
    model, ids = _gpt2()
    logits = lambda out: out.logits  # noqa: E731
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    ref = Reference(model, names, ids, output=logits)
    targets = ids.roll(-1, dims=1)
    J = linops.JacobianOperator(model, ids, output=logits)
    D = ref.jacobian()
    v = torch.randn(J.shape[1], 3, dtype=torch.float64, generator=torch.Generator())
    assert _rel(J @ v, D @ v) < 1e-10
    u = torch.randn(J.shape[0], 2, dtype=torch.float64)
    assert _rel(J.T @ u, D.T @ u) < 1e-10
    H = linops.HessianOperator(model, _sequence_ce, (ids, targets), output=logits)
    DH = ref.hessian(_sequence_ce, targets)
    assert ref.fd_hessian_error(DH, _sequence_ce, targets) < 1e-6
    assert _rel(H @ v, DH @ v) < 1e-10
    G = linops.GGNOperator(model, _sequence_ce, (ids, targets), output=logits)
    assert _rel(G @ v, ref.ggn(_sequence_ce, targets) @ v) < 1e-10
    assert H.route.startswith("autograd") and J.route.startswith("autograd")
