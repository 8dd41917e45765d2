"""Private helpers shared by the Krylov and randomized routines.

Input normalisation (operator, output kind, generator), checked integers, and block
orthogonalisation against a basis with classical Gram-Schmidt applied twice ("twice is
enough", Giraud et al. 2005) followed by a QR factorisation that replaces numerically
dependent columns by fresh random directions. Also what the eigen- and singular-value solvers
share to make ``converged`` trustworthy: the symmetry probe (:func:`check_symmetric`), the
true-residual verification of Ritz pairs (:class:`Verifier`), the search for missing copies
of repeated values (:func:`completeness`) and ARPACK's restart size (:func:`keep_count`).
"""

from __future__ import annotations

import cmath
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Union

import numpy as np
import torch

from linops._backend import ArrayKind, array_kind, from_torch
from linops._checks import check_int, check_which
from linops._types import Array, ArrayLike, OperatorLike
from linops.base import TorchLinearOperator, aslinearoperator

if TYPE_CHECKING:
    from linops._disk_basis import DiskColumns

#: an orthonormal basis: columns of a tensor, or of a file (out of core)
Basis = Union[torch.Tensor, "DiskColumns"]

__all__ = [
    "Verifier",
    "check_int",
    "check_products",
    "check_symmetric",
    "check_which",
    "cluster_gap",
    "clusters",
    "completeness",
    "holds_zero",
    "keep_count",
    "make_generator",
    "orth_qr",
    "output_kind",
    "prepare",
    "probe_block",
    "random_block",
    "raise_if_not_symmetric",
    "start_block",
    "symmetry_defect",
    "symmetry_tolerance",
    "to_output",
    "trusted_symmetric",
]


def output_kind(A: OperatorLike) -> ArrayKind:
    """Kind of arrays to return: torch for tensors and torch operators, CuPy for CuPy, else numpy."""
    if isinstance(A, TorchLinearOperator):
        return "torch"
    return array_kind(A)


def prepare(A: OperatorLike) -> tuple[TorchLinearOperator, ArrayKind]:
    """Return the operator view of ``A`` and the kind of arrays the caller expects back."""
    return aslinearoperator(A), output_kind(A)


def to_output(t: torch.Tensor, kind: ArrayKind) -> Array:
    """Convert a result tensor to the caller's array kind (once, at the end)."""
    return from_torch(t, kind)


def make_generator(seed: int | torch.Generator | None, device: torch.device) -> torch.Generator:
    """Return a ``torch.Generator`` on ``device`` seeded by ``seed`` (fresh entropy when ``None``)."""
    if isinstance(seed, torch.Generator):
        return seed
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    elif isinstance(seed, int | np.integer) and not isinstance(seed, bool):
        if not -(2**63) <= int(seed) < 2**64:
            raise ValueError(f"seed: expected an integer in [-2**63, 2**64), got {seed!r}")
        gen.manual_seed(int(seed))
    else:
        raise TypeError(f"seed: expected an int, a torch.Generator or None, got {seed!r}")
    return gen


def random_block(n: int, b: int, op: TorchLinearOperator, gen: torch.Generator) -> torch.Tensor:
    """Return a Gaussian ``(n, b)`` block on the operator's device and dtype."""
    return torch.randn(n, b, generator=gen, dtype=op.torch_dtype, device=op.device)


def start_block(
    v0: ArrayLike | None, n: int, b: int, op: TorchLinearOperator, gen: torch.Generator
) -> torch.Tensor:
    """Orthonormal start block: ``v0`` if given (checked), else Gaussian."""
    if v0 is None:
        X = random_block(n, b, op, gen)
    else:
        from linops._backend import to_torch

        X, _ = to_torch(v0, dtype=op.torch_dtype, device=op.device)
        X = X.to(device=op.device, dtype=op.torch_dtype).reshape(X.shape[0], -1)
        if X.shape != (n, b):
            raise ValueError(f"v0: expected shape ({n},) or ({n}, {b}), got {tuple(X.shape)}")
        if not bool(torch.isfinite(X).all()):
            raise ValueError("v0: expected a finite start vector, got NaN or inf")
        if bool((torch.linalg.vector_norm(X, dim=0) == 0).any()):
            raise ValueError("v0: expected a nonzero start vector, got a zero vector")
    Q, _, _ = orth_qr(X, X[:, :0], gen, ref=float(torch.linalg.matrix_norm(X, ord=2)))
    return Q


def _project_twice(W: torch.Tensor, V: Basis) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(V, torch.Tensor):  # a basis on disk: in place, by chunks of rows
        return V.project_twice(W)
    # one new block and no temporary ``V C`` (a vector of a large model is 0.5 GB); W is
    # left unchanged for the caller
    C = V.mH @ W
    W = torch.addmm(W, V, C, alpha=-1)
    D = V.mH @ W
    return W.addmm_(V, D, alpha=-1), C + D


#: rows per chunk of the wide-precision reductions below (64 MB of float64 per 8 columns)
CHUNK_ROWS = 1 << 20


def _wide_dtype(*xs: torch.Tensor) -> torch.dtype:
    return torch.complex128 if any(x.is_complex() for x in xs) else torch.float64


def residual_norms(AY: torch.Tensor, Y: torch.Tensor, vals: torch.Tensor) -> torch.Tensor:
    """Column norms of ``AY - Y diag(vals)`` summed in double precision, by chunks of rows.

    A whole block converted to double would take ``3 n p`` doubles at once (15 GB for five
    Ritz vectors of a 124M-parameter model); chunks keep that to a few MB.
    """
    wide = _wide_dtype(AY, Y, vals)
    v = vals.to(device=Y.device, dtype=wide)
    acc = torch.zeros(Y.shape[1], dtype=torch.float64, device=Y.device)
    for lo in range(0, Y.shape[0], CHUNK_ROWS):
        R = AY[lo : lo + CHUNK_ROWS].to(wide) - Y[lo : lo + CHUNK_ROWS].to(wide) * v
        acc += (R.abs() ** 2).sum(dim=0) if R.is_complex() else (R * R).sum(dim=0)
    return acc.sqrt().to(vals.real.dtype if vals.is_complex() else vals.dtype)


def _wide_dots(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """``x_i^H y_i`` for every column pair in double, by chunks of rows (no n-sized temporary)."""
    wide = _wide_dtype(X, Y)
    acc = torch.zeros(X.shape[1], dtype=wide, device=X.device)
    for lo in range(0, X.shape[0], CHUNK_ROWS):
        acc += (X[lo : lo + CHUNK_ROWS].to(wide).conj() * Y[lo : lo + CHUNK_ROWS].to(wide)).sum(0)
    return acc


def column_dots(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """``x_i^H y_i`` for every column pair, summed in double by chunks of rows (no n-sized temporary)."""
    return _wide_dots(X, Y).to(Y.dtype if Y.is_complex() or not X.is_complex() else X.dtype)


def safe_max_norm(W: torch.Tensor) -> float:
    """Return the largest column norm of ``W``.

    The fast plain norm, or :func:`column_norms` where its squares overflow (a plain norm of
    inf made every column a breakdown).
    """
    top = float(torch.linalg.vector_norm(W, dim=0).max()) if W.numel() else 0.0
    return top if math.isfinite(top) else float(column_norms(W).max())


def column_norms(X: torch.Tensor) -> torch.Tensor:
    r"""Euclidean norm of every column of ``X``, accurate to the dtype's rounding.

    ``torch.linalg.vector_norm(X, dim=0)`` of a float32 block measured 3.5e-5 relative error on
    this CPU (272,000 x 8), the norm of one contiguous vector 6e-7, and a scaled sum of squares
    5.6e-8: Lanczos betas, quadrature weights and residuals use this one. Single and half
    precision are squared and summed in double (no overflow, no underflow, no scaling
    needed); double precision is scaled by each column's largest entry first. Both by chunks
    of :data:`CHUNK_ROWS` rows, so no temporary of ``X``'s size is made (0.5 GB per vector
    of a 124M-parameter model).
    """
    real = X.real.dtype if X.is_complex() else X.dtype
    if X.shape[0] == 0 or X.shape[1] == 0:
        return X.new_zeros(X.shape[1], dtype=real)
    if real != torch.float64:
        return _wide_dots(X, X).real.sqrt().to(real)
    chunks = range(0, X.shape[0], CHUNK_ROWS)
    scale = torch.stack([X[lo : lo + CHUNK_ROWS].abs().amax(dim=0) for lo in chunks]).amax(0)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    acc = torch.zeros(X.shape[1], dtype=real, device=X.device)
    for lo in chunks:
        acc += ((X[lo : lo + CHUNK_ROWS] / safe).abs() ** 2).sum(dim=0)
    return acc.sqrt() * scale


def orth_qr(
    W: torch.Tensor,
    V: Basis,
    gen: torch.Generator,
    ref: float,
    on_breakdown: Callable[[], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Orthonormalise the block ``W`` against the orthonormal basis ``V``.

    ``V`` is a tensor or a basis on disk (:class:`linops._disk_basis.DiskColumns`, which
    projects ``W`` in place: pass a block the caller no longer needs).

    Returns ``(Q, C, R)`` with :math:`W = V C + Q R`, :math:`V^H Q = 0`, :math:`Q^H Q = I`.
    Columns whose remainder is below ``100 eps ref`` are numerically in ``span(V)``; they are
    replaced by random directions orthogonal to ``V`` (with ``R`` recomputed, so the
    relation holds up to that tiny remainder), and ``on_breakdown()`` is called: ``span(V)``
    held the block's image, an exact breakdown of a Krylov iteration. When ``V`` already spans
    the whole space, ``Q`` and ``R`` are zero.
    """
    n, b = W.shape
    W, C = _project_twice(W, V)
    if V.shape[1] + b > n:
        return torch.zeros_like(W), C, torch.zeros(b, b, dtype=W.dtype, device=W.device)
    Q, R = torch.linalg.qr(W)
    eps = torch.finfo(W.dtype).eps
    d = torch.linalg.diagonal(R).abs()
    tiny = 100 * eps * max(ref, safe_max_norm(W))
    if bool((d <= tiny).any()):
        Q = _replace_columns(Q, d <= tiny, V, gen)
        if on_breakdown is not None:
            on_breakdown()
    elif bool((d <= eps**0.5 * ref).any()):
        Q, _ = torch.linalg.qr(_project_twice(Q, V)[0])  # heavy cancellation: a third pass
    else:
        return Q, C, R
    return Q, C, Q.mH @ W


def _replace_columns(
    Q: torch.Tensor, bad: torch.Tensor, V: Basis, gen: torch.Generator
) -> torch.Tensor:
    good = Q[:, ~bad]
    X = torch.randn(Q.shape[0], int(bad.sum()), generator=gen, dtype=Q.dtype, device=Q.device)
    for _ in range(2):
        if isinstance(V, torch.Tensor):
            X = _project_twice(X, torch.cat([V, good], dim=1))[0]
        else:  # good is orthogonal to V: one after the other is the same projection
            X = _project_twice(_project_twice(X, V)[0], good)[0]
        X, _ = torch.linalg.qr(X)
    Q = Q.clone()
    Q[:, bad] = X
    return Q


def check_products(W: torch.Tensor, count: int) -> None:
    """Raise FloatingPointError if the operator returned NaN or inf.

    A sum first (one pass, a Python scalar): only a non-finite sum runs the elementwise test,
    so this check in every Lanczos/Krylov iteration costs one reduction, not two kernels.
    """
    if W.numel() and cmath.isfinite(W.sum().item()):
        return
    if not bool(torch.isfinite(W).all()):
        raise FloatingPointError(
            f"the operator returned NaN or inf at product {count}; check the operator "
            "(and its data) for overflow or invalid values"
        )


SYMMETRY_PROBES = 3
"""Random vectors of the symmetry probe (three independent pairs for three products)."""


def symmetry_tolerance(dtype: torch.dtype) -> float:
    """Largest relative asymmetry :func:`check_symmetric` accepts: ``eps^(1/3)`` of ``dtype``.

    That is 4.9e-3 in float32 and 6.1e-6 in float64: far above the roundoff of products of a
    symmetric operator (dense, autodiff or finite-difference Hessians), far below the
    asymmetry of a generic non-symmetric matrix (order one).
    """
    return float(torch.finfo(dtype).eps) ** (1 / 3)


def symmetry_defect(Z: torch.Tensor, AZ: torch.Tensor) -> float:
    r"""Relative asymmetry seen by the probe ``Z`` (``n x p``) and its image ``AZ = A Z``.

    With :math:`M = Z^H A Z`, entry :math:`(i, j)` of :math:`M - M^H` is
    :math:`\langle A z_j, z_i\rangle - \langle z_j, A z_i\rangle = z_i^H (A - A^H) z_j`. For
    Gaussian probes its size is about :math:`\|A - A^H\|_F`, while the scale both inner
    products are computed to, :math:`\|A z_j\|\|z_i\| + \|z_j\|\|A z_i\|`, is about
    :math:`2\sqrt{n}\|A\|_F`; so

    .. math:: r = \max_{i,j} \frac{\sqrt{n}\,|(M - M^H)_{ij}|}
                 {\|A z_j\|\|z_i\| + \|z_j\|\|A z_i\|}

    estimates the relative skew part :math:`\|A - A^H\|_F / (2\|A\|_F)`, independent of
    ``n`` and of the scaling of ``A``, while the roundoff of a symmetric operator's products
    contributes only their relative error. Columns with a zero image are skipped.
    """
    n = Z.shape[0]
    wide = _wide_dtype(Z, AZ)
    p = Z.shape[1]
    M = torch.zeros(p, p, dtype=wide, device=Z.device)
    zn2 = torch.zeros(p, dtype=torch.float64, device=Z.device)
    an2 = torch.zeros(p, dtype=torch.float64, device=Z.device)
    for lo in range(0, n, CHUNK_ROWS):  # in double, by chunks of rows (not 2 n p doubles)
        Z64, AZ64 = Z[lo : lo + CHUNK_ROWS].to(wide), AZ[lo : lo + CHUNK_ROWS].to(wide)
        M += Z64.mH @ AZ64
        zn2 += (Z64.abs() ** 2).sum(dim=0)
        an2 += (AZ64.abs() ** 2).sum(dim=0)
    zn, an = zn2.sqrt(), an2.sqrt()
    scale = zn[:, None] * an[None, :] + an[:, None] * zn[None, :]
    defect = (M - M.mH).abs() * n**0.5
    ok = scale > 0
    if not bool(ok.any()):
        return 0.0
    return float((defect[ok] / scale[ok]).max())


def raise_if_not_symmetric(Z: torch.Tensor, AZ: torch.Tensor, name: str = "A") -> None:
    """Raise ValueError when the probe shows ``A`` is not symmetric (Hermitian)."""
    r, tol = symmetry_defect(Z, AZ), symmetry_tolerance(Z.dtype)
    if r > tol:
        raise ValueError(
            f"{name}: expected a symmetric (Hermitian) operator, got <A x, y> != <x, A y> "
            f"for random x, y (relative asymmetry {r:.2g} > {tol:.2g}); use svds for a "
            "non-symmetric operator, or symmetrise it, e.g. (A + A^H) / 2"
        )


def trusted_symmetric(op: TorchLinearOperator) -> bool:
    """Whether ``op`` is symmetric by construction, so no probe checks it (``is_symmetric``).

    linops' Hessian, GGN, Fisher and KFAC operators, identities, sums and scalings of
    symmetric operators, or an operator a user marked; every symmetry probe asks this.
    """
    return bool(op.is_symmetric)


def check_symmetric(op: TorchLinearOperator, name: str = "A") -> int:
    r"""Check once, with a random probe, that ``op`` is symmetric; return the products used.

    An operator that declares ``is_symmetric`` (linops' Hessian, GGN, Fisher and KFAC
    operators, identities, sums and scalings of symmetric operators, or one a user marked) is
    symmetric by construction, up to the rounding of its products: it is trusted and costs no
    product (0 is returned). Any other operator: draws :data:`SYMMETRY_PROBES` Gaussian vectors from a generator of its own (fixed seed,
    so the caller's random stream, and hence its results, are unchanged, and every rank of a
    distributed operator draws the same probe), applies ``op`` to them in one block product
    and compares :math:`\langle A x, y\rangle` with :math:`\langle x, A y\rangle` for every
    pair (:func:`symmetry_defect`).

    Raises
    ------
    ValueError
        If the relative asymmetry exceeds :func:`symmetry_tolerance`.
    FloatingPointError
        If the operator returns NaN or inf.
    """
    if trusted_symmetric(op):
        return 0
    Z = probe_block(op, SYMMETRY_PROBES)
    AZ = op._apply(Z)
    check_products(AZ, SYMMETRY_PROBES)
    raise_if_not_symmetric(Z, AZ, name)
    return SYMMETRY_PROBES


def probe_block(op: TorchLinearOperator, count: int) -> torch.Tensor:
    """``count`` Gaussian probe vectors from the fixed-seed generator of :func:`check_symmetric`."""
    gen = torch.Generator(device=op.device)
    gen.manual_seed(0x5E11)
    return random_block(op.shape[0], count, op, gen)


def clusters(values: torch.Tensor, gap: float) -> bool:
    """Whether two of ``values`` (1-d, any order) lie within ``gap`` of each other."""
    if values.numel() < 2:
        return False
    v = torch.sort(values.reshape(-1)).values
    return bool((torch.diff(v) <= gap).any())


def keep_count(k: int, nconv: int, ncv: int, b: int) -> int:
    """Ritz vectors kept at a thick restart: ``k + min(nconv, (ncv - k) / 2)``.

    ARPACK's rule (``dsaup2``: ``nev + min(nconv, np / 2)``): as more wanted pairs converge,
    more Ritz vectors are kept, which keeps the unconverged ones from stagnating; at least
    two are kept and room is left for one new block.
    """
    keep = k + min(nconv, (ncv - k) // 2)
    return max(min(keep, ncv - b), min(2, ncv - b), 1)


class Verifier:
    r"""When to recompute true residuals, and what they say (shared by Lanczos and svds).

    The Ritz residual estimates of a Krylov method (``||R E^H s||``) are exact only in exact
    arithmetic: in floating point they keep falling while the true residuals
    :math:`\|A v - \theta v\|` stall at the precision floor (a few ``eps ||A||``). So
    convergence is never declared from the estimates: once they are below ``tol ||A||`` the
    caller recomputes the true residuals with one block product (:meth:`judge`), and

    * true residuals ``<= tol ||A||``: converged;
    * true residuals above ``tol ||A||`` and more than 4 times the estimates: the estimates no
      longer describe the true residuals, which are at the precision floor, so ``tol`` is out
      of reach (``"floor"``; the caller raises, naming the tolerance the dtype reaches);
    * otherwise the estimates were optimistic: iterate until they fall 10 times lower.

    When ``tol`` is below ``eps`` the first check comes at ``eps`` already, and
    estimates that stop falling near the floor (no halving in ``window`` restarts, window
    doubling after each such check) trigger a check too, so an unreachable tolerance is
    detected after a small multiple of the products a reachable one needs.
    """

    def __init__(self, tol: float, dtype: torch.dtype) -> None:
        self.tol, self.eps = tol, float(torch.finfo(dtype).eps)
        self.level = max(tol, self.eps)
        self.best, self.since, self.window = float("inf"), 0, 3
        self.defer_from: int | None = None

    def defer(
        self, res_max: float, rounding_max: float, est_max: float, anorm: float, nmv: int, cost: int
    ) -> bool:
        """Whether to iterate on instead of taking the check's block product (``cost`` products).

        When residuals recombined from the products already taken miss ``tol ||A||`` only
        because of their rounding bound (the bound alone leaves at least half the tolerance,
        and the residuals still follow the estimates, ``res <= 2 est``), a few more steps
        bring them under ``tol ||A||`` minus the bound for fewer products than the check: the
        next check waits for estimates below half that room. At most ``cost / 2`` products
        are spent so before the block product is taken after all.
        """
        room = self.tol * anorm - rounding_max
        if self.defer_from is None:
            self.defer_from = nmv
        if nmv - self.defer_from >= max(cost // 2, 1) or room < self.tol * anorm / 2:
            return False
        if res_max > 2 * est_max:
            return False
        self.level = min(self.level, room / 2 / max(anorm, float.fromhex("0x1p-1000")))
        return True

    def due(self, est_max: float, anorm: float) -> bool:
        """Whether the estimates ask for a true-residual check."""
        return est_max <= self.level * anorm

    def stalled(self, est_max: float, anorm: float) -> bool:
        """Check at each restart whether estimates stuck near the floor ask for a check."""
        if est_max < self.best / 2:
            self.best, self.since = est_max, 0
            return False
        self.since += 1
        if self.since >= self.window and est_max <= 1e3 * self.eps * anorm:
            self.since, self.window = 0, 2 * self.window
            return True
        return False

    def judge(self, true_max: float, est_max: float, anorm: float) -> str:
        """``"converged"``, ``"floor"`` or ``"continue"`` (see the class docstring)."""
        if true_max <= self.tol * anorm:
            return "converged"
        if true_max > 4 * est_max:
            return "floor"
        self.level = est_max / max(anorm, float.fromhex("0x1p-1000")) / 10
        return "continue"

    def floor_message(
        self, name: str, dtype: torch.dtype, true_max: float, est_max: float, anorm: float, nmv: int
    ) -> str:
        """Return the error message of an unreachable tolerance, with the tolerance that is reachable."""
        rel = true_max / anorm if anorm > 0 else true_max
        reach = 10.0 ** math.ceil(math.log10(2 * rel)) if rel > 0 else self.eps
        return (
            f"{name}: rtol={self.tol:.3g} is below what {dtype} reaches for this operator: "
            f"after {nmv} products the true residuals stagnate at {rel:.2g} ||A|| (the Krylov "
            f"estimates say {est_max / anorm:.2g} ||A||); use rtol >= {reach:.0e}, or a wider "
            "dtype"
        )


def cluster_gap(tol: float, anorm: float, dtype: torch.dtype) -> float:
    """Return ``max(tol, sqrt(eps)) ||A||``: values closer than this are copies of one value."""
    return max(tol, float(torch.finfo(dtype).eps) ** 0.5) * anorm


def holds_zero(vals: torch.Tensor, tol: float, anorm: float, dtype: torch.dtype) -> bool:
    """Whether the smallest of ``vals`` in magnitude is 0 to :func:`cluster_gap` (a null space)."""
    return float(vals.abs().min()) <= cluster_gap(tol, anorm, dtype)


def completeness(
    vals: torch.Tensor,
    locked: torch.Tensor | None,
    tol: float,
    anorm: float,
    dtype: torch.dtype,
    rounds: int,
    k: int,
    room: bool,
    broke: bool = False,
    smallest: bool = False,
) -> str:
    """After verified convergence: ``"done"``, ``"inject"`` (one more round) or an error text.

    A single-vector Krylov space holds one direction of each eigenspace (in exact
    arithmetic), so copies of a repeated value are found only through rounding, and some may
    be missing. When the ``k`` verified values contain a cluster (two within
    ``max(tol, sqrt(eps)) ||A||``), the caller locks them and restarts from a fresh random
    vector orthogonal to them (``"inject"``), asking for ``k + 1`` pairs; a round that
    changes the wanted values (``locked`` is the previous round's) found a missing copy and
    asks for another round; a round that changes nothing ends the search (``"done"``).
    ``broke``: the Krylov space became invariant (an exact breakdown: the start vector had no
    component along the other eigenvectors, e.g. copies of a value repeated exactly). Its
    converged Ritz values are then eigenvalues but not necessarily the wanted ones, so the
    first round is searched like a cluster. ``smallest``: the wanted values are the
    smallest two or more; if the least is 0 to ``max(tol, sqrt(eps)) ||A||`` (the null space
    of a PSD curvature, a GGN with more parameters than outputs, whose copies one start
    vector sees once), it is searched likewise (``lanczos(G, 4, "SA")`` returned one 0 and
    the next three values, all verified).
    """
    gap = cluster_gap(tol, anorm, dtype)
    zero = smallest and holds_zero(vals, tol, anorm, dtype)
    if locked is not None:
        if bool(((vals.detach().cpu().to(locked) - locked).abs() <= tol * anorm).all()):
            return "done"
    elif not (broke or zero) and not clusters(vals, gap):
        return "done"
    if not room and broke and locked is None:
        return (
            f"the Krylov space became invariant before the {k} wanted values were certified "
            f"(an exact breakdown), and a search of its complement needs room for k + 1 = "
            f"{k + 1} vectors plus a block in the basis; raise ncv"
        )
    if not room and zero and locked is None:
        return (
            f"the wanted end holds the value 0 (a null space), and a search for its missing "
            f"copies needs room for k + 1 = {k + 1} vectors plus a block in the basis; raise "
            "ncv or use block_size >= its multiplicity"
        )
    if not room:
        return (
            f"the {k} wanted values contain repeated values, and a search for missing copies "
            f"needs room for k + 1 = {k + 1} vectors plus a block in the basis; raise ncv or "
            "use block_size >= the multiplicity"
        )
    if rounds > k:
        return (
            f"the {k} wanted values contain repeated values, and {rounds} searches for "
            "missing copies each found another one; use block_size >= the multiplicity"
        )
    return "inject"
