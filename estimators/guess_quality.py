r"""How good is a guessed gradient? Quality measures of seed 003 (sections 3.3, 4, 5).

* :func:`guess_cosine`: cosine of a guess to the true gradient, per layer and whole model
  (Figure 1).
* :func:`one_step_effectiveness`: loss reduction of one step along the guess relative to one
  backprop step, each at its best step size on a grid (section 4, "One step effectiveness").
* :func:`cosine_saturation`: cosine of the average of ``K`` guesses as ``K`` grows (Figure 4
  left): it tends to 1 for unbiased guessers and saturates for biased ones.
* :class:`GuessNoiseOperator`, :class:`GuessCovarianceOperator`, :func:`guess_bias`: the
  expected update :math:`E[\hat g] = \mathrm{Cov}(y) \nabla L` and its bias
  :math:`(\mathrm{Cov}(y) - I)\nabla L` (section 5, eqs. (14)-(16)) as toolkit operators.
* :func:`activation_gradient_overlap`: how much of the gradient with respect to a layer's
  activations lies in the span of those activations (Figure 2 right), with principal angles.

The true gradient here comes from backprop: these are measurements of the guessers, not parts
of them.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import torch
from torch import nn

from estimators._guess_layers import Record, find_layers, record_pass, vjp
from estimators.guesses import GradientGuesser
from linops.base import IdentityOperator, TorchLinearOperator
from linops.params import ParamSpace

__all__ = [
    "STEP_SIZES",
    "ActivationGradientOverlap",
    "BiasAnalysis",
    "CosineSimilarity",
    "CosineSaturation",
    "GuessCovarianceOperator",
    "GuessNoiseOperator",
    "OneStep",
    "activation_gradient_overlap",
    "cosine_saturation",
    "guess_bias",
    "guess_cosine",
    "one_step_effectiveness",
    "true_gradient",
]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: Step-size grid of :func:`one_step_effectiveness`: seed 003 searches 1e-5 ... 1e-1; the grid
#: is widened to 1e-6 ... 1e2 (half decades) so that guesses of any scale (e.g. directional
#: descent with appendix A.2's 1/N mean) find their best step inside it.
STEP_SIZES: tuple[float, ...] = tuple(10.0 ** (k / 2) for k in range(-12, 5))


def _space(model: nn.Module | ParamSpace) -> ParamSpace:
    if isinstance(model, ParamSpace):
        return model
    if isinstance(model, nn.Module):
        return ParamSpace(model)
    raise TypeError(
        f"model: expected a torch.nn.Module or a ParamSpace, got {type(model).__name__}"
    )


def true_gradient(
    model: nn.Module | ParamSpace,
    params: Mapping[str, torch.Tensor] | None,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: LossFn,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Batch loss and its gradient by reverse-mode autodiff (the reference of every measure)."""
    space = _space(model)
    params = space.values() if params is None else params
    leaves = {n: p.detach().requires_grad_(True) for n, p in params.items()}
    with torch.enable_grad():
        loss = loss_fn(space.functional_call(leaves, x), y)
        grads = torch.autograd.grad(loss, list(leaves.values()))
    return loss.detach(), dict(zip(leaves, grads, strict=True))


# ----------------------------------------------------------------------------- cosine
class CosineSimilarity(NamedTuple):
    """Cosine of a guess to the true gradient, per layer (module name) and for the whole model."""

    per_layer: dict[str, float]
    whole_model: float


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    den = float(a.norm() * b.norm())
    return float(a @ b) / den if den > 0 else 0.0


def guess_cosine(
    guess: Mapping[str, torch.Tensor], grad: Mapping[str, torch.Tensor]
) -> CosineSimilarity:
    r"""Cosine similarity :math:`\hat g \cdot g / (\|\hat g\| \|g\|)` (seed 003 section 3.1).

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

    per_layer = {k: _cos(flat(guess, v), flat(grad, v)) for k, v in groups.items()}
    return CosineSimilarity(per_layer, _cos(flat(guess, list(grad)), flat(grad, list(grad))))


# ----------------------------------------------------------------------------- one step
class OneStep(NamedTuple):
    """Result of :func:`one_step_effectiveness`.

    ``effectiveness = reduction_guess / reduction_backprop``; each reduction is the largest
    :math:`L(\\theta) - L(\\theta - \\eta d)` over the grid, floored at 0 (not stepping).
    """

    effectiveness: float
    reduction_guess: float
    reduction_backprop: float
    step_size_guess: float
    step_size_backprop: float


@torch.no_grad()
def _best_reduction(
    space: ParamSpace,
    params: Mapping[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: LossFn,
    d: Mapping[str, torch.Tensor],
    steps: Sequence[float],
) -> tuple[float, float]:
    loss0 = float(loss_fn(space.functional_call(params, x), y))
    best, best_eta = 0.0, 0.0
    for eta in steps:
        moved = {n: p - eta * d[n] for n, p in params.items()}
        red = loss0 - float(loss_fn(space.functional_call(moved, x), y))
        if math.isfinite(red) and red > best:
            best, best_eta = red, eta
    return best, best_eta


def one_step_effectiveness(
    model: nn.Module | ParamSpace,
    params: Mapping[str, torch.Tensor] | None,
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
    space = _space(model)
    params = space.values() if params is None else dict(params)
    steps = [float(s) for s in step_sizes]
    if not steps or min(steps) <= 0:
        raise ValueError(f"step_sizes: expected positive step sizes, got {list(step_sizes)!r}")
    if grad is None:
        _, grad = true_gradient(space, params, x, y, loss_fn)
    red_g, eta_g = _best_reduction(space, params, x, y, loss_fn, guess, steps)
    red_b, eta_b = _best_reduction(space, params, x, y, loss_fn, grad, steps)
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
    params: Mapping[str, torch.Tensor] | None,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: LossFn,
    *,
    counts: Sequence[int] = tuple(2**k for k in range(1, 11)),
    max_replicas: int = 256,
    generator: torch.Generator | None = None,
) -> CosineSaturation:
    r"""Cosine of :math:`\frac1K \sum_{k \le K} \hat g_k` to :math:`\nabla L` (Figure 4 left).

    Pre-activation guessers average ``K`` independent guesses by replicating the batch ``K``
    times (up to ``max_replicas`` per call, with a mean-reduced ``loss_fn`` the guess of the
    replicated batch is the mean of the per-copy guesses); weight-space guessers call the
    guesser ``K`` times. Larger counts extend the running mean (counts must be increasing).
    Unbiased guessers approach cosine 1 at rate :math:`1/\sqrt K`; biased ones saturate.

    Raises
    ------
    ValueError
        If ``counts`` is not a strictly increasing sequence of positive integers.
    """
    counts = [int(c) for c in counts]
    if not counts or counts[0] < 1 or any(b <= a for a, b in itertools.pairwise(counts)):
        raise ValueError(f"counts: expected increasing positive integers, got {counts!r}")
    space = _space(model)
    params = space.values() if params is None else dict(params)
    _, grad = true_gradient(space, params, x, y, loss_fn)
    per_call = 1 if not hasattr(guesser, "jvp_mode") else max_replicas

    def draw(k: int) -> dict[str, torch.Tensor]:
        if per_call == 1:
            return guesser(space, params, x, y, loss_fn, generator=generator).grads
        xs, ys = x.repeat(k, *[1] * (x.ndim - 1)), y.repeat(k, *[1] * (y.ndim - 1))
        return guesser(space, params, xs, ys, loss_fn, generator=generator).grads

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


# ----------------------------------------------------------------------------- section 5
class GuessNoiseOperator(TorchLinearOperator):
    r"""The linear map :math:`A` from noise to one example's pre-activation guess (section 5).

    The guess of layer :math:`l` is :math:`y = A \xi` with :math:`\xi \sim N(0, I)`:

    * ``"activation_perturbation"``: :math:`A = I`;
    * ``"w_transpose"``: :math:`A = D_l\, c\, W_{l+1}^\top` (:math:`\xi` at :math:`s_{l+1}`);
    * ``"downstream"``: :math:`A = D_l\, c\, W_{l+1}^\top D_{l+1}` (:math:`\xi` at :math:`x_{l+2}`).

    Products with :math:`A` are local vector-Jacobian products; products with :math:`A^\top`
    are their transposes by double backward. Shape ``(n_l, n_noise)``.

    Parameters
    ----------
    model
        Network or parameter space.
    params
        Parameter values (``None``: the model's).
    x
        One example, shape ``(1, ...)``.
    layer
        Index of the layer (execution order of its Linear / Conv2d layers); must not be the
        last one for ``"w_transpose"`` / ``"downstream"``.
    method
        One of the three above.

    Raises
    ------
    ValueError
        For an unknown method, a batch of more than one example or a layer out of range.
    """

    METHODS = ("activation_perturbation", "w_transpose", "downstream")

    def __init__(
        self,
        model: nn.Module | ParamSpace,
        params: Mapping[str, torch.Tensor] | None,
        x: torch.Tensor,
        layer: int,
        *,
        method: str = "w_transpose",
    ) -> None:
        if method not in self.METHODS:
            raise ValueError(f"method: expected one of {self.METHODS}, got {method!r}")
        if x.shape[0] != 1:
            raise ValueError(f"x: expected one example (a batch of 1), got {x.shape[0]}")
        space = _space(model)
        params = space.values() if params is None else params
        layers = find_layers(space, x)
        last = len(layers) - 1 if method == "activation_perturbation" else len(layers) - 2
        if not (isinstance(layer, int) and 0 <= layer <= last):
            raise ValueError(f"layer: expected an integer in [0, {last}], got {layer!r}")
        self.rec = record_pass(space, params, x, layers)
        self.layer, self.method = layer, method
        self._down = method == "downstream" and layer + 2 < len(layers)
        if method == "activation_perturbation":
            self._start = self.rec.leaves[layer]
        elif self._down:
            self._start = self.rec.inputs[layer + 2]
        else:
            self._start = self.rec.raw[layer + 1]
        target = self.rec.leaves[layer]
        super().__init__(
            (target[0].numel(), self._start[0].numel()), dtype=target.dtype, device=target.device
        )

    def _pull(self, v: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
        """``A v``: local vector-Jacobian products from the noise position back to ``s_l``."""
        i, rec = self.layer, self.rec
        if self.method == "activation_perturbation":
            return v
        steps = [(self._start, rec.leaves[i + 1])] if self._down else []
        steps.append((rec.raw[i + 1], rec.leaves[i]))
        for out, inp in steps:
            (v,) = torch.autograd.grad(out, inp, v, retain_graph=True, create_graph=create_graph)
        return v

    def _matmat_torch(self, X: torch.Tensor) -> torch.Tensor:
        shape = self._start.shape
        cols = [self._pull(X[:, j].reshape(shape)).reshape(-1) for j in range(X.shape[1])]
        return torch.stack(cols, dim=1) if cols else X.new_zeros(self.shape[0], 0)

    def _rmatmat_torch(self, Y: torch.Tensor) -> torch.Tensor:
        if self.method == "activation_perturbation":
            return Y
        u = torch.zeros(self._start.shape, dtype=Y.dtype, device=Y.device, requires_grad=True)
        with torch.enable_grad():
            out = self._pull(u, create_graph=True)
        cols = []
        for j in range(Y.shape[1]):
            (g,) = torch.autograd.grad(out, u, Y[:, j].reshape(out.shape), retain_graph=True)
            cols.append(g.reshape(-1))
        return torch.stack(cols, dim=1) if cols else Y.new_zeros(self.shape[1], 0)


class GuessCovarianceOperator(TorchLinearOperator):
    r""":math:`\mathrm{Cov}(y) = A A^\top` for a guess :math:`y = A\xi`, :math:`\xi \sim N(0, I)`.

    Seed 003 eq. (14): :math:`E[\hat g] = E[y y^\top] \nabla L = \mathrm{Cov}(y) \nabla L`; for
    :math:`W^\top`, :math:`\mathrm{Cov}(y) = D W^\top W D` (section 5). Symmetric positive
    semi-definite, so Lanczos and the spectral routines of :mod:`linops` apply.
    """

    is_symmetric = True

    def __init__(self, noise: TorchLinearOperator) -> None:
        super().__init__(
            (noise.shape[0], noise.shape[0]), dtype=noise.torch_dtype, device=noise.device
        )
        self.noise = noise

    def _matmat_torch(self, X: torch.Tensor) -> torch.Tensor:
        return self.noise._apply(self.noise._apply(X, True))


class BiasAnalysis(NamedTuple):
    """Section 5 for one layer and example: :math:`E[\\hat g_s]`, its bias, and summaries."""

    gradient: torch.Tensor
    expected: torch.Tensor
    bias: torch.Tensor
    cosine_expected: float
    relative_bias: float


def guess_bias(cov: TorchLinearOperator, gradient: torch.Tensor) -> BiasAnalysis:
    r"""Expected guess :math:`\mathrm{Cov}(y) g` and bias :math:`(\mathrm{Cov}(y) - I) g` (eq. (15)).

    Parameters
    ----------
    cov
        :math:`\mathrm{Cov}(y)` as an operator (e.g. :class:`GuessCovarianceOperator`).
    gradient
        The true gradient :math:`g` in the guess space (flat, length ``cov.shape[0]``).

    Returns
    -------
    BiasAnalysis
        With ``cosine_expected`` the cosine of :math:`E[\hat g]` to :math:`g` and
        ``relative_bias`` :math:`\|(\mathrm{Cov} - I) g\| / \|g\|`.

    Raises
    ------
    ValueError
        If ``gradient`` is not a vector of length ``cov.shape[0]``.
    """
    g = gradient.reshape(-1) if gradient.ndim > 1 and gradient.shape[0] == 1 else gradient
    if g.ndim != 1 or g.shape[0] != cov.shape[0]:
        raise ValueError(
            f"gradient: expected a vector of length {cov.shape[0]}, got shape {tuple(gradient.shape)}"
        )
    g = g.to(cov.torch_dtype)
    expected = cov @ g
    bias = (cov - IdentityOperator(cov.shape[0], dtype=cov.torch_dtype, device=cov.device)) @ g
    gn = float(g.norm())
    return BiasAnalysis(
        g, expected, bias, _cos(expected, g), float(bias.norm()) / gn if gn else 0.0
    )


# ----------------------------------------------------------------------------- Figure 2
class ActivationGradientOverlap(NamedTuple):
    """Result of :func:`activation_gradient_overlap` (one layer)."""

    ks: list[int]
    cosine_activation: list[float]
    cosine_random: list[float]
    principal_angle_cosines: list[float]


def activation_gradient_overlap(
    model: nn.Module | ParamSpace,
    params: Mapping[str, torch.Tensor] | None,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: LossFn,
    layer: int,
    *,
    ks: Sequence[int] = (1, 2, 4, 8, 16),
    generator: torch.Generator | None = None,
) -> ActivationGradientOverlap:
    r"""Do gradients lie in the span of activations? (seed 003 section 3.3, Figure 2 right).

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
    space = _space(model)
    params = space.values() if params is None else params
    layers = find_layers(space, x)
    if not (isinstance(layer, int) and 1 <= layer < len(layers)):
        raise ValueError(f"layer: expected an integer in [1, {len(layers) - 1}], got {layer!r}")
    rec = record_pass(space, params, x, layers)
    act = rec.inputs[layer].detach().reshape(x.shape[0], -1).double()
    with torch.enable_grad():
        loss = loss_fn(rec.output, y)
    G = _backprop_to_input(rec, layer, loss).reshape(x.shape[0], -1).double()
    n = act.shape[1]
    ks = [int(k) for k in ks]
    if not ks or min(ks) < 1 or max(ks) > n:
        raise ValueError(f"ks: expected integers in [1, {n}], got {ks!r}")
    U_act = torch.linalg.svd((act - act.mean(0)).T, full_matrices=False).U
    Q, _ = torch.linalg.qr(
        torch.randn(n, max(ks), generator=generator, dtype=torch.float64, device=act.device)
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
    """Reference gradient at layer ``layer``'s input: backprop chained over the local graphs."""
    (v,) = torch.autograd.grad(loss, rec.leaves[-1], retain_graph=True)
    for j in range(len(rec.leaves) - 1, layer, -1):
        v = vjp(rec.raw[j], rec.leaves[j - 1], v)
    (g,) = torch.autograd.grad(rec.raw[layer], rec.inputs[layer], v, retain_graph=True)
    return g


def _principal_angles(A: torch.Tensor, B: torch.Tensor) -> list[float]:
    import linops

    if not hasattr(linops, "principal_angles"):
        raise ImportError("linops.principal_angles is not available yet (linops/angles.py)")
    res = linops.principal_angles(A, B)
    angles = getattr(res, "angles", res)
    return [float(a) for a in torch.as_tensor(angles).reshape(-1)]
