r"""Numerical, effective (Roy-Vetterli) and stable rank.

* numerical rank: :math:`\#\{i : \sigma_i > \mathrm{rtol}\,\sigma_1\}`;
* effective rank (Roy & Vetterli 2007): :math:`\exp(-\sum_i p_i \log p_i)` with
  :math:`p_i = \sigma_i / \sum_j \sigma_j`;
* stable rank: :math:`\|A\|_F^2 / \|A\|_2^2 = \sum_i \sigma_i^2 / \sigma_1^2`.

Each takes singular values (a 1-d tensor or array), a dense matrix, or an operator.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator

from linops import _krylov as kr
from linops._backend import to_torch
from linops._checks import check_rtol
from linops._types import OperatorLike

__all__ = ["effective_rank", "numerical_rank", "stable_rank"]


def numerical_rank(
    s_or_A: OperatorLike, rtol: float | None = None, *, seed: int | torch.Generator | None = 0
) -> int:
    r"""Return the number of singular values above ``rtol`` times the largest.

    Parameters
    ----------
    s_or_A
        Singular values (1-d), a dense matrix (2-d tensor/array), or an operator.
    rtol
        Relative threshold. Default ``max(m, n) * eps`` for singular values and dense
        matrices (as ``numpy.linalg.matrix_rank``), ``sqrt(eps)`` for operators, with ``eps``
        the machine epsilon of the *input's* dtype: a float32 numpy array gets float32's
        ``eps`` although its SVD is computed in float64 (its entries carry float32 rounding,
        which shows as singular values near ``eps_float32 * sigma_1``).
    seed
        Seed of the randomized routines used for operators: an int (the default 0, so the
        same operator gives the same rank), a ``torch.Generator`` (advanced) or None (fresh
        entropy).

    Raises
    ------
    ValueError
        For ``rtol`` outside ``[0, 1)``, input that is neither 1-d nor 2-d, non-finite entries,
        or (operators) an ``rtol`` below what the operator's dtype can resolve.

    Notes
    -----
    For an operator, :math:`\sigma_1` comes from :func:`linops.svds`, then the adaptive range
    finder (:func:`linops.range_finder`) grows a basis :math:`Q` until
    :math:`\|(I - QQ^H)A\| \le \mathrm{rtol}\,\sigma_1 / 10` and the singular values of
    :math:`Q^H A` are counted, so the rank need not be known in advance. If the range finder
    stalls at its rounding floor above :math:`\mathrm{rtol}\,\sigma_1` (a tolerance the
    operator's dtype cannot resolve) a ValueError says which ``rtol`` is reachable.

    Examples
    --------
    >>> import torch
    >>> numerical_rank(torch.tensor([3.0, 1.0, 1e-9]), rtol=1e-6)
    2
    """
    if isinstance(s_or_A, LinearOperator):
        return _operator_rank(s_or_A, rtol, seed)
    s, shape = _singular_values(s_or_A)
    if s.numel() == 0 or float(s.max()) == 0:
        return 0
    if rtol is None:
        rtol = max(shape) * _input_eps(s_or_A)
    return int((s > check_rtol(rtol) * s.max()).sum())


def _input_eps(X: OperatorLike) -> float:
    """Machine epsilon of the precision ``X`` is stored in (before any conversion).

    A float32 numpy array is converted to float64 for the SVD, but its entries carry float32
    rounding, so its singular values below about ``eps_float32 * sigma_1`` are noise: the
    default tolerance must come from the input's own dtype (as ``numpy.linalg.matrix_rank``
    does), not from the dtype of the computation. Integers and Python floats count as float64.
    """
    if isinstance(X, torch.Tensor):
        dt = X.dtype
        if dt.is_floating_point or dt.is_complex:
            return float(torch.finfo(dt).eps)
        return float(torch.finfo(torch.float64).eps)
    dtype = getattr(X, "dtype", None)
    if dtype is None:
        dtype = np.asarray(X).dtype
    try:
        dtype = np.dtype(dtype)
    except TypeError:  # e.g. a CuPy or other array whose dtype numpy does not take
        return float(torch.finfo(torch.float64).eps)
    if dtype.kind in "fc":
        return float(np.finfo(dtype).eps)
    return float(np.finfo(np.float64).eps)


def effective_rank(s_or_A: OperatorLike) -> float:
    r"""Roy-Vetterli effective rank :math:`\exp H(p)`, :math:`p = \sigma / \|\sigma\|_1`.

    Lies in :math:`[1, \mathrm{rank}]`; equals :math:`r` for :math:`r` equal nonzero singular
    values.

    References
    ----------
    .. [1] O. Roy and M. Vetterli, "The effective rank: a measure of effective
       dimensionality", EUSIPCO 2007.

    Examples
    --------
    >>> round(effective_rank([1.0, 1.0, 1.0, 0.0]), 12)
    3.0
    """
    s, _ = _singular_values(s_or_A)
    total = s.sum()
    if s.numel() == 0 or float(total) == 0:
        raise ValueError("s: expected at least one nonzero singular value, got all zeros")
    p = s[s > 0] / total
    return float(torch.exp(-(p * torch.log(p)).sum()))


def stable_rank(
    s_or_A: OperatorLike, *, num_matvecs: int = 64, seed: int | torch.Generator | None = 0
) -> float:
    r"""Stable rank :math:`\|A\|_F^2 / \|A\|_2^2`.

    For an operator, :math:`\|A\|_2` comes from :func:`linops.svds` and :math:`\|A\|_F^2` from
    the unbiased Gaussian estimate :math:`\frac{1}{N}\sum_j \|A\omega_j\|^2` with
    ``num_matvecs`` probes.

    Examples
    --------
    >>> stable_rank([2.0, 1.0, 1.0])
    1.5
    """
    if isinstance(s_or_A, LinearOperator):
        from linops.svds import svds

        op, _ = kr.prepare(s_or_A)
        smax = float(torch.as_tensor(svds(op, 1, seed=seed).singular_values)[0])
        gen = kr.make_generator(seed, op.device)
        N = kr.check_int(num_matvecs, "num_matvecs", 1)
        Y = op._apply(kr.random_block(op.shape[1], N, op, gen))
        return float((Y.abs() ** 2).sum()) / N / smax**2
    s, _ = _singular_values(s_or_A)
    if s.numel() == 0 or float(s.max()) == 0:
        raise ValueError("s: expected at least one nonzero singular value, got all zeros")
    return float((s**2).sum() / s.max() ** 2)


def _singular_values(X: OperatorLike) -> tuple[torch.Tensor, tuple[int, ...]]:
    if isinstance(X, torch.Tensor):
        t = X.detach()
    else:
        t, _ = to_torch(X, dtype=torch.float64, device=torch.device("cpu"))
    if not (t.is_floating_point() or t.is_complex()):
        t = t.to(torch.float64)
    if t.ndim == 1:
        if t.is_complex() or bool((t < 0).any()) or not bool(torch.isfinite(t).all()):
            raise ValueError("s: expected finite non-negative singular values")
        return t, tuple(t.shape)
    if t.ndim == 2:
        if not bool(torch.isfinite(t).all()):
            raise ValueError("A: expected finite entries, got NaN or inf")
        return torch.linalg.svdvals(t), tuple(t.shape)
    raise ValueError(
        f"expected singular values (1-d) or a matrix (2-d), got shape {tuple(t.shape)}"
    )


def _operator_rank(
    A: LinearOperator, rtol: float | None, seed: int | torch.Generator | None
) -> int:
    from linops.randomized import range_finder
    from linops.svds import svds

    op, _ = kr.prepare(A)
    rtol = check_rtol(torch.finfo(op.torch_dtype).eps ** 0.5 if rtol is None else rtol)
    smax = float(torch.as_tensor(svds(op, 1, seed=seed).singular_values)[0])
    if smax == 0 or math.isnan(smax):
        return 0
    block = min(10, *op.shape)  # range_finder's default, at most the smaller dimension
    rf = range_finder(op, atol=max(rtol * smax / 10, 1e-300), block_size=block, seed=seed)
    if not rf.converged and rf.error_estimate > rtol * smax:
        raise ValueError(
            f"rtol: expected at least about {rf.error_estimate / smax:.1e} for this "
            f"{op.torch_dtype} operator (the range finder's error estimate stalls at "
            f"{rf.error_estimate:.2e}, sigma_1 = {smax:.3e}), got {rtol!r}"
        )
    Q = torch.as_tensor(rf.basis)
    s = torch.linalg.svdvals(op._apply(Q, adjoint=True))
    return int((s > rtol * smax).sum())
