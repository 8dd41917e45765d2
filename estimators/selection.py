r"""Reference sets: which ``r`` of the ``m`` parameters represent the Jacobian.

"Leveraging Low Rank Structure in the Lazy Regime" (an anonymous ICLR 2025 submission, no arXiv
id given; "the paper" below), section 3.1, keeps only the Jacobian columns of a *reference set*
:math:`\mathcal{R}` of parameters; :func:`select_reference_set` chooses it (at random, by
weight magnitude, by Jacobian column norm or by leverage-score sampling) and
:mod:`estimators.reference` builds the reference matrix and its rank from it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from estimators._jacobian_blocks import (
    check_indices,
    check_size,
    inputs_tensor,
    num_outputs,
    param_space,
    per_sample_blocks,
)
from estimators.seeding import Seed, make_generator
from linops import Params
from linops.jacobian import JacobianOperator
from linops.params import ParamSpace
from linops.rank import numerical_rank

__all__ = ["STRATEGIES", "jacobian_column_norms", "select_reference_set"]

#: Names accepted by :func:`select_reference_set` (besides an explicit index set).
STRATEGIES = ("random", "magnitude", "gradient", "leverage")


def jacobian_column_norms(
    model: torch.nn.Module,
    inputs: torch.Tensor | Sequence[torch.Tensor],
    *,
    params: Params | None = None,
    output_index: int | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    r"""Exact column norms :math:`\|J_{:, k}\|_2` of the Jacobian, one per parameter.

    :math:`\|J_{:,k}\|_2^2 = \sum_i \sum_j (\partial f_j(x^{(i)}) / \partial \theta_k)^2` (over the
    chosen output unit only when ``output_index`` is given): the norm of weight ``k``'s
    ``n``-dimensional representation (the paper's section 3.1). Computed from per-sample Jacobian
    blocks, never holding more than a bounded block.

    Returns
    -------
    torch.Tensor
        ``(m,)`` column norms in :class:`linops.ParamSpace` order.
    """
    X = inputs_tensor(inputs)
    space = param_space(model, params, dtype)
    X = X.to(dtype=space.dtype, device=space.device)
    d = num_outputs(space, X, output_index)
    sq = torch.zeros(space.dim, dtype=space.dtype, device=space.device)
    with torch.no_grad():
        for block in per_sample_blocks(space, X, output_index, d):
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
    keep = max(1, min(k, numerical_rank(S)))  # linops' default threshold, s eps sigma_1
    return (U[:, :keep] ** 2).sum(1)


def select_reference_set(
    model: torch.nn.Module,
    inputs: torch.Tensor | Sequence[torch.Tensor],
    r: int,
    strategy: str | Sequence[int] | torch.Tensor = "random",
    *,
    params: Params | None = None,
    output_index: int | None = None,
    oversample: int = 10,
    seed: Seed = 0,
) -> torch.Tensor:
    r"""Choose a reference set :math:`\mathcal{R}` of ``r`` parameters (the paper's section 3.1).

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
    seed
        Randomness of ``"random"`` and ``"leverage"`` (see :mod:`estimators.seeding`).

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
        idx = check_indices(strategy, m)
        if idx.numel() != r:
            raise ValueError(f"r: expected {idx.numel()} (the number of given indices), got {r}")
        return torch.sort(idx).values
    r = check_size(r, m)
    if strategy not in STRATEGIES:
        raise ValueError(
            f"strategy: expected one of {STRATEGIES} or an index set, got {strategy!r}"
        )
    gen = make_generator(seed)
    if strategy == "random":
        idx = torch.randperm(m, generator=gen)[:r]
    elif strategy == "magnitude":
        idx = torch.topk(space.flat_values().abs().cpu(), r).indices
    elif strategy == "gradient":
        norms = jacobian_column_norms(model, inputs, params=params, output_index=output_index)
        idx = torch.topk(norms.cpu(), r).indices
    else:
        J = JacobianOperator(model, inputs_tensor(inputs), params, output_index=output_index)
        scores = _leverage_scores(J, r, oversample, gen).cpu().double()
        probs = scores + scores.sum() * 1e-12 / m  # every weight has a (tiny) chance
        idx = torch.multinomial(probs, r, replacement=False, generator=gen)
    return torch.sort(idx).values


def ordered_selection(
    model: torch.nn.Module,
    inputs: torch.Tensor | Sequence[torch.Tensor],
    r: int,
    strategy: str,
    params: Params | None,
    output_index: int | None,
    seed: Seed,
) -> torch.Tensor:
    """Return indices in selection order (prefixes are the smaller reference sets)."""
    space = ParamSpace(model, params)
    gen = make_generator(seed)
    if strategy == "random":
        return torch.randperm(space.dim, generator=gen)[:r]
    if strategy == "magnitude":
        return torch.topk(space.flat_values().abs().cpu(), r).indices
    if strategy == "gradient":
        norms = jacobian_column_norms(model, inputs, params=params, output_index=output_index)
        return torch.topk(norms.cpu(), r).indices
    idx = select_reference_set(
        model, inputs, r, strategy, params=params, output_index=output_index, seed=gen
    )
    return idx[torch.randperm(idx.numel(), generator=gen)]
