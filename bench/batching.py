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

**ResNet-20 blocks** (``--resnet20``, issue 22): a CIFAR ResNet-20 (269,722 parameters,
BatchNorm in eval mode, identity shortcuts with zero-padded channels) on CIFAR-shaped random
images, float32. ``torch.func.vmap``'s batching rule for convolutions folds the vectors into
the convolution (no faster than a loop here, at K times the memory), so the operators' block
pass (decided at the first block from the graph's convolution nodes) is one vector per pass.
Each memory figure is the median of ``--repeats`` subprocesses, one figure each: the wall time of an 8-vector block ``H V`` against 8 single
products ``H v`` (interleaved rounds, medians), and the peak resident memory above the
resident memory before the product (``VmHWM`` of ``/proc/self/status``, reset through
``/proc/self/clear_refs`` once the graph is built; ``ru_maxrss`` where that is not
available) of the first single product and of the first 8-vector block (a probe pass included
where one runs; the graph's convolutions make it a loop before any pass), of a later single product and a later block (the steady state of a
solver, after the allocator has grown its heap), of 8 single products in a row (the work the
block replaces: glibc's heap grows from the second product on, freed blocks kept resident
where the next pass's temporaries do not land on the same pages), and, with ``--wide``, of the 8-vector batched pass itself (``torch.func.vmap``
folding the vectors into the convolutions), which is what the operators avoid.

A fresh process's peak varies with the heap layout it draws: address-space randomization
(ASLR), Python's hash seed and the threads' timing moved the same single product's peak
between 154 and 246 MiB in nine processes here. Most of that spread is how much of the freed
heap that building the graph left resident a product happens to reuse (108-222 MiB here):
the single product, the first block and 8 products in a row are therefore also measured from
a start where ``malloc_trim(0)`` has given the heap's free pages back, which leaves what the
product itself faults in (one product 295-344 MiB over 15 processes, against 162-254 from
the plain start). Each worker also prints its whole process's peak (the graph's build
included) as ``process_peak_bytes``. The table gives the block-over-product ratio's 95%
interval over resampled processes (a bootstrap of the medians) for both starts: from the
plain start 15 processes each gave 1.27 (1.00-1.40) in one run and 1.08 (1.04-1.22) in
another, 40 each 1.16 (1.05-1.35); from the trimmed start 1.11 (1.07-1.16). ``--layouts N``
measures one product, 8 single products in a row and the first 8-vector block in each of N
fixed layouts instead (no ASLR through ``setarch -R``, ``PYTHONHASHSEED=0``, one thread, and
small blocks allocated and kept before the operator is made, their number and size set by
the layout), where every process of one task gives the same figure; it reports the ratios
per layout. A task's own few lines of Python before its product still move its layout
against another task's.

Usage::

    python bench/batching.py [--quick] [--repeats 9] [--out results/batching]
    python bench/batching.py --resnet20 [--quick] [--wide] [--out results/batching]
    python bench/batching.py --resnet20 --layouts 6 [--out results/batching]

writes ``batching.json`` and ``batching.md`` under ``--out`` and prints the markdown.
"""

from __future__ import annotations

import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _harness import markdown_table, parser, write_json, write_text
from operators import Case, make_cases, time_back_to_back

from linops import HessianOperator, JacobianOperator, retain_freed_memory
from linops._model import attempt_batched
from linops.memory import _libc

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


# ----------------------------------------------------------------------------- ResNet-20 blocks
class _BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.pad = c_out - c_in  # option A: identity shortcut, channels zero-padded
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        s = x[:, :, :: self.stride, :: self.stride] if self.stride > 1 else x
        if self.pad:
            s = F.pad(s, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return F.relu(h + s)


class ResNet20(nn.Module):
    """CIFAR ResNet-20 ("Deep Residual Learning for Image Recognition", arXiv 1512.03385)."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        layers: list[nn.Module] = []
        c = 16
        for c_out, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(3):
                layers.append(_BasicBlock(c, c_out, stride if i == 0 else 1))
                c = c_out
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.layers(F.relu(self.bn(self.conv(x))))
        return self.fc(h.mean(dim=(2, 3)))


def _resnet20_operator(n: int) -> HessianOperator:
    torch.manual_seed(0)
    model = ResNet20()
    for m in model.modules():  # non-trivial running statistics, as after training
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    model.eval()
    X, y = torch.randn(n, 3, 32, 32), torch.randint(0, 10, (n,))
    return HessianOperator(model, nn.CrossEntropyLoss(), (X, y))


def _status_kib(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _trim_heap() -> int | None:
    """Give the heap's free pages back (glibc's ``malloc_trim(0)``); return the KiB released."""
    trim = getattr(_libc(), "malloc_trim", None)
    before = _status_kib("VmRSS")
    if trim is None or before is None:
        return None
    trim(0)
    return before - (_status_kib("VmRSS") or before)


def _peak_bytes(f: Callable[[], Any]) -> dict[str, Any]:
    """Peak resident bytes above the resident size before ``f()``, and how it was read.

    With ``LINOPS_BENCH_TRIMMED_START=1`` the heap's free pages are given back first (where
    the C library has ``malloc_trim``: ``released_at_start`` says how much, None where it
    could not): the peak is then what ``f`` faults in, not less whatever part of the freed
    pages it happens to reuse. ``process_peak_bytes`` is the whole process's peak: the larger
    of its high-water mark before ``f`` (the graph's build included) and after it (``VmHWM``;
    resetting it through ``clear_refs`` also resets ``ru_maxrss``, so that one would miss
    the build).
    """
    out: dict[str, Any] = {}
    if os.environ.get("LINOPS_BENCH_TRIMMED_START") == "1":
        released = _trim_heap()
        out["released_at_start"] = None if released is None else 1024 * released
    before, hwm_before = _status_kib("VmRSS"), _status_kib("VmHWM")
    if before is not None and hwm_before is not None and _reset_peak():
        f()
        hwm = _status_kib("VmHWM") or 0
        out |= {"bytes": 1024 * (hwm - before), "how": "VmHWM after clear_refs"}
        return out | {"process_peak_bytes": 1024 * max(hwm_before, hwm)}
    before_max = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    f()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out |= {"bytes": 1024 * (peak - before_max), "how": "ru_maxrss growth (a lower bound)"}
    # ru_maxrss survives exec: at least the parent's peak where that was larger
    return out | {"process_peak_bytes": 1024 * peak}


def _shift_heap() -> Any:
    """Allocate and keep a block whose size follows ``LINOPS_BENCH_LAYOUT`` (``--layouts``)."""
    layout = int(os.environ.get("LINOPS_BENCH_LAYOUT", "0"))
    if not layout:
        return None
    # small blocks, which glibc serves from its heap (a large one would be mapped on its own)
    return [bytearray(2048 + 64 * layout) for _ in range(97 * layout)]


def resnet20_worker(task: str, n: int, k: int, repeats: int) -> dict[str, Any]:
    """One measurement in a fresh process (memory) or the time rounds (``task == 'time'``)."""
    kept = _shift_heap()  # noqa: F841  (kept alive: it shifts what is allocated after it)
    H = _resnet20_operator(n)
    for _ in H._graphs():  # build and keep the graph before anything is measured
        pass
    gen = torch.Generator().manual_seed(1)
    V = torch.randn(H.shape[1], k, generator=gen)
    if task == "single":
        return _peak_bytes(lambda: H @ V[:, 0])
    if task == "block":
        out = _peak_bytes(lambda: H @ V)
        out["route"], out["reason"] = H.route, H.unbatched_reason[False]
        return out
    if task == "singles":  # the work a block replaces: k single products in a row

        def singles() -> None:
            for i in range(k):
                H @ V[:, i]

        return _peak_bytes(singles)
    if task == "single_later":  # after two single products: the steady state of a solver
        H @ V[:, 0]
        H @ V[:, 1]
        return _peak_bytes(lambda: H @ V[:, 2])
    if task == "block_later":  # after a first block (which decided the block pass)
        H @ V
        return _peak_bytes(lambda: H @ V)
    if task == "wide":  # the batched pass the operators avoid: vmap folding into convolutions

        def wide() -> None:
            attempt_batched(lambda X, a: HessianOperator._hooks(H, X, a), V, False)

        return _peak_bytes(wide)
    # time: k single products against one k-vector block, interleaved rounds
    H @ V  # decides the block pass
    singles, blocks = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(k):
            H @ V[:, i]
        singles.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        H @ V
        blocks.append(time.perf_counter() - t0)
    return {
        "seconds_k_singles": statistics.median(singles),
        "seconds_block": statistics.median(blocks),
        "route": H.route,
    }


#: glibc's fixed mmap threshold, as :func:`linops.memory.return_freed_memory` sets it
FIXED_MMAP = {"MALLOC_MMAP_THRESHOLD_": "131072"}
#: the heap's free pages given back before the measured product (:func:`_peak_bytes`)
TRIMMED_START = {"LINOPS_BENCH_TRIMMED_START": "1"}
_TRIMMED_TASKS = ("single", "block", "singles")


def _run_worker(
    task: str, n: int, k: int, repeats: int, env: dict[str, str] | None = None
) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", task, str(n), str(k), str(repeats)]
    if env is not None and "LINOPS_BENCH_LAYOUT" in env and shutil.which("setarch"):
        cmd = ["setarch", "-R", *cmd]
    full_env = {k: v for k, v in os.environ.items() if k != "LINOPS_BENCH_TRIMMED_START"}
    full_env |= env or {}
    done = subprocess.run(cmd, capture_output=True, text=True, check=True, env=full_env)
    return json.loads(done.stdout.strip().splitlines()[-1])


_MEMORY_TASKS = ("single", "block", "single_later", "block_later", "singles")


def bootstrap_ratio_of_medians(
    num: list[int], den: list[int], draws: int = 20_000, seed: int = 0
) -> tuple[float, float]:
    """95% interval of ``median(num) / median(den)`` over resampled processes (percentiles).

    A fresh process's peak moves with the heap layout it draws, so a ratio of two medians of
    a few processes moves too; this says how far, from the processes measured.
    """
    rng = random.Random(seed)
    ratios = sorted(
        statistics.median(rng.choices(num, k=len(num)))
        / max(1, statistics.median(rng.choices(den, k=len(den))))
        for _ in range(draws)
    )
    return ratios[int(0.025 * draws)], ratios[int(0.975 * draws) - 1]


def resnet20_rows(quick: bool, repeats: int, wide: bool) -> dict[str, Any]:
    """ResNet-20: an 8-vector block against 8 single products, time and peak memory."""
    n, k = (32 if quick else 128), 8
    load = [round(os.getloadavg()[0], 2)]
    timing = _run_worker("time", n, k, repeats)
    # glibc's heap makes one fresh process's peak vary by up to a fifth: medians of `repeats`
    # processes per figure, the tasks interleaved
    runs: dict[str, list[dict[str, Any]]] = {t: [] for t in _MEMORY_TASKS}
    fixed_runs: dict[str, list[int]] = {t: [] for t in _MEMORY_TASKS}
    trimmed_runs: dict[str, list[int]] = {t: [] for t in _TRIMMED_TASKS}
    trimmed_everywhere = True  # False where the C library has no malloc_trim
    for _ in range(repeats):
        for t in _MEMORY_TASKS:
            runs[t].append(_run_worker(t, n, k, repeats))
            # glibc's adaptive mmap threshold keeps the freed temporaries of one product in
            # its heap, where the next product's do not land on the same pages: the same
            # figures with it fixed
            fixed_runs[t].append(_run_worker(t, n, k, repeats, FIXED_MMAP)["bytes"])
        for t in _TRIMMED_TASKS:  # the same product from a start without free pages resident
            run = _run_worker(t, n, k, repeats, TRIMMED_START)
            trimmed_runs[t].append(run["bytes"])
            trimmed_everywhere = trimmed_everywhere and run.get("released_at_start") is not None
    med = {t: {**runs[t][0], "bytes": statistics.median(r["bytes"] for r in runs[t])} for t in runs}
    fixed = {t: statistics.median(v) for t, v in fixed_runs.items()}
    single, block, single_later = med["single"], med["block"], med["single_later"]
    block_later, singles = med["block_later"], med["singles"]
    out: dict[str, Any] = {
        "images": n,
        "vectors": k,
        "route": block["route"],
        "unbatched_reason": block["reason"],
        "seconds_8_single_products": timing["seconds_k_singles"],
        "seconds_8_vector_block": timing["seconds_block"],
        "ratio_time_block_over_8_singles": timing["seconds_block"] / timing["seconds_k_singles"],
        "bytes_peak_single_product": single["bytes"],
        "bytes_peak_first_block": block["bytes"],
        "ratio_memory_block_over_single": block["bytes"] / max(1, single["bytes"]),
        "ratio_memory_block_over_single_95": bootstrap_ratio_of_medians(
            [r["bytes"] for r in runs["block"]], [r["bytes"] for r in runs["single"]]
        ),
        "bytes_peak_later_single_product": single_later["bytes"],
        "bytes_peak_later_block": block_later["bytes"],
        "ratio_memory_later_block_over_later_single": block_later["bytes"]
        / max(1, single_later["bytes"]),
        "bytes_peak_k_single_products": singles["bytes"],
        "ratio_memory_block_over_k_singles": block["bytes"] / max(1, singles["bytes"]),
        "memory_measured_by": single["how"],
        "bytes_peak_each_process": {t: [r["bytes"] for r in v] for t, v in runs.items()},
    }
    out["fixed_mmap_threshold"] = {
        "bytes": fixed,
        "ratio_memory_block_over_single": fixed["block"] / max(1, fixed["single"]),
        "ratio_memory_later_block_over_later_single": fixed["block_later"]
        / max(1, fixed["single_later"]),
        "ratio_memory_block_over_k_singles": fixed["block"] / max(1, fixed["singles"]),
    }
    trimmed = {t: statistics.median(v) for t, v in trimmed_runs.items()}
    out["trimmed_start"] = {
        "trimmed": trimmed_everywhere,
        "bytes": trimmed,
        "ratio_memory_block_over_single": trimmed["block"] / max(1, trimmed["single"]),
        "ratio_memory_block_over_single_95": bootstrap_ratio_of_medians(
            trimmed_runs["block"], trimmed_runs["single"]
        ),
        "ratio_memory_block_over_k_singles": trimmed["block"] / max(1, trimmed["singles"]),
        "bytes_peak_each_process": trimmed_runs,
    }
    if wide:
        w = _run_worker("wide", n, k, repeats)
        out["bytes_peak_wide_vmap_pass"] = w["bytes"]
        out["ratio_memory_wide_over_single"] = w["bytes"] / max(1, single["bytes"])
    load.append(round(os.getloadavg()[0], 2))
    out["loadavg_start_end"] = load
    return out


_LAYOUT_TASKS = ("single", "singles", "block")


def resnet20_layout_rows(layouts: int, quick: bool) -> dict[str, Any]:
    """One product, 8 in a row and the first block, each in its own process, per fixed layout."""
    n, k = (32 if quick else 128), 8
    per: list[dict[str, int]] = []
    for layout in range(1, layouts + 1):
        env = {"LINOPS_BENCH_LAYOUT": str(layout), "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
        per.append({t: _run_worker(t, n, k, 1, env)["bytes"] for t in _LAYOUT_TASKS})
    ratios = {
        "block_over_single": [p["block"] / max(1, p["single"]) for p in per],
        "singles_over_single": [p["singles"] / max(1, p["single"]) for p in per],
        "block_over_singles": [p["block"] / max(1, p["singles"]) for p in per],
    }
    return {
        "images": n,
        "vectors": k,
        "aslr_off": shutil.which("setarch") is not None,
        "bytes_per_layout": per,
        "ratios_per_layout": ratios,
        "ratio_medians": {key: statistics.median(v) for key, v in ratios.items()},
    }


def resnet20_layout_markdown(r: dict[str, Any], meta: dict[str, Any]) -> str:
    mb = 2.0**-20
    rat, med = r["ratios_per_layout"], r["ratio_medians"]
    header = ["layout", "one product (MiB)", "8 in a row (MiB)", "first 8-vector block (MiB)"]
    header += ["block / one", "8 in a row / one", "block / 8 in a row"]
    keys = ("block_over_single", "singles_over_single", "block_over_singles")
    rows: list[list[object]] = [
        [i + 1, *(f"{mb * p[t]:.0f}" for t in ("single", "singles", "block"))]
        + [f"{rat[key][i]:.2f}" for key in keys]
        for i, p in enumerate(r["bytes_per_layout"])
    ]
    rows.append(["median", "", "", "", *(f"{med[key]:.2f}" for key in keys)])
    lines = [
        f"ResNet-20, {r['images']} CIFAR-shaped images, float32, H: peak resident memory per "
        f"fixed heap layout (ASLR off: {r['aslr_off']}, PYTHONHASHSEED=0, one thread)",
        "",
        markdown_table(header, rows),
        "",
        f"each figure in its own process; `{meta['command']}`",
    ]
    return "\n".join(lines) + "\n"


def resnet20_markdown(r: dict[str, Any], meta: dict[str, Any]) -> str:
    mb = 2.0**-20
    lines = [
        f"ResNet-20, {r['images']} CIFAR-shaped images, float32, H with {r['vectors']} vectors: "
        f"route `{r['route']}`",
        "",
        "| what | value |",
        "|---|---|",
        f"| 8 single products (s) | {r['seconds_8_single_products']:.3f} |",
        f"| one 8-vector block (s) | {r['seconds_8_vector_block']:.3f} |",
        f"| block / 8 singles, time | {r['ratio_time_block_over_8_singles']:.2f} |",
        f"| peak of one product (MiB) | {mb * r['bytes_peak_single_product']:.0f} |",
        f"| peak of the first 8-vector block (MiB) | {mb * r['bytes_peak_first_block']:.0f} |",
        f"| block / one product, peak memory | {r['ratio_memory_block_over_single']:.2f} |",
        "| the same, 95% interval over resampled processes (bootstrap) | "
        + "-".join(f"{x:.2f}" for x in r["ratio_memory_block_over_single_95"])
        + " |",
        f"| peak of a later single product (MiB) | "
        f"{mb * r['bytes_peak_later_single_product']:.0f} |",
        f"| peak of a later 8-vector block (MiB) | {mb * r['bytes_peak_later_block']:.0f} |",
        f"| later block / later product, peak memory | "
        f"{r['ratio_memory_later_block_over_later_single']:.2f} |",
        f"| peak of {r['vectors']} single products in a row (MiB) | "
        f"{mb * r['bytes_peak_k_single_products']:.0f} |",
        f"| block / {r['vectors']} single products, peak memory | "
        f"{r['ratio_memory_block_over_k_singles']:.2f} |",
    ]
    if "fixed_mmap_threshold" in r:
        f = r["fixed_mmap_threshold"]
        lines += [
            "| with `MALLOC_MMAP_THRESHOLD_=131072` (`linops.memory.return_freed_memory()`): "
            "one product / first block / later product / later block / "
            f"{r['vectors']} products (MiB) | "
            + " / ".join(f"{mb * f['bytes'][t]:.0f}" for t in _MEMORY_TASKS)
            + " |",
            f"| same setting: block / one product, later block / later product, block / "
            f"{r['vectors']} products | {f['ratio_memory_block_over_single']:.2f}, "
            f"{f['ratio_memory_later_block_over_later_single']:.2f}, "
            f"{f['ratio_memory_block_over_k_singles']:.2f} |",
        ]
    if "trimmed_start" in r:
        t = r["trimmed_start"]
        lines += [
            "| from a start with the heap's free pages given back (`malloc_trim(0)`"
            + ("" if t["trimmed"] else "; not available here: a plain start")
            + f"): one product / first block / {r['vectors']} products (MiB) | "
            + " / ".join(f"{mb * t['bytes'][task]:.0f}" for task in _TRIMMED_TASKS)
            + " |",
            f"| same start: block / one product (95% interval), block / {r['vectors']} "
            f"products | {t['ratio_memory_block_over_single']:.2f} ("
            + "-".join(f"{x:.2f}" for x in t["ratio_memory_block_over_single_95"])
            + f"), {t['ratio_memory_block_over_k_singles']:.2f} |",
        ]
    if "bytes_peak_wide_vmap_pass" in r:
        lines += [
            f"| peak of vmap's 8-vector pass (MiB) | {mb * r['bytes_peak_wide_vmap_pass']:.0f} |",
            f"| vmap's pass / one product, peak memory | "
            f"{r['ratio_memory_wide_over_single']:.2f} |",
        ]
    lines += [
        "",
        f"memory: {r['memory_measured_by']}, medians of {meta['repeats']} processes per "
        f"figure (each in its own); time: medians of "
        f"{meta['repeats']} interleaved rounds; {meta['threads']} threads; load average "
        f"{r['loadavg_start_end'][0]} -> {r['loadavg_start_end'][1]}; `{meta['command']}`",
    ]
    return "\n".join(lines) + "\n"


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
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:  # one ResNet-20 measurement, in its own process
        task, n, k, repeats = argv[1], *map(int, argv[2:5])
        print(json.dumps(resnet20_worker(task, n, k, repeats)))
        return
    p = parser(__doc__, "results/batching", quick_help="smaller data, fewer calls")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--resnet20", action="store_true", help="only the ResNet-20 block section")
    p.add_argument("--wide", action="store_true", help="also vmap's own 8-vector pass (slow)")
    p.add_argument(
        "--layouts",
        type=int,
        default=0,
        help="with --resnet20: the memory figures in this many fixed heap layouts instead",
    )
    args = p.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 9)
    meta = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "command": "python " + " ".join(sys.argv),
    }
    if args.resnet20 and args.layouts:
        r = resnet20_layout_rows(args.layouts, args.quick)
        table = resnet20_layout_markdown(r, meta)
        write_json(args.out, "batching_layouts", {"meta": meta, "layouts": r}, indent=2)
        write_text(args.out / "batching_layouts.md", table)
        print(table)
        return
    if args.resnet20:
        r = resnet20_rows(args.quick, repeats, args.wide)
        table = resnet20_markdown(r, meta)
        write_json(args.out, "batching_resnet20", {"meta": meta, "resnet20": r}, indent=2)
        write_text(args.out / "batching_resnet20.md", table)
        print(table)
        return
    meta["retain_freed_memory"] = retain_freed_memory()
    rows = []
    for case in make_cases(args.quick):
        rows += graph_rows(case, repeats) + kernel_rows(case, repeats)
        print(f"{case.name}: done", file=sys.stderr)
    table = markdown(rows, meta)
    write_json(args.out, "batching", {"meta": meta, "rows": rows}, indent=2)
    write_text(args.out / "batching.md", table)
    print(table)


if __name__ == "__main__":
    main()
