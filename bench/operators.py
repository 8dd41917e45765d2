"""Per-operator product cost of linops against hand-written torch and curvlinops 3.0.1.

What is measured
----------------
For each model (an MLP of about 10k parameters and a small CNN on scikit-learn's digits, an
MLP above 1M parameters on a slice of them, and with ``--lenet`` LeNet-5 on 512 digits scaled
to 32x32) and each operator (Hessian ``H v``, GGN ``G v``, Jacobian ``J v``, transposed
Jacobian ``J^T u``), the median wall-clock seconds of

* ``linops`` with one vector, and with 32 vectors (reported per vector);
* the hand-written reference in plain torch on the same data: a double-backward HVP
  (``create_graph=True`` gradient, then a second ``autograd.grad``), a
  ``torch.autograd.forward_ad`` JVP, an ``autograd.grad`` VJP, and for the GGN the chain of
  the three (forward-mode ``J v``, loss Hessian on the outputs, ``autograd.grad`` VJP);
* ``curvlinops`` 3.0.1 (``HessianLinearOperator``, ``GGNLinearOperator``,
  ``JacobianLinearOperator``, ``TransposedJacobianLinearOperator``) built on the same model,
  the same single batch, float32 and ``check_deterministic=False``, with one vector and (on
  the small models, where it is cheap) 32 vectors.

All candidates of one operator are timed in the same run and interleaved: after the warm-up
every round calls each candidate once, in an order shuffled afresh each round (seeded), and
the median over rounds is kept, so that a change of machine load moves all candidates alike
and the ratios stay meaningful. (A rotated order, used before, made each candidate always
follow the same other one: the 10k-MLP ``J^T u`` always ran right after a 512^3 matmul, which
costs it 0.45 -> 0.71 ms, and curvlinops' always after a 32-vector product.) Each call then
runs after other work has evicted its data from the caches; the single products of linops and
curvlinops are also timed back to back (``*_back_to_back``: consecutive calls, as inside
Lanczos or CG), which is where a retained graph's data stays warm.
The linops operators keep one retained autodiff graph per batch
(``linops/_autodiff.py``); it is built by the warm-up, and its one-off cost is reported
separately as ``seconds_linops_first`` (construction plus the first product).

Each row also gives the FLOPs of one product (``torch.utils.flop_counter``; the same per
vector with 1 or 32 vectors, so batching can only remove overhead), the achieved GFLOP/s,
the best rate of a 512^3 float32 matmul timed in the same rounds, and from these the lowest
32-vector/single ratio that compute allows (``ratio_32_per_vector_over_1_floor``).

``torch.set_num_threads`` is left at its default, and so is ``OMP_WAIT_POLICY`` (set it in the
environment: OpenMP reads it once, when torch loads). The policy decides the small products: with
the runtime's default (threads spin briefly before they sleep) a 10k-MLP ``J^T u`` took 0.47 ms
here on an idle machine, with ``PASSIVE`` (threads sleep at once, and every parallel kernel pays
to wake them) 1.07 ms, while curvlinops' took 2.4-3.1 ms under either. On a machine shared with
other busy processes spinning is ruinous instead (a small matmul ran 10-20x slower), so run
``OMP_WAIT_POLICY=PASSIVE python bench/operators.py`` there. Policy and load are recorded.

The run calls :func:`linops.retain_freed_memory` first (``--default-malloc``: not), so that
glibc keeps freed blocks for reuse rather than page-faulting every product's temporaries in
afresh; it applies to every candidate alike, as all run in this one process.

``--chunks`` times 32-vector products in passes of 1 to 32 vectors (``max_vectors``), back to
back, against one vector (``chunks.json`` / ``chunks.md``).

``--routes`` times the candidate autodiff routes behind ``linops/_autodiff.py`` instead
(retained-graph HVP with 1 vector; 32 vectors looped or batched in chunks of 4, 8, 16 or
32; forward-mode against double-backward JVP; ``torch.func`` ``vmap(jvp(grad))`` and a
reused ``torch.func.linearize``), so the choice made there can be rerun.

Usage::

    python bench/operators.py [--quick] [--routes | --chunks] [--lenet] [--default-malloc]
                              [--out results/operators]

writes ``operators.json`` (times in ``seconds_*`` keys) and ``operators.md`` (or
``routes.json`` / ``routes.md``) under ``--out`` and prints the markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.func import functional_call

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/_harness.py

from _harness import parser, write_json, write_text

from linops import GGNOperator, HessianOperator, JacobianOperator, retain_freed_memory
from linops._autodiff import GradientGraph, OutputGraph
from linops.params import ParamSpace
from trainers.data import digits
from trainers.models import MLP, LeNet5, SmallCNN

OPERATORS = ("hessian", "ggn", "jacobian", "jacobian_t")
K = 32  # vectors of the many-vector product
Fn = Callable[[], Any]


class Case(NamedTuple):
    """One model on one batch of data."""

    name: str
    model: nn.Module
    X: torch.Tensor
    y: torch.Tensor
    curvlinops_many: bool  # whether the 32-vector curvlinops product is cheap enough to time


def make_cases(quick: bool, lenet: bool = False) -> list[Case]:
    """MLP ~10k parameters, small CNN, MLP > 1M parameters (eval mode, float32, seeded), and
    with ``lenet`` LeNet-5 on the digits scaled up to 32x32 (512 of them)."""
    torch.manual_seed(0)
    ds = digits()
    n = 256 if quick else len(ds.X_train)
    n_big = 32 if quick else 256
    X, y = ds.X_train[:n], ds.y_train[:n]
    cases = [
        Case("mlp-10k", MLP(64, 10, widths=(128,)), X, y, not quick),
        Case("cnn", SmallCNN(), X.reshape(-1, 1, 8, 8), y, not quick),
        Case(
            "mlp-1m",
            MLP(64, 10, widths=(1024, 1024)),
            ds.X_train[:n_big],
            ds.y_train[:n_big],
            False,
        ),
    ]
    if lenet:
        n_lenet = 64 if quick else 512
        X32 = nn.functional.interpolate(
            ds.X_train[:n_lenet].reshape(-1, 1, 8, 8), size=32, mode="bilinear"
        )
        cases.append(Case("lenet5", LeNet5(), X32, ds.y_train[:n_lenet], False))
    for c in cases:
        c.model.eval()
    return cases


# ------------------------------------------------------------------------------ timing
def time_interleaved(
    fns: dict[str, Fn], *, repeats: int, warmup: int = 1, budget_s: float = 0.0
) -> dict[str, list[float]]:
    """Seconds of each call of each function, calls interleaved round by round.

    At least ``repeats`` rounds; cheap functions get more (up to ``4 * repeats``) until the
    rounds fill about ``budget_s`` seconds, which steadies the medians on a loaded machine.
    """
    t0 = time.perf_counter()
    for f in fns.values():
        for _ in range(warmup):
            f()
    per_round = (time.perf_counter() - t0) / warmup
    repeats = int(min(4 * repeats, max(repeats, budget_s / max(per_round, 1e-9))))
    names = list(fns)
    samples: dict[str, list[float]] = {k: [] for k in names}
    # a fresh order every round: with a rotated one each candidate always followed the same
    # other, and what that one leaves behind (caches, sleeping OpenMP threads) biased it alone
    order = random.Random(0)
    for _ in range(repeats):
        for name in order.sample(names, len(names)):
            t0 = time.perf_counter()
            fns[name]()
            samples[name].append(time.perf_counter() - t0)
    return samples


def time_back_to_back(fns: dict[str, Fn], *, repeats: int) -> dict[str, float]:
    """Median seconds of ``repeats`` consecutive calls of each function (as in an iterative
    solver, where products follow each other), the functions taken in turn."""
    out = {}
    for name, f in fns.items():
        f()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            f()
            times.append(time.perf_counter() - t0)
        out[name] = statistics.median(times)
    return out


def medians(samples: dict[str, list[float]]) -> dict[str, float]:
    return {k: statistics.median(v) for k, v in samples.items()}


_GEMM = 512  # side of the square float32 matmul that measures the machine's compute ceiling


def _gemm_fn() -> Fn:
    a, b = torch.randn(_GEMM, _GEMM), torch.randn(_GEMM, _GEMM)
    return lambda: a @ b


def count_flops(f: Fn) -> int:
    """FLOPs of one call (matmuls and convolutions, forward and backward), by torch's counter."""
    from torch.utils.flop_counter import FlopCounterMode

    def addmm_(self_shape: Any, a_shape: Any, b_shape: Any, **_: Any) -> int:
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]

    # torch's counter knows addmm but not its in-place form, which the chain's JVP uses
    # (``y.addmm_(dx, W^T)``: about half of a Jacobian product's FLOPs on the 1M MLP)
    inplace = {torch.ops.aten.addmm_: addmm_}
    with FlopCounterMode(display=False, custom_mapping=inplace) as counter:
        f()
    return int(counter.get_total_flops())


# ------------------------------------------------------------------------------ references
class Reference:
    """Hand-written products in plain torch, each rebuilding what it needs (no retained graph)."""

    def __init__(self, case: Case, loss: nn.Module) -> None:
        self.case, self.loss = case, loss
        self.names = [n for n, _ in case.model.named_parameters()]
        self.params = [p.detach() for _, p in case.model.named_parameters()]
        self.sizes = [p.numel() for p in self.params]

    def _split(self, v: torch.Tensor) -> list[torch.Tensor]:
        return [t.view_as(p) for t, p in zip(torch.split(v, self.sizes), self.params, strict=True)]

    def _forward(self, params: list[torch.Tensor]) -> torch.Tensor:
        return functional_call(
            self.case.model, dict(zip(self.names, params, strict=True)), (self.case.X,)
        )

    def _leaves(self) -> list[torch.Tensor]:
        return [p.clone().requires_grad_(True) for p in self.params]

    def hvp(self, v: torch.Tensor) -> torch.Tensor:
        leaves = self._leaves()
        g = torch.autograd.grad(
            self.loss(self._forward(leaves), self.case.y), leaves, create_graph=True
        )
        return torch.cat([t.reshape(-1) for t in torch.autograd.grad(g, leaves, self._split(v))])

    def jvp(self, v: torch.Tensor) -> torch.Tensor:
        with fwAD.dual_level():
            duals = [fwAD.make_dual(p, t) for p, t in zip(self.params, self._split(v), strict=True)]
            out = fwAD.unpack_dual(self._forward(duals))
        return out.tangent.reshape(-1)

    def vjp(self, u: torch.Tensor) -> torch.Tensor:
        leaves = self._leaves()
        out = self._forward(leaves)
        grads = torch.autograd.grad(out, leaves, u.view_as(out))
        return torch.cat([t.reshape(-1) for t in grads])

    def ggn(self, v: torch.Tensor) -> torch.Tensor:
        with fwAD.dual_level():
            duals = [fwAD.make_dual(p, t) for p, t in zip(self.params, self._split(v), strict=True)]
            out, jv = fwAD.unpack_dual(self._forward(duals))
        out = out.detach().requires_grad_(True)
        g = torch.autograd.grad(self.loss(out, self.case.y), out, create_graph=True)[0]
        hjv = torch.autograd.grad(g, out, jv)[0]
        return self.vjp(hjv.reshape(-1))


def _curvlinops_ops(case: Case, loss: nn.Module) -> dict[str, Any]:
    import curvlinops as cl

    params = [p for p in case.model.parameters() if p.requires_grad]
    kw = {"check_deterministic": False, "num_data": len(case.X)}
    data = [(case.X, case.y)]
    return {
        "hessian": cl.HessianLinearOperator(case.model, loss, params, data, **kw),
        "ggn": cl.GGNLinearOperator(case.model, loss, params, data, **kw),
        "jacobian": cl.JacobianLinearOperator(case.model, params, data, **kw),
        "jacobian_t": cl.TransposedJacobianLinearOperator(case.model, params, data, **kw),
    }


# ------------------------------------------------------------------------------ one case
def bench_case(
    case: Case, *, repeats: int, curvlinops: bool, budget_s: float
) -> list[dict[str, Any]]:
    """One row per operator: timings, ratios, and agreement with the reference."""
    loss = nn.CrossEntropyLoss()
    ref = Reference(case, loss)
    ref_fn = {"hessian": ref.hvp, "ggn": ref.ggn, "jacobian": ref.jvp, "jacobian_t": ref.vjp}
    curv = _curvlinops_ops(case, loss) if curvlinops else {}
    gen = torch.Generator().manual_seed(1)
    rows = []
    for name in OPERATORS:
        t0 = time.perf_counter()
        op = make_operator(case, loss, name)
        v = torch.randn(op.shape[1], generator=gen)
        op @ v  # builds and keeps the retained graph
        first = time.perf_counter() - t0
        V = torch.randn(op.shape[1], K, generator=gen)
        fns: dict[str, Fn] = {
            "linops_1": lambda op=op, v=v: op @ v,
            "linops_32": lambda op=op, V=V: op @ V,
            "reference_1": lambda f=ref_fn[name], v=v: f(v),
        }
        route = _route(op)
        if route == "chain":  # the autograd route on the same model, timed in the same rounds
            slow = make_operator(case, loss, name, route="autograd")
            slow @ v
            fns["autograd_route_1"] = lambda op=slow, v=v: op @ v
            fns["autograd_route_32"] = lambda op=slow, V=V: op @ V
        if name in curv:
            fns["curvlinops_1"] = lambda c=curv[name], v=v: c @ v
            if case.curvlinops_many:
                fns["curvlinops_32"] = lambda c=curv[name], V=V: c @ V
        fns["gemm"] = _gemm_fn()
        samples = time_interleaved(fns, repeats=repeats, budget_s=budget_s)
        med = medians(samples)
        singles = {k: fns[k] for k in ("linops_1", "curvlinops_1") if k in fns}
        warm = time_back_to_back(singles, repeats=max(len(samples["linops_1"]), repeats))
        row = _row(case, name, op, med, first, _errors(op, ref_fn[name], curv.get(name), v))
        row["route"] = route
        row["seconds_linops_1_back_to_back"] = warm["linops_1"]
        row["seconds_curvlinops_1_back_to_back"] = warm.get("curvlinops_1")
        if "curvlinops_1" in warm:
            row["speedup_vs_curvlinops_1_back_to_back"] = warm["curvlinops_1"] / warm["linops_1"]
        rows.append(_roofline(row, count_flops(fns["linops_1"]), min(samples["gemm"])))
    return rows


def make_operator(case: Case, loss: nn.Module, name: str, **kw: Any) -> Any:
    """The linops operator ``name`` (one of ``OPERATORS``) of a case; ``kw`` go to it."""
    if name == "hessian":
        return HessianOperator(case.model, loss, (case.X, case.y), **kw)
    if name == "ggn":
        return GGNOperator(case.model, loss, (case.X, case.y), **kw)
    J = JacobianOperator(case.model, case.X, **kw)
    return J if name == "jacobian" else J.T


def _route(op: Any) -> str:
    """The route of a model operator (or of the operator a transpose wraps)."""
    for o in (op, *getattr(op, "ops", [])):
        if getattr(o, "route", None) is not None:
            return o.route
    return "autograd"


def _errors(op: Any, ref: Callable, curv: Any, v: torch.Tensor) -> dict[str, float]:
    """Relative max-norm difference of linops' product to the reference and to curvlinops."""
    with torch.no_grad():
        a = op @ v
    out = {"rel_error_vs_reference": _rel(a, ref(v))}
    if curv is not None:
        out["rel_error_vs_curvlinops"] = _rel(a, (curv @ v).detach())
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _row(
    case: Case, name: str, op: Any, med: dict[str, float], first: float, errs: dict[str, float]
) -> dict[str, Any]:
    row: dict[str, Any] = {
        "model": case.name,
        "num_params": sum(p.numel() for p in case.model.parameters()),
        "num_samples": len(case.X),
        "operator": name,
        "shape": list(op.shape),
        "seconds_linops_first": first,
        "seconds_linops_1": med["linops_1"],
        "seconds_linops_32_per_vector": med["linops_32"] / K,
        "seconds_reference_1": med["reference_1"],
        "seconds_autograd_route_1": med.get("autograd_route_1"),
        "seconds_autograd_route_32_per_vector": med["autograd_route_32"] / K
        if "autograd_route_32" in med
        else None,
        "seconds_curvlinops_1": med.get("curvlinops_1"),
        "seconds_curvlinops_32_per_vector": med["curvlinops_32"] / K
        if "curvlinops_32" in med
        else None,
        **errs,
    }
    row["ratio_linops_1_over_reference_1"] = row["seconds_linops_1"] / row["seconds_reference_1"]
    row["ratio_linops_32_per_vector_over_linops_1"] = (
        row["seconds_linops_32_per_vector"] / row["seconds_linops_1"]
    )
    if row["seconds_autograd_route_1"] is not None:
        row["speedup_vs_autograd_route_1"] = (
            row["seconds_autograd_route_1"] / row["seconds_linops_1"]
        )
        row["speedup_vs_autograd_route_32"] = (
            row["seconds_autograd_route_32_per_vector"] / row["seconds_linops_32_per_vector"]
        )
    if row["seconds_curvlinops_1"] is not None:
        row["speedup_vs_curvlinops_1"] = row["seconds_curvlinops_1"] / row["seconds_linops_1"]
    if row["seconds_curvlinops_32_per_vector"] is not None:
        row["speedup_vs_curvlinops_32"] = (
            row["seconds_curvlinops_32_per_vector"] / row["seconds_linops_32_per_vector"]
        )
    return row


def _roofline(row: dict[str, Any], flops: int, gemm_seconds: float) -> dict[str, Any]:
    """FLOPs per vector, achieved rates, and the lowest 32-vector/single ratio compute allows.

    Every product here costs the same FLOPs per vector with 1 or 32 vectors, so batching can
    only remove overhead: even at the best rate of a 512^3 float32 matmul measured in the same
    rounds, a vector costs at least ``flops / ceiling`` seconds.
    """
    ceiling = 2 * _GEMM**3 / gemm_seconds
    row["flops_per_vector"] = flops
    row["gflops_per_second_gemm_ceiling"] = ceiling / 1e9
    row["gflops_per_second_linops_1"] = flops / row["seconds_linops_1"] / 1e9
    row["gflops_per_second_linops_32"] = flops / row["seconds_linops_32_per_vector"] / 1e9
    row["ratio_32_per_vector_over_1_floor"] = flops / ceiling / row["seconds_linops_1"]
    return row


# ------------------------------------------------------------------------------ targets
def target_adder(out: list[dict[str, Any]]) -> Callable[[str, float | None, float, bool], None]:
    """``add(what, value, bound, upper)``: append a target's value, bound and verdict to ``out``
    (skipped when ``value`` is None, e.g. a peer that did not run)."""

    def add(what: str, value: float | None, bound: float, upper: bool) -> None:
        if value is not None:
            met = value <= bound if upper else value >= bound
            out.append(
                {"target": what, "value": value, "bound": bound, "upper_bound": upper, "met": met}
            )

    return add


def check_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's speed targets, each as measured value, bound and verdict."""
    out: list[dict[str, Any]] = []
    add = target_adder(out)

    for r in rows:
        m, o = r["model"], r["operator"]
        if o == "hessian":
            add(
                f"{m} H v / double-backward HVP <= 1.3",
                r["ratio_linops_1_over_reference_1"],
                1.3,
                True,
            )
        if o == "jacobian":
            add(
                f"{m} J v / forward-mode JVP <= 1.3",
                r["ratio_linops_1_over_reference_1"],
                1.3,
                True,
            )
        add(
            f"{m} {o} 32-vector per vector / single <= 0.6",
            r["ratio_linops_32_per_vector_over_linops_1"],
            0.6,
            True,
        )
        bound = {"mlp-10k": 3.0, "mlp-1m": 1.0}.get(m)
        if bound is not None:
            add(
                f"{m} {o} speedup vs curvlinops >= {bound:g} (interleaved)",
                r.get("speedup_vs_curvlinops_1"),
                bound,
                False,
            )
            add(
                f"{m} {o} speedup vs curvlinops >= {bound:g} (back to back)",
                r.get("speedup_vs_curvlinops_1_back_to_back"),
                bound,
                False,
            )
    return out


# ------------------------------------------------------------------------------ --routes
def _chunked(
    fn: Callable[[list[torch.Tensor], bool], Any], T: list[torch.Tensor], chunk: int
) -> None:
    """Apply a retained-graph product to ``K`` batched tangents, ``chunk`` vectors per pass."""
    for i in range(0, K, chunk):
        part = [t[i : i + chunk] for t in T]
        fn([t[0] for t in part], False) if chunk == 1 else fn(part, True)


def _route_fns(case: Case) -> dict[str, dict[str, tuple[int, Fn]]]:
    """Per product, the candidate routes as ``name -> (vectors, fn)``; the first is the baseline."""
    loss = nn.CrossEntropyLoss()
    space = ParamSpace(case.model)
    ref = Reference(case, loss)
    gen = torch.Generator().manual_seed(2)
    v = torch.randn(space.dim, generator=gen)
    V = torch.randn(space.dim, K, generator=gen)
    t1 = list(space.unflatten(v).values())
    T = list(space.unflatten(V).values())  # (K, *shape) each
    td1, tdK = space.unflatten(v), space.unflatten(V)
    params = {k: p.detach() for k, p in space.values().items()}
    gg = GradientGraph(space, loss, case.X, case.y)
    og = OutputGraph(space, case.X, None)
    u = torch.randn(og.out.shape, generator=gen)
    U = torch.randn((K, *og.out.shape), generator=gen)

    def f(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return functional_call(case.model, p, (case.X,))

    grad_fn = torch.func.grad(lambda p: loss(f(p), case.y))
    _, hvp_lin = torch.func.linearize(grad_fn, params)
    _, jvp_lin = torch.func.linearize(f, params)

    def func_hvp(t: dict[str, torch.Tensor]) -> Any:
        return torch.func.jvp(grad_fn, (params,), (t,))[1]

    def func_jvp(t: dict[str, torch.Tensor]) -> Any:
        return torch.func.jvp(f, (params,), (t,))[1]

    hvp: dict[str, tuple[int, Fn]] = {
        "double-backward, fresh graph": (1, lambda: ref.hvp(v)),
        "retained graph": (1, lambda: gg.hvp(t1, False)),
        "retained graph, loop": (K, lambda: _chunked(gg.hvp, T, 1)),
        **{
            f"retained graph, batched chunks of {c}": (K, lambda c=c: _chunked(gg.hvp, T, c))
            for c in (4, 8, 16, 32)
        },
        "torch.func jvp(grad)": (1, lambda: func_hvp(td1)),
        "torch.func vmap(jvp(grad))": (K, lambda: torch.func.vmap(func_hvp)(tdK)),
        "torch.func linearize(grad), reused": (1, lambda: hvp_lin(td1)),
        "torch.func vmap(linearize(grad)), reused": (K, lambda: torch.func.vmap(hvp_lin)(tdK)),
    }
    jvp: dict[str, tuple[int, Fn]] = {
        "forward_ad, fresh": (1, lambda: ref.jvp(v)),
        "double-backward, fresh graph": (
            1,
            lambda: OutputGraph(space, case.X, None).jvp(t1, False),
        ),
        "double-backward, retained graph": (1, lambda: og.jvp(t1, False)),
        "double-backward, retained, loop": (K, lambda: _chunked(og.jvp, T, 1)),
        **{
            f"double-backward, retained, batched chunks of {c}": (
                K,
                lambda c=c: _chunked(og.jvp, T, c),
            )
            for c in (8, 32)
        },
        "torch.func vmap(jvp)": (K, lambda: torch.func.vmap(func_jvp)(tdK)),
        "torch.func linearize, reused": (1, lambda: jvp_lin(td1)),
        "torch.func vmap(linearize), reused": (K, lambda: torch.func.vmap(jvp_lin)(tdK)),
    }
    vjp: dict[str, tuple[int, Fn]] = {
        "autograd.grad, fresh graph": (1, lambda: ref.vjp(u.reshape(-1))),
        "retained graph": (1, lambda: og.vjp(u, False)),
        "retained graph, loop": (K, lambda: [og.vjp(U[i], False) for i in range(K)]),
        **{
            f"retained graph, batched chunks of {c}": (
                K,
                lambda c=c: [og.vjp(U[i : i + c], True) for i in range(0, K, c)],
            )
            for c in (8, 32)
        },
    }
    return {"hvp": hvp, "jvp": jvp, "vjp": vjp}


def run_routes(cases: list[Case], *, repeats: int) -> list[dict[str, Any]]:
    """Seconds per vector of each candidate route, interleaved per product."""
    rows = []
    for case in cases:
        for product, routes in _route_fns(case).items():
            med = medians(time_interleaved({k: f for k, (_, f) in routes.items()}, repeats=repeats))
            base = None
            for name, (k, _) in routes.items():
                per = med[name] / k
                base = base if base is not None else per
                rows.append(
                    {
                        "model": case.name,
                        "product": product,
                        "route": name,
                        "vectors": k,
                        "seconds_per_vector": per,
                        "ratio_vs_baseline": per / base,
                    }
                )
        print(f"{case.name}: done", file=sys.stderr)
    return rows


# ------------------------------------------------------------------------------ output
def _ms(x: float | None) -> str:
    return "-" if x is None else f"{1e3 * x:.2f}"


def _x(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def markdown(
    rows: list[dict[str, Any]], targets: list[dict[str, Any]], meta: dict[str, Any]
) -> str:
    head = (
        "| model | params | n | operator | route | linops 1 (ms) | linops 32 /vec (ms) "
        "| autograd route 1 / 32 per vec (ms) | reference 1 (ms) "
        "| curvlinops 1 (ms) | curvlinops 32 /vec (ms) | linops/ref | 32-per-vec/1 "
        "| speedup vs curvlinops (1) | speedup (32) | linops first (ms) | MFLOP/vec "
        "| GFLOP/s 1 / 32 / gemm | 32/1 floor |"
    )
    lines = [head, "|" + "---|" * 19]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['num_params']} | {r['num_samples']} | {r['operator']} "
            f"| {r.get('route', '-')} "
            f"| {_ms(r['seconds_linops_1'])} | {_ms(r['seconds_linops_32_per_vector'])} "
            f"| {_ms(r.get('seconds_autograd_route_1'))} / "
            f"{_ms(r.get('seconds_autograd_route_32_per_vector'))} "
            f"| {_ms(r['seconds_reference_1'])} | {_ms(r['seconds_curvlinops_1'])} "
            f"| {_ms(r['seconds_curvlinops_32_per_vector'])} "
            f"| {_x(r['ratio_linops_1_over_reference_1'])} "
            f"| {_x(r['ratio_linops_32_per_vector_over_linops_1'])} "
            f"| {_x(r.get('speedup_vs_curvlinops_1'))} | {_x(r.get('speedup_vs_curvlinops_32'))} "
            f"| {_ms(r['seconds_linops_first'])} | {r['flops_per_vector'] / 1e6:.0f} "
            f"| {r['gflops_per_second_linops_1']:.1f} / {r['gflops_per_second_linops_32']:.1f} / "
            f"{r['gflops_per_second_gemm_ceiling']:.0f} | {_x(r['ratio_32_per_vector_over_1_floor'])} |"
        )
    lines += [
        "",
        "Single products timed back to back (consecutive calls, as in an iterative solver):",
        "",
        "| model | operator | linops 1 (ms) | curvlinops 1 (ms) | speedup |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['model']} | {r['operator']} | {_ms(r['seconds_linops_1_back_to_back'])} "
        f"| {_ms(r.get('seconds_curvlinops_1_back_to_back'))} "
        f"| {_x(r.get('speedup_vs_curvlinops_1_back_to_back'))} |"
        for r in rows
    ]
    lines += ["", "| target | measured | met |", "|---|---|---|"]
    lines += [
        f"| {t['target']} | {t['value']:.2f} | {'yes' if t['met'] else 'NO'} |" for t in targets
    ]
    lines += ["", _meta_line(meta)]
    return "\n".join(lines) + "\n"


def _meta_line(meta: dict[str, Any]) -> str:
    return (
        f"torch {meta['torch']}, curvlinops {meta['curvlinops']}, {meta['threads']} threads, "
        f"OMP_WAIT_POLICY={meta['omp_wait_policy']}, "
        f"retain_freed_memory: {meta.get('retain_freed_memory')}, load average {meta['loadavg_start']} -> "
        f"{meta['loadavg_end']}, at least {meta['repeats']} interleaved rounds (median), "
        f"`{meta['command']}`"
    )


def _meta(args: argparse.Namespace) -> dict[str, Any]:
    try:
        curv = metadata.version("curvlinops-for-pytorch")
    except metadata.PackageNotFoundError:
        curv = None
    return {
        "torch": torch.__version__,
        "curvlinops": curv,
        "python": platform.python_version(),
        "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
        "loadavg_start": _loadavg(),
        "repeats": args.repeats,
        "quick": args.quick,
        "command": "python " + " ".join(sys.argv),
    }


def _loadavg() -> float | None:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def write(out: Path, stem: str, payload: dict[str, Any], table: str) -> None:
    write_json(out, stem, payload, indent=2)
    write_text(out / f"{stem}.md", table)
    print(table)
    print(f"wrote {out / stem}.json and {out / stem}.md")


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__, "results/operators", quick_help="smaller data and fewer rounds (~30 s)")
    p.add_argument("--routes", action="store_true", help="time the autodiff routes instead")
    p.add_argument("--repeats", type=int, default=None, help="interleaved timing rounds")
    p.add_argument("--no-curvlinops", action="store_true", help="skip the curvlinops columns")
    p.add_argument("--lenet", action="store_true", help="add LeNet-5 on 512 32x32 inputs")
    p.add_argument(
        "--chunks",
        action="store_true",
        help="time 32-vector products with 1-32 vectors per pass against one vector instead",
    )
    p.add_argument(
        "--default-malloc",
        action="store_true",
        help="leave glibc's malloc thresholds alone (default: linops.retain_freed_memory())",
    )
    args = p.parse_args(argv)
    args.repeats = args.repeats or (3 if args.quick else 7)
    retained = None if args.default_malloc else retain_freed_memory()
    meta = _meta(args)
    meta["retain_freed_memory"] = retained
    meta["budget_s"] = 0.5 if args.quick else 2.0
    if args.chunks:
        rows = run_chunks(make_cases(args.quick, args.lenet), repeats=args.repeats)
        meta["loadavg_end"] = _loadavg()
        write(args.out, "chunks", {"meta": meta, "rows": rows}, chunks_markdown(rows, meta))
        return
    if args.routes:
        rows = run_routes(make_cases(args.quick)[:2], repeats=args.repeats)
        meta["loadavg_end"] = _loadavg()
        write(args.out, "routes", {"meta": meta, "rows": rows}, routes_markdown(rows, meta))
        return
    rows = []
    for case in make_cases(args.quick, args.lenet):
        rows += bench_case(
            case, repeats=args.repeats, curvlinops=not args.no_curvlinops, budget_s=meta["budget_s"]
        )
        print(f"{case.name}: done", file=sys.stderr)
    targets = check_targets(rows)
    meta["loadavg_end"] = _loadavg()
    write(
        args.out,
        "operators",
        {"meta": meta, "rows": rows, "targets": targets},
        markdown(rows, targets, meta),
    )


CHUNKS = (1, 2, 4, 8, 16, 32)


def run_chunks(cases: list[Case], *, repeats: int) -> list[dict[str, Any]]:
    """Per operator, 32 vectors in passes of ``c`` vectors (``max_vectors=c``), back to back,
    per vector and against one vector: how the many-vector path's chunk size pays."""
    loss = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(3)
    rows = []
    for case in cases:
        for name in OPERATORS:
            one = make_operator(case, loss, name, max_vectors=1)
            v = torch.randn(one.shape[1], generator=gen)
            V = torch.randn(one.shape[1], K, generator=gen)
            fns: dict[str, Fn] = {"single": lambda op=one, v=v: op @ v}
            for c in CHUNKS:
                op = make_operator(case, loss, name, max_vectors=c)
                fns[f"chunk_{c}"] = lambda op=op, V=V: op @ V
            med = time_back_to_back(fns, repeats=repeats)
            for c in CHUNKS:
                per = med[f"chunk_{c}"] / K
                rows.append(
                    {
                        "model": case.name,
                        "operator": name,
                        "route": _route(one),
                        "vectors_per_pass": c,
                        "seconds_single": med["single"],
                        "seconds_per_vector": per,
                        "ratio_per_vector_over_single": per / med["single"],
                    }
                )
        print(f"{case.name}: done", file=sys.stderr)
    return rows


def chunks_markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    head = "| model | operator | route | single (ms) | " + " | ".join(
        f"{c} per pass" for c in CHUNKS
    )
    lines = [head + " |", "|" + "---|" * (4 + len(CHUNKS))]
    for i in range(0, len(rows), len(CHUNKS)):
        group = rows[i : i + len(CHUNKS)]
        r = group[0]
        cells = " | ".join(f"{g['ratio_per_vector_over_single']:.2f}" for g in group)
        lines.append(
            f"| {r['model']} | {r['operator']} | {r['route']} | {_ms(r['seconds_single'])} | {cells} |"
        )
    note = "Cells: seconds per vector of a 32-vector product over those of one vector."
    return "\n".join(lines) + "\n\n" + note + "\n" + _meta_line(meta) + "\n"


def routes_markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        "| model | product | route | vectors | seconds per vector (ms) | vs first route |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['product']} | {r['route']} | {r['vectors']} "
            f"| {_ms(r['seconds_per_vector'])} | {_x(r['ratio_vs_baseline'])} |"
        )
    return "\n".join(lines) + "\n\n" + _meta_line(meta) + "\n"


if __name__ == "__main__":
    main()
