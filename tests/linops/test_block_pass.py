"""How a model operator computes a block of vectors: batched where torch batches, else a loop.

The block-pass choice (``op.batched``, ``op.route``, ``op.unbatched_reason``) is made once per
direction at the first many-vector product; it must never change a product beyond rounding
(float64 products against dense ``torch.func`` references, and against the same operator's
single products), and a model whose derivatives vmap would loop over (convolutions and
BatchNorm in torch 2.13) must never run the wide batched pass, not even to find that out.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch

import linops
import linops._model
from tests.linops.test_zoo import _operator, _rel
from tests.linops.zoo import BY_NAME

RTOL = 1e-10


def _recording(widths: list[int]) -> Any:
    real = linops._model.attempt_batched

    def attempt(apply: Any, X: torch.Tensor, adjoint: bool) -> Any:
        widths.append(X.shape[1])
        return real(apply, X, adjoint)

    return attempt


@pytest.mark.parametrize("name", ["H", "JT"])
def test_resnet_takes_one_vector_per_pass_without_running_the_wide_pass(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    op, D = _operator(name, BY_NAME["resnet-batchnorm-eval"])
    widths: list[int] = []
    monkeypatch.setattr(linops._model, "attempt_batched", _recording(widths))
    V = torch.randn(op.shape[1], 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert _rel(op @ V, D @ V) < RTOL
    J = op.args[0] if name == "JT" else op  # J^T wraps the Jacobian operator
    adjoint = name == "JT"
    assert widths == [1]  # only the one-vector probe went through vmap
    assert J.batched[adjoint] is False
    reason = J.unbatched_reason[adjoint]
    assert reason is not None and "vmap has no batching rule" in reason
    assert "convolution_backward" in reason or "native_batch_norm_backward" in reason
    assert J.route.endswith("one vector per pass")
    widths.clear()
    assert _rel(op @ V, D @ V) < RTOL  # later blocks: a plain loop, no vmap at all
    assert widths == []


CASES = [
    "resnet-batchnorm-eval",
    "residual-layernorm-mlp",
    "transformer-pre-norm-gelu",
    "group-norm-cnn",
    "ce-class-weights-loader",
]


@pytest.mark.parametrize("op_name", ["H", "GGN", "J", "JT"])
@pytest.mark.parametrize("case", CASES)
def test_the_block_pass_choice_never_changes_a_product(case: str, op_name: str) -> None:
    op, D = _operator(op_name, BY_NAME[case])
    gen = torch.Generator().manual_seed(1)
    V = torch.randn(op.shape[1], 4, dtype=torch.float64, generator=gen)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # GroupNorm's fallback announces itself
        block = op @ V  # the first block decides the pass
        again = op @ V  # and later blocks take it
    singles = torch.stack([op @ V[:, i] for i in range(V.shape[1])], dim=1)
    assert _rel(block, D @ V) < RTOL
    assert _rel(singles, D @ V) < RTOL
    assert _rel(block, singles) < 1e-12
    assert torch.equal(block, again)

