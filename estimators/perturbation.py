r"""Perturbation experiments on a training Jacobian's singular directions.

Sections 3.2-3.5 of "Understanding Gradient Descent through the Training Jacobian" (an anonymous
submission under double-blind review, no arXiv id given; "the paper" below), for a training run
:math:`\theta_T = f(\theta_0)` with training Jacobian :math:`J = U \operatorname{diag}(\sigma) V^\top`:

* section 3.2: training is linear along bulk directions over many orders of magnitude
  (:func:`linearity_test`);
* section 3.3: moving the final parameters along bulk directions barely changes in-distribution
  predictions, but does change them far out of distribution (:func:`kl_perturbation`,
  :func:`ood_inputs`);
* section 3.4: the approximate nullspace of the parameter-function Jacobian overlaps the bulk
  (:func:`parameter_function_jacobian`, :func:`bulk_overlap`);
* section 3.5: bulks of different seeds / shuffled labels overlap (:func:`bulk_overlap`
  against :func:`random_subspace_similarity`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Protocol

import numpy as np
import torch
from torch.func import functional_call

from estimators.seeding import Seed, make_generator
from linops.angles import subspace_similarity_curve
from linops.params import ParamSpace

__all__ = [
    "LinearityResult",
    "OODInputs",
    "bulk_overlap",
    "kl_perturbation",
    "linearity_test",
    "ood_inputs",
    "parameter_function_jacobian",
    "random_subspace_similarity",
]

Tensor = torch.Tensor


class _Run(Protocol):
    """A training run as a function of its initial parameters (``trainers.functional.TrainingRun``)."""

    def final(self, theta0: Tensor, /) -> Tensor:
        r"""Return the final parameters :math:`\theta_T` of a run from ``theta0``."""
        ...


class LinearityResult(NamedTuple):
    r"""Responses to :math:`\theta_0 + \lambda v_i`.

    ``response`` :math:`= u_i^\top \delta`, ``orthogonal``
    :math:`= \|\delta - u_i u_i^\top\delta\|`, ``predicted`` :math:`= \lambda\sigma_i`.
    """

    stimulus: np.ndarray
    response: np.ndarray
    orthogonal: np.ndarray
    predicted: np.ndarray


def linearity_test(
    run: _Run,
    theta0: Tensor,
    u: Tensor,
    v: Tensor,
    sigma: float,
    stimuli: Sequence[float] | None = None,
    *,
    final: Tensor | None = None,
) -> LinearityResult:
    r"""Test how linear training is along one singular direction (the paper's section 3.2, fig. 2).

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


class OODInputs(NamedTuple):
    """Test inputs and the two far-out-of-distribution sets of the paper's section 3.3.

    Attributes
    ----------
    test
        The test inputs as given.
    inverted
        ``1 - test`` (pixels inverted, inputs in [0, 1]).
    noise
        Uniform white noise of the same shape.
    """

    test: Tensor
    inverted: Tensor
    noise: Tensor


def ood_inputs(X: Tensor, *, seed: Seed = 0) -> OODInputs:
    """Test inputs and the two far-out-of-distribution sets of section 3.3.

    ``seed`` is the randomness of the white noise.

    Returns
    -------
    OODInputs
    """
    g = make_generator(seed)
    noise = torch.rand(X.shape, generator=g, dtype=torch.float64).to(X.dtype)
    return OODInputs(X, 1.0 - X, noise)


def kl_perturbation(
    space: ParamSpace,
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
    ``directions`` (singular vectors of :math:`J`; the paper perturbs the *final* parameters).

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


def parameter_function_jacobian(
    space: ParamSpace, theta: Tensor, X: Tensor, *, chunk: int = 64
) -> Tensor:
    r"""Dense parameter-function Jacobian :math:`\partial \log g(X;\theta) / \partial\theta` (the paper's section 3.4).

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

    With columns sorted by :func:`estimators.spectrum.bulk_order` (or by ascending PFJ
    singular value) this is the "bulk at k" similarity of the paper's sections 3.4-3.5
    (:func:`linops.subspace_similarity`).

    Returns
    -------
    numpy.ndarray
        One similarity per ``k``.
    """
    return subspace_similarity_curve(A, B, ks)


def random_subspace_similarity(A: Tensor, ks: Sequence[int], *, seed: Seed = 0) -> np.ndarray:
    """Baseline of :func:`bulk_overlap`: ``span(A[:, :k])`` against a Gaussian random k-subspace.

    ``seed`` is the randomness of the Gaussian subspace.

    Returns
    -------
    numpy.ndarray
        One similarity per ``k``.
    """
    g = make_generator(seed)
    R = torch.randn(A.shape[0], max(ks), generator=g, dtype=torch.float64)
    return subspace_similarity_curve(A, R, ks)
