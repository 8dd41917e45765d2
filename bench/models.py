"""Product cost of linops on the models users study beyond MLPs: LayerNorm, BatchNorm, attention.

What is measured
----------------
The harness of ``bench/operators.py`` (interleaved rounds in one process, a fresh shuffled
order each round, medians; single products also back to back; FLOPs and the machine's GEMM
rate) on three float32 models on scikit-learn's digits:

* ``residual-ln-mlp``: a residual MLP with LayerNorm, ``x + GELU(W LN(x))`` blocks, width 256
  (about 150k parameters);
* ``resnet-bn``: a ResNet-style CNN with BatchNorm in eval mode and skip connections (about
  60k parameters);
* ``transformer``: the digits' 8 rows as 8 tokens, two pre-norm ``nn.TransformerEncoderLayer``
  (width 64, 4 heads), mean pooling and a linear head (about 75k parameters).

For each the Hessian ``H v``, GGN ``G v``, Jacobian ``J v`` and ``J^T u`` of linops with one
and with 32 vectors (per vector), the plain-torch reference (a fresh double-backward HVP, a
``forward_ad`` JVP, an ``autograd.grad`` VJP, their chain for the GGN) and curvlinops 3.0.1
with one and 32 vectors. The references run under the math SDPA kernel without the fused
attention fast paths, as linops' graphs do (:mod:`linops._defects`); so does curvlinops,
which otherwise raises on attention (its Hessian, a `jvp` of `jacrev`, is still wrong through
``layer_norm``: see its `rel_error_vs_curvlinops`).

Usage::

    python bench/models.py [--quick] [--no-curvlinops] [--repeats N] [--out results/models]

writes ``models.json`` and ``models.md`` under ``--out`` and prints the table.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from operators import (
    Case,
    _loadavg,
    _meta,
    bench_case,
    markdown,
    target_adder,
    write,
)

from linops import retain_freed_memory, workarounds
from trainers.data import digits


class ResidualLNMLP(nn.Module):
    def __init__(self, d_in: int = 64, width: int = 256, depth: int = 2, c: int = 10) -> None:
        super().__init__()
        self.inp = nn.Linear(d_in, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU())
            for _ in range(depth)
        )
        self.head = nn.Linear(width, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for b in self.blocks:
            h = h + b(h)
        return self.head(h)


class _Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(h)))


class ResNetBN(nn.Module):
    def __init__(self, c: int = 40, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
        self.blocks = nn.Sequential(_Block(c), _Block(c))
        self.head = nn.Linear(c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(torch.relu(self.stem(x)))
        return self.head(h.mean(dim=(2, 3)))


class RowTransformer(nn.Module):
    def __init__(self, d: int = 64, heads: int = 4, layers: int = 2, classes: int = 10) -> None:
        super().__init__()
        self.embed = nn.Linear(8, d)
        self.pos = nn.Parameter(0.02 * torch.randn(8, d))
        self.encoder = nn.ModuleList(
            nn.TransformerEncoderLayer(
                d, heads, dim_feedforward=160, dropout=0.0, batch_first=True, norm_first=True
            )
            for _ in range(layers)
        )
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x.reshape(-1, 8, 8)) + self.pos
        for layer in self.encoder:
            h = layer(h)
        return self.head(h.mean(dim=1))


def make_cases(quick: bool) -> list[Case]:
    torch.manual_seed(0)
    ds = digits()
    n = 64 if quick else 256
    X, y = ds.X_train[:n], ds.y_train[:n]
    resnet = ResNetBN()
    for m in resnet.modules():  # non-trivial running statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    cases = [
        Case("residual-ln-mlp", ResidualLNMLP(), X, y, True),
        Case("resnet-bn", resnet, X.reshape(-1, 1, 8, 8), y, not quick),
        Case("transformer", RowTransformer(), X, y, True),
    ]
    for c in cases:
        c.model.eval()
    return cases


def check_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets: 2x curvlinops, no slower than plain torch, batching pays."""
    out: list[dict[str, Any]] = []
    add = target_adder(out)

    for r in rows:
        m, o = r["model"], r["operator"]
        add(f"{m} {o} speedup vs curvlinops (1) >= 2", r.get("speedup_vs_curvlinops_1"), 2, False)
        add(f"{m} {o} speedup vs curvlinops (32) >= 2", r.get("speedup_vs_curvlinops_32"), 2, False)
        add(f"{m} {o} linops 1 / plain torch <= 1", r["ratio_linops_1_over_reference_1"], 1, True)
        if m in ("transformer", "residual-ln-mlp"):
            add(
                f"{m} {o} 32-vector per vector / single <= 0.7",
                r["ratio_linops_32_per_vector_over_linops_1"],
                0.7,
                True,
            )
    return out


@contextlib.contextmanager
def _plain_kernels(model: nn.Module) -> Any:
    with workarounds(model):
        yield


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="64 samples, 3 rounds (about a minute)")
    p.add_argument("--out", type=Path, default=Path("results/models"), help="output folder")
    p.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 7)")
    p.add_argument("--no-curvlinops", action="store_true", help="skip the curvlinops columns")
    args = p.parse_args(argv)
    args.repeats = args.repeats or (3 if args.quick else 7)
    meta = _meta(args)
    meta["retain_freed_memory"] = retain_freed_memory()
    meta["budget_s"] = 0.5 if args.quick else 2.0
    rows = []
    for case in make_cases(args.quick):
        # the plain-torch references (forward-mode JVPs included) need the attention kernels
        # linops' graphs use; linops sets them itself per graph, so this changes only them
        with _plain_kernels(case.model):
            rows += bench_case(
                case,
                repeats=args.repeats,
                curvlinops=not args.no_curvlinops,
                budget_s=meta["budget_s"],
            )
        print(f"{case.name}: done", file=sys.stderr)
    targets = check_targets(rows)
    meta["loadavg_end"] = _loadavg()
    write(
        args.out,
        "models",
        {"meta": meta, "rows": rows, "targets": targets},
        markdown(rows, targets, meta),
    )


if __name__ == "__main__":
    main()
