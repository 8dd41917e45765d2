r"""Bulk / chaotic / stable analysis of a training Jacobian (seed 004, sections 3.1-3.6).

For a training run :math:`\theta_T = f(\theta_0)` with training Jacobian
:math:`J = U \operatorname{diag}(\sigma) V^\top` (:class:`linops.TrainingJacobianOperator`):

* section 3.1: the singular spectrum splits into a *chaotic* region (:math:`\sigma \gg 1`), a
  *bulk* (:math:`|\sigma - 1|` tiny) and a *stable* region (:math:`\sigma < 1`); in the bulk the
  left and right singular vectors nearly coincide (:func:`left_right_cosine`);
* section 3.2: training is linear along bulk directions over many orders of magnitude
  (:func:`linearity_test`);
* section 3.3: moving the final parameters along bulk directions barely changes in-distribution
  predictions, but does change them far out of distribution (:func:`kl_perturbation`);
* section 3.4: the approximate nullspace of the parameter-function Jacobian overlaps the bulk
  (:func:`parameter_function_jacobian`, :func:`bulk_overlap`);
* section 3.5: bulks of different seeds / shuffled labels overlap (:func:`bulk_overlap`
  against :func:`random_subspace_similarity`);
* section 2: the dimension of training, :math:`\operatorname{rank}(J - I)`, estimated
  matrix-free (:func:`training_dimension`).

Dense routines take the dense :math:`J` (4810 x 4810 for the paper's MLP); matrix-free ones take
the operator and never form it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.func import functional_call

from linops.base import IdentityOperator, TorchLinearOperator, aslinearoperator

__all__ = [
    "DimensionResult",
    "LinearityResult",
    "RegionCounts",
    "TrainingJacobianSVD",
    "bulk_order",
    "bulk_overlap",
    "kl_perturbation",
    "left_right_cosine",
    "linearity_test",
    "ood_inputs",
    "parameter_function_jacobian",
    "plot_training_jacobian_report",
    "random_subspace_similarity",
    "region_table",
    "spectral_regions",
    "svd_training_jacobian",
    "top_singular_values",
    "training_dimension",
    "training_dimension_dense",
    "training_jacobian_report",
]

Tensor = torch.Tensor


# --------------------------------------------------------------------------- section 3.1
class TrainingJacobianSVD(NamedTuple):
    """Dense SVD :math:`J = U \\operatorname{diag}(\\sigma) V^\\top`, :math:`\\sigma` descending,
    and the cosine :math:`u_i^\\top v_i` of each pair."""

    singular_values: Tensor
    left: Tensor
    right: Tensor
    cosine: Tensor


def svd_training_jacobian(J: Tensor) -> TrainingJacobianSVD:
    r"""Full SVD of a dense training Jacobian, in float64 (seed 004, section 3.1).

    Parameters
    ----------
    J
        Dense ``(m, m)`` training Jacobian (e.g. ``TrainingJacobianOperator.to_dense()``).

    Returns
    -------
    TrainingJacobianSVD
        Singular values descending, ``U`` and ``V`` with singular vectors as columns, and
        :math:`\cos_i = u_i^\top v_i` (the sign of a pair is fixed jointly, so it is meaningful).

    Raises
    ------
    ValueError
        If ``J`` is not a square 2-d tensor or array.

    Examples
    --------
    >>> import torch
    >>> res = svd_training_jacobian(torch.diag(torch.tensor([3.0, 1.0, 0.5])))
    >>> res.singular_values.tolist(), res.cosine.tolist()
    ([3.0, 1.0, 0.5], [1.0, 1.0, 1.0])
    """
    J = _square(J, "J").to(torch.float64)
    U, s, Vh = torch.linalg.svd(J)
    V = Vh.T
    return TrainingJacobianSVD(s, U, V, left_right_cosine(U, V))


def left_right_cosine(U: Tensor, V: Tensor) -> Tensor:
    r"""Cosine :math:`u_i^\top v_i / (\|u_i\| \|v_i\|)` of corresponding singular vectors (figure 1b)."""
    U, V = torch.as_tensor(U), torch.as_tensor(V)
    if U.shape != V.shape or U.ndim != 2:
        raise ValueError(
            f"U, V: expected two matrices of the same shape, got {tuple(U.shape)} and {tuple(V.shape)}"
        )
    return (U * V).sum(0) / (U.norm(dim=0) * V.norm(dim=0)).clamp_min(torch.finfo(U.dtype).tiny)


class RegionCounts(NamedTuple):
    """Numbers of singular values in each region and the thresholds that define them."""

    chaotic: int
    bulk: int
    stable: int
    other: int
    chaotic_threshold: float
    bulk_tol: float
    stable_threshold: float


def spectral_regions(
    sigma: Any,
    *,
    chaotic_threshold: float = 1.1,
    bulk_tol: float = 1e-3,
    stable_threshold: float = 0.9,
) -> RegionCounts:
    r"""Split a training-Jacobian spectrum into chaotic, bulk and stable regions (section 3.1).

    chaotic: :math:`\sigma > \text{chaotic\_threshold}`; bulk:
    :math:`|\sigma - 1| \le \text{bulk\_tol}`; stable: :math:`\sigma < \text{stable\_threshold}`;
    the rest is ``other`` (between the regions).

    Raises
    ------
    ValueError
        If the thresholds are not ordered
        ``stable_threshold <= 1 - bulk_tol <= 1 + bulk_tol <= chaotic_threshold``.

    Examples
    --------
    >>> spectral_regions([50.0, 1.5, 1.0 + 1e-5, 1.0, 0.999999, 0.95, 0.2])[:4]
    (2, 3, 1, 1)
    """
    s = _as_1d(sigma)
    if not (
        0 <= bulk_tol and stable_threshold <= 1 - bulk_tol and 1 + bulk_tol <= chaotic_threshold
    ):
        raise ValueError(
            "thresholds: expected stable_threshold <= 1 - bulk_tol <= 1 + bulk_tol <= "
            f"chaotic_threshold, got {stable_threshold}, {bulk_tol}, {chaotic_threshold}"
        )
    chaotic = int((s > chaotic_threshold).sum())
    bulk = int(((s - 1).abs() <= bulk_tol).sum())
    stable = int((s < stable_threshold).sum())
    return RegionCounts(
        chaotic,
        bulk,
        stable,
        len(s) - chaotic - bulk - stable,
        chaotic_threshold,
        bulk_tol,
        stable_threshold,
    )


def region_table(
    sigma: Any, tols: Sequence[float] = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5)
) -> list[dict[str, float]]:
    r"""Region counts at several thresholds :math:`\tau`: chaotic :math:`\sigma > 1 + \tau`,
    bulk :math:`|\sigma - 1| \le \tau`, stable :math:`\sigma < 1 - \tau` (one row per :math:`\tau`).

    Examples
    --------
    >>> region_table([3.0, 1.0, 0.5], tols=[0.1])
    [{'tol': 0.1, 'chaotic': 1, 'bulk': 1, 'stable': 1}]
    """
    s = _as_1d(sigma)
    return [
        {
            "tol": float(t),
            "chaotic": int((s > 1 + t).sum()),
            "bulk": int(((s - 1).abs() <= t).sum()),
            "stable": int((s < 1 - t).sum()),
        }
        for t in tols
    ]


def bulk_order(sigma: Any) -> Tensor:
    r"""Indices sorting the singular values by :math:`|\sigma_i - 1|` ascending ("bulk at k" = first k)."""
    return torch.argsort((_as_1d(sigma) - 1).abs(), stable=True)


def top_singular_values(op: Any, k: int, *, seed: int = 0, **kw: Any) -> Any:
    """Top-``k`` singular triplets of a training Jacobian matrix-free (:func:`linops.svds`).

    Each Golub-Kahan step costs one forward (JVP) and one reverse (VJP) pass through training.
    """
    from linops import svds

    return svds(op, k, seed=seed, **kw)


# --------------------------------------------------------------------------- section 3.2
class LinearityResult(NamedTuple):
    r"""Responses to :math:`\theta_0 + \lambda v_i`: ``response`` :math:`= u_i^\top \delta`,
    ``orthogonal`` :math:`= \|\delta - u_i u_i^\top\delta\|`, ``predicted`` :math:`= \lambda\sigma_i`."""

    stimulus: np.ndarray
    response: np.ndarray
    orthogonal: np.ndarray
    predicted: np.ndarray


def linearity_test(
    run: Any,
    theta0: Tensor,
    u: Tensor,
    v: Tensor,
    sigma: float,
    stimuli: Sequence[float] | None = None,
    *,
    final: Tensor | None = None,
) -> LinearityResult:
    r"""How linear is training along one singular direction? (seed 004, section 3.2, figure 2)

    For each stimulus size :math:`\lambda` (default a log grid from :math:`10^{-3}` to
    :math:`10^3`), retrain from :math:`\theta_0 + \lambda v` and record
    :math:`\delta = f(\theta_0 + \lambda v) - f(\theta_0)`, its projection on :math:`u` (the
    linear prediction is :math:`\lambda\sigma`) and the norm of its component orthogonal to
    :math:`u` (zero if training is linear).

    Parameters
    ----------
    run
        The :class:`trainers.functional.TrainingRun`.
    theta0
        Initial parameters.
    u, v
        Left and right singular vectors (unit norm) of singular value ``sigma``.
    sigma
        The singular value.
    stimuli
        Stimulus sizes :math:`\lambda`.
    final
        :math:`f(\theta_0)` if already known.
    """
    lams = np.logspace(-3, 3, 13) if stimuli is None else np.asarray(stimuli, dtype=float)
    base = run.final(theta0) if final is None else final
    u, v = u.to(theta0.dtype), v.to(theta0.dtype)
    resp, orth = [], []
    for lam in lams:
        delta = run.final(theta0 + float(lam) * v) - base
        p = float(u @ delta)
        resp.append(p)
        orth.append(float((delta - p * u).norm()))
    return LinearityResult(lams, np.asarray(resp), np.asarray(orth), lams * float(sigma))


# --------------------------------------------------------------------------- section 3.3
def ood_inputs(X: Tensor, *, seed: int = 0) -> dict[str, Tensor]:
    """Test inputs and the two far-out-of-distribution sets of section 3.3.

    ``"test"``: ``X``; ``"inverted"``: ``1 - X`` (pixels inverted, inputs in [0, 1]);
    ``"noise"``: uniform white noise of the same shape.
    """
    g = torch.Generator().manual_seed(seed)
    noise = torch.rand(X.shape, generator=g, dtype=torch.float64).to(X.dtype)
    return {"test": X, "inverted": 1.0 - X, "noise": noise}


def kl_perturbation(
    space: Any,
    theta: Tensor,
    directions: Tensor,
    X: Tensor,
    *,
    scale: float = 1.0,
    batch_size: int = 64,
) -> Tensor:
    r"""Mean KL divergence caused by moving the parameters along each direction (eq. 2).

    .. math:: \mathrm{KL}_i = \mathbb{E}_x\big[D_{\mathrm{KL}}\big(g(x;\theta)\,\|\,g(x;\theta + s\,d_i)\big)\big]

    with :math:`g` the softmax output, :math:`s` = ``scale`` and :math:`d_i` the columns of
    ``directions`` (singular vectors of :math:`J`; seed 004 perturbs the *final* parameters).

    Parameters
    ----------
    space
        A :class:`linops.ParamSpace` (``run.space``).
    theta
        Parameters :math:`\theta` (flat, ``(m,)``).
    directions
        ``(m, k)`` directions.
    X
        Inputs.
    scale
        Step length :math:`s`.
    batch_size
        Directions evaluated per batched forward pass.

    Returns
    -------
    Tensor
        ``(k,)`` mean KL divergences.
    """
    if directions.ndim != 2 or directions.shape[0] != theta.shape[0]:
        raise ValueError(
            f"directions: expected shape ({theta.shape[0]}, k), got {tuple(directions.shape)}"
        )
    model = space.model

    def logp(th: Tensor) -> Tensor:
        return torch.log_softmax(functional_call(model, space.unflatten(th), (X,)), -1)

    with torch.no_grad():
        p0 = logp(theta)
        out = []
        for i in range(0, directions.shape[1], batch_size):
            D = directions[:, i : i + batch_size].to(theta.dtype)
            lq = torch.vmap(logp)((theta[:, None] + scale * D).T)
            kl = (p0.exp() * (p0 - lq)).sum(-1).mean(-1)
            out.append(kl)
    return torch.cat(out)


# --------------------------------------------------------------------------- section 3.4
def parameter_function_jacobian(space: Any, theta: Tensor, X: Tensor, *, chunk: int = 64) -> Tensor:
    r"""Dense parameter-function Jacobian :math:`\partial \log g(X;\theta) / \partial\theta` (section 3.4).

    Rows are (example, class) pairs of the log-probabilities on ``X``; shape ``(N C, m)``.
    """

    def logp(th: Tensor, xb: Tensor) -> Tensor:
        return torch.log_softmax(
            functional_call(space.model, space.unflatten(th), (xb,)), -1
        ).reshape(-1)

    rows = [torch.func.jacrev(logp)(theta, X[i : i + chunk]) for i in range(0, len(X), chunk)]
    return torch.cat(rows).detach()


def bulk_overlap(A: Tensor, B: Tensor, ks: Sequence[int]) -> np.ndarray:
    r"""Mean cosine of the principal angles between ``span(A[:, :k])`` and ``span(B[:, :k])``.

    With columns sorted by :func:`bulk_order` (or by ascending PFJ singular value) this is the
    "bulk at k" similarity of seed 004 sections 3.4-3.5 (:func:`linops.subspace_similarity`).
    """
    from linops import subspace_similarity_curve

    return subspace_similarity_curve(A, B, ks)


def random_subspace_similarity(A: Tensor, ks: Sequence[int], *, seed: int = 0) -> np.ndarray:
    """Baseline of :func:`bulk_overlap`: ``span(A[:, :k])`` against a Gaussian random k-subspace."""
    from linops import subspace_similarity_curve

    g = torch.Generator().manual_seed(seed)
    R = torch.randn(A.shape[0], max(ks), generator=g, dtype=torch.float64)
    return subspace_similarity_curve(A, R, ks)


# --------------------------------------------------------------------------- dimension of training
class DimensionResult(NamedTuple):
    r"""Estimated :math:`\operatorname{rank}(J - I)` and what it cost.

    ``rank``: the estimate; ``num_products``: products with :math:`J` (forward plus reverse
    passes through training); ``basis_size``: columns of the range-finder basis;
    ``error_estimate``: its bound on :math:`\|(I - QQ^\top)(J - I)\|`; ``singular_values``: the
    singular values of :math:`J - I` seen on the basis (descending)."""

    rank: int
    num_products: int
    basis_size: int
    error_estimate: float
    singular_values: Tensor


def training_dimension_dense(J: Tensor, threshold: float) -> int:
    r"""Dense count :math:`\#\{i : \sigma_i(J - I) > \text{threshold}\}` (seed 004, section 2)."""
    J = _square(J, "J").to(torch.float64)
    s = torch.linalg.svdvals(J - torch.eye(J.shape[0], dtype=J.dtype))
    return int((s > threshold).sum())


def training_dimension(
    op: Any,
    threshold: float | Sequence[float],
    *,
    max_products: int | None = None,
    method: str = "krylov",
    block_size: int | None = None,
    seed: int = 0,
) -> DimensionResult:
    r"""Matrix-free :math:`\operatorname{rank}(J - I)` at an absolute threshold (seed 004, section 2).

    :math:`\#\{i : \sigma_i(J - I) > \tau\}` is counted on a projection of :math:`A = J - I`
    built from at most ``max_products`` products with :math:`J` (forward and reverse passes
    through training together); :math:`J` is never formed.

    * ``method="krylov"`` (default): randomized block Krylov SVD (:func:`linops.randomized_svd`,
      block Golub-Kahan, Musco & Musco 2015), the singular values of the projected
      bidiagonal matrix are counted: a deterministic lower bound, exact once the basis captures
      every direction above :math:`\tau` (a gap, or an exactly low-rank :math:`J - I`);
    * ``method="deflated"``: Krylov-deflated stochastic Lanczos quadrature
      (:func:`estimators.counting.singular_value_count`): the Ritz values above :math:`\tau`
      of a block Krylov basis are counted and the rest is estimated by SLQ on the
      Schur complement of :math:`(J - I)^\top (J - I)` on that basis's complement (an exact
      split), with a standard error (``error_estimate``); for spectra without a gap at
      thresholds on the scale of the spectrum (seed 004's); a threshold far below the
      quadrature's resolution (say :math:`\tau^2 < 10^{-6} \|A\|^2`) is counted too high;
    * ``method="range_finder"``: the adaptive randomized range finder
      (:func:`linops.range_finder`, Halko, Martinsson & Tropp 2011, Algorithm 4.2) grows
      :math:`Q` until its bound on :math:`\|(I - QQ^\top)A\|` is below :math:`\tau` or half the
      budget is used, then the singular values of :math:`Q^\top A` (one reverse pass per column)
      are counted.

    Parameters
    ----------
    op
        The training Jacobian as an operator (``linops.TrainingJacobianOperator``) or any
        square operator / dense matrix.
    threshold
        Absolute threshold :math:`\tau` (or several; the rank is reported for the first and the
        singular values for all).
    max_products
        Budget of products with :math:`J` (default ``m // 2``, half of a dense computation).
    method
        ``"deflated"``, ``"krylov"`` or ``"range_finder"``.
    block_size
        Vectors per block (default 16 for ``"deflated"``, 64 otherwise).
    seed
        Seed of the Gaussian test vectors.

    Returns
    -------
    DimensionResult
        With ``"deflated"``: ``rank`` is the rounded estimate, ``basis_size`` the columns of
        the Krylov basis, ``error_estimate`` the standard error of the count and
        ``singular_values`` the Ritz values; the rank is for the first threshold (call
        :func:`estimators.counting.singular_value_count` on ``op - I`` for all of them from
        one run).

    Notes
    -----
    Projection methods count exactly once every direction with :math:`\sigma_i > \tau` is
    captured, which needs a gap in the spectrum of :math:`J - I` near :math:`\tau`. On seed 004's
    MLP the singular values of :math:`J - I` below 1 are spread over many decades without a gap
    (about 1200 per decade): with ``m / 2`` products ``"krylov"`` resolves thresholds at or above
    2 and undercounts at 1 by 7%, where ``"deflated"`` is unbiased with a standard error of about
    0.5% (``bench/training_jacobian.py``, ``examples/training_jacobian.md``).
    """
    from linops import randomized_svd, range_finder

    A = _shifted(op)
    m = A.shape[0]
    taus = (
        [float(threshold)] if isinstance(threshold, int | float) else [float(t) for t in threshold]
    )
    budget = m // 2 if max_products is None else int(max_products)
    if budget < 2:
        raise ValueError(f"max_products: expected at least 2, got {max_products!r}")
    if method not in ("deflated", "krylov", "range_finder"):
        raise ValueError(f"method: expected 'deflated', 'krylov' or 'range_finder', got {method!r}")
    products0 = getattr(op, "num_products", None)
    if block_size is None:
        block_size = 16 if method == "deflated" else 64
    if method == "deflated":
        from estimators.counting import singular_value_count

        c = singular_value_count(A, taus[0], budget, block_size=block_size, seed=seed)
        used = c.num_products if products0 is None else op.num_products - products0
        count, se = float(c.counts[0]), float(c.stderrs[0])
        return DimensionResult(round(count), int(used), c.basis_size, se, c.ritz_values)
    if method == "krylov":
        k = min(budget // 2, m)
        b = min(block_size, k)
        res = randomized_svd(A, k, oversample=0, power_iters=0, block_size=b, seed=seed)
        s, size, err, used = torch.as_tensor(res.singular_values), k, float("nan"), res.num_matvecs
    else:
        rf = range_finder(
            A, tol=taus[0], block_size=block_size, max_rank=min(budget // 2, m), seed=seed
        )
        Q = torch.as_tensor(rf.basis).to(A.torch_dtype)
        s = torch.linalg.svdvals(A._apply(Q, adjoint=True).T.to(torch.float64))
        size, err, used = Q.shape[1], float(rf.error_estimate), rf.num_matvecs + Q.shape[1]
    if products0 is not None:
        used = op.num_products - products0
    s = s.to(torch.float64)
    return DimensionResult(int((s > taus[0]).sum()), int(used), size, err, s)


def _shifted(op: Any) -> TorchLinearOperator:
    A = aslinearoperator(op)
    if A.shape[0] != A.shape[1]:
        raise ValueError(f"op: expected a square operator, got shape {A.shape}")
    return A - IdentityOperator(A.shape[0], dtype=A.torch_dtype, device=A.device)


# --------------------------------------------------------------------------- helpers
def _as_1d(sigma: Any) -> Tensor:
    s = torch.as_tensor(np.asarray(sigma) if not isinstance(sigma, Tensor) else sigma).to(
        torch.float64
    )
    if s.ndim != 1:
        raise ValueError(
            f"sigma: expected a 1-d array of singular values, got shape {tuple(s.shape)}"
        )
    return s


def _square(J: Any, name: str) -> Tensor:
    J = torch.as_tensor(J)
    if J.ndim != 2 or J.shape[0] != J.shape[1]:
        raise ValueError(f"{name}: expected a square matrix, got shape {tuple(J.shape)}")
    return J


# --------------------------------------------------------------------------- report
def training_jacobian_report(quick: bool = True, *, workers: int = 1) -> dict[str, Any]:
    r"""A small training-Jacobian study for ``linops report``: JSON-ready numbers.

    ``quick=True``: seed 004's setup shrunk to a hidden width of 16 and 2 epochs (1210
    parameters, 50 steps; a few seconds). ``quick=False``: the full 4810-parameter, 625-step
    run (minutes). Returns the dense-build time, the spectrum, region counts at several
    thresholds, left/right cosines, test accuracy and a matrix-free
    :math:`\operatorname{rank}(J - I)` (block Krylov, half the products of a dense build)
    against the dense count.

    Examples
    --------
    >>> r = training_jacobian_report()  # doctest: +SKIP
    >>> sorted(r)[:3]  # doctest: +SKIP
    ['dim', 'left_right_cosine', 'mean_cosine_bulk']
    """
    import time

    from estimators._seed004 import digits_mlp_run
    from linops import TrainingJacobianOperator

    setup = digits_mlp_run(**({"width": 16, "epochs": 2} if quick else {}))
    op = TrainingJacobianOperator(setup.run, setup.theta0)
    t0 = time.perf_counter()
    J = op.to_dense(workers=workers)
    seconds = time.perf_counter() - t0
    res = svd_training_jacobian(J)
    s, cos = res.singular_values, res.cosine
    space, data = setup.run.space, setup.data
    with torch.no_grad():
        logits = space.functional_call(space.unflatten(op.final_params()), data.X_test)
    taus = [2.0, 3.0]
    dim = training_dimension(TrainingJacobianOperator(setup.run, setup.theta0), taus)
    dense_rank = [training_dimension_dense(J, t) for t in taus]
    bulk = (s - 1).abs() <= 1e-3
    return {
        "dim": setup.run.dim,
        "steps": setup.run.num_steps,
        "seconds_dense_jacobian": seconds,
        "test_accuracy": float((logits.argmax(-1) == data.y_test).double().mean()),
        "singular_values": s.tolist(),
        "left_right_cosine": cos.tolist(),
        "region_table": region_table(s),
        "mean_cosine_bulk": float(cos[bulk].mean()) if bool(bulk.any()) else float("nan"),
        "rank_thresholds": taus,
        "rank_dense": dense_rank,
        "rank_matrix_free": [int((dim.singular_values > t).sum()) for t in taus],
        "products_matrix_free": dim.num_products,
    }


def plot_training_jacobian_report(result: Mapping[str, Any], path: str | Path) -> Path:
    """Figure of a :func:`training_jacobian_report`: spectrum (seed 004 fig. 1a) and cosines (1b)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    ax[0].semilogy(result["singular_values"])
    ax[0].axhline(1.0, color="k", ls="--", lw=0.8)
    ax[0].set(
        xlabel="index", ylabel="singular value", title=f"training Jacobian ({result['dim']} params)"
    )
    ax[1].plot(result["left_right_cosine"], ".", ms=2)
    ax[1].set(xlabel="index", ylabel=r"$u_i^\top v_i$", title="left/right singular vector cosine")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
