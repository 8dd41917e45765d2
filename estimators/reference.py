r"""Reference-set Jacobians: low-rank checks without storing the Jacobian (seed 000 section 3.1-3.2).

For inputs :math:`x^{(1)}, \dots, x^{(n)}` and a model :math:`f(\theta; x) \in \mathbb{R}^{d_y}`
with :math:`m` parameters, seed 000 keeps only the columns of the Jacobian that belong to a
*reference set* :math:`\mathcal{R} \subset \{1, \dots, m\}` of :math:`r` parameters,

.. math::

    A = [J]_{:, j, \mathcal{R}} \in \mathbb{R}^{n \times r}, \qquad
    A_{i k} = \frac{\partial f_j(\theta; x^{(i)})}{\partial \theta_{\mathcal{R}_k}},

for one output unit :math:`j` (``output_index=j``) or for all outputs jointly (rows
``i * d_y + j``, sample-major, the row order of :class:`linops.JacobianOperator`). Optionally
the rows are centred, :math:`\tilde A = A (I - \tfrac{1}{r} \mathbf{1}\mathbf{1}^\top)` (each
row minus its mean over the reference columns: the :math:`r` weights are the observations of
the "covariance of the model weights" :math:`\tilde A \tilde A^\top` of section 3.1).

Proposition 3.1 of seed 000: if :math:`\tilde A^\top \tilde A \psi = \lambda \psi` with
:math:`\lambda \ne 0`, then :math:`\phi = \tilde A \psi / \sqrt{\lambda}` is a unit eigenvector
of the :math:`n \times n` matrix :math:`\tilde A \tilde A^\top` with the same eigenvalue. So the
leading eigenvectors :math:`V_J` of the big covariance come from an :math:`r \times r`
eigendecomposition (:func:`reference_gram_eigh`), and the numerical rank of :math:`\tilde A`
(:func:`reference_rank`) estimates the rank of the full Jacobian once :math:`r` exceeds it.

Public API (stable; the low-rank trainer of issue 6 builds on it):

* :func:`select_reference_set` -- indices of ``r`` parameters (random, largest magnitude,
  largest Jacobian-column norm, leverage-score sampling, or user-supplied);
* :func:`reference_jacobian` -- the ``n x r`` (or ``n d_y x r``) matrix, by batched JVPs on
  unit tangents or by per-sample gradients;
* :func:`reference_gram_eigh` -- Proposition 3.1: eigenvalues, :math:`\psi`, :math:`V_J`;
* :func:`reference_rank` -- effective numerical rank (paper's threshold or user tolerances);
* :func:`rank_curve` -- rank and rank-to-model-size ratio as ``r`` grows (seed 000 Figure 2);
* :func:`exact_jacobian_rank` -- the numerical rank of the full Jacobian, for comparison.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch.func import functional_call, jacrev, vmap

from linops.base import TorchLinearOperator
from linops.jacobian import JacobianOperator
from linops.params import ParamSpace

__all__ = [
    "STRATEGIES",
    "RankCurve",
    "ReferenceGram",
    "exact_jacobian_rank",
    "jacobian_column_norms",
    "rank_curve",
    "reference_gram_eigh",
    "reference_jacobian",
    "reference_rank",
    "select_reference_set",
]

#: Names accepted by :func:`select_reference_set` (besides an explicit index set).
STRATEGIES = ("random", "magnitude", "gradient", "leverage")

#: Bound on the per-sample Jacobian block held at once by the ``"vjp"`` route (bytes).
_PER_SAMPLE_BYTES = 256 * 2**20


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
    """Reference rank as the reference-set size grows (seed 000 Figure 2).

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


# --------------------------------------------------------------------------- helpers
def _check_r(r: Any, m: int) -> int:
    if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= m:
        raise ValueError(f"r: expected an integer in [1, {m}] (the parameter count), got {r!r}")
    return r


def _check_indices(indices: Any, m: int) -> torch.Tensor:
    idx = torch.as_tensor(indices)
    if idx.dtype.is_floating_point or idx.dtype == torch.bool or idx.ndim != 1 or idx.numel() == 0:
        raise ValueError(
            "indices: expected a non-empty 1-d sequence of integer parameter indices, got "
            f"dtype {idx.dtype} and shape {tuple(idx.shape)}"
        )
    idx = idx.to(torch.long).cpu()
    if int(idx.min()) < 0 or int(idx.max()) >= m:
        raise ValueError(
            f"indices: expected values in [0, {m - 1}], got range [{int(idx.min())}, "
            f"{int(idx.max())}]"
        )
    if torch.unique(idx).numel() != idx.numel():
        raise ValueError("indices: expected distinct parameter indices, got repeats")
    return idx


def _inputs_tensor(inputs: Any) -> torch.Tensor:
    if isinstance(inputs, tuple | list) and inputs and isinstance(inputs[0], torch.Tensor):
        inputs = inputs[0]
    if not isinstance(inputs, torch.Tensor):
        raise TypeError(
            f"inputs: expected a tensor or an (X, y) pair of tensors, got {type(inputs).__name__}"
        )
    if inputs.ndim < 1 or len(inputs) == 0:
        raise ValueError(f"inputs: expected at least one sample, got shape {tuple(inputs.shape)}")
    return inputs


def _space(model: torch.nn.Module, params: Any, dtype: torch.dtype | None) -> ParamSpace:
    space = ParamSpace(model, params)
    return space.to(dtype=dtype) if dtype is not None else space


def _num_outputs(space: ParamSpace, X: torch.Tensor, output_index: int | None) -> int:
    with torch.no_grad():
        d = space.functional_call(space.values(), X[:1]).reshape(1, -1).shape[1]
    if output_index is not None and (
        isinstance(output_index, bool) or not isinstance(output_index, int)
    ):
        raise TypeError(f"output_index: expected an int or None, got {type(output_index).__name__}")
    if output_index is not None and not 0 <= output_index < d:
        raise ValueError(f"output_index: expected an integer in [0, {d - 1}], got {output_index}")
    return 1 if output_index is not None else d


def _per_sample_blocks(space: ParamSpace, X: torch.Tensor, output_index: int | None, d: int) -> Any:
    """Yield ``(rows, m)`` blocks of the full Jacobian, sample-major, via ``vmap(jacrev)``."""
    params = space.values()
    model = space.model

    def f(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, p, (x[None],)).reshape(-1)
        return out if output_index is None else out[output_index : output_index + 1]

    per = vmap(jacrev(f), in_dims=(None, 0))
    item = torch.empty((), dtype=space.dtype).element_size()
    chunk = max(1, _PER_SAMPLE_BYTES // max(1, d * space.dim * item))
    for i in range(0, len(X), chunk):
        jac = per(params, X[i : i + chunk])  # name -> (b, d, *shape)
        yield torch.cat([jac[n].reshape(jac[n].shape[0] * d, -1) for n in space.names], dim=1)


def jacobian_column_norms(
    model: torch.nn.Module,
    inputs: Any,
    *,
    params: Any = None,
    output_index: int | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    r"""Exact column norms :math:`\|J_{:, k}\|_2` of the Jacobian, one per parameter.

    :math:`\|J_{:,k}\|_2^2 = \sum_i \sum_j (\partial f_j(x^{(i)}) / \partial \theta_k)^2` (over the
    chosen output unit only when ``output_index`` is given): the norm of weight ``k``'s
    ``n``-dimensional representation (seed 000 section 3.1). Computed from per-sample Jacobian
    blocks, never holding more than a bounded block.

    Returns
    -------
    torch.Tensor
        ``(m,)`` column norms in :class:`linops.ParamSpace` order.
    """
    X = _inputs_tensor(inputs)
    space = _space(model, params, dtype)
    X = X.to(dtype=space.dtype, device=space.device)
    d = _num_outputs(space, X, output_index)
    sq = torch.zeros(space.dim, dtype=space.dtype, device=space.device)
    with torch.no_grad():
        for block in _per_sample_blocks(space, X, output_index, d):
            sq += (block * block).sum(0)
    return sq.sqrt()


def _leverage_scores(
    J: JacobianOperator, k: int, oversample: int, gen: torch.Generator
) -> torch.Tensor:
    """Rank-``k`` column leverage scores of ``J`` from a Gaussian sketch of its range."""
    rows, m = J.shape
    s = min(rows, m, k + oversample)
    Omega = torch.randn(m, s, generator=gen, dtype=J.torch_dtype).to(J.device)
    Q = torch.linalg.qr(J._apply(Omega)).Q  # (rows, s): approximate range of J
    B = J._apply(Q, adjoint=True)  # (m, s) = (Q^T J)^T
    U, S, _ = torch.linalg.svd(B, full_matrices=False)  # right singular vectors of J ~ U
    keep = max(1, min(k, int((S > S[0] * s * torch.finfo(S.dtype).eps).sum())))
    return (U[:, :keep] ** 2).sum(1)


def select_reference_set(
    model: torch.nn.Module,
    inputs: Any,
    r: int,
    strategy: str | Sequence[int] | torch.Tensor = "random",
    *,
    params: Any = None,
    output_index: int | None = None,
    oversample: int = 10,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    r"""Choose a reference set :math:`\mathcal{R}` of ``r`` parameters (seed 000 section 3.1).

    Parameters
    ----------
    model
        The network (at its current parameters).
    inputs
        ``(n, ...)`` input tensor or ``(X, y)`` pair; used by ``"gradient"`` and ``"leverage"``.
    r
        Reference-set size, ``1 <= r <= m``.
    strategy
        * ``"random"``: uniform without replacement;
        * ``"magnitude"``: the ``r`` largest :math:`|\theta_k|` (the paper's "important
          weights", after Frankle & Carbin 2018);
        * ``"gradient"``: the ``r`` largest Jacobian column norms :math:`\|J_{:,k}\|_2`
          (:func:`jacobian_column_norms`: the weights whose outputs move most);
        * ``"leverage"``: sampled without replacement with probability proportional to the
          rank-``r`` column leverage scores :math:`\ell_k = \|V_r^\top e_k\|^2` of :math:`J`
          (Drineas, Mahoney & Muthukrishnan 2008), with :math:`V_r` from a Gaussian sketch of
          ``r + oversample`` columns (one batched JVP and one batched VJP);
        * a sequence or tensor of distinct indices: used as given (validated; ``r`` must
          equal its length).
    params
        Which parameters (see :class:`linops.ParamSpace`); indices refer to its flat order.
    output_index
        Restrict ``"gradient"`` / ``"leverage"`` to output unit ``j``.
    oversample
        Extra sketch columns for ``"leverage"``.
    generator
        Random generator for ``"random"`` and ``"leverage"`` (default: a fresh one seeded 0).

    Returns
    -------
    torch.Tensor
        ``(r,)`` int64 indices into the flat parameter vector (CPU), ascending.

    Raises
    ------
    ValueError
        For ``r`` out of range, an unknown strategy, or invalid explicit indices.

    Examples
    --------
    >>> import torch
    >>> lin = torch.nn.Linear(3, 1, bias=False)
    >>> with torch.no_grad():
    ...     _ = lin.weight.copy_(torch.tensor([[0.1, -3.0, 2.0]]))
    >>> select_reference_set(lin, torch.ones(4, 3), 2, "magnitude").tolist()
    [1, 2]
    """
    space = ParamSpace(model, params)
    m = space.dim
    if not isinstance(strategy, str):
        idx = _check_indices(strategy, m)
        if idx.numel() != r:
            raise ValueError(f"r: expected {idx.numel()} (the number of given indices), got {r}")
        return torch.sort(idx).values
    r = _check_r(r, m)
    if strategy not in STRATEGIES:
        raise ValueError(
            f"strategy: expected one of {STRATEGIES} or an index set, got {strategy!r}"
        )
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    if strategy == "random":
        idx = torch.randperm(m, generator=gen)[:r]
    elif strategy == "magnitude":
        idx = torch.topk(space.flat_values().abs().cpu(), r).indices
    elif strategy == "gradient":
        norms = jacobian_column_norms(model, inputs, params=params, output_index=output_index)
        idx = torch.topk(norms.cpu(), r).indices
    else:
        J = JacobianOperator(model, _inputs_tensor(inputs), params, output_index=output_index)
        scores = _leverage_scores(J, r, oversample, gen).cpu().double()
        probs = scores + scores.sum() * 1e-12 / m  # every weight has a (tiny) chance
        idx = torch.multinomial(probs, r, replacement=False, generator=gen)
    return torch.sort(idx).values


def reference_jacobian(
    model: torch.nn.Module,
    inputs: Any,
    indices: Sequence[int] | torch.Tensor,
    *,
    params: Any = None,
    output_index: int | None = None,
    center: bool = False,
    method: str = "auto",
    dtype: torch.dtype | None = None,
    batch_size: int | None = None,
) -> torch.Tensor:
    r"""The reference submatrix :math:`A = [J]_{:, j, \mathcal{R}}` (seed 000 section 3.1).

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
    X = _inputs_tensor(inputs)
    space = _space(model, params, dtype)
    idx = _check_indices(indices, space.dim)
    X = X.to(dtype=space.dtype, device=space.device)
    d = _num_outputs(space, X, output_index)
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
            A = torch.cat([b[:, cols] for b in _per_sample_blocks(space, X, output_index, d)])
    A = A.detach()
    return A - A.mean(dim=1, keepdim=True) if center else A


def _check_matrix(A: Any) -> torch.Tensor:
    if not isinstance(A, torch.Tensor):
        raise TypeError(f"A: expected a torch tensor, got {type(A).__name__}")
    if A.ndim != 2 or A.shape[0] == 0 or A.shape[1] == 0:
        raise ValueError(f"A: expected a non-empty 2-d matrix (n x r), got shape {tuple(A.shape)}")
    if not A.dtype.is_floating_point:
        raise TypeError(f"A: expected a floating dtype, got {A.dtype}")
    return A


def _threshold(
    eigenvalues: torch.Tensor, n: int, r: int, rtol: float | None, atol: float | None, eps: float
) -> float:
    """Eigenvalue threshold: ``max(atol, rtol * lambda_1)``; default rtol = r * eps (paper)."""
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
    r"""Proposition 3.1 of seed 000: eigenvectors of :math:`\tilde A \tilde A^\top` from an ``r x r`` eigh.

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
    thr = _threshold(evals, n, r, rtol, atol, torch.finfo(A.dtype).eps)
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
    r"""Effective numerical rank of a reference matrix (seed 000 section 3.2, "Low-rank Jacobian").

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
        r = A.eigenvalues.numel()
        thr = _threshold(A.eigenvalues, 0, r, rtol, atol, torch.finfo(A.eigenvalues.dtype).eps)
        return int((A.eigenvalues > thr).sum())
    A = _check_matrix(A)
    n, r = A.shape
    if rule == "paper":
        At = (A - A.mean(dim=1, keepdim=True) if center else A).double()
        # the non-zero eigenvalues of At^T At and At At^T agree (Prop. 3.1): use the smaller
        evals = torch.linalg.eigvalsh(At.T @ At if r <= n else At @ At.T).clamp_min(0)
        thr = _threshold(evals, n, r, rtol, atol, torch.finfo(A.dtype).eps)
        return int((evals > thr).sum())
    At = A - A.mean(dim=1, keepdim=True) if center else A
    s = torch.linalg.svdvals(At)
    thr = _threshold(
        s, n, r, max(n, r) * torch.finfo(A.dtype).eps if rtol is None else rtol, atol, 0.0
    )
    return int((s > thr).sum())


def rank_curve(
    model: torch.nn.Module,
    inputs: Any,
    sizes: Sequence[int],
    strategy: str = "random",
    *,
    params: Any = None,
    output_index: int | None = None,
    center: bool = True,
    rule: str = "paper",
    rtol: float | None = None,
    dtype: torch.dtype | None = None,
    generator: torch.Generator | None = None,
) -> RankCurve:
    r"""Reference rank against reference-set size (seed 000 section 4.1, Figure 2).

    The reference sets are nested: one ordering of the parameters is drawn with the largest
    size and each smaller set is a prefix of it (for ``"magnitude"`` / ``"gradient"`` the top
    ``r``; for ``"random"`` / ``"leverage"`` the first ``r`` drawn), so the rank is
    non-decreasing in ``r`` and the reference Jacobian is computed once.

    Parameters
    ----------
    sizes
        Reference-set sizes (each in ``[1, m]``).
    center, rule, rtol
        As in :func:`reference_jacobian` and :func:`reference_rank` (centred by default, as
        the paper).
    dtype
        Compute the reference Jacobian in this dtype.

    Returns
    -------
    RankCurve
    """
    space = ParamSpace(model, params)
    m = space.dim
    sizes = sorted({_check_r(int(s), m) for s in sizes})
    if not sizes:
        raise ValueError("sizes: expected at least one reference-set size, got none")
    order = _ordered_selection(model, inputs, sizes[-1], strategy, params, output_index, generator)
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


def _ordered_selection(model, inputs, r, strategy, params, output_index, generator) -> torch.Tensor:
    """Indices in selection order (prefixes are the smaller reference sets)."""
    space = ParamSpace(model, params)
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    if strategy == "random":
        return torch.randperm(space.dim, generator=gen)[:r]
    if strategy == "magnitude":
        return torch.topk(space.flat_values().abs().cpu(), r).indices
    if strategy == "gradient":
        norms = jacobian_column_norms(model, inputs, params=params, output_index=output_index)
        return torch.topk(norms.cpu(), r).indices
    idx = select_reference_set(
        model, inputs, r, strategy, params=params, output_index=output_index, generator=gen
    )
    return idx[torch.randperm(idx.numel(), generator=gen)]


def exact_jacobian_rank(
    model: torch.nn.Module,
    inputs: Any,
    *,
    params: Any = None,
    output_index: int | None = None,
    center: bool = False,
    rtol: float | None = None,
    method: str = "auto",
    dtype: torch.dtype | None = None,
    seed: int = 0,
) -> int:
    r"""Numerical rank of the full Jacobian (the quantity the reference rank estimates).

    Parameters
    ----------
    center
        Row-centre over all ``m`` columns, :math:`\tilde J = J (I - \mathbf{1}\mathbf{1}^\top/m)`.
    rtol
        Singular values above ``rtol * sigma_1`` count; default ``max(rows, m) eps``.
    method
        ``"dense"``: singular values of the Jacobian assembled from per-sample blocks (for
        ``rows * m`` up to a few 1e7 entries); ``"matrix_free"``: :func:`linops.numerical_rank`
        on the :class:`linops.JacobianOperator` (adaptive range finder); ``"gram"``: the
        Jacobian assembled in its dtype, :math:`J J^\top` formed in float64 by column blocks and
        :math:`\sigma_i = \sqrt{\lambda_i(J J^\top)}` (for few rows and many columns: the
        float64 Gram resolves :math:`\sigma_i/\sigma_1` down to about 1e-8, below float32's
        own rounding of ``J``); ``"auto"``: dense up to 512 MiB, gram up to 4096 rows and
        4 GiB, else matrix-free.
    dtype
        Compute in this dtype (float64 recommended for small models).

    Returns
    -------
    int
    """
    if method not in ("auto", "dense", "gram", "matrix_free"):
        raise ValueError(
            f"method: expected 'auto', 'dense', 'gram' or 'matrix_free', got {method!r}"
        )
    X = _inputs_tensor(inputs)
    space = _space(model, params, dtype)
    X = X.to(dtype=space.dtype, device=space.device)
    d = _num_outputs(space, X, output_index)
    rows, m = len(X) * d, space.dim
    item = torch.empty((), dtype=space.dtype).element_size()
    if method == "auto":
        size = rows * m * item
        method = (
            "dense"
            if size <= 512 * 2**20
            else "gram"
            if rows <= 4096 and size <= 4 * 2**30
            else "matrix_free"
        )
    if method in ("dense", "gram"):
        with torch.no_grad():
            J = torch.cat(list(_per_sample_blocks(space, X, output_index, d)))
        if center:
            J = J - J.mean(dim=1, keepdim=True)
        s = torch.linalg.svdvals(J) if method == "dense" else _gram_singular_values(J)
        tol = (max(rows, m) * torch.finfo(J.dtype).eps if rtol is None else rtol) * float(s[0])
        return int((s > tol).sum())
    return _matrix_free_rank(model, X, params, output_index, center, rtol, space.dtype, seed)


def _gram_singular_values(J: torch.Tensor, block: int = 8192) -> torch.Tensor:
    K = torch.zeros(J.shape[0], J.shape[0], dtype=torch.float64, device=J.device)
    for i in range(0, J.shape[1], block):
        B = J[:, i : i + block].double()
        K += B @ B.T
    return torch.linalg.eigvalsh(K).flip(0).clamp_min(0).sqrt()


def _matrix_free_rank(model, X, params, output_index, center, rtol, dtype, seed) -> int:
    import linops

    if not hasattr(linops, "numerical_rank"):
        raise RuntimeError("exact_jacobian_rank: linops.numerical_rank is not available yet")
    J = JacobianOperator(model, X, params, output_index=output_index, dtype=dtype)
    op = _RowCentered(J) if center else J
    kwargs: dict[str, Any] = {"seed": seed}
    if rtol is not None:
        kwargs["rtol"] = rtol
    return int(linops.numerical_rank(op, **kwargs))


class _RowCentered(TorchLinearOperator):
    r""":math:`J (I - \mathbf{1}\mathbf{1}^\top / m)`: every row minus its mean over the columns."""

    def __init__(self, J: Any) -> None:
        self.J = J
        super().__init__(J.shape, dtype=J.torch_dtype, device=J.device)

    def _matmat_torch(self, X: torch.Tensor) -> torch.Tensor:
        return self.J._apply(X - X.mean(dim=0, keepdim=True))

    def _rmatmat_torch(self, Y: torch.Tensor) -> torch.Tensor:
        Z = self.J._apply(Y, adjoint=True)
        return Z - Z.mean(dim=0, keepdim=True)
