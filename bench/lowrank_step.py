"""Step time and memory of the low-rank Jacobian trainer (Algorithm 1 of the lazy-regime low-rank paper) against backprop.

For an MLP and for :class:`trainers.models.SmallCNN` on 32x32 inputs with growing channel
counts, measured in one run on the same batches:

* ``seconds_step_backprop``: one :class:`trainers.BackpropTrainer` step (forward + backward +
  SGD update);
* ``seconds_step_lowrank_forward``: one :class:`trainers.LowRankJacobianTrainer` step with
  ``outputs="forward"`` (a forward pass, no backward; the paper's Algorithm 1);
* ``seconds_step_lowrank_linearized``: the same with ``outputs="linearized"`` (no pass through
  the network at all);
* ``seconds_preprocess``: the one-off preprocessing (reference set, ``V_J``, ``P = J^T V_J``,
  basis and ``J B``), and the break-even step count
  ``seconds_preprocess / (seconds_step_backprop - seconds_step_lowrank)`` (``null`` in the
  JSON where the low-rank step saves no time: it never breaks even).

Memory per step is *accounted*, not read from an allocator (CPU torch has no peak counter):
backprop = tensors saved for the backward pass (``saved_tensors_hooks``, unique storages) plus
the gradient; low-rank forward = the largest input+output pair of any module in a no-grad
forward plus the per-step factor rows and update; low-rank linearized = those per-step
temporaries only. ``bytes_stored_factors`` is the persistent memory of the factors.

Run ``python bench/lowrank_step.py [--quick] [--out DIR]``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/_harness.py

from _harness import markdown_table, median_seconds, parser, save_figure, write_json, write_markdown

from trainers import BackpropTrainer, LowRankJacobianTrainer
from trainers.models import MLP, SmallCNN

NAME = "lowrank_step"
CE = torch.nn.functional.cross_entropy


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def backprop_bytes(trainer: BackpropTrainer, x: torch.Tensor, y: torch.Tensor) -> int:
    """Bytes saved for backward (unique storages) plus the gradient."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    params = {n: p.detach().requires_grad_(True) for n, p in trainer.values.items()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = CE(trainer.forward(x, params), y)
    loss.backward()
    return sum(seen.values()) + sum(_bytes(p) for p in params.values())


def forward_peak_bytes(model: torch.nn.Module, trainer: Any, x: torch.Tensor) -> int:
    """Largest input + output of any leaf module in a no-grad forward."""
    peak = [_bytes(x)]

    def hook(mod: torch.nn.Module, inp: Any, out: torch.Tensor) -> None:
        peak.append(sum(_bytes(i) for i in inp if isinstance(i, torch.Tensor)) + _bytes(out))

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    with torch.no_grad():
        trainer.forward(x)
    for h in handles:
        h.remove()
    return max(peak)


def lowrank_step_bytes(trainer: LowRankJacobianTrainer, batch: int) -> int:
    """Per-step temporaries: factor rows of the batch, coefficients, outputs and the update."""
    F = trainer.factors
    k = F.B.shape[1] if F.B is not None else F.P.shape[1]
    d = F.f0.shape[1]
    item = F.f0.element_size()
    return item * (batch * d * k + 2 * k + 3 * batch * d + 2 * trainer.space.dim)


def stored_bytes(F: Any) -> int:
    return sum(_bytes(t) for t in (F.f0, F.V, F.P, F.B, F.JB, F.w_ref) if t is not None)


def time_steps(trainer: Any, batches: list, repeats: int) -> float:
    """Median seconds of one ``trainer.step`` over ``repeats`` steps after one warm-up step."""
    trainer.step(*batches[0])
    calls = iter(range(1, repeats + 1))

    def step() -> None:
        trainer.step(*batches[next(calls) % len(batches)])

    return median_seconds(step, repeats)


def case(kind: str, size: int, cfg: dict) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    n, bs, side = cfg["n"], cfg["batch"], cfg["side"]
    X = torch.randn(n, 1, side, side, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    torch.manual_seed(0)
    if kind == "mlp":
        model = MLP(side * side, 10, (size, size), seed=g)
    else:
        model = SmallCNN(channels=(size, 2 * size), image_size=side)
    batches = [(X[i : i + bs], y[i : i + bs]) for i in range(0, n, bs)]
    kw = {"lr": 0.01}
    bp = BackpropTrainer(model, CE, **kw)
    row: dict[str, Any] = {"model": kind, "size": size, "num_params": bp.space.dim}
    row["seconds_step_backprop"] = time_steps(bp, batches, cfg["repeats"])
    row["bytes_step_backprop"] = backprop_bytes(bp, *batches[0])
    factors = None
    for outputs in ("forward", "linearized"):
        lr_t = LowRankJacobianTrainer(model, CE, X, rank=cfg["rank"], outputs=outputs, **kw)
        if factors is None:
            factors = lr_t.preprocess()
        else:  # the same factors serve both output modes (preprocessing is measured once)
            lr_t.factors, lr_t.refresh_steps, lr_t.seconds_preprocess = factors, [0], [0.0]
        row[f"seconds_step_lowrank_{outputs}"] = time_steps(lr_t, batches, cfg["repeats"])
        extra = lowrank_step_bytes(lr_t, bs)
        if outputs == "forward":
            extra += forward_peak_bytes(model, lr_t, batches[0][0])
            row["seconds_preprocess"] = lr_t.seconds_preprocess[0]
            row["bytes_stored_factors"] = stored_bytes(lr_t.factors)
            row["stored_rank"] = sum(lr_t.factors.ranks)
        row[f"bytes_step_lowrank_{outputs}"] = extra
        ratio = row[f"seconds_step_lowrank_{outputs}"] / row["seconds_step_backprop"]
        row[f"ratio_step_time_{outputs}"] = ratio
        row[f"ratio_step_bytes_{outputs}"] = extra / row["bytes_step_backprop"]
        saved = row["seconds_step_backprop"] - row[f"seconds_step_lowrank_{outputs}"]
        row[f"break_even_steps_{outputs}"] = (
            row["seconds_preprocess"] / saved if saved > 0 else float("inf")
        )
    return row


def main() -> None:
    ap = parser(__doc__, f"results/{NAME}", quick_help="smoke run (< 30 s)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: robust timings)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.quick:
        cfg = {"n": 64, "batch": 32, "side": 32, "rank": 4, "repeats": 3}
        cases = [("mlp", 64), ("cnn", 4), ("cnn", 8)]
    else:
        cfg = {"n": 128, "batch": 64, "side": 32, "rank": 16, "repeats": 10}
        cases = [("mlp", 512), ("cnn", 8), ("cnn", 16), ("cnn", 32)]
    rows = [case(kind, size, cfg) for kind, size in tqdm(cases, desc=NAME)]
    payload = {"config": {**cfg, "quick": args.quick, "threads": torch.get_num_threads()}}
    payload["cases"] = rows
    write_json(out, NAME, payload)
    plot(rows, out)
    table = markdown_table(
        ["model", "size", "params", "s_bp", "s_fwd", "s_lin", "t_fwd", "t_lin", "mem_fwd",
         "mem_lin", "s_pre", "even_fwd", "even_lin"],
        [
            (r["model"], r["size"], r["num_params"], f"{r['seconds_step_backprop']:.4f}",
             f"{r['seconds_step_lowrank_forward']:.4f}",
             f"{r['seconds_step_lowrank_linearized']:.4f}", f"{r['ratio_step_time_forward']:.3f}",
             f"{r['ratio_step_time_linearized']:.3f}", f"{r['ratio_step_bytes_forward']:.3f}",
             f"{r['ratio_step_bytes_linearized']:.3f}", f"{r['seconds_preprocess']:.2f}",
             f"{r['break_even_steps_forward']:.1f}", f"{r['break_even_steps_linearized']:.1f}")
            for r in rows
        ],
    )  # fmt: skip
    write_markdown(
        out, NAME, "bench/lowrank_step.py: low-rank Jacobian steps against backprop",
        table + "\n\nt_*: step time / backprop's; mem_*: step bytes / backprop's; s_pre: "
        "preprocessing seconds; even_*: steps to break even (inf: never)",
    )  # fmt: skip


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cnn = [r for r in rows if r["model"] == "cnn"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    sizes = [r["size"] for r in cnn]
    for key, label in (
        ("forward", "low-rank, forward outputs"),
        ("linearized", "low-rank, stored"),
    ):
        axes[0].plot(sizes, [r[f"ratio_step_time_{key}"] for r in cnn], "o-", label=label)
        axes[1].plot(sizes, [r[f"ratio_step_bytes_{key}"] for r in cnn], "o-", label=label)
    for ax, what in zip(axes, ("step time", "step memory"), strict=True):
        ax.axhline(1.0, color="k", lw=0.8)
        ax.axhline(0.5, color="r", lw=0.8, ls="--")
        ax.set(xscale="log", yscale="log", xlabel="CNN channels c (conv c, 2c; 32x32 input)")
        ax.set_ylabel(f"{what} / backprop {what}")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, out / f"{NAME}.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
