"""Hessian spectra of real networks at scale: ResNet-18, a GPT-2-small-shaped decoder, a streamed ResNet-20.

What is measured
----------------
For each model, each task in a fresh process of its own (so ``ru_maxrss`` is the task's own
peak resident memory; the model, the data and the operator are built first and their RSS is
reported as ``setup_rss_mb``), with wall time, Hessian-vector products (columns) and a
progress bar on stderr:

* ``hvp``: the baseline: a plain double-backward Hessian-vector product in torch (gradient
  with ``create_graph=True``, then ``autograd.grad`` of its inner product with ``v``), three
  times; its peak RSS is the yardstick of the others' memory;
* ``top5``: the 5 largest eigenvalues by :func:`linops.lanczos` (``rtol`` and ``ncv`` per
  model below) and their true residuals, eigenvalues only (``return_eigenvectors=False``);
  for GPT-2 the basis is kept on disk (``basis_dir``, the system's temporary directory:
  ``ncv`` vectors of 498 MB would not fit 1.5x the HVP's memory);
* ``trace``: Hutchinson's estimate (:func:`estimators.hutchinson_trace`) with its standard
  error, its probes sent in groups of ``trace_group`` (a GPT-2 probe is 496 MB);
* ``density``: SLQ (:func:`estimators.spectral_density`, ``density_probes x density_steps``;
  full reorthogonalisation keeps the basis, ``steps`` vectors of the model's size);
* ``blockwise``: :func:`estimators.blockwise_spectra` of 8 named blocks: each block's top
  eigenvalue and SLQ density, and the averaged Jensen-Shannon distance between them (for
  GPT-2 within a memory budget of one column each way and 13 vectors of each block's size,
  so the blocks' own bases are counted; whether each block's SLQ was reorthogonalised is in
  the JSON).

Models (float32, eval mode, synthetic data from a fixed seed):

* ``resnet18``: torchvision's ResNet-18 layout written out (7x7 stem, max-pool, [2, 2, 2, 2]
  basic blocks with BatchNorm, 1x1 downsampling), 10 classes, on 32 CIFAR-shaped 3x32x32
  images (11.17M parameters);
* ``gpt2``: Hugging Face ``GPT2LMHeadModel`` from a config (no weights downloaded): 12
  layers, width 768, 12 heads, vocabulary 50257, 1024 positions, tied LM head, dropout 0,
  eager attention (124.4M parameters) on 2 sequences of 128 random tokens, next-token
  cross-entropy;
* ``resnet20-stream``: the CIFAR ResNet-20 (He et al. 2016, 3 stages of 3 basic blocks,
  widths 16/32/64, 1x1 convolution shortcuts with BatchNorm; 272k parameters) over 5,000
  synthetic CIFAR-shaped images in batches of 128 (40 batches), with ``cache=False`` so
  every product streams the batches; its budgets are cut (one plain HVP, a top-5 of one
  Lanczos cycle of ``ncv = 10``, 10 probes, 10 SLQ steps, each block's density from 3 steps
  without its Lanczos top eigenvalue) so that the report completes in about an hour here.

``--quick`` shrinks every model and budget (tiny shapes) for the smoke test.

Usage::

    python bench/scale.py [--quick] [--models resnet18,gpt2,resnet20-stream]
        [--tasks hvp,top5,trace,density,blockwise] [--out results/scale]

writes ``scale.json`` and ``scale.md`` under ``--out`` after every task (a partial run keeps
what it finished) and prints the table.
"""

from __future__ import annotations

import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _harness import parser, write_json, write_text

import estimators
import linops
from linops.base import TorchLinearOperator

MODELS = ("resnet18", "gpt2", "resnet20-stream")
TITLES = {
    "resnet18": "ResNet-18 (BatchNorm eval), 32 CIFAR-shaped images",
    "gpt2": "a GPT-2-small-shaped decoder, 2 x 128 tokens",
    "resnet20-stream": "ResNet-20 (BatchNorm eval), 5,000 images streamed",
}
TASKS = ("hvp", "top5", "trace", "density", "blockwise")


# ---------------------------------------------------------------------------------- models
class BasicBlock(nn.Module):
    """``relu(bn(conv(relu(bn(conv x)))) + shortcut x)``, torchvision's and He et al.'s block."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
    """Torchvision's ResNet layout (``stem="imagenet"``) or the CIFAR ResNet (``"cifar"``)."""

    def __init__(self, depths: list[int], widths: list[int], num_classes: int, stem: str) -> None:
        super().__init__()
        w0 = widths[0]
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(3, w0, 7, 2, 3, bias=False)
            self.pool: nn.Module = nn.MaxPool2d(3, 2, 1)
        else:
            self.conv1 = nn.Conv2d(3, w0, 3, 1, 1, bias=False)
            self.pool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(w0)
        self.relu = nn.ReLU()
        layers, cin = [], w0
        for i, (d, w) in enumerate(zip(depths, widths, strict=True)):
            blocks = [BasicBlock(cin, w, 1 if i == 0 else 2)]
            blocks += [BasicBlock(w, w, 1) for _ in range(d - 1)]
            layers.append(nn.Sequential(*blocks))
            cin = w
        for i, layer in enumerate(layers):
            self.add_module(f"layer{i + 1}", layer)
        self.num_layers = len(layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.relu(self.bn1(self.conv1(x))))
        for i in range(self.num_layers):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _randomise_bn(model: nn.Module, gen: torch.Generator) -> nn.Module:
    """Give BatchNorm non-trivial running statistics (as after training), then eval mode."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=gen))
            m.running_var.copy_(1 + 0.5 * torch.rand(m.num_features, generator=gen))
    return model.eval()


def resnet18(num_classes: int = 10, width: int = 64, seed: int = 0) -> nn.Module:
    """Torchvision's ResNet-18 layout (BatchNorm in eval mode)."""
    torch.manual_seed(seed)
    model = ResNet([2, 2, 2, 2], [width, 2 * width, 4 * width, 8 * width], num_classes, "imagenet")
    return _randomise_bn(model, torch.Generator().manual_seed(seed))


def resnet20(num_classes: int = 10, width: int = 16, depth: int = 3, seed: int = 0) -> nn.Module:
    """The CIFAR ResNet-20 (He et al. 2016; ``depth`` basic blocks per stage), BatchNorm in eval mode."""
    torch.manual_seed(seed)
    model = ResNet([depth] * 3, [width, 2 * width, 4 * width], num_classes, "cifar")
    return _randomise_bn(model, torch.Generator().manual_seed(seed))


def gpt2(quick: bool, seed: int = 0) -> nn.Module:
    """A GPT-2-small-shaped decoder from ``transformers`` (no weights downloaded), eval mode."""
    import transformers

    torch.manual_seed(seed)
    size = (
        {"n_layer": 2, "n_embd": 32, "n_head": 4, "vocab_size": 500, "n_positions": 64}
        | {"bos_token_id": 0, "eos_token_id": 0}
        if quick
        else {"n_layer": 12, "n_embd": 768, "n_head": 12, "vocab_size": 50257, "n_positions": 1024}
    )
    cfg = transformers.GPT2Config(
        **size, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True
    )
    cfg._attn_implementation = "eager"
    return transformers.GPT2LMHeadModel(cfg).eval()


def cifar_batches(n: int, batch: int, seed: int, size: int = 32) -> list[tuple[Any, Any]]:
    """``n`` synthetic CIFAR-shaped images (standard normal pixels) and labels, in batches."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 3, size, size, generator=gen)
    y = torch.randint(0, 10, (n,), generator=gen)
    return [(X[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]


def _lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy (mean over tokens) of ``(B, T, V)`` logits."""
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def _params_in(model: nn.Module, blocks: dict[str, str]) -> int:
    """Parameters of ``model`` under the blocks' prefixes."""
    return sum(
        p.numel()
        for n, p in model.named_parameters()
        if any(n == q or n.startswith(q + ".") for q in blocks.values())
    )


def setup(name: str, quick: bool) -> dict[str, Any]:
    """The model, loss, data, operator options, 8 blocks and per-task budgets of one model."""
    if name == "resnet18":
        model = resnet18(width=8 if quick else 64)
        data = cifar_batches(4 if quick else 32, 32, seed=1, size=16 if quick else 32)[0]
        pre = [
            "conv1",
            "layer1.0",
            "layer1.1",
            "layer2.0",
            "layer3.0",
            "layer4.0",
            "layer4.1",
            "fc",
        ]
        blocks = {p: p for p in pre}
        cfg = {"loss": nn.CrossEntropyLoss(), "op": {}, "ncv": None, "rtol": None}
        cfg |= {"trace_matvecs": 100, "trace_group": 100, "density_steps": 32}
    elif name == "gpt2":
        model = gpt2(quick)
        V = model.config.vocab_size
        B, T = (2, 16) if quick else (2, 128)
        gen = torch.Generator().manual_seed(1)
        tokens = torch.randint(0, V, (B, T + 1), generator=gen)
        data = (tokens[:, :-1], tokens[:, 1:])
        last = model.config.n_layer - 1
        pre = [
            "transformer.wpe",
            "transformer.h.0.attn.c_attn",
            "transformer.h.0.attn.c_proj",
            "transformer.h.0.mlp.c_fc",
            "transformer.h.0.mlp.c_proj",
            f"transformer.h.{last}.attn.c_attn",
            f"transformer.h.{last}.mlp.c_fc",
            "transformer.ln_f",
        ]
        blocks = {p.removeprefix("transformer."): p for p in pre}
        cfg = {"loss": _lm_loss, "op": {"reduction": "mean", "output": lambda out: out.logits}}
        # a probe of the full model is 498 MB: bounded bases and groups, and memory budgets
        # in vectors of the model's size: top-5 keeps its basis on disk (in memory the
        # pending vector, its product and two work vectors), SLQ's bases get 4 vectors (so
        # its runs are not reorthogonalised); the
        # blockwise call one column each way and 13 vectors of each block's size for its runs
        # (SLQ on 3 vectors, Lanczos with ncv = 6 without A V)
        cfg |= {"ncv": 10, "maxiter": 12, "rtol": None, "trace_matvecs": 10, "trace_group": 10}
        budget_vectors = {"top5": 4, "density": 4}
        cfg |= {"top5_on_disk": True}
        cfg |= {"density_steps": 10, "max_vectors": 1, "budget_vectors": budget_vectors}
        cfg |= {"bw_block_vectors": 13}
        cfg |= {"bw": {"ncv": 6, "maxiter": 3, "num_steps": 8, "max_vectors": 1}}
    elif name == "resnet20-stream":
        model = resnet20(width=4 if quick else 16, depth=1 if quick else 3)
        n, b = (256, 64) if quick else (5000, 128)
        data = cifar_batches(n, b, seed=1, size=8 if quick else 32)
        pre = [
            "conv1",
            "layer1.0.conv1",
            "layer1.0.conv2",
            "layer2.0.conv1",
            "layer2.0.downsample",
            "layer3.0.conv1",
            "layer3.0.conv2",
            "fc",
        ]
        blocks = {p: p for p in pre}
        cfg = {"loss": nn.CrossEntropyLoss(), "op": {"cache": False}, "ncv": 10, "rtol": None}
        # every product draws the 40 batches and rebuilds their graphs (about 47 s here), so
        # the budgets are cut to finish in about an hour on 2 cores: top-5 one Lanczos cycle,
        # 10 probes, 10 SLQ steps, each block's density from 3 steps, no per-block Lanczos
        cfg |= {"maxiter": 1, "trace_matvecs": 10, "trace_group": 10, "density_steps": 10}
        cfg |= {"hvp_repeats": 1, "bw": {"eigenvalues": False, "num_steps": 3}}
    else:
        raise ValueError(f"--models: expected names among {list(MODELS)}, got {name!r}")
    if quick:
        cfg |= {"trace_matvecs": 8, "density_steps": 8}
    cfg |= {"model": model, "data": data, "blocks": blocks}
    return cfg


# ---------------------------------------------------------------------------------- tasks
def _rss_mb() -> float:
    """Peak resident memory of this process so far, MB (``ru_maxrss`` is in kB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Counted(TorchLinearOperator):
    """``H`` with its products (columns) counted and shown on a progress bar."""

    is_symmetric = True

    def __init__(self, H: TorchLinearOperator, bar: Any) -> None:
        super().__init__(H.shape, dtype=H.torch_dtype, device=H.device)
        self.op, self.bar, self.count = H, bar, 0

    def vectors_per_pass(self) -> int | None:
        # the wrapped operator's, so estimators group their probes as they would for it
        return self.op.vectors_per_pass()

    def _matmat_torch(self, X: torch.Tensor) -> torch.Tensor:
        out = self.op._apply(X)
        self.count += X.shape[1]
        self.bar.update(X.shape[1])
        return out


def _bar(desc: str, total: int | None) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="Hv", file=sys.stderr, mininterval=2.0)


def plain_hvp(cfg: dict[str, Any], repeats: int) -> dict[str, Any]:
    """The baseline: torch's double-backward HVP on the whole data, ``repeats`` times."""
    model, loss_fn = cfg["model"], cfg["loss"]
    params = [p for p in model.parameters() if p.requires_grad]
    batches = cfg["data"] if isinstance(cfg["data"], list) else [cfg["data"]]
    select = cfg["op"].get("output") or (lambda out: out)
    gen = torch.Generator().manual_seed(0)
    v = [torch.randn(p.shape, generator=gen) for p in params]
    times = []
    bar = _bar("hvp", repeats)
    for _ in range(repeats):
        start = time.perf_counter()
        for x, y in batches:  # the mean loss over equal batches is the mean of theirs
            loss = loss_fn(select(model(x)), y) / len(batches)
            g = torch.autograd.grad(loss, params, create_graph=True)
            dot = sum((gi * vi).sum() for gi, vi in zip(g, v, strict=True))
            torch.autograd.grad(dot, params)
            del loss, g, dot
        times.append(time.perf_counter() - start)
        bar.update(1)
    bar.close()
    return {"seconds_per_hvp": sorted(times)[len(times) // 2], "times": times, "products": repeats}


def run_task(
    name: str,
    task: str,
    quick: bool,
    seed: int = 0,
    overrides: dict[str, Any] | None = None,
    png: Path | None = None,
) -> dict[str, Any]:
    """One task on one model, in this process; returns its JSON-ready row.

    ``overrides`` replaces budgets of :func:`setup` (``hvp_repeats``, ``trace_matvecs``,
    ``density_steps``,
    ``maxiter``, ``ncv``, and ``bw``: keyword arguments of the blockwise call); the blockwise
    task draws its densities to ``png`` when given.
    """
    torch.manual_seed(seed)
    cfg = setup(name, quick)
    for key, value in (overrides or {}).items():
        cfg[key] = cfg.get(key, {}) | value if key == "bw" else value
    model = cfg["model"]
    nparams = sum(p.numel() for p in model.parameters() if p.requires_grad)
    opkw = dict(cfg["op"])
    if "max_vectors" in cfg:
        opkw["max_vectors"] = cfg["max_vectors"]
    H = linops.HessianOperator(model, cfg["loss"], cfg["data"], **opkw)
    vector_bytes = nparams * H.torch_dtype.itemsize
    budgets = {t: int(v * vector_bytes) for t, v in cfg.get("budget_vectors", {}).items()}
    setup_rss = _rss_mb()
    row: dict[str, Any] = {"model": name, "task": task, "params": nparams}
    start = time.perf_counter()
    if task == "hvp":
        row |= plain_hvp(cfg, cfg.get("hvp_repeats", 1 if quick else 3))
    elif task == "blockwise":
        bar = _bar("blockwise", None)
        last = [0]

        def progress(rounds: int, matvecs: int) -> None:
            bar.update(matvecs - last[0])
            last[0] = matvecs

        bw = {"k": 1, "rtol": 1e-3, "ncv": 8, "maxiter": 5, "num_steps": 8 if quick else 16}
        bw |= cfg.get("bw", {})
        budget = None
        if "bw_block_vectors" in cfg:  # its columns, and this many vectors of each block's size
            columns = 2 * bw.get("max_vectors", 1) * vector_bytes
            budget = (
                columns
                + cfg["bw_block_vectors"]
                * _params_in(model, cfg["blocks"])
                * H.torch_dtype.itemsize
            )
        res = estimators.blockwise_spectra(
            H,
            cfg["blocks"],
            num_probes=1,
            seed=seed,
            progress=progress,
            memory_budget=budget,
            **bw,
        )
        row["settings"] = bw | {"memory_budget": budget}
        row["reorthogonalized"] = {b: s.reorthogonalized for b, s in res.blocks.items()}
        bar.close()
        if png is not None:
            from reports.blockwise import plot_blockwise_spectra

            plot_blockwise_spectra(
                res, png, model=TITLES[name] + (" (--quick: tiny shapes)" if quick else "")
            )
            row["png"] = str(png)
        row |= {
            "products": res.num_matvecs,
            "passes": res.num_passes,
            "rounds": res.num_rounds,
            "js_mean": res.js_mean,
            "blocks": {
                b: {
                    "dim": s.dim,
                    "top": s.eigenvalues.tolist(),
                    "residual": s.residuals.tolist(),
                    "converged": s.converged,
                    "trace": s.trace.estimate,
                    "trace_stderr": s.trace.stderr,
                    "products": s.num_matvecs,
                    "density": s.density.tolist(),
                }
                for b, s in res.blocks.items()
            },
            "grid": res.grid.tolist(),
            "sigma": res.sigma,
        }
    else:
        bar = _bar(task, None)
        A = Counted(H, bar)
        if task == "top5":
            try:
                r = linops.lanczos(
                    A,
                    5,
                    "LA",
                    ncv=cfg["ncv"],
                    rtol=cfg["rtol"],
                    maxiter=cfg.get("maxiter"),
                    seed=seed,
                    memory_budget=budgets.get("top5"),
                    basis_dir=tempfile.gettempdir() if cfg.get("top5_on_disk") else None,
                    return_eigenvectors=False,
                )
            except linops.LanczosNoConvergence as err:
                r = err.result
            row |= {
                "eigenvalues": r.eigenvalues.tolist(),
                "residuals": r.residuals.tolist(),
                "converged": bool(r.converged),
                "ncv": cfg["ncv"],
                "memory_budget": budgets.get("top5"),
                "basis": "disk" if cfg.get("top5_on_disk") else "memory",
            }
        elif task == "trace":
            total, group = cfg["trace_matvecs"], cfg["trace_group"]
            ests = []
            for i in range(math.ceil(total / group)):
                ests.append(
                    estimators.hutchinson_trace(A, min(group, total - i * group), seed=seed + i)
                )
            sizes = [e.num_matvecs for e in ests]
            mean = sum(e.estimate * s for e, s in zip(ests, sizes, strict=True)) / sum(sizes)
            se = math.sqrt(
                sum((e.stderr * s) ** 2 for e, s in zip(ests, sizes, strict=True))
            ) / sum(sizes)
            row |= {"trace": mean, "trace_stderr": se, "trace_group": group}
        elif task == "density":
            sd = estimators.spectral_density(
                A,
                num_probes=1,
                num_steps=cfg["density_steps"],
                seed=seed,
                memory_budget=budgets.get("density"),
            )
            nodes = torch.as_tensor(sd.nodes)
            row |= {
                "node_min": float(nodes.min()),
                "node_max": float(nodes.max()),
                "reorthogonalized": sd.reorthogonalized,
                "trace_slq": sd.trace.estimate,
                "steps": cfg["density_steps"],
                "grid": torch.as_tensor(sd.grid).tolist(),
                "density": torch.as_tensor(sd.density).tolist(),
            }
        else:
            raise ValueError(f"--tasks: expected names among {list(TASKS)}, got {task!r}")
        bar.close()
        row["products"] = A.count
    row["wall_s"] = time.perf_counter() - start
    row["setup_rss_mb"] = setup_rss
    row["peak_rss_mb"] = _rss_mb()
    row["route"] = getattr(H, "route", None)
    return row


# ---------------------------------------------------------------------------------- driver
def _fmt(x: Any, digits: int = 4) -> str:
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return str(x)


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The results table: one row per model and task."""
    out = [
        f"# bench/scale.py ({meta['when']}, {meta['threads']} threads, load {meta['load']})",
        "",
        "| model | params | task | wall s | products | peak RSS MB | / hvp RSS | result |",
        "|---|---|---|---|---|---|---|---|",
    ]
    base = {r["model"]: r["peak_rss_mb"] for r in rows if r["task"] == "hvp" and "error" not in r}
    for r in rows:
        if "error" in r:
            out.append(f"| {r['model']} | | {r['task']} | | | | | error: {r['error'][:120]} |")
            continue
        if r["task"] == "hvp":
            res = f"{r['seconds_per_hvp']:.3g} s per HVP"
        elif r["task"] == "top5":
            res = "top-5 " + ", ".join(f"{v:.5g}" for v in reversed(r["eigenvalues"]))
            res += f" (max residual {max(r['residuals']):.2g}, converged {r['converged']})"
        elif r["task"] == "trace":
            res = f"trace {r['trace']:.5g} +- {r['trace_stderr']:.2g}"
        elif r["task"] == "density":
            res = (
                f"nodes [{r['node_min']:.4g}, {r['node_max']:.4g}], SLQ trace {r['trace_slq']:.4g}"
            )
        else:
            tops = ", ".join(
                f"{b}: {s['top'][-1]:.3g}" if s["top"] else f"{b}: tr {s['trace']:.3g}"
                for b, s in r["blocks"].items()
            )
            res = f"JS0 {r['js_mean']:.3f}; {r['passes']} passes, {r['rounds']} rounds; top: {tops}"
        ratio = r["peak_rss_mb"] / base[r["model"]] if r["model"] in base else float("nan")
        out.append(
            f"| {r['model']} | {r['params']:,} | {r['task']} | {r['wall_s']:.1f} | "
            f"{r['products']} | {r['peak_rss_mb']:.0f} | {ratio:.2f} | {res} |"
        )
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = parser(
        __doc__,
        "results/scale",
        quick_help="tiny shapes and budgets (about 2 minutes on a quiet 2-core CPU)",
    )
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--budgets",
        type=json.loads,
        default={},
        help='JSON overriding the per-model budgets, e.g. \'{"trace_matvecs": 4, "bw": '
        '{"eigenvalues": false, "num_steps": 4}}\'',
    )
    p.add_argument("--worker", nargs=2, metavar=("MODEL", "TASK"), help=argparse_hidden())
    p.add_argument("--worker-out", type=Path, help=argparse_hidden())
    args = p.parse_args(argv)
    if args.worker:
        png = args.worker_out.parent / f"blockwise_{args.worker[0]}.png"
        row = run_task(
            *args.worker, quick=args.quick, seed=args.seed, overrides=args.budgets, png=png
        )
        write_text(args.worker_out, json.dumps(row))
        return
    models = [m for m in args.models.split(",") if m]
    tasks = [t for t in args.tasks.split(",") if t]
    for m in models:
        if m not in MODELS:
            p.error(f"--models: expected names among {list(MODELS)}, got {m!r}")
    for t in tasks:
        if t not in TASKS:
            p.error(f"--tasks: expected names among {list(TASKS)}, got {t!r}")
    meta = {
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "threads": torch.get_num_threads(),
        "load": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "quick": args.quick,
        "budgets": args.budgets,
        "command": " ".join(
            [Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]
        ),
    }
    rows: list[dict[str, Any]] = []
    args.out.mkdir(parents=True, exist_ok=True)
    for m in models:
        for t in tasks:
            tmp = args.out / f".worker-{m}-{t}.json"
            cmd = [sys.executable, __file__, "--worker", m, t, "--worker-out", str(tmp)]
            cmd += ["--seed", str(args.seed), "--budgets", json.dumps(args.budgets)]
            cmd += ["--quick"] if args.quick else []
            load = " ".join(f"{x:.2f}" for x in os.getloadavg())
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None, text=True)
            if proc.returncode == 0 and tmp.exists():
                row = json.loads(tmp.read_text())
                tmp.unlink()
            else:
                row = {"model": m, "task": t, "error": f"exit {proc.returncode}"}
            row["load_at_start"] = load
            rows.append(row)
            meta["load_at_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
            write_json(args.out, "scale", {"meta": meta, "rows": rows})
            write_text(args.out / "scale.md", markdown(rows, meta))
            print(markdown([row], meta).splitlines()[-1], flush=True)
    print(markdown(rows, meta))


def argparse_hidden() -> str:
    """Help text of the internal options (``argparse.SUPPRESS``)."""
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
