r"""Laziness: the Hessian-to-gradient ratio and the measured Jacobian drift.

"Leveraging Low Rank Structure in the Lazy Regime" (an anonymous ICLR 2025 submission, no arXiv
id given; "the paper" below), section 3.2, after Chizat et al. 2019 and Liu et al. 2020, measures how lazy a network is by

.. math::

    \rho_j(x) = \frac{\|\nabla^2_\theta f_j(\theta; x)\|_2}{\|\nabla_\theta f_j(\theta; x)\|_2^2},

for single output units :math:`j` and data points :math:`x`, averaged over both. The numerator
is the largest-magnitude eigenvalue of the output Hessian, found by Lanczos on
:class:`linops.OutputHessianOperator` (exact Hessian-vector products, or the paper's central
finite differences). Why this ratio: moving the parameters by :math:`\Delta\theta` changes the
gradient by at most :math:`\|H\|\|\Delta\theta\|`, and fitting a residual of size :math:`\delta`
needs :math:`\|\Delta\theta\| \approx \delta / \|\nabla f\|`, so the relative change of the
gradient is about :math:`\rho\,\delta`. Liu et al. (2020) show :math:`\|H\| = O(1/\sqrt{m})`
for width :math:`m` in the NTK parameterization while :math:`\|\nabla f\| = \Theta(1)`.

Two denominators are offered:

* ``"exact"`` (default): :math:`\|\nabla_\theta f_j(x)\|_2^2` at the same point :math:`x`, the
  quantity of the bound above;
* ``"reference"`` (the paper's): :math:`\sigma_1^2` of the row-centred reference matrix
  :math:`[\tilde J]_{:, j, \mathcal{R}}` over the whole dataset (the largest eigenvalue of the
  ``r x r`` Gram, Proposition 3.1). This mixes a per-point numerator with a dataset-level
  denominator that grows with ``n`` and shrinks with ``r / m``, so its value depends on those
  choices; it is kept to reproduce the paper.

The static ratio is a prediction; :func:`jacobian_drift` measures what happens along a real
training run, :math:`\|J_t - J_0\| / \|J_0\|` (spectral norm by Golub-Kahan :func:`linops.svds`
on the difference operator, or the exact Frobenius norm from per-sample blocks), and
:class:`JacobianDrift` records it as a trainer callback.

References
----------
.. [1] L. Chizat, E. Oyallon and F. Bach, "On lazy training in differentiable programming",
   NeurIPS 2019. arXiv:1812.07956
.. [2] C. Liu, L. Zhu and M. Belkin, "On the linearity of large non-linear models: when and
   why the tangent kernel is constant", NeurIPS 2020. arXiv:2010.01092
.. [3] Anonymous, "Leveraging Low Rank Structure in the Lazy Regime", ICLR 2025 submission
   (OpenReview; no arXiv id given).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple, Protocol

import torch

from estimators._jacobian_blocks import inputs_tensor, num_outputs, per_sample_blocks
from estimators.reference import reference_gram_eigh, reference_jacobian
from estimators.seeding import Seed, make_generator
from estimators.selection import select_reference_set
from linops import Params
from linops.hessian import OutputHessianOperator
from linops.jacobian import JacobianOperator
from linops.lanczos import lanczos
from linops.params import ParamSpace
from linops.svds import svds

__all__ = [
    "HessianNorm",
    "JacobianDrift",
    "LazinessResult",
    "hessian_norm",
    "jacobian_drift",
    "laziness_ratio",
]


class LazinessResult(NamedTuple):
    r"""Laziness ratios over sampled points and output units.

    Attributes
    ----------
    mean, std, stderr
        Mean, standard deviation and standard error of :math:`\rho_j(x)` over all pairs.
    ratios
        ``(p, q)`` :math:`\rho_j(x)` for ``p`` points and ``q`` output units.
    hessian_norms
        ``(p, q)`` :math:`\|\nabla^2 f_j(x)\|_2`.
    gradient_norms
        ``(p, q)`` :math:`\|\nabla f_j(x)\|_2`.
    points
        ``(p,)`` indices of the sampled data points.
    outputs
        The ``q`` output units.
    reference_norms
        ``(q,)`` the paper's denominator root :math:`\sigma_1([\tilde J]_{:, j, \mathcal{R}})`
        (``None`` unless requested).
    paper_ratio_mean
        Mean of :math:`\|\nabla^2 f_j(x)\| / \sigma_1^2` (``None`` unless requested).
    num_matvecs
        Hessian-vector products used by Lanczos, in total.
    """

    mean: float
    std: float
    stderr: float
    ratios: torch.Tensor
    hessian_norms: torch.Tensor
    gradient_norms: torch.Tensor
    points: torch.Tensor
    outputs: list[int]
    reference_norms: torch.Tensor | None
    paper_ratio_mean: float | None
    num_matvecs: int


class HessianNorm(NamedTuple):
    r"""Result of :func:`hessian_norm`.

    Attributes
    ----------
    norm
        :math:`\|\nabla^2_\theta f_j(\theta; x)\|_2`.
    num_matvecs
        Hessian-vector products used by Lanczos.
    """

    norm: float
    num_matvecs: int


def hessian_norm(
    model: torch.nn.Module,
    x: torch.Tensor,
    output_index: int = 0,
    *,
    method: str = "exact",
    eps: float | None = None,
    params: Params | None = None,
    rtol: float | None = None,
    seed: Seed = 0,
) -> HessianNorm:
    r"""Spectral norm :math:`\|\nabla^2_\theta f_j(\theta; x)\|_2` by Lanczos (``which="LM"``).

    Parameters
    ----------
    model, x, output_index
        The network, one input (leading batch dimension of 1 optional) and the unit :math:`j`.
    method, eps
        ``"exact"`` or ``"finite_difference"`` products (see :class:`linops.OutputHessianOperator`).
    params
        Which parameters (see :class:`linops.ParamSpace`).
    rtol
        Lanczos tolerance, relative to the norm (:func:`linops.lanczos`'s ``tol``; default
        ``sqrt(eps)`` of the dtype).
    seed
        Randomness of the Lanczos start vector.

    Returns
    -------
    HessianNorm
        The norm and the number of Hessian-vector products.

    Examples
    --------
    >>> import torch
    >>> lin = torch.nn.Linear(3, 2).double()
    >>> hessian_norm(lin, torch.ones(1, 3, dtype=torch.float64)).norm  # a linear model is flat
    0.0
    """
    x = x if x.ndim > 1 else x[None]
    H = OutputHessianOperator(model, x[:1], output_index, method=method, eps=eps, params=params)
    res = lanczos(H, 1, "LM", rtol=rtol, seed=seed)
    return HessianNorm(float(res.eigenvalues.abs().max()), int(res.num_matvecs))


def _pick(count: int | None, total: int, gen: torch.Generator) -> torch.Tensor:
    if count is None or count >= total:
        return torch.arange(total)
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"num_points: expected a positive integer or None, got {count!r}")
    return torch.sort(torch.randperm(total, generator=gen)[:count]).values


def laziness_ratio(
    model: torch.nn.Module,
    inputs: torch.Tensor | Sequence[torch.Tensor],
    *,
    num_points: int | None = 8,
    output_indices: Sequence[int] | None = None,
    method: str = "exact",
    eps: float | None = None,
    reference_size: int | None = None,
    reference_strategy: str = "random",
    params: Params | None = None,
    dtype: torch.dtype | None = None,
    rtol: float | None = None,
    seed: Seed = 0,
) -> LazinessResult:
    r"""Compute the laziness ratio :math:`\|\nabla^2 f_j(x)\| / \|\nabla f_j(x)\|^2` (section 3.2).

    Parameters
    ----------
    model
        The network.
    inputs
        ``(n, ...)`` inputs or an ``(X, y)`` pair.
    num_points
        Data points sampled without replacement (``None``: all).
    output_indices
        Output units (default: all).
    method, eps
        Hessian products: ``"exact"`` or the paper's ``"finite_difference"``.
    reference_size
        If given, also the paper's ratio with denominator :math:`\sigma_1^2` of the row-centred
        ``n x r`` reference matrix per unit (``r = reference_size``, chosen by
        ``reference_strategy``).
    params
        Which parameters (see :class:`linops.ParamSpace`).
    dtype
        Compute in this dtype (a float64 copy of the model is made if needed).
    rtol
        Lanczos tolerance, relative to each Hessian's norm (see :func:`hessian_norm`).
    seed
        Randomness of the choice of points and of the reference set. The Lanczos start
        vector of pair ``(a, b)`` (``a``-th point, ``b``-th unit) is seeded
        ``a * len(output_indices) + b`` whatever ``seed``.

    Returns
    -------
    LazinessResult

    Raises
    ------
    ValueError
        For an unknown ``method``, bad ``num_points`` or an output unit out of range.
    """
    if method not in ("exact", "finite_difference"):
        raise ValueError(f"method: expected 'exact' or 'finite_difference', got {method!r}")
    X = inputs_tensor(inputs)
    gen = make_generator(seed)
    model = _cast(model, dtype)
    space = ParamSpace(model, params)
    X = X.to(dtype=space.dtype, device=space.device)
    d = num_outputs(space, X, None)
    outputs = list(range(d)) if output_indices is None else [int(j) for j in output_indices]
    for j in outputs:
        num_outputs(space, X, j)
    points = _pick(num_points, len(X), gen)
    hn = torch.zeros(len(points), len(outputs), dtype=torch.float64)
    gn = torch.zeros_like(hn)
    total = 0
    for a, i in enumerate(points.tolist()):
        for b, j in enumerate(outputs):
            H = OutputHessianOperator(model, X[i : i + 1], j, method=method, eps=eps, params=params)
            res = lanczos(H, 1, "LM", rtol=rtol, seed=a * len(outputs) + b)
            hn[a, b] = float(res.eigenvalues.abs().max())
            gn[a, b] = float(H.gradient().norm())
            total += int(res.num_matvecs)
    ratios = hn / gn.clamp_min(torch.finfo(torch.float64).tiny) ** 2
    ref_norms, paper = None, None
    if reference_size is not None:
        idx = select_reference_set(
            model, X, reference_size, reference_strategy, params=params, seed=gen
        )
        ref_norms = torch.tensor(
            [
                float(
                    reference_gram_eigh(
                        reference_jacobian(
                            model, X, idx, params=params, output_index=j, center=True
                        )
                    )
                    .eigenvalues[0]
                    .sqrt()
                )
                for j in outputs
            ],
            dtype=torch.float64,
        )
        paper = float((hn / ref_norms**2).mean())
    flat = ratios.reshape(-1)
    std = float(flat.std()) if flat.numel() > 1 else 0.0
    return LazinessResult(
        float(flat.mean()),
        std,
        std / math.sqrt(flat.numel()),
        ratios,
        hn,
        gn,
        points,
        outputs,
        ref_norms,
        paper,
        total,
    )


def _cast(model: torch.nn.Module, dtype: torch.dtype | None) -> torch.nn.Module:
    if dtype is None or next(model.parameters()).dtype == dtype:
        return model
    import copy

    return copy.deepcopy(model).to(dtype)


def _full_values(
    space: ParamSpace, values: Mapping[str, torch.Tensor] | torch.Tensor, name: str
) -> dict[str, torch.Tensor]:
    if isinstance(values, torch.Tensor):
        if values.shape != (space.dim,):
            raise ValueError(
                f"{name}: expected a flat vector of length {space.dim}, got {tuple(values.shape)}"
            )
        return {k: v for k, v in space.unflatten(values.to(space.dtype)).items()}
    if not isinstance(values, Mapping):
        raise TypeError(
            f"{name}: expected a mapping of tensors or a flat tensor, got {type(values).__name__}"
        )
    missing = [n for n in space.names if n not in values]
    if missing:
        raise ValueError(f"{name}: expected values for every parameter, missing {missing}")
    return {n: values[n].detach().to(space.dtype) for n in space.names}


def jacobian_drift(
    model: torch.nn.Module,
    inputs: torch.Tensor | Sequence[torch.Tensor],
    values_t: Mapping[str, torch.Tensor] | torch.Tensor,
    values_0: Mapping[str, torch.Tensor] | torch.Tensor | None = None,
    *,
    norm: str = "spectral",
    output_index: int | None = None,
    rtol: float = 1e-4,
    seed: Seed = 0,
    params: Params | None = None,
) -> float:
    r"""Measured relative change of the Jacobian, :math:`\|J_t - J_0\| / \|J_0\|`.

    Parameters
    ----------
    model
        The network (its parameters are :math:`\theta_0` unless ``values_0`` is given).
    inputs
        ``(n, ...)`` inputs (the probe set) or an ``(X, y)`` pair.
    values_t, values_0
        Parameter values by name (all of those the Jacobian is taken for), or flat vectors.
    norm
        ``"spectral"``: :math:`\sigma_1` of both operators by :func:`linops.svds` (matrix-free;
        the difference is the lazy operator ``J_t - J_0``); ``"frobenius"``: exact, from
        per-sample Jacobian blocks (memory bounded; cost about ``d_y`` backward passes).
    output_index
        Restrict to one output unit.
    rtol
        Relative tolerance of ``svds`` (its ``tol``).
    seed
        Randomness of the ``svds`` start vector.
    params
        The parameters the Jacobian is taken for (:class:`linops.ParamSpace`; default all
        trainable ones): a run that trains some of them drifts only in their columns.

    Returns
    -------
    float
    """
    if norm not in ("spectral", "frobenius"):
        raise ValueError(f"norm: expected 'spectral' or 'frobenius', got {norm!r}")
    X = inputs_tensor(inputs)
    space = ParamSpace(model, params)
    p_t = _full_values(space, values_t, "values_t")
    p_0 = space.values() if values_0 is None else _full_values(space, values_0, "values_0")
    X = X.to(dtype=space.dtype, device=space.device)
    if norm == "spectral":
        J_t = JacobianOperator(model, X, p_t, output_index=output_index)
        J_0 = JacobianOperator(model, X, p_0, output_index=output_index)
        top = svds(J_t - J_0, 1, rtol=rtol, seed=seed).singular_values
        base = svds(J_0, 1, rtol=rtol, seed=seed).singular_values
        return float(top[0]) / float(base[0])
    d = num_outputs(space, X, output_index)
    diff, base = 0.0, 0.0
    with torch.no_grad():
        blocks_t = per_sample_blocks(ParamSpace(model, p_t), X, output_index, d)
        blocks_0 = per_sample_blocks(ParamSpace(model, p_0), X, output_index, d)
        for bt, b0 in zip(blocks_t, blocks_0, strict=True):
            diff += float(((bt - b0) ** 2).sum())
            base += float((b0**2).sum())
    return math.sqrt(diff / base)


class _TrainerView(Protocol):
    """What :class:`JacobianDrift` reads of a trainer (a ``trainers.Trainer``; estimators do not import trainers)."""

    @property
    def model(self) -> torch.nn.Module:
        """The trained model."""
        ...

    @property
    def space(self) -> ParamSpace:
        """The trained parameters."""
        ...

    @property
    def values(self) -> Mapping[str, torch.Tensor]:
        """The current values of the trained parameters."""
        ...

    @property
    def initial_values(self) -> Mapping[str, torch.Tensor]:
        """Their values at step 0."""
        ...


class JacobianDrift:
    r"""Trainer callback: :math:`\|J_t - J_0\| / \|J_0\|` on a fixed probe set, every ``every`` steps.

    Parameters
    ----------
    inputs
        Probe inputs (a few hundred samples at most for the spectral norm).
    every
        Log at steps divisible by ``every``.
    norm
        ``"frobenius"`` (default, exact) or ``"spectral"`` (see :func:`jacobian_drift`).
    output_index
        Restrict to one output unit.

    Notes
    -----
    Logs ``jacobian_drift`` in the trainer's history; :attr:`records` keeps ``(step, drift)``.
    """

    def __init__(
        self,
        inputs: torch.Tensor | Sequence[torch.Tensor],
        every: int = 1,
        *,
        norm: str = "frobenius",
        output_index: int | None = None,
    ) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every: expected a positive integer, got {every!r}")
        self.inputs, self.every, self.norm, self.output_index = inputs, every, norm, output_index
        self.records: list[tuple[int, float]] = []

    def __call__(self, trainer: _TrainerView, step: int) -> dict[str, float] | None:
        """Log the Jacobian drift at steps divisible by ``every`` (else ``None``)."""
        if step % self.every:
            return None
        # the trained parameters' Jacobian: the others' columns never move with training
        value = jacobian_drift(
            trainer.model, self.inputs, dict(trainer.values), dict(trainer.initial_values),
            norm=self.norm, output_index=self.output_index, params=list(trainer.space.names),
        )  # fmt: skip
        self.records.append((step, value))
        return {"jacobian_drift": value}
