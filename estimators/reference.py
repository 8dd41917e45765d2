r"""Reference-set Jacobians: low-rank checks without storing the Jacobian.

The method of "Leveraging Low Rank Structure in the Lazy Regime" (an anonymous ICLR 2025
submission, no arXiv id given; "the paper" below), sections 3.1-3.2.

For inputs :math:`x^{(1)}, \dots, x^{(n)}` and a model :math:`f(\theta; x) \in \mathbb{R}^{d_y}`
with :math:`m` parameters, the paper keeps only the columns of the Jacobian that belong to a
*reference set* :math:`\mathcal{R} \subset \{1, \dots, m\}` of :math:`r` parameters,

.. math::

    A = [J]_{:, j, \mathcal{R}} \in \mathbb{R}^{n \times r}, \qquad
    A_{i k} = \frac{\partial f_j(\theta; x^{(i)})}{\partial \theta_{\mathcal{R}_k}},

for one output unit :math:`j` (``output_index=j``) or for all outputs jointly (rows
``i * d_y + j``, sample-major, the row order of :class:`linops.JacobianOperator`). Optionally
the rows are centred, :math:`\tilde A = A (I - \tfrac{1}{r} \mathbf{1}\mathbf{1}^\top)` (each
row minus its mean over the reference columns: the :math:`r` weights are the observations of
the "covariance of the model weights" :math:`\tilde A \tilde A^\top` of section 3.1).

Proposition 3.1 of the paper: if :math:`\tilde A^\top \tilde A \psi = \lambda \psi` with
:math:`\lambda \ne 0`, then :math:`\phi = \tilde A \psi / \sqrt{\lambda}` is a unit eigenvector
of the :math:`n \times n` matrix :math:`\tilde A \tilde A^\top` with the same eigenvalue. So the
leading eigenvectors :math:`V_J` of the big covariance come from an :math:`r \times r`
eigendecomposition (:func:`reference_gram_eigh`), and the numerical rank of :math:`\tilde A`
(:func:`reference_rank`) estimates the rank of the full Jacobian once :math:`r` exceeds it.

Public API (the low-rank trainer, :mod:`trainers.lowrank`, builds on it); the reference set
itself comes from :func:`estimators.selection.select_reference_set` and the rank of the full
Jacobian from :func:`estimators.jacobian_rank.exact_jacobian_rank`:

* :func:`reference_jacobian` -- the ``n x r`` (or ``n d_y x r``) matrix, by batched JVPs on
  unit tangents or by per-sample gradients;
* :func:`reference_gram_eigh` -- Proposition 3.1: eigenvalues, :math:`\psi`, :math:`V_J`;
* :func:`reference_rank` -- effective numerical rank (paper's threshold or user tolerances);
* :func:`rank_curve` -- rank and rank-to-model-size ratio as ``r`` grows (the paper's Figure 2);
* :func:`eigenvalue_threshold` -- the paper's rank threshold on Gram eigenvalues.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from estimators._jacobian_blocks import (
    check_indices,
    check_size,
    inputs_tensor,
    num_outputs,
    param_space,
    per_sample_blocks,
)
from estimators.seeding import Seed
from estimators.selection import ordered_selection
from linops import Params
from linops.jacobian import JacobianOperator
from linops.params import ParamSpace
from linops.rank import numerical_rank

__all__ = [
    "RankCurve",
    "ReferenceGram",
    "eigenvalue_threshold",
    "rank_curve",
    "reference_gram_eigh",
    "reference_jacobian",
    "reference_rank",
]


class ReferenceGram(NamedTuple):
    r"""Eigendecomposition of the reference Gram matrix :math:`\tilde A^\top \tilde A` (Prop. 3.1).

    Attributes
    ----------
    eigenvalues
        ``(r,)`` eigenvalues of :math:`\tilde A^\top \tilde A`, descending (clamped at 0); they
        are also the non-zero eigenvalues of the ``n x n`` covariance :math:`\tilde A \tilde A^\top`.
    right_vectors
        ``(r, r)`` orthonormal eigenvectors :math:`\psi` of :math:`\tilde A^\top \tilde A`,
        column ``i`` for ``eigenvalues[i]``.
    left_vectors
        ``(n, k)`` the leading eigenvectors :math:`V_J = \tilde A \psi / \sqrt{\lambda}` of
        :math:`\tilde A \tilde A^\top` for the ``k = rank`` eigenvalues above the threshold.
    rank
        Number of eigenvalues above ``threshold``.
    threshold
        The eigenvalue threshold used (see :func:`reference_rank`).
    row_means
        ``(n,)`` the subtracted row means (zeros when not centred).
    """

    eigenvalues: torch.Tensor
    right_vectors: torch.Tensor
    left_vectors: torch.Tensor
    rank: int
    threshold: float
    row_means: torch.Tensor


class RankCurve(NamedTuple):
    """Reference rank as the reference-set size grows (the paper's Figure 2).

    Attributes
    ----------
    sizes
        Reference-set sizes ``r`` (ascending).
    ranks
        Effective numerical rank of the reference matrix at each size.
    model_size
        Number of parameters ``m``.
    num_rows
        Rows of the reference matrix (``n`` or ``n d_y``): the rank never exceeds it.
    rank_to_model_size
        ``ranks / m`` (the paper's ratio).
    rank_to_reference_size
        ``ranks / r``: the fraction of reference columns that add a new direction.
    """

    sizes: list[int]
    ranks: list[int]
    model_size: int
    num_rows: int
    rank_to_model_size: list[float]
    rank_to_reference_size: list[float]


def reference_jacobian(
    model: torch.nn.Module,
    inputs: torch.Tensor | Sequence[torch.Tensor],
    indices: Sequence[int] | torch.Tensor,
    *,
    params: Params | None = None,
    output_index: int | None = None,
    center: bool = False,
    method: str = "auto",
    dtype: torch.dtype | None = None,
    batch_size: int | None = None,
) -> torch.Tensor:
    r"""Return the reference submatrix :math:`A = [J]_{:, j, \mathcal{R}}` (the paper's sec. 3.1).

    Parameters
    ----------
    model
        The network, at its current parameters (or ``params`` given as a mapping).
    inputs
        ``(n, ...)`` input tensor or an ``(X, y)`` pair (``y`` ignored).
    indices
        ``(r,)`` flat parameter indices (e.g. from :func:`select_reference_set`).
    params
        Which parameters (see :class:`linops.ParamSpace`).
    output_index
        ``j`` for the ``n x r`` slice of one output unit; ``None`` for all outputs jointly,
        ``n d_y x r`` with row ``i * d_y + j`` (sample-major). The per-unit slices of the joint
        matrix are ``A.reshape(n, d_y, r)[:, j]``.
    center
        Subtract each row's mean over the reference columns,
        :math:`\tilde A = A - \bar a \mathbf{1}^\top` with :math:`\bar a = A \mathbf{1} / r`.
    method
        ``"jvp"``: batched JVPs on the unit tangents :math:`e_k, k \in \mathcal{R}` through a
        :class:`linops.JacobianOperator` (cost about ``r / 8`` backward passes over the data);
        ``"vjp"``: per-sample Jacobians by ``vmap(jacrev)`` in bounded blocks, columns picked
        (cost about ``d_y`` backward passes, independent of ``r``); ``"auto"``: ``"vjp"`` when
        ``r > 8 d_y``, else ``"jvp"``.
    dtype
        Compute in this dtype (e.g. ``torch.float64``); default that of the parameters.
    batch_size
        Samples per batch of the ``"jvp"`` route.

    Returns
    -------
    torch.Tensor
        ``(n, r)`` or ``(n d_y, r)``, columns in the order of ``indices``.

    Raises
    ------
    ValueError
        For invalid ``indices``, ``output_index`` or ``method``.

    Examples
    --------
    >>> import torch
    >>> lin = torch.nn.Linear(2, 1, bias=False).double()
    >>> X = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    >>> reference_jacobian(lin, X, [1]).tolist()  # d f / d W_{0,1} = x_1
    [[2.0], [4.0]]
    """
    if method not in ("auto", "jvp", "vjp"):
        raise ValueError(f"method: expected 'auto', 'jvp' or 'vjp', got {method!r}")
    X = inputs_tensor(inputs)
    space = param_space(model, params, dtype)
    idx = check_indices(indices, space.dim)
    X = X.to(dtype=space.dtype, device=space.device)
    d = num_outputs(space, X, output_index)
    if method == "auto":
        method = "vjp" if idx.numel() > 8 * d else "jvp"
    if method == "jvp":
        J = JacobianOperator(
            model,
            X,
            params,
            output_index=output_index,
            dtype=space.dtype,
            batch_size=batch_size,
        )
        E = torch.zeros(space.dim, idx.numel(), dtype=space.dtype, device=space.device)
        E[idx.to(space.device), torch.arange(idx.numel(), device=space.device)] = 1.0
        A = J._apply(E)
    else:
        cols = idx.to(space.device)
        with torch.no_grad():
            A = torch.cat([b[:, cols] for b in per_sample_blocks(space, X, output_index, d)])
    A = A.detach()
    return A - A.mean(dim=1, keepdim=True) if center else A


def _check_matrix(A: object) -> torch.Tensor:
    if not isinstance(A, torch.Tensor):
        raise TypeError(f"A: expected a torch tensor, got {type(A).__name__}")
    if A.ndim != 2 or A.shape[0] == 0 or A.shape[1] == 0:
        raise ValueError(f"A: expected a non-empty 2-d matrix (n x r), got shape {tuple(A.shape)}")
    if not A.dtype.is_floating_point:
        raise TypeError(f"A: expected a floating dtype, got {A.dtype}")
    return A


def eigenvalue_threshold(
    eigenvalues: torch.Tensor,
    dtype: torch.dtype,
    *,
    rtol: float | None = None,
    atol: float | None = None,
) -> float:
    r"""Return the paper's rank threshold on eigenvalues of an ``r``-column Gram :math:`A^\top A`.

    :math:`\max(\mathrm{atol}, \mathrm{rtol}\,\lambda_1)` with default
    :math:`\mathrm{rtol} = r\,\epsilon` (``r = len(eigenvalues)``, :math:`\epsilon` the machine
    precision of ``dtype``, the dtype ``A`` was computed in) and ``atol = 0``: section 3.2's
    rule. On singular values it reads :math:`\sigma_i > \sqrt{r\epsilon}\,\sigma_1`; for
    singular values of a matrix itself the toolkit's one default is
    :func:`linops.numerical_rank`'s.

    Raises
    ------
    ValueError
        If ``rtol`` or ``atol`` is negative.

    Examples
    --------
    >>> import torch
    >>> eigenvalue_threshold(torch.tensor([4.0, 1.0]), torch.float64, rtol=0.5)
    2.0
    """
    r = eigenvalues.numel()
    eps = torch.finfo(dtype).eps
    lam1 = float(eigenvalues.max().clamp_min(0))
    rtol_ = r * eps if rtol is None else float(rtol)
    atol_ = 0.0 if atol is None else float(atol)
    if rtol_ < 0 or atol_ < 0:
        raise ValueError(f"rtol, atol: expected non-negative numbers, got {rtol!r} and {atol!r}")
    return max(atol_, rtol_ * lam1)


def reference_gram_eigh(
    A: torch.Tensor,
    *,
    center: bool = False,
    rtol: float | None = None,
    atol: float | None = None,
) -> ReferenceGram:
    r"""Proposition 3.1 of the paper: eigenvectors of :math:`\tilde A \tilde A^\top` from an ``r x r`` eigh.

    Parameters
    ----------
    A
        ``(n, r)`` reference matrix (from :func:`reference_jacobian`).
    center
        Row-centre ``A`` first (as :func:`reference_jacobian` with ``center=True``).
    rtol, atol
        Eigenvalue threshold :math:`\max(\mathrm{atol}, \mathrm{rtol}\,\lambda_1)` deciding the
        rank and how many :math:`V_J` columns are returned; default ``rtol = r eps`` with
        ``eps`` the machine precision of ``A``'s dtype (the paper's rule, section 3.2).

    Returns
    -------
    ReferenceGram

    Notes
    -----
    The Gram matrix :math:`G = \tilde A^\top \tilde A` is formed in float64 whatever the dtype
    of ``A`` (its eigenvalues are :math:`\sigma_i^2`, so forming it squares the condition
    number; float64 keeps that from hiding singular values that ``A`` itself resolves), and
    :math:`V_J = \tilde A \psi \Lambda^{-1/2}` is returned in ``A``'s dtype.

    Examples
    --------
    >>> import torch
    >>> A = torch.tensor([[3.0, 0.0], [0.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
    >>> res = reference_gram_eigh(A)
    >>> res.eigenvalues.tolist(), res.rank
    ([9.0, 1.0], 2)
    >>> res.left_vectors.abs().tolist()
    [[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]
    """
    A = _check_matrix(A)
    n, r = A.shape
    means = A.mean(dim=1) if center else torch.zeros(n, dtype=A.dtype, device=A.device)
    At = (A - means[:, None]).double()
    evals, evecs = torch.linalg.eigh(At.T @ At)
    evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)
    thr = eigenvalue_threshold(evals, A.dtype, rtol=rtol, atol=atol)
    k = int((evals > thr).sum())
    V = (At @ evecs[:, :k]) / evals[:k].sqrt()
    return ReferenceGram(evals.to(A.dtype), evecs.to(A.dtype), V.to(A.dtype), k, thr, means)


def reference_rank(
    A: torch.Tensor | ReferenceGram,
    *,
    rule: str = "paper",
    rtol: float | None = None,
    atol: float | None = None,
    center: bool = False,
) -> int:
    r"""Effective numerical rank of a reference matrix (the paper's section 3.2, "Low-rank Jacobian").

    Parameters
    ----------
    A
        ``(n, r)`` reference matrix, or a :class:`ReferenceGram` (then ``rule="paper"``).
    rule
        ``"paper"``: count eigenvalues :math:`\lambda_i` of :math:`\tilde A^\top \tilde A` above
        :math:`\max(\mathrm{atol}, \mathrm{rtol}\,\lambda_1)`, default ``rtol = r eps``.
        ``"svd"``: count singular values :math:`\sigma_i` of :math:`\tilde A` (computed from
        ``A`` itself, no Gram) above :math:`\max(\mathrm{atol}, \mathrm{rtol}\,\sigma_1)`,
        default ``rtol = max(n, r) eps`` (NumPy's ``matrix_rank``).
    rtol, atol
        User tolerances (relative and absolute, in the units of the rule: eigenvalues of the
        Gram for ``"paper"``, singular values for ``"svd"``).
    center
        Row-centre ``A`` first.

    Returns
    -------
    int
        The rank, never more than ``min(n, r)``.

    Notes
    -----
    The paper states its threshold on the Gram eigenvalues, :math:`\lambda_i > r \epsilon
    \lambda_1`, which in singular values is :math:`\sigma_i > \sqrt{r\epsilon}\,\sigma_1`:
    much looser than the usual :math:`\sigma_i > \max(n, r)\,\epsilon\,\sigma_1`, because the
    Gram route cannot resolve :math:`\sigma_i / \sigma_1` below about :math:`\sqrt{\epsilon}`.
    ``"svd"`` is the sound choice when the matrix is small enough to decompose; ``"paper"``
    reproduces the paper.

    Examples
    --------
    >>> import torch
    >>> A = torch.ones(5, 3, dtype=torch.float64)  # rank one
    >>> reference_rank(A), reference_rank(A, rule="svd")
    (1, 1)
    """
    if rule not in ("paper", "svd"):
        raise ValueError(f"rule: expected 'paper' or 'svd', got {rule!r}")
    if isinstance(A, ReferenceGram):
        if rule != "paper":
            raise ValueError("rule: expected 'paper' for a ReferenceGram, got 'svd'")
        if rtol is None and atol is None:
            return A.rank
        thr = eigenvalue_threshold(A.eigenvalues, A.eigenvalues.dtype, rtol=rtol, atol=atol)
        return int((A.eigenvalues > thr).sum())
    A = _check_matrix(A)
    n, r = A.shape
    if rule == "paper":
        At = (A - A.mean(dim=1, keepdim=True) if center else A).double()
        # the non-zero eigenvalues of At^T At and At At^T agree (Prop. 3.1): use the smaller
        evals = torch.linalg.eigvalsh(At.T @ At if r <= n else At @ At.T).clamp_min(0)
        # the paper's rule counts r columns even when the smaller (n x n) Gram is used
        thr = eigenvalue_threshold(
            evals, A.dtype, rtol=r * torch.finfo(A.dtype).eps if rtol is None else rtol, atol=atol
        )
        return int((evals > thr).sum())
    At = A - A.mean(dim=1, keepdim=True) if center else A
    if atol is None:
        return numerical_rank(At, rtol)  # linops' default: max(n, r) eps
    s = torch.linalg.svdvals(At)
    rtol_ = max(n, r) * torch.finfo(A.dtype).eps if rtol is None else float(rtol)
    if rtol_ < 0 or atol < 0:
        raise ValueError(f"rtol, atol: expected non-negative numbers, got {rtol!r} and {atol!r}")
    return int((s > max(float(atol), rtol_ * float(s.max().clamp_min(0)))).sum())


def rank_curve(
    model: torch.nn.Module,
    inputs: torch.Tensor | Sequence[torch.Tensor],
    sizes: Sequence[int],
    strategy: str = "random",
    *,
    params: Params | None = None,
    output_index: int | None = None,
    center: bool = True,
    rule: str = "paper",
    rtol: float | None = None,
    dtype: torch.dtype | None = None,
    seed: Seed = 0,
) -> RankCurve:
    r"""Compute the reference rank against reference-set size (the paper's section 4.1, Figure 2).

    The reference sets are nested: one ordering of the parameters is drawn with the largest
    size and each smaller set is a prefix of it (for ``"magnitude"`` / ``"gradient"`` the top
    ``r``; for ``"random"`` / ``"leverage"`` the first ``r`` drawn), so the reference
    Jacobian is computed once. The ranks need not grow with ``r``: each size's threshold
    scales with its own largest singular value (and, for the paper's rule, with ``r``), and
    centring subtracts each row's mean over the ``r`` columns, so a larger set may count
    fewer.

    Parameters
    ----------
    sizes
        Reference-set sizes (each in ``[1, m]``).
    center, rule, rtol
        As in :func:`reference_jacobian` and :func:`reference_rank` (centred by default, as
        the paper).
    dtype
        Compute the reference Jacobian in this dtype.
    seed
        Randomness of the ``"random"`` and ``"leverage"`` strategies.

    Returns
    -------
    RankCurve
    """
    space = ParamSpace(model, params)
    m = space.dim
    sizes = sorted({check_size(int(s), m) for s in sizes})
    if not sizes:
        raise ValueError("sizes: expected at least one reference-set size, got none")
    order = ordered_selection(model, inputs, sizes[-1], strategy, params, output_index, seed)
    A_full = reference_jacobian(
        model, inputs, order, params=params, output_index=output_index, dtype=dtype
    )
    ranks = [reference_rank(A_full[:, :s], rule=rule, rtol=rtol, center=center) for s in sizes]
    return RankCurve(
        sizes,
        ranks,
        m,
        A_full.shape[0],
        [k / m for k in ranks],
        [k / s for k, s in zip(ranks, sizes, strict=True)],
    )
