"""Fisher-family products and damped inverse solves: linops against curvlinops 3.0.1 and scipy.

What is measured
----------------
On the digits MLP (``trainers.models.MLP(64, 10, widths=(128,))``, 9,610 parameters, at its
seeded initialisation, float64, cross-entropy; 1,600 training digits, 256 with ``--quick``):

* **Products** of the empirical Fisher (``linops.EmpiricalFisherOperator`` against
  curvlinops' ``EFLinearOperator``) and of the Monte-Carlo Fisher with one sample
  (``FisherOperator(mc_samples=1)`` against ``FisherMCLinearOperator``, same seed, hence the
  same sampled labels), with one vector and with 32 (reported per vector), and the largest
  relative difference of the two libraries' products.
* **KFAC / EKFAC** (type-2): construction of the factors (and EKFAC's eigenvalue correction)
  and products, against curvlinops' ``KFACLinearOperator`` / ``EKFACLinearOperator``; their
  matrix products alone (the floor); the products' flops against this CPU's ``torch.mm``
  speed (what no implementation can beat); and one product right after an empirical-Fisher
  product (cold caches).
* **Solves** of :math:`(G + \\lambda I) x = b` for the GGN at :math:`\\lambda = 10^{-4}
  \\lambda_{\\max}(G)` and one right-hand side, to a relative residual of 1e-8:
  ``linops.inverse`` with CG, with CG and the randomized Nystrom preconditioner (its sketch
  built inside the timed call and its products counted), with CG preconditioned by the KFAC
  inverse at the same damping (``preconditioner="kfac"``, KFAC built inside the timed call:
  data passes, no products of ``G``), and with MINRES; ``scipy.sparse.
  linalg.cg(rtol=1e-8)`` on the linops operator; curvlinops' ``CGInverseLinearOperator`` on
  its GGN plus damping (GPyTorch's ``linear_cg`` with ``tolerance=1e-8``, at most 2,000
  iterations: on 256 digits it stalled at a relative residual of 1e-5 after 20,000). For each: products
  of ``G``, seconds, and the relative residual and error reached (against a linops solve at
  ``rtol=1e-12``), the residual recomputed outside the timing. Then 8 right-hand sides at
  once: linops' block CG, one CG per column (``block=False``), block CG with Nystrom.

All candidates of a section are timed in the same run, interleaved: every round calls each
candidate (400 times in a row for the KFAC / EKFAC single-vector products, 50 for their
blocks of 32, once otherwise) in an order
shuffled afresh (seeded); medians over rounds are kept, of the wall time and of this
process's CPU time. The run uses one torch thread (``--threads``), so its CPU time leaves
out the time it waited for a core on a shared machine; the tables report CPU time and the
ratios of it, the JSON both (``seconds_*`` wall, ``seconds_cpu_*`` CPU).

Usage::

    python bench/curvature.py [--quick] [--repeats R] [--threads T] [--out results/curvature]

writes ``curvature.json`` (times in ``seconds_*`` keys) and ``curvature.md`` under ``--out``
and prints the markdown tables. curvlinops is optional: without it its columns are empty.
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
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse.linalg as sla
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/_harness.py

from _harness import strict_json, write_text

from linops import (
    EKFACOperator,
    EmpiricalFisherOperator,
    FisherOperator,
    GGNOperator,
    KFACOperator,
    inverse,
    lanczos,
)
from trainers.data import digits
from trainers.models import MLP

try:
    import curvlinops
except ImportError:  # optional: the bench runs without it
    curvlinops = None

K = 32
RTOL = 1e-8
BLOCK = 8  # right-hand sides of the block solves
#: curvlinops' CG stalls near 1e-5 here (20,000 iterations, 146 s, on 256 digits): capped
CURV_MAXITER = 2000


def interleaved(
    cands: dict[str, Callable[[], Any]], rounds: int, seed: int = 0, reps: int | dict = 1
) -> tuple[dict, dict]:
    """Median wall and CPU seconds per call of each candidate over ``rounds`` shuffled rounds.

    After one warm-up call each; every round calls each candidate ``reps`` times in a row (an
    int, or per candidate), in an order shuffled afresh. CPU seconds (``time.process_time``)
    are those of this process: with one thread they leave out the time the process waited
    for a core, which on a shared machine is most of the wall time's noise.
    """
    rng = random.Random(seed)
    wall: dict[str, list[float]] = {k: [] for k in cands}
    cpu: dict[str, list[float]] = {k: [] for k in cands}
    for name in cands:
        cands[name]()
    for _ in range(rounds):
        order = list(cands)
        rng.shuffle(order)
        for name in order:
            r = reps.get(name, 1) if isinstance(reps, dict) else reps
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(r):
                cands[name]()
            wall[name].append((time.perf_counter() - t0) / r)
            cpu[name].append((time.process_time() - c0) / r)
    med = statistics.median
    return {k: med(v) for k, v in wall.items()}, {k: med(v) for k, v in cpu.items()}


def setup(quick: bool) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    ds = digits(dtype=torch.float64)
    n = 256 if quick else len(ds.X_train)
    model = MLP(64, 10, widths=(128,)).double().eval()
    return model, ds.X_train[:n], ds.y_train[:n]


def products(model: nn.Module, X: torch.Tensor, y: torch.Tensor, rounds: int) -> dict:
    loss = nn.CrossEntropyLoss()
    ef = EmpiricalFisherOperator(model, loss, (X, y))
    fmc = FisherOperator(model, loss, (X, y), mc_samples=1, seed=3)
    g = torch.Generator().manual_seed(1)
    V = torch.randn(ef.shape[0], K, generator=g, dtype=torch.float64)
    v = V[:, :1].clone()  # one contiguous vector, as a solver passes it
    cands: dict[str, Callable[[], Any]] = {
        "linops_ef_1": lambda: ef @ v,
        "linops_ef_32": lambda: ef @ V,
        "linops_fmc_1": lambda: fmc @ v,
    }
    row: dict[str, Any] = {"num_params": ef.shape[0], "num_samples": len(X)}
    if curvlinops is not None:
        params = list(model.parameters())
        data = [(X, y)]
        kw = {"check_deterministic": False}
        cef = curvlinops.EFLinearOperator(model, loss, params, data, **kw)
        cfmc = curvlinops.FisherMCLinearOperator(model, loss, params, data, seed=3, **kw)
        cands |= {
            "curvlinops_ef_1": lambda: cef @ v,
            "curvlinops_ef_32": lambda: cef @ V,
            "curvlinops_fmc_1": lambda: cfmc @ v,
        }
        ref = cef @ V
        row["max_rel_diff_ef"] = float((ef @ V - ref).abs().max() / ref.abs().max())
        ref = cfmc @ V
        row["max_rel_diff_fmc"] = float((fmc @ V - ref).abs().max() / ref.abs().max())
    kfac = KFACOperator(model, loss, (X, y))
    ekfac = EKFACOperator(model, loss, (X, y))
    kfac.compute_factors(), ekfac._eigen()
    cands |= _kfac_floor(kfac) | _ekfac_floor(ekfac)
    cands |= {
        "linops_kfac_build": lambda: KFACOperator(model, loss, (X, y)).compute_factors(),
        "linops_ekfac_build": lambda: EKFACOperator(model, loss, (X, y))._eigen(),
        "linops_kfac_1": lambda: kfac @ v,
        "linops_kfac_32": lambda: kfac @ V,
        "linops_ekfac_1": lambda: ekfac @ v,
        "linops_ekfac_32": lambda: ekfac @ V,
    }
    if curvlinops is not None:
        ck = curvlinops.KFACLinearOperator(model, loss, params, data, fisher_type="type-2", **kw)
        ce = curvlinops.EKFACLinearOperator(model, loss, params, data, fisher_type="type-2", **kw)

        def build(cls: Any, method: str) -> Callable[[], Any]:
            return lambda: getattr(
                cls(model, loss, params, data, fisher_type="type-2", **kw), method
            )()

        ref, ref_e = ck @ V, ce @ V
        row["max_rel_diff_kfac"] = float((kfac @ V - ref).abs().max() / ref.abs().max())
        row["max_rel_diff_ekfac"] = float((ekfac @ V - ref_e).abs().max() / ref_e.abs().max())
        cands |= {
            "curvlinops_kfac_build": build(
                curvlinops.KFACLinearOperator, "compute_kronecker_factors"
            ),
            "curvlinops_ekfac_build": build(
                curvlinops.EKFACLinearOperator, "compute_eigenvalue_correction"
            ),
            "curvlinops_kfac_1": lambda: ck @ v,
            "curvlinops_kfac_32": lambda: ck @ V,
            "curvlinops_ekfac_1": lambda: ce @ v,
            "curvlinops_ekfac_32": lambda: ce @ V,
        }
    # the KFAC / EKFAC products and their floors: enough calls in a row for a window of tens
    # of ms (the first call after another candidate runs on cold caches: see cold_calls)
    reps = {
        k: 1 if k.endswith("_build") or "_ef_" in k or "_fmc_" in k else 400 if k.endswith("_1")
        else 50
        for k in cands
    }  # fmt: skip
    t, c = interleaved(cands, rounds, reps=reps)
    for k in t:
        per = K if k.endswith("_32") else 1
        row[f"seconds_{k}"], row[f"seconds_cpu_{k}"] = t[k] / per, c[k] / per
    singles = [k for k in cands if k.endswith(("kfac_1", "ekfac_1")) and "floor" not in k]
    cold = cold_calls({k: cands[k] for k in singles}, lambda: ef @ V, rounds * 5)
    row |= {f"seconds_cpu_cold_{k}": v for k, v in cold.items()}
    row |= kronecker_flops(kfac)
    row["gflops_peak_dgemm"] = peak_gflops(kfac.torch_dtype)
    return row


def cold_calls(
    cands: dict[str, Callable[[], Any]], evict: Callable[[], Any], samples: int, seed: int = 1
) -> dict[str, float]:
    """Median CPU seconds of one call made right after ``evict()`` (another operator's product).

    What a product costs where it alternates with other work, as a preconditioner does with
    the operator it preconditions: its code and operands are no longer in the caches.
    """
    rng = random.Random(seed)
    cpu: dict[str, list[float]] = {k: [] for k in cands}
    for _ in range(samples):
        order = list(cands)
        rng.shuffle(order)
        for name in order:
            evict()
            c0 = time.process_time()
            cands[name]()
            cpu[name].append(time.process_time() - c0)
    return {k: statistics.median(v) for k, v in cpu.items()}


def kronecker_flops(kfac: KFACOperator) -> dict[str, int]:
    r"""Floating-point operations of a KFAC and an EKFAC product with one vector.

    Per layer :math:`G W A` (``2 (o^2 i + o i^2)``) and :math:`G b` (``2 o^2``); EKFAC twice
    that (a rotation into the eigenbasis and one back; the scaling is negligible).
    """
    n = 0
    for s in kfac._slots():
        n += 2 * (s.rows**2 * s.cols + s.rows * s.cols**2) if s.w is not None else 0
        n += 2 * (s.b.stop - s.b.start) ** 2 if s.b is not None else 0
    return {"flops_kfac_1": n, "flops_ekfac_1": 2 * n}


def peak_gflops(dtype: torch.dtype, n: int = 1024, reps: int = 10) -> float:
    """This CPU's matrix-product speed: GFLOP/s of ``torch.mm`` on ``n x n`` (best of ``reps``)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    out = torch.empty(n, n, dtype=dtype)
    torch.mm(a, b, out=out)
    best = float("inf")
    for _ in range(reps):
        c0 = time.process_time()
        torch.mm(a, b, out=out)
        best = min(best, time.process_time() - c0)
    return 2 * n**3 / best / 1e9


def _kfac_floor(kfac: KFACOperator) -> dict[str, Callable[[], Any]]:
    """The KFAC product's matrix products alone: the least any implementation must compute.

    Per layer :math:`G W A` for its ``out x in`` weight and :math:`G b` for its bias, on
    preallocated operands and outputs (one vector), and for 32 vectors stacked as
    ``(32, out, in)`` (``G W`` batched, then one ``(32 out) x in`` product with ``A``).
    """
    factors, g = kfac.compute_factors(), torch.Generator().manual_seed(2)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=kfac.torch_dtype)

    one, many = [], []
    for s in kfac._slots():
        A, G = factors[s.layer]
        bias = s.b is not None
        one.append((A, G, rand(s.rows, s.cols), rand(s.rows, s.cols), bias and rand(s.rows, 1)))
        many.append((A, G, rand(K, s.rows, s.cols), bias and rand(s.rows, K)))

    def floor_1() -> None:
        for A, G, W, out, b in one:
            torch.mm(torch.mm(G, W), A, out=out)
            if b is not False:
                torch.mm(G, b)

    def floor_32() -> None:
        for A, G, W, b in many:
            torch.matmul(G, W).reshape(-1, A.shape[0]) @ A
            if b is not False:
                G @ b

    return {"floor_kfac_1": floor_1, "floor_kfac_32": floor_32}


def _ekfac_floor(ekfac: EKFACOperator) -> dict[str, Callable[[], Any]]:
    r"""EKFAC's matrix products alone (as :func:`_kfac_floor`), 32 vectors stacked.

    Per layer :math:`Q_G[(Q_G^\top W Q_A) \odot E]Q_A^\top` and the bias's rotation, scaling
    and rotation back.
    """
    eig, g = ekfac._eigen(), torch.Generator().manual_seed(3)
    many = []
    for s in ekfac._slots():
        QA, QG, E, Eb = eig[s.layer]
        W = torch.randn(K, s.rows, s.cols, generator=g, dtype=ekfac.torch_dtype)
        b = s.b is not None and torch.randn(s.rows, K, generator=g, dtype=ekfac.torch_dtype)
        many.append((QA, QG, E, Eb, W, b))

    def floor_32() -> None:
        for QA, QG, E, Eb, W, b in many:
            d = QA.shape[0]
            R = (torch.matmul(QG.mT, W).reshape(-1, d) @ QA).view_as(W) * E
            torch.matmul(QG, R).reshape(-1, d) @ QA.mT
            if b is not False:
                QG @ ((QG.mT @ b) * Eb)

    return {"floor_ekfac_32": floor_32}


class _Counted(sla.LinearOperator):
    """``G + lam I`` for scipy's cg, counting products."""

    def __init__(self, G: Any, lam: float) -> None:
        super().__init__(dtype=np.float64, shape=G.shape)
        self.G, self.lam, self.count = G, lam, 0

    def _matvec(self, x: np.ndarray) -> np.ndarray:
        self.count += 1
        return self.G @ x + self.lam * x


def _curvlinops_inverse(model: nn.Module, X: torch.Tensor, y: torch.Tensor, lam: float) -> Any:
    from curvlinops._torch_base import PyTorchLinearOperator

    params = list(model.parameters())
    G = curvlinops.GGNLinearOperator(
        model, nn.CrossEntropyLoss(), params, [(X, y)], check_deterministic=False
    )

    class Damping(PyTorchLinearOperator):
        SELF_ADJOINT = True
        count = 0

        def _matmat(self, M: list[torch.Tensor]) -> list[torch.Tensor]:
            Damping.count += M[0].shape[-1]
            return [lam * m for m in M]

        @property
        def device(self) -> torch.device:
            return torch.device("cpu")

        @property
        def dtype(self) -> torch.dtype:
            return torch.float64

    shapes = [tuple(p.shape) for p in params]
    A = G + Damping(shapes, shapes)
    inv = curvlinops.CGInverseLinearOperator(A, tolerance=RTOL, max_iter=CURV_MAXITER)
    return inv, Damping


def solves(model: nn.Module, X: torch.Tensor, y: torch.Tensor, rounds: int) -> dict:
    G = GGNOperator(model, nn.CrossEntropyLoss(), (X, y))
    lmax = float(torch.as_tensor(lanczos(G, 1, "LA", rtol=1e-6, seed=0).eigenvalues)[0])
    lam = 1e-4 * lmax
    n = G.shape[0]
    b = torch.randn(n, 1, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ref = inverse(G, damping=lam, rtol=1e-12) @ b
    counts: dict[str, int] = {}
    out: dict[str, torch.Tensor] = {}

    def linops_solve(name: str, rhs: torch.Tensor | None = None, **kw: Any) -> Callable[[], Any]:
        def run() -> None:
            op = inverse(G, damping=lam, rtol=RTOL, seed=0, **kw)
            out[name] = op @ (b if rhs is None else rhs)
            pc = op.preconditioner
            counts[name] = op.info.num_matvecs
            counts[name + "_preconditioner"] = getattr(pc, "num_matvecs", 0)

        return run

    def scipy_cg() -> None:
        A = _Counted(G, lam)
        x, info = sla.cg(A, b[:, 0].numpy(), rtol=RTOL, maxiter=20000)
        out["scipy_cg"], counts["scipy_cg"] = torch.as_tensor(x)[:, None], A.count

    cands = {
        "linops_cg": linops_solve("linops_cg"),
        "linops_cg_kfac": linops_solve("linops_cg_kfac", preconditioner="kfac"),
        "linops_cg_nystrom": linops_solve("linops_cg_nystrom", preconditioner="nystrom"),
        "linops_minres": linops_solve("linops_minres", method="minres"),
        "scipy_cg": scipy_cg,
    }
    if curvlinops is not None:
        cinv, damping = _curvlinops_inverse(model, X, y, lam)

        def curv_cg() -> None:
            damping.count = 0
            out["curvlinops_cg"] = cinv @ b
            counts["curvlinops_cg"] = damping.count

        cands["curvlinops_cg"] = curv_cg
    B8 = torch.randn(n, BLOCK, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    ref8 = inverse(G, damping=lam, rtol=1e-12) @ B8
    cands |= {
        f"linops_block_cg_{BLOCK}rhs": linops_solve(f"linops_block_cg_{BLOCK}rhs", rhs=B8),
        f"linops_cg_columns_{BLOCK}rhs": linops_solve(
            f"linops_cg_columns_{BLOCK}rhs", rhs=B8, block=False
        ),
        f"linops_block_cg_nystrom_{BLOCK}rhs": linops_solve(
            f"linops_block_cg_nystrom_{BLOCK}rhs", rhs=B8, preconditioner="nystrom"
        ),
    }
    t, cpu = interleaved(cands, rounds)
    rows = []
    for name, secs in t.items():
        x = out[name]
        rhs, sol = (B8, ref8) if name.endswith("rhs") else (b, ref)
        r = rhs - (G @ x + lam * x)
        rows.append(
            {
                "solver": name,
                "num_matvecs": counts[name],
                "num_matvecs_preconditioner": counts.get(name + "_preconditioner", 0),
                "seconds": secs,
                "seconds_cpu": cpu[name],
                "relative_residual": float((r.norm(dim=0) / rhs.norm(dim=0)).max()),
                "relative_error": float((x - sol).norm() / sol.norm()),
            }
        )
    return {"lambda": lam, "lambda_max": lmax, "num_params": n, "rtol": RTOL, "rows": rows}


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def markdown(prod: dict, sol: dict, meta: dict) -> str:
    lines = [
        "# Curvature products and damped solves (digits MLP, float64)",
        "",
        f"{prod['num_params']} parameters, {prod['num_samples']} samples; "
        f"torch {meta['torch']}, curvlinops {meta['curvlinops']}, {meta['rounds']} rounds, "
        f"{meta['threads']} thread(s), load average {meta['load_average']}.",
        "",
        "CPU milliseconds of this process per product (medians; ``x`` = curvlinops / linops; "
        "wall-clock ms in the JSON):",
        "",
        "| product | linops 1 vec | curvlinops 1 vec | x | linops per vec of 32 "
        "| curvlinops per vec of 32 | x | max rel diff |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def ms(key: str) -> str:
        return f"{1e3 * prod[key]:.3f}" if key in prod else "-"

    def ratio(op: str, k: str) -> str:
        a, b = (
            prod.get(f"seconds_cpu_curvlinops_{op}_{k}"),
            prod.get(f"seconds_cpu_linops_{op}_{k}"),
        )
        return f"{a / b:.2f}" if a and b else "-"

    for op, label in (
        ("ef", "empirical Fisher"), ("fmc", "MC Fisher (1 sample)"), ("kfac", "KFAC (type-2)"),
        ("ekfac", "EKFAC (type-2)"),
    ):  # fmt: skip
        diff = prod.get(f"max_rel_diff_{op}")
        lines.append(
            f"| {label} | {ms(f'seconds_cpu_linops_{op}_1')} "
            f"| {ms(f'seconds_cpu_curvlinops_{op}_1')} | {ratio(op, '1')} "
            f"| {ms(f'seconds_cpu_linops_{op}_32')} | {ms(f'seconds_cpu_curvlinops_{op}_32')} "
            f"| {ratio(op, '32')} | {'-' if diff is None else f'{diff:.1e}'} |"
        )
    nan = float("nan")
    if "seconds_cpu_floor_kfac_1" in prod:
        f1, f32 = prod["seconds_cpu_floor_kfac_1"], prod["seconds_cpu_floor_kfac_32"]
        c1 = prod.get("seconds_cpu_curvlinops_kfac_1", nan)
        c32 = prod.get("seconds_cpu_curvlinops_kfac_32", nan)
        lines += [
            "",
            "KFAC floor (the factors' matrix products alone, preallocated, no bookkeeping): "
            f"{1e3 * f1:.3f} ms for one vector, {1e3 * f32:.3f} ms per vector of 32; "
            f"curvlinops / floor {c1 / f1:.2f} and {c32 / f32:.2f} (the most any "
            f"implementation could gain), linops / floor "
            f"{prod['seconds_cpu_linops_kfac_1'] / f1:.2f} and "
            f"{prod['seconds_cpu_linops_kfac_32'] / f32:.2f}. EKFAC floor per vector of 32: "
            f"{1e3 * prod['seconds_cpu_floor_ekfac_32']:.3f} ms; curvlinops / floor "
            f"{prod.get('seconds_cpu_curvlinops_ekfac_32', nan) / prod['seconds_cpu_floor_ekfac_32']:.2f}, "
            f"linops / floor "
            f"{prod['seconds_cpu_linops_ekfac_32'] / prod['seconds_cpu_floor_ekfac_32']:.2f}.",
        ]
    if "gflops_peak_dgemm" in prod:
        peak = prod["gflops_peak_dgemm"] * 1e9
        bound = []
        for op in ("kfac", "ekfac"):
            t_peak = prod[f"flops_{op}_1"] / peak
            c32 = prod.get(f"seconds_cpu_curvlinops_{op}_32", nan)
            bound.append(
                f"{op.upper()} {1e3 * t_peak:.3f} ms per vector, curvlinops' block of 32 "
                f"{c32 / t_peak:.2f}x that, linops' "
                f"{prod[f'seconds_cpu_linops_{op}_32'] / t_peak:.2f}x"
            )
        cold = [
            f"{op.upper()} linops {1e3 * prod[f'seconds_cpu_cold_linops_{op}_1']:.3f} ms, "
            f"curvlinops {1e3 * prod.get(f'seconds_cpu_cold_curvlinops_{op}_1', nan):.3f} ms "
            f"(x {prod.get(f'seconds_cpu_cold_curvlinops_{op}_1', nan) / prod[f'seconds_cpu_cold_linops_{op}_1']:.2f})"
            for op in ("kfac", "ekfac")
        ]
        lines += [
            "",
            f"Bound from this CPU's matrix-product speed ({prod['gflops_peak_dgemm']:.1f} GFLOP/s, "
            "``torch.mm`` of 1024 x 1024): the products' flops at that speed take "
            + "; ".join(bound)
            + ". A block product 2x faster than curvlinops' needs curvlinops at 2x or more "
            "of this bound.",
            "",
            "One product right after an empirical-Fisher product of 32 vectors (cold caches, "
            "as a preconditioner alternating with its operator runs; medians, CPU): "
            + "; ".join(cold)
            + ".",
        ]
    lines += [
        "",
        "KFAC / EKFAC construction (one pass over the data; EKFAC: both passes), CPU seconds: "
        f"linops {prod['seconds_cpu_linops_kfac_build']:.3f} / "
        f"{prod['seconds_cpu_linops_ekfac_build']:.3f}, curvlinops "
        f"{prod.get('seconds_cpu_curvlinops_kfac_build', nan):.3f} / "
        f"{prod.get('seconds_cpu_curvlinops_ekfac_build', nan):.3f}.",
    ]
    lines += [
        "",
        f"Solves of (G + lambda I) x = b, lambda = 1e-4 lambda_max = {sol['lambda']:.3g}, "
        f"rtol {sol['rtol']:g}, one right-hand side (``*_8rhs``: 8 at once; the residual is "
        "the largest column's); x = the baseline's CPU seconds over this row's:",
        "",
        "| solver | products of G (solve + preconditioner) | CPU s | wall s | x curvlinops_cg "
        "| x scipy_cg | relative residual | relative error |",
        "|---|---|---|---|---|---|---|---|",
    ]
    base = {r["solver"]: r["seconds_cpu"] for r in sol["rows"]}
    for r in sol["rows"]:
        xc = base.get("curvlinops_cg", nan) / r["seconds_cpu"]
        xs = base.get("scipy_cg", nan) / r["seconds_cpu"]
        lines.append(
            f"| {r['solver']} | {r['num_matvecs']} + {r['num_matvecs_preconditioner']} "
            f"| {r['seconds_cpu']:.2f} | {r['seconds']:.2f} | {xc:.2f} | {xs:.2f} "
            f"| {r['relative_residual']:.1e} | {r['relative_error']:.1e} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="256 digits, one round")
    p.add_argument("--repeats", type=int, default=None, help="interleaved timing rounds")
    p.add_argument("--out", type=Path, default=Path("results/curvature"))
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rounds = args.repeats or (1 if args.quick else 3)
    model, X, y = setup(args.quick)
    meta = {
        "torch": torch.__version__,
        "curvlinops": _version("curvlinops-for-pytorch"),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "rounds": rounds,
        "quick": args.quick,
        "command": "python " + " ".join(sys.argv),
    }
    prod = products(model, X, y, rounds)
    sol = solves(model, X, y, rounds)
    table = markdown(prod, sol, meta)
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {"meta": meta, "products": prod, "solves": sol}
    write_text(args.out / "curvature.json", strict_json(payload, indent=2) + "\n")
    write_text(args.out / "curvature.md", table)
    print(table)
    print(f"wrote {args.out / 'curvature.json'} and {args.out / 'curvature.md'}")


if __name__ == "__main__":
    main()
