r"""How many singular values exceed a threshold? Deflated stochastic Lanczos quadrature.

The numerical rank :math:`N(\tau) = \#\{i : \sigma_i(A) > \tau\}` of a large operator is the
dimension of training of seed 004 (section 2) for :math:`A = J - I`. A projection method
(block Krylov, range finder) counts it exactly only when a gap separates the singular values
above :math:`\tau` from those below; without one (seed 004's MLP has about 1200 singular values
of :math:`J - I` per decade below 1) its Ritz values sit below the true ones and the count
comes out low. This estimator splits the count in two:

1. **Deflation.** A randomized block Krylov method on :math:`A^\top A` (Musco & Musco 2015),
   started from a Gaussian block, gives Ritz triplets :math:`(\tilde\sigma_i, u_i, v_i)`. Their
   residuals :math:`r_i = \|A^\top u_i - \tilde\sigma_i v_i\|` (with :math:`A v_i = \tilde\sigma_i
   u_i` exactly) come free from the products already made. A triplet with
   :math:`\tilde\sigma_i > \tau` is counted outright (a Ritz value never exceeds the singular
   value it approximates) once :math:`r_i \le \delta\tau` (``deflation_tol`` :math:`= \delta`):
   its coupling to the rest of :math:`A^\top A` is :math:`\tilde\sigma_i r_i`, which moves the
   eigenvalues near :math:`\tau^2` by about :math:`r_i^2 \le \delta^2\tau^2` (second-order
   perturbation across the gap :math:`\tilde\sigma_i^2 - \tau^2`).
2. **The rest, stochastically.** With :math:`P = I - V_k V_k^\top`, the eigenvalues of
   :math:`B = P A^\top A P` are the remaining :math:`\sigma_i^2` (and ``k`` zeros), and
   :math:`\#\{\lambda_i(B) > \tau^2\} = \operatorname{tr} \mathbb{1}(B > \tau^2)` is estimated by
   stochastic Lanczos quadrature (Ubaru, Chen & Saad 2017) with Rademacher probes: each probe's
   Gauss rule (nodes :math:`\theta_j`, weights :math:`w_j`) counts :math:`\sum_{\theta_j >
   \tau^2} w_j`. By the Chebyshev-Markov-Stieltjes inequalities the true mass above
   :math:`\tau^2` differs from that by at most the weights of the two nodes around
   :math:`\tau^2`; where no node lies near :math:`\tau^2` (a gap) the count is exact.

:math:`\hat N = k + \hat N_\perp`; its standard error is that of :math:`\hat N_\perp` across
probes. Deflating the top of the spectrum both shrinks the spectral interval the quadrature must
resolve and removes the largest contributions to the probe variance.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

from estimators.density import spectral_density
from linops import IdentityOperator, aslinearoperator
from linops import _krylov as kr

__all__ = ["SingularValueCount", "singular_value_count"]


class SingularValueCount(NamedTuple):
    """Estimated :math:`\\#\\{\\sigma_i > \\tau\\}` and its parts.

    ``count``: the estimate :math:`k + \\hat N_\\perp`; ``stderr``: its standard error (across
    probes); ``deflated``: ``k``; ``rest``: :math:`\\hat N_\\perp`; ``num_products``: products
    with ``A`` or ``A^T``; ``ritz_values``: the deflated singular values (descending);
    ``probes`` and ``steps``: the quadrature's probes and Lanczos steps per probe."""

    count: float
    stderr: float
    deflated: int
    rest: float
    num_products: int
    ritz_values: torch.Tensor
    probes: int
    steps: int


def singular_value_count(
    A: Any,
    threshold: float,
    max_products: int,
    *,
    block_size: int = 64,
    deflation_share: float = 0.55,
    steps: int = 110,
    deflation_tol: float = 0.1,
    seed: int = 0,
) -> SingularValueCount:
    r"""Estimate :math:`\#\{i : \sigma_i(A) > \tau\}` with at most ``max_products`` products.

    Parameters
    ----------
    A
        A square or rectangular operator (any type :func:`linops.aslinearoperator` takes).
    threshold
        :math:`\tau > 0`.
    max_products
        Products with ``A`` and ``A^T`` together. About ``deflation_share`` of them go to the
        block Krylov deflation (``2 * block_size`` per iteration), the rest to the quadrature
        (``2 * steps`` per probe, at least two probes).
    block_size
        Vectors per Krylov block.
    deflation_share
        Share of the budget for the deflation, in ``(0, 1)``.
    steps
        Lanczos steps per probe (shortened if the budget is small).
    deflation_tol
        :math:`\delta`: a Ritz triplet above the threshold is counted outright when its residual
        is at most :math:`\delta\tau`.
    seed
        Seed of the Gaussian start block and the Rademacher probes.

    Returns
    -------
    SingularValueCount

    Raises
    ------
    ValueError
        If the threshold is not positive, or the budget cannot pay for one Krylov iteration and
        two probes of two steps.

    Examples
    --------
    >>> import torch
    >>> s = torch.linspace(0.01, 3.0, 400, dtype=torch.float64)  # no gap: 267 above 1
    >>> res = singular_value_count(torch.diag(s), 1.0, 400, block_size=8, steps=30, seed=0)
    >>> int((s > 1.0).sum()), round(res.count), res.num_products <= 400
    (267, 263, True)
    """
    op, _ = kr.prepare(A)
    tau = float(threshold)
    if not tau > 0:
        raise ValueError(f"threshold: expected a positive number, got {threshold!r}")
    budget = kr.check_int(max_products, "max_products", 1)
    b = kr.check_int(block_size, "block_size", 1)
    if not 0.0 < deflation_share < 1.0:
        raise ValueError(f"deflation_share: expected a number in (0, 1), got {deflation_share!r}")
    m = op.shape[1]
    b = min(b, m)
    iters = max(1, min(int(deflation_share * budget) // (2 * b), m // b))
    rest = budget - 2 * b * iters
    d = min(kr.check_int(steps, "steps", 2), rest // 4, m)
    if d < 2:
        raise ValueError(
            f"max_products: expected at least {2 * b + 8} for one Krylov iteration of block "
            f"{b} and two probes of two Lanczos steps, got {budget}"
        )
    probes = max(2, rest // (2 * d))
    gen = kr.make_generator(seed, op.device)
    sigma, V, res = _block_krylov(op, b, iters, gen)
    keep = (sigma > tau) & (res * sigma <= deflation_tol * tau)
    Vk = V[:, keep]
    k = int(keep.sum())
    B = _deflated_normal(op, Vk)
    sd = spectral_density(B, num_probes=probes, num_steps=d, seed=gen)
    theta = torch.as_tensor(sd.nodes, dtype=torch.float64).reshape(probes, -1)
    w = torch.as_tensor(sd.weights, dtype=torch.float64).reshape(probes, -1)
    per_probe = m * _above(theta, w, tau**2)
    est = float(per_probe.mean())
    se = float(per_probe.std()) / math.sqrt(probes)
    used = 2 * b * iters + 2 * probes * d
    return SingularValueCount(
        k + est, se, k, est, used, sigma[keep].to(torch.float64).cpu(), probes, d
    )


def _above(theta: torch.Tensor, w: torch.Tensor, t: float) -> torch.Tensor:
    """Per probe, the Gauss-rule mass above ``t``."""
    return (w * (theta > t)).sum(dim=1)


def _block_krylov(
    op: Any, b: int, iters: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Ritz values, right Ritz vectors and relative residuals from ``span[X, A^T A X, ...]``.

    Each iteration applies ``A`` and ``A^T`` to one orthonormalised block (``2 b`` products).
    With :math:`AV = U S W^\top` the Ritz triplets are :math:`(s_i, u_i, V w_i)`; the residual
    :math:`A^\top u_i - s_i V w_i` uses the products :math:`A^\top A V` the iteration already made.
    """
    m = op.shape[1]
    X = kr.random_block(m, b, op, gen)
    V = X[:, :0]
    AV, AtAV = [], []
    for _ in range(iters):
        Q, _, _ = kr.orth_qr(X, V, gen, ref=1.0)
        Y = op._apply(Q)
        X = op._apply(Y, adjoint=True)
        kr.check_products(X, 2 * b * (len(AV) + 1))
        V = torch.cat([V, Q], dim=1)
        AV.append(Y)
        AtAV.append(X)
    U, S, Wh = torch.linalg.svd(torch.cat(AV, dim=1), full_matrices=False)
    R = V @ Wh.mH
    safe = torch.where(S > 0, S, torch.ones_like(S))
    AtU = (torch.cat(AtAV, dim=1) @ Wh.mH) / safe
    res = torch.linalg.vector_norm(AtU - R * S, dim=0) / safe
    return S, R, torch.where(S > 0, res, torch.full_like(res, math.inf))


def _deflated_normal(op: Any, Vk: torch.Tensor) -> Any:
    """:math:`P A^\\top A P` with :math:`P = I - V_k V_k^\\top`, as an operator."""
    m = op.shape[1]
    AtA = op.H @ op
    if Vk.shape[1] == 0:
        return AtA
    eye = IdentityOperator(m, dtype=op.torch_dtype, device=op.device)
    P = eye - aslinearoperator(Vk) @ aslinearoperator(Vk.mH)
    return P @ AtA @ P
