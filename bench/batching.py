"""What batching over vectors can save on this machine, with no operator bookkeeping.

``bench/operators.py`` compares a 32-vector product per vector with a single-vector product of
the operators. This script asks how low that ratio can go at all here, on the same models and
data (``operators.make_cases``):

* **graph products**: the chain route's retained graphs (``linops/_chain.py``) called directly
  with ready parameter-shaped tangents, K = 1, 8 and 32 vectors in one pass: no flattening,
  no input checks, no chunking. Per vector, over K = 1.
* **kernels**: the dominant kernels of those products alone, per vector with K vectors in one
  call over one vector. For each ``nn.Linear`` of an MLP the weight-tangent GEMM
  ``x (n, in) @ [dW_1^T ... dW_K^T]`` and the input-tangent GEMM ``dx (n K, in) @ W^T``; for
  each ``nn.Conv2d`` of a CNN the input-tangent convolution over ``n K`` images.

If the kernels cost per vector what they cost for one vector, batching can only remove the
per-call overhead of a single product, and the operators' ratio cannot go much below the graph
products' ratio. Times are medians of back-to-back calls after a warm-up call.

Usage::

    python bench/batching.py [--quick] [--repeats 9] [--out results/batching]

writes ``batching.json`` and ``batching.md`` under ``--out`` and prints the markdown.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _harness import parser, write_json
from operators import Case, make_cases, time_back_to_back

from linops import HessianOperator, JacobianOperator, retain_freed_memory

KS = (1, 8, 32)


def median_seconds(f: Callable[[], Any], repeats: int) -> float:
    """Median wall-clock seconds of ``repeats`` back-to-back calls after a warm-up call."""
    return time_back_to_back({"f": f}, repeats=repeats)["f"]


def _tangents(shapes: list[torch.Size], k: int, gen: torch.Generator) -> list[torch.Tensor]:
    if k == 1:
        return [torch.randn(s, generator=gen) for s in shapes]
    return [torch.randn(k, *s, generator=gen) for s in shapes]


def graph_rows(case: Case, repeats: int) -> list[dict[str, Any]]:
    """Per-vector cost of the chain graphs' products with K vectors over one vector."""
    loss = nn.CrossEntropyLoss()
    H = HessianOperator(case.model, loss, (case.X, case.y), route="chain")
    J = JacobianOperator(case.model, case.X, route="chain")
    (hg,) = list(H._graphs())
    (jg,) = list(J._graphs())
    shapes = H.space.shapes
    n, d = case.X.shape[0], J.shape[0] // case.X.shape[0]
    gen = torch.Generator().manual_seed(0)
    rows = []
    for name in ("hessian", "jacobian", "jacobian_t"):
        per = {}
        for k in KS:
            if name == "jacobian_t":
                cot = torch.randn(n, d, generator=gen) if k == 1 else torch.randn(k, n, d)
                fn: Callable[[], Any] = lambda c=cot, b=k > 1: jg.vjp(c, b)  # noqa: E731
            else:
                tan = _tangents(shapes, k, gen)
                g = hg.hvp if name == "hessian" else jg.jvp
                fn = lambda t=tan, b=k > 1, g=g: g(t, b)  # noqa: E731
            per[k] = median_seconds(fn, repeats) / k
        rows.append(_row(case.name, "graph " + name, per))
    return rows


def _row(model: str, what: str, per: dict[int, float]) -> dict[str, Any]:
    return {
        "model": model,
        "what": what,
        "seconds_per_vector": {str(k): v for k, v in per.items()},
        "ratio_over_one": {str(k): v / per[1] for k, v in per.items()},
    }


def kernel_rows(case: Case, repeats: int) -> list[dict[str, Any]]:
    """Per-vector cost of each layer's dominant kernels with K vectors over one vector."""
    inputs: dict[nn.Module, torch.Tensor] = {}

    def keep(mod: nn.Module, args: tuple[torch.Tensor, ...], _: torch.Tensor) -> None:
        inputs.setdefault(mod, args[0].detach())

    hooks = [
        m.register_forward_hook(keep)
        for m in case.model.modules()
        if isinstance(m, nn.Linear | nn.Conv2d)
    ]
    with torch.no_grad():
        case.model(case.X)
    for h in hooks:
        h.remove()
    rows = []
    for i, (mod, x) in enumerate(inputs.items()):
        W, n = mod.weight.detach(), x.shape[0]
        if isinstance(mod, nn.Linear):
            out, inp = W.shape
            rows.append(
                _kernel_row(
                    case.name,
                    f"layer {i} x @ [dW^T] ({inp} -> {out})",
                    lambda k, x=x, out=out, inp=inp: (x, torch.randn(k * out, inp)),
                    lambda x, dW: x @ dW.T,
                    repeats,
                )
            )
            rows.append(
                _kernel_row(
                    case.name,
                    f"layer {i} dx @ W^T ({inp} -> {out})",
                    lambda k, n=n, inp=inp: (torch.randn(n * k, inp),),
                    lambda dx, W=W: dx @ W.T,
                    repeats,
                )
            )
        else:
            c_out, c_in = W.shape[:2]
            rows.append(
                _kernel_row(
                    case.name,
                    f"layer {i} conv(dx, W) ({c_in} -> {c_out})",
                    lambda k, x=x: (torch.randn(x.shape[0] * k, *x.shape[1:]),),
                    lambda dx, W=W, m=mod: F.conv2d(dx, W, None, m.stride, m.padding, m.dilation),
                    repeats,
                )
            )
    return rows


def _kernel_row(
    model: str,
    what: str,
    make: Callable[[int], tuple[torch.Tensor, ...]],
    kernel: Callable[..., torch.Tensor],
    repeats: int,
) -> dict[str, Any]:
    """``kernel(*make(k))`` for k in ``KS``, per vector."""
    per = {}
    for k in KS:
        args = make(k)
        per[k] = median_seconds(lambda args=args: kernel(*args), repeats) / k
    return _row(model, what, per)


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    head = "| model | what | 1 vector (ms) | " + " | ".join(
        f"{k} vectors, per vector / one" for k in KS[1:]
    )
    lines = [head + " |", "|" + "---|" * (3 + len(KS) - 1)]
    for r in rows:
        cells = " | ".join(f"{r['ratio_over_one'][str(k)]:.2f}" for k in KS[1:])
        one = 1e3 * r["seconds_per_vector"]["1"]
        lines.append(f"| {r['model']} | {r['what']} | {one:.3f} | {cells} |")
    lines += [
        "",
        f"torch {meta['torch']}, {meta['threads']} threads, retain_freed_memory: "
        f"{meta['retain_freed_memory']}, median of {meta['repeats']} back-to-back calls, "
        f"`{meta['command']}`",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__, "results/batching", quick_help="smaller data, fewer calls")
    p.add_argument("--repeats", type=int, default=None)
    args = p.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 9)
    meta = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "retain_freed_memory": retain_freed_memory(),
        "repeats": repeats,
        "command": "python " + " ".join(sys.argv),
    }
    rows = []
    for case in make_cases(args.quick):
        rows += graph_rows(case, repeats) + kernel_rows(case, repeats)
        print(f"{case.name}: done", file=sys.stderr)
    table = markdown(rows, meta)
    write_json(args.out, "batching", {"meta": meta, "rows": rows}, indent=2)
    (args.out / "batching.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
