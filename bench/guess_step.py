r"""Time and memory of one guess-and-update step per method of "How to Guess a Gradient", against a backprop step.

For an MLP and a deeper, wider one, every guesser of :mod:`estimators.guesses` drives a
:class:`trainers.ForwardGradientTrainer` (plain SGD, so no optimizer state enters the memory
figure) and :class:`trainers.BackpropTrainer` is the baseline measured in the same run. Reported
per method: the median seconds of one step and its ratio to backprop's, and the peak extra
resident memory of one step (bytes above the resident set before the step, sampled every
0.5 ms by a thread) and its ratio to backprop's. Also compared: ``jvp_mode="all"`` (one JVP for
all layers) and the ``torch.func`` forward-mode backend against ``torch.autograd.forward_ad``.

The memory figure comes from the process's resident set, so the script re-executes itself with
``MALLOC_MMAP_THRESHOLD_=65536``: every large tensor is then its own mapping, returned to the
system when freed, and the resident set tracks live tensor memory.

Run ``python bench/guess_step.py [--quick] [--out DIR] [--threads N]``; writes
``DIR/guess_step.json`` and ``DIR/guess_step.png``.
"""

from __future__ import annotations

import gc
import os
import sys
import threading
import time
from pathlib import Path

if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None and __name__ == "__main__":
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    os.execve(sys.executable, [sys.executable, *sys.argv], env)

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/_harness.py

from _harness import markdown_table, median_seconds, parser, save_figure, write_json, write_markdown

from estimators.guesses import make_guesser
from trainers import BackpropTrainer, ForwardGradientTrainer
from trainers.models import MLP

F = torch.nn.functional
VARIANTS: dict[str, tuple[str, dict]] = {
    "directional_descent": ("directional_descent", {}),
    "activation_perturbation": ("activation_perturbation", {}),
    "activation_mixing": ("activation_mixing", {}),
    "w_transpose": ("w_transpose", {}),
    "downstream": ("downstream", {}),
    "self_sharpening": ("self_sharpening", {}),
    "w_transpose[jvp_mode=all]": ("w_transpose", {"jvp_mode": "all"}),
    "w_transpose[backend=func]": ("w_transpose", {"backend": "func"}),
    "directional_descent[backend=func]": ("directional_descent", {"backend": "func"}),
}
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


class PeakRSS:
    """Peak resident-set growth inside a ``with`` block (sampled by a thread)."""

    def __enter__(self) -> PeakRSS:
        gc.collect()
        self.base = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(0.0005)

    def __exit__(self, *exc: object) -> None:
        self.peak = max(self.peak, _rss())
        self._stop.set()
        self._thread.join()
        self.bytes = self.peak - self.base


def _trainer(method: str, depth: int, width: int, d_in: int, d_out: int):
    net = MLP(d_in, d_out, (width,) * (depth - 1), seed=torch.Generator().manual_seed(0))
    if method == "backprop":
        return BackpropTrainer(net, F.cross_entropy, optimizer="sgd", lr=1e-3)
    name, kw = VARIANTS[method]
    guesser = make_guesser(name, **kw)
    return ForwardGradientTrainer(net, F.cross_entropy, guesser=guesser, optimizer="sgd", lr=1e-3)


def measure(method: str, cfg: dict, repeats: int) -> dict:
    """Median step time and peak step memory of one method on one configuration."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(cfg["batch"], cfg["d_in"], generator=g)
    y = torch.randint(0, cfg["d_out"], (cfg["batch"],), generator=g)
    t = _trainer(method, cfg["depth"], cfg["width"], cfg["d_in"], cfg["d_out"])
    t.step(x, y)  # warm-up (layer discovery, allocator)
    mems = []
    for _ in range(2):
        with PeakRSS() as m:
            t.step(x, y)
        mems.append(m.bytes)
    seconds = median_seconds(lambda: t.step(x, y), repeats)
    return {"seconds_step": seconds, "bytes_step_peak": min(mems)}


def main(argv: list[str] | None = None) -> dict:
    p = parser(__doc__, "results/guess_step", quick_help="small smoke run (< ~30 s)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.quick:
        configs = {
            "mlp": {"depth": 3, "width": 128, "batch": 64, "d_in": 64, "d_out": 10},
            "deep_wide": {"depth": 6, "width": 256, "batch": 128, "d_in": 64, "d_out": 10},
        }
        repeats = 3
    else:
        configs = {
            "mlp": {"depth": 3, "width": 256, "batch": 128, "d_in": 64, "d_out": 10},
            "deep_wide": {"depth": 8, "width": 1024, "batch": 512, "d_in": 256, "d_out": 10},
        }
        repeats = 10
    results: dict = {
        "threads": args.threads,
        "torch": torch.__version__,
        "device": "cpu",
        "configs": configs,
        "methods": {},
    }
    for cname, cfg in configs.items():
        base = measure("backprop", cfg, repeats)
        rows = {
            "backprop": {**base, "time_ratio_vs_backprop": 1.0, "memory_ratio_vs_backprop": 1.0}
        }
        for method in VARIANTS:
            r = measure(method, cfg, repeats)
            r["time_ratio_vs_backprop"] = r["seconds_step"] / base["seconds_step"]
            r["memory_ratio_vs_backprop"] = r["bytes_step_peak"] / max(base["bytes_step_peak"], 1)
            r["bytes_saved_vs_backprop"] = base["bytes_step_peak"] - r["bytes_step_peak"]
            rows[method] = r
        results["methods"][cname] = rows
    write_json(args.out, "guess_step", results)
    _plot(results, args.out)
    parts = []
    for cname, rows in results["methods"].items():
        c = configs[cname]
        table = markdown_table(
            ["method", "ms/step", "x backprop", "MiB peak", "x backprop"],
            [
                (m, f"{1e3 * r['seconds_step']:.2f}", f"{r['time_ratio_vs_backprop']:.2f}",
                 f"{r['bytes_step_peak'] / 2**20:.1f}", f"{r['memory_ratio_vs_backprop']:.2f}")
                for m, r in rows.items()
            ],
        )  # fmt: skip
        parts.append(f"## {cname}: depth {c['depth']} width {c['width']} batch {c['batch']}")
        parts.append(table)
    write_markdown(
        args.out, "guess_step", "bench/guess_step.py: gradient guesses per step", "\n\n".join(parts)
    )
    return results


def _plot(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.4
    for k, (cname, rows) in enumerate(results["methods"].items()):
        names = list(rows)
        xs = [i + (k - 0.5) * width for i in range(len(names))]
        axes[0].bar(xs, [rows[n]["time_ratio_vs_backprop"] for n in names], width, label=cname)
        axes[1].bar(xs, [rows[n]["memory_ratio_vs_backprop"] for n in names], width, label=cname)
    for ax, title in zip(
        axes, ["step time / backprop", "peak step memory / backprop"], strict=True
    ):
        ax.set_xticks(range(len(names)), names, rotation=70, fontsize=7)
        ax.axhline(1.0, color="k", lw=0.5)
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    save_figure(fig, out / "guess_step.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
