r"""How good is a guessed gradient? Quality measures of "How to Guess a Gradient".

U. Singhal, B. Cheung, K. Chandra, J. Ragan-Kelley, J. B. Tenenbaum, T. A. Poggio and S. X. Yu,
"How to Guess a Gradient" (no arXiv id in the research document; "the paper" below), sections
3.3 and 4:

* :func:`guess_cosine`: cosine of a guess to the true gradient, per layer and whole model
  (Figure 1).
* :func:`one_step_effectiveness`: loss reduction of one step along the guess relative to one
  backprop step, each at its best step size on a grid (section 4, "One step effectiveness").
* :func:`cosine_saturation`: cosine of the average of ``K`` guesses as ``K`` grows (Figure 4
  left): it tends to 1 for unbiased guessers and saturates for biased ones.
* :func:`activation_gradient_overlap`: how much of the gradient with respect to a layer's
  activations lies in the span of those activations (Figure 2 right), with principal angles.

The bias of a guesser (section 5) is in :mod:`estimators.guess_bias`. The true gradient here
comes from backprop: these are measurements of the guessers, not parts
of them.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import torch
from torch import nn

from estimators._guess_layers import Record, find_layers, record_pass
from estimators.guesses import GradientGuesser
from estimators.seeding import Seed, make_generator
from linops.params import ParamSpace

__all__ = [
    "STEP_SIZES",
    "ActivationGradientOverlap",
    "CosineSaturation",
    "CosineSimilarity",
    "OneStep",
    "TrueGradient",
    "activation_gradient_overlap",
    "cosine_saturation",
    "guess_cosine",
    "one_step_effectiveness",
    "true_gradient",
]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: Step-size grid of :func:`one_step_effectiveness`: the paper searches 1e-5 ... 1e-1; the grid
#: is widened to 1e-6 ... 1e2 (half decades) so that guesses of any scale (e.g. directional
#: descent with appendix A.2's 1/N mean) find their best step inside it.
STEP_SIZES: tuple[float, ...] = tuple(10.0 ** (k / 2) for k in range(-12, 5))
#: Default guess counts of :func:`cosine_saturation`: 2, 4, ..., 1024.
SATURATION_COUNTS: tuple[int, ...] = tuple(2**k for k in range(1, 11))


def as_space(model: nn.Module | ParamSpace) -> ParamSpace:
    """Return the model's :class:`linops.ParamSpace` (all parameters), or the space as given."""
    if isinstance(model, ParamSpace):
        return model
    if isinstance(model, nn.Module):
        return ParamSpace(model)
    raise TypeError(
        f"model: expected a torch.nn.Module or a ParamSpace, got {type(model).__name__}"
    )


class TrueGradient(NamedTuple):
    """Batch loss and its gradient by backprop (fields as :class:`estimators.Guess`'s).

    Attributes
    ----------
    loss
        The batch loss (0-d, detached).
    grads
        Its gradient by parameter name.
    """

    loss: torch.Tensor
    grads: dict[str, torch.Tensor]


def true_gradient(
    model: nn.Module | ParamSpace,
    values: Mapping[str, torch.Tensor] | None,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: LossFn,
) -> TrueGradient:
    """Batch loss and its gradient by reverse-mode autodiff (the reference of every measure).

    ``values`` are the parameter values by name (``None``: the model's).

    Returns
    -------
    TrueGradient
    """
    space = as_space(model)
    values = space.values() if values is None else values
    leaves = {n: p.detach().requires_grad_(True) for n, p in values.items()}
    with torch.enable_grad():
        loss = loss_fn(space.functional_call(leaves, x), y)
        grads = torch.autograd.grad(loss, list(leaves.values()))
    return TrueGradient(loss.detach(), dict(zip(leaves, grads, strict=True)))


# ----------------------------------------------------------------------------- cosine
class CosineSimilarity(NamedTuple):
    """Cosine of a guess to the true gradient, per layer (module name) and for the whole model."""

    per_layer: dict[str, float]
    whole_model: float


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine of two flat vectors (0 when either is zero)."""
    den = float(a.norm() * b.norm())
    return float(a @ b) / den if den > 0 else 0.0


def guess_cosine(
    guess: Mapping[str, torch.Tensor], grad: Mapping[str, torch.Tensor]
) -> CosineSimilarity:
    r"""Cosine similarity :math:`\hat g \cdot g / (\|\hat g\| \|g\|)` (the paper's section 3.1).

    Per layer the weight and bias of one module are concatenated (layers are keyed by module
    name: the parameter name without its last component); a zero vector has cosine 0.

    Raises
    ------
    ValueError
        If the two mappings do not hold the same parameter names and shapes.

    Examples
    --------
    >>> import torch
    >>> g = {"0.weight": torch.tensor([[1.0, 0.0]]), "0.bias": torch.tensor([0.0])}
    >>> h = {"0.weight": torch.tensor([[1.0, 1.0]]), "0.bias": torch.tensor([0.0])}
    >>> round(guess_cosine(h, g).whole_model, 4)
    0.7071
    """
    if set(guess) != set(grad):
        raise ValueError(f"guess: expected the parameters {sorted(grad)}, got {sorted(guess)}")
    for n in grad:
        if guess[n].shape != grad[n].shape:
            raise ValueError(
                f"guess[{n!r}]: expected shape {tuple(grad[n].shape)}, got {tuple(guess[n].shape)}"
            )
    groups: dict[str, list[str]] = {}
    for n in grad:
        groups.setdefault(n.rpartition(".")[0], []).append(n)

    def flat(d: Mapping[str, torch.Tensor], names: Sequence[str]) -> torch.Tensor:
        return torch.cat([d[n].reshape(-1) for n in names]).double()

    per_layer = {k: cosine(flat(guess, v), flat(grad, v)) for k, v in groups.items()}
    return CosineSimilarity(per_layer, cosine(flat(guess, list(grad)), flat(grad, list(grad))))


# ----------------------------------------------------------------------------- one step
class OneStep(NamedTuple):
    r"""Result of :func:`one_step_effectiveness`.

    ``effectiveness = reduction_guess / reduction_backprop``; each reduction is the largest
    :math:`L(\theta) - L(\theta - \eta d)` over the grid, floored at 0 (not stepping).
    """

    effectiveness: float
    reduction_guess: float
    reduction_backprop: float
    step_size_guess: float
    step_size_backprop: float


@torch.no_grad()
def _best_reduction(
    space: ParamSpace,
    values: Mapping[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: LossFn,
    d: Mapping[str, torch.Tensor],
    steps: Sequence[float],
) -> tuple[float, float]:
    loss0 = float(loss_fn(space.functional_call(values, x), y))
    best, best_eta = 0.0, 0.0
    for eta in steps:
        moved = {n: p - eta * d[n] for n, p in values.items()}
        red = loss0 - float(loss_fn(space.functional_call(moved, x), y))
        if math.isfinite(red) and red > best:
            best, best_eta = red, eta
    return best, best_eta


def one_step_effectiveness(
    model: nn.Module | ParamSpace,
    values: Mapping[str, torch.Tensor] | None,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: LossFn,
    guess: Mapping[str, torch.Tensor],
    *,
    grad: Mapping[str, torch.Tensor] | None = None,
    step_sizes: Sequence[float] = STEP_SIZES,
) -> OneStep:
    r"""Loss reduction of one step along ``guess`` relative to one backprop step (section 4).

    .. math::

        \text{eff} = \frac{\max_{\eta \in \mathcal{G}} \big(L(\theta) - L(\theta - \eta \hat g)\big)_+}
                          {\max_{\eta \in \mathcal{G}} \big(L(\theta) - L(\theta - \eta g)\big)_+}

    on the same batch, with the grid :math:`\mathcal{G}` = ``step_sizes`` (default
    :data:`STEP_SIZES`). ``grad`` defaults to the backprop gradient.

    Raises
    ------
    ValueError
        If ``step_sizes`` is empty or holds a non-positive value.
    """
    space = as_space(model)
    values = space.values() if values is None else dict(values)
    steps = [float(s) for s in step_sizes]
    if not steps or min(steps) <= 0:
        raise ValueError(f"step_sizes: expected positive step sizes, got {list(step_sizes)!r}")
    if grad is None:
        _, grad = true_gradient(space, values, x, y, loss_fn)
    red_g, eta_g = _best_reduction(space, values, x, y, loss_fn, guess, steps)
    red_b, eta_b = _best_reduction(space, values, x, y, loss_fn, grad, steps)
    eff = red_g / red_b if red_b > 0 else 0.0
    return OneStep(eff, red_g, red_b, eta_g, eta_b)


# ----------------------------------------------------------------------------- bias (Fig. 4)
class CosineSaturation(NamedTuple):
    """Cosine to the true gradient of the average of ``counts[i]`` guesses (whole model)."""

    counts: list[int]
    cosine: list[float]


def cosine_saturation(
    guesser: GradientGuesser,
    model: nn.Module | ParamSpace,
    values: Mapping[str, torch.Tensor] | None,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: LossFn,
    *,
    counts: Sequence[int] = SATURATION_COUNTS,
    max_replicas: int = 256,
    seed: Seed = None,
) -> CosineSaturation:
    r"""Cosine of :math:`\frac1K \sum_{k \le K} \hat g_k` to :math:`\nabla L` (Figure 4 left).

    Pre-activation guessers average ``K`` independent guesses by replicating the batch ``K``
    times (up to ``max_replicas`` per call, with a mean-reduced ``loss_fn`` the guess of the
    replicated batch is the mean of the per-copy guesses); weight-space guessers call the
    guesser ``K`` times. Larger counts extend the running mean (counts must be increasing).
    Unbiased guessers approach cosine 1 at rate :math:`1/\sqrt K`; biased ones saturate.
    ``values`` are the parameter values by name (``None``: the model's); ``seed`` is the
    randomness of the guesses (one generator threads through all of them).

    Returns
    -------
    CosineSaturation

    Raises
    ------
    ValueError
        If ``counts`` is not a strictly increasing sequence of positive integers.
    """
    counts = [int(c) for c in counts]
    if not counts or counts[0] < 1 or any(b <= a for a, b in itertools.pairwise(counts)):
        raise ValueError(f"counts: expected increasing positive integers, got {counts!r}")
    space = as_space(model)
    values = space.values() if values is None else dict(values)
    _, grad = true_gradient(space, values, x, y, loss_fn)
    gen = make_generator(seed, x.device)
    per_call = 1 if not hasattr(guesser, "jvp_mode") else max_replicas

    def draw(k: int) -> dict[str, torch.Tensor]:
        if per_call == 1:
            return guesser(space, values, x, y, loss_fn, seed=gen).grads
        xs, ys = x.repeat(k, *[1] * (x.ndim - 1)), y.repeat(k, *[1] * (y.ndim - 1))
        return guesser(space, values, xs, ys, loss_fn, seed=gen).grads

    total = {n: torch.zeros_like(g) for n, g in grad.items()}
    done, cosines = 0, []
    for c in counts:
        if (c <= per_call and done == 0) or c < done:
            mean = draw(c)
        else:
            while done < c:
                k = min(per_call, c - done)
                g = draw(k)
                for n in total:
                    total[n].add_(k * g[n])
                done += k
            mean = {n: t / done for n, t in total.items()}
        cosines.append(guess_cosine(mean, grad).whole_model)
    return CosineSaturation(counts, cosines)


# ----------------------------------------------------------------------------- Figure 2
class ActivationGradientOverlap(NamedTuple):
    """Result of :func:`activation_gradient_overlap` (one layer)."""

    ks: list[int]
    cosine_activation: list[float]
    cosine_random: list[float]
    principal_angle_cosines: list[float]


def activation_gradient_overlap(
    model: nn.Module | ParamSpace,
    values: Mapping[str, torch.Tensor] | None,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: LossFn,
    layer: int,
    *,
    ks: Sequence[int] = (1, 2, 4, 8, 16),
    seed: Seed = None,
) -> ActivationGradientOverlap:
    r"""Do gradients lie in the span of activations? (the paper's section 3.3, Figure 2 right).

    For the input :math:`x_{l}` (a post-activation, so ``layer >= 1``) of layer ``layer`` over the batch (rows :math:`x_{l,b}`) and the
    per-example gradients :math:`G_b = \partial L / \partial x_{l,b}` (backprop), the top-``k``
    principal components :math:`P_k` of the activations (centred PCA) give the mean projection
    cosine :math:`\frac1B \sum_b \|P_k G_b\| / \|G_b\|`, against the same for a random
    ``k``-dimensional subspace. ``principal_angle_cosines`` are the cosines of the principal
    angles between the top-``max(ks)`` principal subspaces of activations and of gradients
    (:func:`linops.principal_angles`).

    Raises
    ------
    ValueError
        If ``layer`` is out of range or a ``k`` exceeds the activation dimension.
    """
    space = as_space(model)
    values = space.values() if values is None else values
    layers = find_layers(space, x, allow_batch_statistics=True)  # exact backprop of the batch
    if not (isinstance(layer, int) and 1 <= layer < len(layers)):
        raise ValueError(f"layer: expected an integer in [1, {len(layers) - 1}], got {layer!r}")
    rec = record_pass(space, values, x, layers)
    act = rec.inputs[layer].detach().reshape(x.shape[0], -1).double()
    with torch.enable_grad():
        loss = loss_fn(rec.output, y)
    G = _backprop_to_input(rec, layer, loss).reshape(x.shape[0], -1).double()
    n = act.shape[1]
    ks = [int(k) for k in ks]
    if not ks or min(ks) < 1 or max(ks) > n:
        raise ValueError(f"ks: expected integers in [1, {n}], got {ks!r}")
    U_act = torch.linalg.svd((act - act.mean(0)).T, full_matrices=False).U
    gen = make_generator(seed, act.device)
    Q, _ = torch.linalg.qr(
        torch.randn(n, max(ks), generator=gen, dtype=torch.float64, device=act.device)
    )
    Gn = G / G.norm(dim=1, keepdim=True).clamp_min(1e-300)

    def proj_cos(U: torch.Tensor) -> float:
        return float((Gn @ U).norm(dim=1).mean())

    cos_act = [proj_cos(U_act[:, :k]) for k in ks]
    cos_rand = [proj_cos(Q[:, :k]) for k in ks]
    k = min(max(ks), U_act.shape[1])
    U_grad = torch.linalg.svd((G - G.mean(0)).T, full_matrices=False).U[:, :k]
    angles = _principal_angles(U_act[:, :k], U_grad)
    return ActivationGradientOverlap(ks, cos_act, cos_rand, [math.cos(a) for a in angles])


def _backprop_to_input(rec: Record, layer: int, loss: torch.Tensor) -> torch.Tensor:
    r"""Compute the reference gradient :math:`\partial L / \partial x_l` at layer ``layer``'s input.

    The recorded graph is cut at every layer output (:class:`Record`), so the total derivative
    is gathered back to front: that of each cut point :math:`s_j` from every later one and
    from the loss, then that of :math:`x_l` likewise. Chaining layer to layer only left out
    skip connections (a residual block's cosines 20-40% off).
    """
    n = len(rec.leaves)
    total: list[torch.Tensor | None] = [None] * n

    def pull(target: torch.Tensor, start: int) -> torch.Tensor:
        outs, cots = [loss], [torch.ones_like(loss)]
        for k in range(start, n):
            t = total[k]
            if t is not None and rec.raw[k].requires_grad:
                outs.append(rec.raw[k])
                cots.append(t)
        (g,) = torch.autograd.grad(outs, target, cots, retain_graph=True, allow_unused=True)
        return torch.zeros_like(target) if g is None else g

    for j in range(n - 1, layer - 1, -1):
        total[j] = pull(rec.leaves[j], j + 1)
    return pull(rec.inputs[layer], layer)


def _principal_angles(A: torch.Tensor, B: torch.Tensor) -> list[float]:
    import linops

    if not hasattr(linops, "principal_angles"):
        raise ImportError("linops.principal_angles is not available yet (linops/angles.py)")
    res = linops.principal_angles(A, B)
    angles = getattr(res, "angles", res)
    return [float(a) for a in torch.as_tensor(angles).reshape(-1)]
