r"""Gradient guessers of "How to Guess a Gradient" (Singhal et al.): forward mode only.

"The paper" below is U. Singhal, B. Cheung, K. Chandra, J. Ragan-Kelley, J. B. Tenenbaum,
T. A. Poggio and S. X. Yu, "How to Guess a Gradient", arXiv:2312.04709. The module is about
600 lines because it holds one concept, the guessers, one class each (the layer plumbing they
share is in ``estimators/_guess_layers.py``).

Every guesser returns an estimate :math:`\hat g` of :math:`\nabla_\theta L` built from
directional derivatives (JVPs), never from a backward pass through the network. Two families:

*Weight space* (the paper's eq. (1), appendix A.2). A direction :math:`v` is drawn, one JVP gives
:math:`\nabla L \cdot v`, and :math:`\hat g = (\nabla L \cdot v)\, v`, so
:math:`E[\hat g] = \mathrm{Cov}(v) \nabla L` (section 5, eq. (14)).

*Pre-activation space* (section 3.2, appendix A.2). For each layer :math:`l` and example
:math:`b` a guess :math:`\epsilon_{l,b}` of :math:`\partial L/\partial s_{l,b}` is drawn, the
per-example JVP :math:`d_{l,b} = (\partial L/\partial s_{l,b}) \cdot \epsilon_{l,b}` is measured
and the weight update is the outer product of eq. (3):

.. math::

    \hat g_{W_l} = \sum_b d_{l,b}\, \epsilon_{l,b}\, x_{l,b}^\top, \qquad
    \hat g_{b_l} = \sum_b d_{l,b}\, \epsilon_{l,b}.

The methods differ only in the law of :math:`\epsilon_{l,b}`:

=========================  ======================================================================
``activation_perturbation``  :math:`\epsilon \sim N(0, I)` (unbiased; Ren et al. 2022)
``activation_mixing``        :math:`\epsilon_b = D_l \sum_{b'} \alpha_{bb'} x_{l+1,b'}`,
                             :math:`\alpha \sim N(0,1)`, normalized (section 3.3)
``w_transpose``              :math:`\epsilon_b = D_l\, c\, W_{l+1}^\top \xi`,
                             :math:`\xi \sim N(0, I)` (eq. (6))
``downstream``               :math:`\epsilon_b = D_l\, c\, W_{l+1}^\top D_{l+1} \xi` (eq. (7), l=1)
``self_sharpening``          ``downstream`` with uniform :math:`\xi`; exact last-layer error (4.1)
=========================  ======================================================================

where :math:`D_l = \partial x_{l+1}/\partial s_l` (the ReLU mask for an MLP) and :math:`c` the
layer's forward multiplier. Products with :math:`D_l`, :math:`W_{l+1}^\top` are local
vector-Jacobian products through one layer (see :mod:`estimators._guess_layers`). The last layer
(which has no next layer) gets an isotropic guess, as in appendix A.2.

Notes
-----
Choices the paper leaves open, and the ones taken here:

* **JVP per layer or for all layers.** ``jvp_mode="per_layer"`` (default) measures one JVP per
  layer and example, so layer :math:`l`'s update is scaled by its own
  :math:`d_{l,b}`; the layers ride in one forward pass over a batch stacked ``L`` times.
  ``jvp_mode="all"`` injects every layer's guess in one pass and scales each layer by the
  summed :math:`d_b = \sum_l d_{l,b}` (still unbiased for independent zero-mean guesses, with
  more variance, at ``1/L`` of the cost).
* **Per-example JVPs.** One batched pass gives the output tangent :math:`\dot f_b`; the
  per-example split is :math:`d_b = e_b \cdot \dot f_b` with :math:`e_b = \partial L/\partial f_b`
  from the loss function alone (requires a per-example separable loss such as mean or summed
  cross-entropy / MSE, and a model without batch coupling such as BatchNorm in train mode).
* **Directional-descent scale.** Appendix A.2 draws :math:`v_i \sim N(0, 1/N)` so that
  :math:`\|v\| \approx 1`; then :math:`E[\hat g] = \nabla L / N`. ``normalize=False`` draws
  :math:`N(0, 1)` (unbiased: :math:`E[\hat g] = \nabla L`).
* **Mixing normalization.** Each example's mixed guess is rescaled to norm
  :math:`\sqrt{n_l}`, the root-mean-square norm of an :math:`N(0, I_{n_l})` guess.
* **W^T versus 1-layer downstream.** The paper's descriptions coincide for a ReLU MLP unless
  the downstream guess is placed after the next layer's nonlinearity; here ``w_transpose``
  guesses at :math:`s_{l+1}` and ``downstream`` at :math:`x_{l+2} = \phi(s_{l+1})` (so it also
  applies :math:`D_{l+1}`). When layer :math:`l+1` is the last layer both guess at its output.
* **Self-sharpening noise.** "Random uniform" is read as :math:`U[0, 1)` (``torch.rand``), a
  non-centred law; ``noise="uniform_symmetric"`` gives :math:`U[-1, 1)`.
* **Matched cosine (section 4).** The control blends the unit gradient with a unit random
  direction orthogonal to it, :math:`y = \cos\theta\, u_\parallel + \sin\theta\, u_\perp`, and
  steps :math:`(\nabla L \cdot y)\, y` (one JVP); it needs the true gradient (backprop).

References
----------
Singhal, Cheung, Chandra, Ragan-Kelley, Tenenbaum, Poggio, Yu. "How to guess a gradient",
arXiv:2312.04709. Baydin et al., "Gradients without backpropagation",
arXiv:2202.08587. Ren et al., "Scaling forward gradient with local losses", arXiv:2210.03310.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn

from estimators._guess_layers import (
    BACKENDS,
    Layer,
    Record,
    chain_break,
    find_layers,
    layer_param_vjp,
    output_error,
    param_jvp,
    param_jvp_many,
    per_example_dot,
    preactivation_jvp,
    record_pass,
    vjp,
)
from estimators.seeding import Seed, make_generator
from linops.params import ParamSpace

__all__ = [
    "GUESSERS",
    "ActivationMixing",
    "ActivationPerturbation",
    "DirectionalDescent",
    "Downstream",
    "GradientGuesser",
    "Guess",
    "MatchedCosine",
    "SelfSharpening",
    "WTranspose",
    "make_guesser",
]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
_NOISES = ("normal", "uniform", "uniform_symmetric")
_CHUNK = 256  # weight-space directions per vmapped pass


class Guess(NamedTuple):
    r"""A guessed gradient and what it was built from.

    Attributes
    ----------
    loss
        Batch loss at ``values`` (a 0-d tensor).
    grads
        The guessed gradient :math:`\hat g`, by parameter name (shapes of the parameters).
    jvps
        The directional derivatives used. Pre-activation guessers: ``(L, B)``, row ``l`` scales
        layer ``l``'s guess (zero rows for layers without a guess). Weight-space guessers:
        ``(K,)``, one per guessed direction.
    tangents
        The guessed directions: per layer the pre-activation guesses :math:`\epsilon_l` of
        shape ``(B, *s_l.shape[1:])`` (``None`` where no guess was made), or for weight-space
        guessers the direction of the last guess by parameter name.
    """

    loss: torch.Tensor
    grads: dict[str, torch.Tensor]
    jvps: torch.Tensor
    tangents: list[torch.Tensor | None] | dict[str, torch.Tensor]


def _noise(like: torch.Tensor, gen: torch.Generator | None, kind: str) -> torch.Tensor:
    if kind == "normal":
        return torch.randn(like.shape, generator=gen, dtype=like.dtype, device=like.device)
    u = torch.rand(like.shape, generator=gen, dtype=like.dtype, device=like.device)
    return u if kind == "uniform" else 2.0 * u - 1.0


class GradientGuesser:
    """Base of the guessers: ``guesser(model_or_space, values, x, y, loss_fn) -> Guess``.

    Parameters
    ----------
    backend
        Forward-mode route: ``"forward_ad"`` (dual tensors, default; measured faster on CPU in
        ``bench/guess_step.py``) or ``"func"`` (:func:`torch.func.jvp`).
    """

    name: ClassVar[str] = "guesser"
    uses_true_gradient: ClassVar[bool] = False

    def __init__(self, *, backend: str = "forward_ad") -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
        self.backend = backend
        self._layers_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._chains: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __repr__(self) -> str:
        """Return ``ClassName(backend=...)``."""
        return f"{type(self).__name__}(backend={self.backend!r})"

    def __call__(
        self,
        model: nn.Module | ParamSpace,
        values: Mapping[str, torch.Tensor] | None,
        x: torch.Tensor,
        y: torch.Tensor,
        loss_fn: LossFn,
        *,
        seed: Seed = None,
    ) -> Guess:
        """Guess the gradient of ``loss_fn(model(x), y)`` at ``values``.

        Parameters
        ----------
        model
            The network, or a :class:`linops.ParamSpace` of it (selects the trained
            parameters; default all).
        values
            Parameter values by name (the space's names); ``None`` uses the model's own.
        x, y
            A batch of inputs and targets (equal non-zero lengths).
        loss_fn
            ``loss_fn(outputs, targets) -> scalar``, mean or sum over examples.
        seed
            Randomness of the guesses (see :mod:`estimators.seeding`; pass one
            ``torch.Generator`` to thread its state through many calls).

        Returns
        -------
        Guess

        Raises
        ------
        TypeError
            If ``loss_fn`` is not callable or ``model`` is neither a module nor a space.
        ValueError
            If ``x``/``y`` lengths differ or are zero, or ``values`` does not hold exactly the
            space's parameters.
        """
        space, values = _check_inputs(model, values, x, y, loss_fn)
        return self._guess(space, values, x, y, loss_fn, make_generator(seed, x.device))

    def _guess(
        self,
        space: ParamSpace,
        values: dict[str, torch.Tensor],
        x: torch.Tensor,
        y: torch.Tensor,
        loss_fn: LossFn,
        gen: torch.Generator | None,
    ) -> Guess:
        raise NotImplementedError

    def layers(self, space: ParamSpace, x: torch.Tensor) -> list[Layer]:
        """Return the model's guessable layers (cached per model and parameter selection)."""
        per_model = self._layers_cache.setdefault(space.model, {})
        key = tuple(space.names)
        if key not in per_model:
            per_model[key] = find_layers(space, x)
        return per_model[key]


def _check_inputs(
    model: nn.Module | ParamSpace,
    values: Mapping[str, torch.Tensor] | None,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: LossFn,
) -> tuple[ParamSpace, dict[str, torch.Tensor]]:
    if isinstance(model, ParamSpace):
        space = model
    elif isinstance(model, nn.Module):
        space = ParamSpace(model)
    else:
        raise TypeError(
            f"model: expected a torch.nn.Module or a ParamSpace, got {type(model).__name__}"
        )
    if not callable(loss_fn):
        raise TypeError(f"loss_fn: expected a callable, got {type(loss_fn).__name__}")
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError(f"x, y: expected tensors, got {type(x).__name__} and {type(y).__name__}")
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(f"x, y: expected equal non-zero lengths, got {len(x)} and {len(y)}")
    if values is None:
        values = space.values()
    if set(values) != set(space.names):
        raise ValueError(
            f"values: expected exactly the parameters {space.names}, got {sorted(values)}"
        )
    return space, dict(values)


# =========================================================================== weight space
class DirectionalDescent(GradientGuesser):
    r"""Isotropic guess in weight space: :math:`\hat g = \frac1K \sum_k (\nabla L \cdot v_k) v_k`.

    Parameters
    ----------
    normalize
        ``True`` (appendix A.2): :math:`v_i \sim N(0, 1/N)`, so :math:`\|v\| \approx 1` and
        :math:`E[\hat g] = \nabla L / N`. ``False``: :math:`v_i \sim N(0, 1)`, unbiased,
        :math:`E\|\hat g - \nabla L\|^2 = (N + 1)\|\nabla L\|^2 / K`.
    num_guesses
        Number :math:`K` of directions averaged (one JVP each).
    backend
        See :class:`GradientGuesser`.

    Examples
    --------
    >>> import torch
    >>> net = torch.nn.Linear(3, 2)
    >>> g = DirectionalDescent()(net, None, torch.randn(4, 3), torch.randn(4, 2),
    ...                          torch.nn.functional.mse_loss, seed=0)
    >>> sorted(g.grads), tuple(g.jvps.shape)
    (['bias', 'weight'], (1,))
    """

    name = "directional_descent"

    def __init__(
        self, *, normalize: bool = True, num_guesses: int = 1, backend: str = "forward_ad"
    ) -> None:
        super().__init__(backend=backend)
        if not isinstance(num_guesses, int) or num_guesses < 1:
            raise ValueError(f"num_guesses: expected a positive integer, got {num_guesses!r}")
        self.normalize, self.num_guesses = normalize, num_guesses

    def _guess(self, space, values, x, y, loss_fn, gen):
        std = 1.0 / math.sqrt(space.dim) if self.normalize else 1.0
        if self.num_guesses == 1:
            v = {n: std * _noise(p, gen, "normal") for n, p in values.items()}
            out, out_dot = param_jvp(space, values, x, v, self.backend)
            loss, e = output_error(loss_fn, out, y)
            d = per_example_dot(e, out_dot).sum()
            return Guess(loss, {n: d * t for n, t in v.items()}, d[None], v)
        # several directions: vmap over torch.func.jvp, in chunks
        with torch.no_grad():
            loss, e = output_error(loss_fn, space.functional_call(values, x), y)
        total = {n: torch.zeros_like(p) for n, p in values.items()}
        jvps = []
        for start in range(0, self.num_guesses, _CHUNK):
            k = min(_CHUNK, self.num_guesses - start)
            V = {
                n: std * _noise(p.new_empty(k, *p.shape), gen, "normal") for n, p in values.items()
            }
            out_dot = param_jvp_many(space, values, x, V)
            d = (out_dot * e).reshape(k, -1).sum(1)
            jvps.append(d)
            for n in total:
                total[n].add_(torch.tensordot(d, V[n], dims=1))
        grads = {n: t / self.num_guesses for n, t in total.items()}
        return Guess(loss, grads, torch.cat(jvps), {n: V[n][-1] for n in V})


class MatchedCosine(GradientGuesser):
    r"""Control of section 4: a guess at a fixed angle to the true gradient (uses backprop).

    With :math:`u_\parallel = g / \|g\|`, a random :math:`v \sim N(0, I)` and
    :math:`u_\perp = (v - (v\cdot u_\parallel) u_\parallel) / \|\cdot\|`, the direction is
    :math:`y = \cos\theta\, u_\parallel + \sin\theta\, u_\perp` and the update
    :math:`(\nabla L \cdot y)\, y` (its JVP is measured in forward mode). It has cosine exactly
    ``cosine`` with :math:`g` and mean :math:`\cos^2\theta\, g`: unbiased up to scale.

    Parameters
    ----------
    cosine
        :math:`\cos\theta \in (0, 1]`.
    backend
        See :class:`GradientGuesser`.
    """

    name = "matched_cosine"
    uses_true_gradient = True

    def __init__(self, cosine: float = 0.03, *, backend: str = "forward_ad") -> None:
        super().__init__(backend=backend)
        if not isinstance(cosine, int | float) or not 0.0 < cosine <= 1.0:
            raise ValueError(f"cosine: expected a number in (0, 1], got {cosine!r}")
        self.cosine = float(cosine)

    def _guess(self, space, values, x, y, loss_fn, gen):
        leaves = {n: p.detach().requires_grad_(True) for n, p in values.items()}
        with torch.enable_grad():
            loss_bp = loss_fn(space.functional_call(leaves, x), y)
            g = space.flatten(torch.autograd.grad(loss_bp, list(leaves.values())))
        u = g / g.norm().clamp_min(torch.finfo(g.dtype).tiny)
        if self.cosine == 1.0:
            y_dir = u
        elif g.numel() == 1:
            raise ValueError(
                f"cosine: a one-parameter space has no direction orthogonal to the gradient, "
                f"so only cosine=1 is defined, got {self.cosine}"
            )
        else:
            v = _noise(g, gen, "normal")
            w = v - (v @ u) * u
            w = w / w.norm()
            y_dir = self.cosine * u + math.sqrt(1.0 - self.cosine**2) * w
        direction = space.unflatten(y_dir)
        out, out_dot = param_jvp(space, values, x, direction, self.backend)
        loss, e = output_error(loss_fn, out, y)
        d = per_example_dot(e, out_dot).sum()
        return Guess(loss, {n: d * t for n, t in direction.items()}, d[None], direction)


# =========================================================================== pre-activation
class _PreactivationGuesser(GradientGuesser):
    """Shared machinery: record pass, guesses, batched per-example JVPs, local weight updates."""

    def __init__(self, *, jvp_mode: str = "per_layer", backend: str = "forward_ad") -> None:
        super().__init__(backend=backend)
        if jvp_mode not in ("per_layer", "all"):
            raise ValueError(f"jvp_mode: expected 'per_layer' or 'all', got {jvp_mode!r}")
        self.jvp_mode = jvp_mode

    def __repr__(self) -> str:
        return f"{type(self).__name__}(jvp_mode={self.jvp_mode!r}, backend={self.backend!r})"

    def preactivation_guesses(
        self, rec: Record, gen: torch.Generator | None
    ) -> list[torch.Tensor | None]:
        r"""Return the guesses :math:`\epsilon_l` (shape of :math:`s_l`) for every layer."""
        raise NotImplementedError

    def exact_errors(self, rec: Record, e: torch.Tensor) -> dict[int, torch.Tensor]:
        """Layers whose pre-activation gradient is known locally and used as is (none here)."""
        return {}

    #: whether the guesses pass through the next layer (W^T, downstream, mixing): a chain needed
    needs_chain = False

    def _guess(self, space, values, x, y, loss_fn, gen):
        layers = self.layers(space, x)
        rec = record_pass(space, values, x, layers)
        if self.needs_chain:
            checked = self._chains.setdefault(space.model, {})
            key = tuple(space.names)
            if key not in checked:
                checked[key] = chain_break(rec, layers)
            if checked[key] is not None:
                raise ValueError(
                    f"model: {type(self).__name__} passes each guess through the next layer, "
                    f"so it needs the Linear/Conv2d layers to form a chain, but {checked[key]} "
                    "(its guess would be zero or leave that path out); ActivationPerturbation "
                    "and DirectionalDescent take any model"
                )
        loss, e = output_error(loss_fn, rec.output, y)
        eps = self.preactivation_guesses(rec, gen)
        exact = self.exact_errors(rec, e)
        eps = [
            None if (i in exact or not layer.param_names) else t
            for i, (layer, t) in enumerate(zip(layers, eps, strict=True))
        ]
        d = self._jvps(space, values, x, layers, eps, e)
        grads: dict[str, torch.Tensor] = {}
        for i, layer in enumerate(layers):
            if not layer.param_names:
                continue
            if i in exact:
                cot = exact[i]
            else:
                e_i = eps[i]
                assert e_i is not None  # a layer with parameters always gets a guess
                cot = d[i].view(-1, *[1] * (e_i.ndim - 1)) * e_i
            grads.update(layer_param_vjp(layer, values, rec.inputs[i].detach(), cot))
        return Guess(loss, grads, d, eps)

    def _jvps(self, space, values, x, layers, eps, e) -> torch.Tensor:
        B = x.shape[0]
        active = [i for i, t in enumerate(eps) if t is not None]
        d = e.new_zeros(len(layers), B)
        if not active:
            return d
        if self.jvp_mode == "all":
            _, out_dot = preactivation_jvp(space, values, x, layers, eps, self.backend)
            d[active] = per_example_dot(e, out_dot)
            return d
        K = len(active)
        tangents: list[torch.Tensor | None] = [None] * len(layers)
        for j, i in enumerate(active):
            t = eps[i].new_zeros(K * B, *eps[i].shape[1:])
            t[j * B : (j + 1) * B] = eps[i]
            tangents[i] = t
        xs = x.repeat(K, *[1] * (x.ndim - 1))
        _, out_dot = preactivation_jvp(space, values, xs, layers, tangents, self.backend)
        d[active] = per_example_dot(e.repeat(K, *[1] * (e.ndim - 1)), out_dot).view(K, B)
        return d


class ActivationPerturbation(_PreactivationGuesser):
    r"""Isotropic pre-activation guesses :math:`\epsilon_{l,b} \sim N(0, I)` (section 3.2).

    Unbiased: :math:`E[\hat g] = \nabla L` (in ``jvp_mode="per_layer"`` and ``"all"``).

    Examples
    --------
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    >>> g = ActivationPerturbation()(net, None, torch.randn(5, 3), torch.randn(5, 2),
    ...                              torch.nn.functional.mse_loss)
    >>> tuple(g.jvps.shape), tuple(g.grads["0.weight"].shape)
    ((2, 5), (4, 3))
    """

    name = "activation_perturbation"

    def preactivation_guesses(self, rec, gen):
        r"""Return the noise guesses :math:`\epsilon_l` of every layer (see the class docstring)."""
        return [_noise(s, gen, "normal") for s in rec.leaves]


class WTranspose(_PreactivationGuesser):
    r""":math:`W^\top` guess (eq. (6)): :math:`\epsilon_{l,b} = D_l\, c\, W_{l+1}^\top \xi_b`.

    :math:`\xi_b \sim N(0, I)` at the next layer's pre-activation, pulled back through layer
    :math:`l+1` and the activation in between by one local vector-Jacobian product. The guess
    lies in :math:`D_l\, \mathrm{range}(W_{l+1}^\top)`; :math:`\mathrm{Cov} = c^2 D_l W_{l+1}^\top
    W_{l+1} D_l` (section 5). The last layer gets :math:`N(0, I)`.
    """

    needs_chain = True

    name = "w_transpose"

    def preactivation_guesses(self, rec, gen):
        r"""Return the noise guesses :math:`\epsilon_l` of every layer (see the class docstring)."""
        L = len(rec.leaves)
        out = [
            vjp(rec.raw[i + 1], rec.leaves[i], _noise(rec.raw[i + 1], gen, "normal"))
            for i in range(L - 1)
        ]
        return [*out, _noise(rec.leaves[-1], gen, "normal")]


class Downstream(_PreactivationGuesser):
    r"""Partial backpropagation of a random vector through ``depth`` layers (eq. (7)).

    :math:`\xi \sim` ``noise`` is placed at the input of layer :math:`l + \text{depth} + 1`
    (the post-activation of layer :math:`l+\text{depth}`) and pulled back to :math:`s_l`
    through ``depth`` layers by local vector-Jacobian products. For ``depth=1`` and a ReLU MLP:
    :math:`\epsilon = D_l c W_{l+1}^\top D_{l+1} \xi`. Where fewer than ``depth`` layers
    follow, :math:`\xi` sits at the last layer's output; the last layer gets ``noise`` itself.

    Parameters
    ----------
    depth
        Number of downstream layers (the paper uses 1; appendix A.3 compares 2).
    noise
        ``"normal"``, ``"uniform"`` (:math:`U[0,1)`) or ``"uniform_symmetric"`` (:math:`U[-1,1)`).
    jvp_mode, backend
        See the module notes.
    """

    needs_chain = True

    name = "downstream"

    def __init__(
        self,
        *,
        depth: int = 1,
        noise: str = "normal",
        jvp_mode: str = "per_layer",
        backend: str = "forward_ad",
    ) -> None:
        super().__init__(jvp_mode=jvp_mode, backend=backend)
        if not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth: expected a positive integer, got {depth!r}")
        if noise not in _NOISES:
            raise ValueError(f"noise: expected one of {_NOISES}, got {noise!r}")
        self.depth, self.noise = depth, noise

    def preactivation_guesses(self, rec, gen):
        r"""Return the noise guesses :math:`\epsilon_l` of every layer (see the class docstring)."""
        L = len(rec.leaves)
        guesses = []
        for i in range(L):
            k = i + self.depth
            if k + 1 < L:
                v = _noise(rec.inputs[k + 1], gen, self.noise)
                v = vjp(rec.inputs[k + 1], rec.leaves[k], v)
            else:
                k = L - 1
                v = _noise(rec.leaves[k], gen, self.noise)
            for j in range(k, i, -1):
                v = vjp(rec.raw[j], rec.leaves[j - 1], v)
            guesses.append(v)
        return guesses


class SelfSharpening(Downstream):
    r"""Section 4.1: 1-layer downstream with uniform noise and the true last-layer error.

    The last layer's update is exact: its pre-activation error
    :math:`\partial L / \partial s_L = (\partial f / \partial s_L)^\top e` is local (the loss and
    the output head only), so no JVP is spent on it.
    """

    name = "self_sharpening"

    def __init__(
        self,
        *,
        noise: str = "uniform",
        jvp_mode: str = "per_layer",
        backend: str = "forward_ad",
    ) -> None:
        super().__init__(depth=1, noise=noise, jvp_mode=jvp_mode, backend=backend)

    def exact_errors(self, rec, e):
        """Layers whose error is known exactly (the last one, from the loss), by index."""
        return {len(rec.leaves) - 1: vjp(rec.output, rec.leaves[-1], e)}


class ActivationMixing(_PreactivationGuesser):
    r"""Random mixtures of the batch's activations (section 3.3).

    :math:`\xi_b = \sum_{b'} \alpha_{bb'} x_{l+1,b'}` with :math:`\alpha \sim N(0,1)` is a guess
    of :math:`\partial L / \partial x_{l+1}`; it is pulled back through the activation
    (:math:`\epsilon_b = D_l \xi_b`, the ReLU mask) and rescaled to norm :math:`\sqrt{n_l}`.
    :math:`\mathrm{Cov}(\epsilon_b) \propto D_l X_{l+1}^\top X_{l+1} D_l` (section 5). The last
    layer gets :math:`N(0, I)`.
    """

    needs_chain = True

    name = "activation_mixing"

    def preactivation_guesses(self, rec, gen):
        r"""Return the noise guesses :math:`\epsilon_l` of every layer (see the class docstring)."""
        L = len(rec.leaves)
        guesses = []
        for i in range(L - 1):
            act = rec.inputs[i + 1]
            B = act.shape[0]
            alpha = torch.randn(B, B, generator=gen, dtype=act.dtype, device=act.device)
            xi = (alpha @ act.detach().reshape(B, -1)).view_as(act)
            eps = vjp(act, rec.leaves[i], xi)
            flat = eps.reshape(B, -1)
            norms = flat.norm(dim=1, keepdim=True).clamp_min(torch.finfo(eps.dtype).tiny)
            guesses.append((flat * (math.sqrt(flat.shape[1]) / norms)).view_as(eps))
        return [*guesses, _noise(rec.leaves[-1], gen, "normal")]


GUESSERS: dict[str, type[GradientGuesser]] = {
    cls.name: cls
    for cls in (
        DirectionalDescent,
        ActivationPerturbation,
        ActivationMixing,
        WTranspose,
        Downstream,
        SelfSharpening,
        MatchedCosine,
    )
}


def make_guesser(
    name: str,
    **options: Any,  # forwarded to the guesser's constructor as they are
) -> GradientGuesser:
    """Make a guesser by its name (a key of :data:`GUESSERS`), configured with ``options``.

    Raises
    ------
    ValueError
        If ``name`` is not a known guesser.

    Examples
    --------
    >>> make_guesser("w_transpose", jvp_mode="all")
    WTranspose(jvp_mode='all', backend='forward_ad')
    """
    if name not in GUESSERS:
        raise ValueError(f"name: expected one of {sorted(GUESSERS)}, got {name!r}")
    return GUESSERS[name](**options)
