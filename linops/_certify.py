r"""Residuals certified from products already taken (shared by Lanczos and svds).

A Krylov solver keeps a basis :math:`X` and the products :math:`AX` it took. A Ritz vector
:math:`y = X s` then has :math:`A y = (AX) s` without a new product, up to the rounding of the
recombinations and of the stored products' own drift :math:`E = AX_{\text{stored}} - A
X_{\text{stored}}` (zero right after a product, nonzero once columns have been recombined at
restarts). :func:`recombine` forms :math:`X s` and :math:`(AX) s` and measures or bounds that
rounding column by column; :func:`carry` bounds :math:`\|E s\|` from bounds on the columns of
:math:`E`. With :math:`y_r, z_r` the rounded :math:`X s, (AX) s` and :math:`\theta` the Ritz
value,

.. math:: \|A y_r - \theta y_r\| \le \|z_r - \theta y_r\| + \|E s\| + \|z_r - (AX)s\|
   + \|A\|\,\|y_r - Xs\|,

every term of which is known, so a residual at most ``rtol ||A||`` certifies convergence of
the vector actually returned, with no product. ``||A||`` is the solver's estimate, as in its
tolerance. :math:`A` is the operator as its products compute it: their own rounding (in
float32 about :math:`\varepsilon \|A\|` per unit vector for a dense matrix) is the
operator's accuracy, not the solver's, and no bound from the products can see it.

In single (and half) precision the recombinations run in double precision by row chunks,
so their own rounding is :math:`O(j\,\varepsilon_{64})` and the rounding of the result to
the working dtype is *measured* (the difference of the two, exact in double), instead of
bounded by the worst case :math:`\varepsilon \sum_i |s_i|` (which, at :math:`j = 21`, is
already :math:`4.6\,\varepsilon \approx 5.5\times 10^{-7}` in float32 and kept float32
Lanczos from certifying ``rtol = 1e-6``). In double precision there is no wider dtype and
the first-order model :math:`\varepsilon \sum_i |s_i| \|x_i\|` is used.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from linops._krylov import column_norms

__all__ = ["Recombination", "carry", "recombine"]

_CHUNK_ELEMENTS = 1 << 22
"""Elements of one row chunk of the wide recombination (32 MiB per double array)."""


class Recombination(NamedTuple):
    """Result of :func:`recombine`; norms are float64 on the host, one per column."""

    Y: torch.Tensor
    """``X S`` in the working dtype."""
    AY: torch.Tensor
    """``AX SA`` in the working dtype."""
    d_Y: torch.Tensor
    """Bound on ``||Y - X S||`` (measured in single precision)."""
    d_AY: torch.Tensor
    """Bound on ``||AY - AX SA||``."""
    residual: torch.Tensor
    """``||AY - theta Y||`` (computed in double) plus a bound on its rounding; zeros
    without ``theta``."""


def _wide(dtype: torch.dtype) -> torch.dtype:
    return torch.complex128 if dtype.is_complex else torch.float64


def _sq(X: torch.Tensor) -> torch.Tensor:
    return (X.real * X.real + X.imag * X.imag) if X.is_complex() else X * X


def recombine(
    X: torch.Tensor,
    AX: torch.Tensor,
    S: torch.Tensor,
    SA: torch.Tensor,
    theta: torch.Tensor | None = None,
    *,
    inplace: bool = False,
) -> Recombination:
    r"""Return ``Y = X S`` and ``AY = AX SA`` with bounds on their rounding.

    Parameters
    ----------
    X, AX
        ``(n, j)`` and ``(m, j)`` blocks of the working dtype (a basis and the stored
        products, or two bases).
    S, SA
        ``(j, p)`` coefficients (any device and dtype; used in double).
    theta
        ``(p,)`` Ritz values (the values returned, in the working dtype): also return
        :math:`\|AY - \theta Y\|` per column (needs ``n == m``).
    inplace
        Write ``Y`` into ``X[:, :p]`` and ``AY`` into ``AX[:, :p]`` (row chunk by row
        chunk, each chunk read before it is written) instead of new tensors.
    """
    dt, p = X.dtype, S.shape[1]
    Y = X[:, :p] if inplace else torch.empty(X.shape[0], p, dtype=dt, device=X.device)
    AY = AX[:, :p] if inplace else torch.empty(AX.shape[0], p, dtype=dt, device=X.device)
    if dt in (torch.float64, torch.complex128):
        return _recombine_double(X, AX, S, SA, theta, Y, AY)
    return _recombine_single(X, AX, S, SA, theta, Y, AY)


def _recombine_single(X, AX, S, SA, theta, Y, AY) -> Recombination:
    """Single or half precision: double-precision sums by row chunks, rounding measured.

    ``round(z) - z`` is exact in double (Sterbenz); squares of single-precision numbers
    neither overflow nor underflow in double, so plain sums of squares are accurate.
    """
    dt, (j, p) = X.dtype, S.shape
    wide = _wide(dt)
    S64, SA64 = (M.detach().to(device=X.device, dtype=wide) for M in (S, SA))
    th = None if theta is None else theta.detach().to(device=X.device, dtype=wide)
    acc = torch.zeros(5, p, dtype=torch.float64, device=X.device)  # dY, dAY, res, |Y|, |AY|
    cols = torch.zeros(2, j, dtype=torch.float64, device=X.device)  # |X_i|^2, |AX_i|^2
    rows = max(1, _CHUNK_ELEMENTS // max(j + p, 1))
    for lo in range(0, max(X.shape[0], AX.shape[0]), rows):
        Xw, AXw = X[lo : lo + rows, :j].to(wide), AX[lo : lo + rows, :j].to(wide)
        cols[0] += _sq(Xw).sum(dim=0)
        cols[1] += _sq(AXw).sum(dim=0)
        Yw, AYw = Xw @ S64, AXw @ SA64
        Yr, AYr = Yw.to(dt), AYw.to(dt)
        Yrw, AYrw = Yr.to(wide), AYr.to(wide)
        acc[0] += _sq(Yrw - Yw).sum(dim=0)
        acc[1] += _sq(AYrw - AYw).sum(dim=0)
        if th is not None:
            acc[2] += _sq(AYrw - Yrw * th).sum(dim=0)
        acc[3] += _sq(Yrw).sum(dim=0)
        acc[4] += _sq(AYrw).sum(dim=0)
        Y[lo : lo + rows], AY[lo : lo + rows] = Yr, AYr
    d_Y, d_AY, res, nY, nAY = acc.sqrt().cpu()
    nX, nAX = cols.sqrt().cpu()
    # the double-precision sums' own rounding: j terms each, first-order bound
    e64 = j * float(torch.finfo(torch.float64).eps)
    d_Y = d_Y + e64 * (_weights(S).T @ nX)
    d_AY = d_AY + e64 * (_weights(SA).T @ nAX)
    if th is not None:
        res = res + 4 * e64 * (nAY + th.abs().cpu().double() * nY)
    return Recombination(Y, AY, d_Y, d_AY, res)


def _recombine_double(X, AX, S, SA, theta, Y, AY) -> Recombination:
    """Double precision: no wider dtype; the first-order model ``eps sum_i |s_i| ||x_i||``."""
    dt, (j, p) = X.dtype, S.shape
    nX, nAX = (column_norms(M[:, :j]).double().cpu() for M in (X, AX))
    Y[:], AY[:] = X[:, :j] @ S.detach().to(X), AX[:, :j] @ SA.detach().to(X)
    eps = float(torch.finfo(dt).eps)
    d_Y, d_AY = eps * (_weights(S).T @ nX), eps * (_weights(SA).T @ nAX)
    res = torch.zeros(p, dtype=torch.float64)
    if theta is not None:
        th = theta.detach().to(device=X.device, dtype=Y.real.dtype)
        res = column_norms(AY - Y * th.to(dt)).double().cpu()
        nY, nAY = column_norms(Y).double().cpu(), column_norms(AY).double().cpu()
        res = res + 4 * eps * (nAY + th.abs().cpu().double() * nY)
    return Recombination(Y, AY, d_Y, d_AY, res)


def _weights(S: torch.Tensor) -> torch.Tensor:
    return S.detach().abs().double().cpu()


def carry(err: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    r"""Bound on :math:`\|E s\|` for each column :math:`s` of ``S``.

    Given :math:`\|E_i\| \le` ``err[i]``: the smaller of :math:`\sum_i |s_i|\,\mathrm{err}_i`
    (triangle inequality) and :math:`\|s\|\,\|\mathrm{err}\|` (Cauchy-Schwarz on the columns
    of :math:`E`).
    """
    W = S.detach().abs().double().cpu()
    e = err.double().cpu()
    by_sum = W.T @ e
    by_norm = column_norms(W) * column_norms(e[:, None])[0]
    return torch.minimum(by_sum, by_norm)
