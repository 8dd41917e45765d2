r"""Gradient engines: the mini-batch gradient and batched Hessian-vector products through it.

Differentiating one training step needs :math:`g = \nabla L(\theta)` and the products
:math:`H V` of the mini-batch Hessian with many vectors at once (tangents in forward mode,
cotangents in reverse mode; :math:`H` is symmetric, so both are the same product). Two engines:

* :class:`FuncEngine`: any model and loss, through ``torch.func``:
  ``vmap(jvp(grad(L)))`` (forward-over-reverse), batched over the vectors;
* :class:`MLPEngine`: a hand-derived forward-over-reverse pass for :class:`trainers.models.MLP`
  with cross-entropy or squared loss. Every tangent product is a batched matrix product over all
  ``K`` vectors, and nothing is spent on the input tangent (which is zero). It is tested against
  ``torch.func`` in float64 and is the fast path of the dense training Jacobian.

Vectors are batched as rows, ``V`` of shape ``(K, m)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.func import grad, jvp, vmap

from linops.params import ParamSpace

__all__ = ["FuncEngine", "MLPEngine", "make_engine", "resolve_loss"]

Tensor = torch.Tensor
LossFn = Callable[[Tensor, Tensor], Tensor]

_LOSSES: dict[str, LossFn] = {
    "cross_entropy": nn.functional.cross_entropy,
    "mse": nn.functional.mse_loss,
}


def resolve_loss(loss: str | LossFn) -> tuple[str | None, LossFn]:
    """``(name, function)`` of a loss given by name (``"cross_entropy"``, ``"mse"``) or callable."""
    if isinstance(loss, str):
        if loss not in _LOSSES:
            raise ValueError(f"loss: expected one of {sorted(_LOSSES)} or a callable, got {loss!r}")
        return loss, _LOSSES[loss]
    if callable(loss):
        return None, loss
    raise TypeError(f"loss: expected a loss name or a callable, got {type(loss).__name__}")


class FuncEngine:
    """Gradient and batched HVPs of ``loss_fn(model(X), y)`` through ``torch.func``."""

    name = "func"

    def __init__(self, space: ParamSpace, loss_fn: LossFn) -> None:
        self.space, self.loss_fn = space, loss_fn

        def batch_loss(theta: Tensor, X: Tensor, y: Tensor) -> Tensor:
            return self.loss_fn(self.space.functional_call(self.space.unflatten(theta), X), y)

        self._grad = grad(batch_loss)

        def hvp_one(v: Tensor, theta: Tensor, X: Tensor, y: Tensor) -> Tensor:
            return jvp(lambda th: self._grad(th, X, y), (theta,), (v,))[1]

        self._hvp = vmap(hvp_one, in_dims=(0, None, None, None))

    def prepare(self, theta: Tensor, X: Tensor, y: Tensor) -> dict[str, Any]:
        """Gradient at ``theta`` on the batch, plus what :meth:`hvp` needs."""
        return {"g": self._grad(theta, X, y), "theta": theta, "X": X, "y": y}

    def hvp(self, cache: dict[str, Any], V: Tensor) -> Tensor:
        """``(H V^T)^T`` for ``V`` of shape ``(K, m)``."""
        return self._hvp(V, cache["theta"], cache["X"], cache["y"])


# --------------------------------------------------------------------------- the MLP fast path
def _gelu(a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    pdf = torch.exp(-0.5 * a * a) * (1.0 / math.sqrt(2.0 * math.pi))
    cdf = 0.5 * (1.0 + torch.erf(a * (1.0 / math.sqrt(2.0))))
    return a * cdf, cdf + a * pdf, pdf * (2.0 - a * a)


def _tanh(a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    t = torch.tanh(a)
    d = 1.0 - t * t
    return t, d, -2.0 * t * d


def _relu(a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    pos = (a > 0).to(a.dtype)
    return a * pos, pos, torch.zeros_like(a)


def _identity(a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return a, torch.ones_like(a), torch.zeros_like(a)


def _sigmoid(a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    s = torch.sigmoid(a)
    d = s * (1.0 - s)
    return s, d, d * (1.0 - 2.0 * s)


def _silu(a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    s = torch.sigmoid(a)
    d = s * (1.0 - s)
    return a * s, s + a * d, d * (2.0 + a * (1.0 - 2.0 * s))


def _activation_derivs(mod: nn.Module) -> Callable[[Tensor], tuple[Tensor, Tensor, Tensor]] | None:
    """``a -> (phi(a), phi'(a), phi''(a))`` for supported activation modules, else None."""
    if isinstance(mod, nn.GELU):
        return _gelu if mod.approximate == "none" else None
    table = {
        nn.Tanh: _tanh,
        nn.ReLU: _relu,
        nn.Identity: _identity,
        nn.Sigmoid: _sigmoid,
        nn.SiLU: _silu,
    }
    return table.get(type(mod))


class MLPEngine:
    r"""Hand-derived gradient and batched HVPs for :class:`trainers.models.MLP`.

    With :math:`h_0 = x`, :math:`a_l = c_l h_{l-1} W_l^\top + b_l`, :math:`h_l = \phi(a_l)`,
    :math:`f = \kappa a_{L+1}` and back-propagated errors :math:`e_l = \partial L / \partial a_l`,
    :math:`q_{l-1} = c_l e_l W_l`, :math:`e_{l-1} = q_{l-1} \odot \phi'(a_{l-1})`, the tangent of
    the gradient along :math:`(\dot W_l, \dot b_l)` is

    .. math::

        \dot a_l &= c_l(\dot h_{l-1} W_l^\top + h_{l-1} \dot W_l^\top) + \dot b_l,\quad
        \dot h_l = \phi'(a_l) \odot \dot a_l,\quad \dot e_{L+1} = \kappa^2\, \nabla^2_f \ell\, \dot a_{L+1} \\
        \dot g_{W_l} &= c_l(\dot e_l^\top h_{l-1} + e_l^\top \dot h_{l-1}),\quad
        \dot g_{b_l} = \textstyle\sum_{\text{batch}} \dot e_l \\
        \dot e_{l-1} &= c_l(\dot e_l W_l + e_l \dot W_l) \odot \phi'(a_{l-1})
        + q_{l-1} \odot \phi''(a_{l-1}) \odot \dot a_{l-1}

    (:math:`\dot h_0 = 0`), all batched over the ``K`` tangents as batched matrix products.
    """

    name = "mlp"

    def __init__(self, space: ParamSpace, loss_name: str) -> None:
        model = space.model
        self.loss_name = loss_name
        self.linears = model.linear_layers()
        mods = list(model.layers)
        self.acts = [_activation_derivs(m) for m in mods if not isinstance(m, nn.Linear)]
        self.mult = [float(lin.multiplier) for lin in self.linears]
        self.kappa = float(model.kappa)
        self.has_bias = self.linears[0].bias is not None
        self.shapes = [tuple(lin.weight.shape) for lin in self.linears]
        sizes = []
        for n, p in self.shapes:
            sizes += [n * p, n] if self.has_bias else [n * p]
        self.sizes = sizes

    @staticmethod
    def supports(space: ParamSpace, loss_name: str | None) -> bool:
        """Whether the fast path applies: an MLP, all its parameters, a named loss."""
        from trainers.models import MLP

        model = space.model
        if not isinstance(model, MLP) or loss_name not in _LOSSES:
            return False
        if space.names != [n for n, _ in model.named_parameters()]:
            return False
        mods = list(model.layers)
        linears = model.linear_layers()
        acts = [m for m in mods if not isinstance(m, nn.Linear)]
        alternating = all(isinstance(m, nn.Linear) == (i % 2 == 0) for i, m in enumerate(mods))
        return (
            alternating
            and len(linears) == len(acts) + 1
            and all(_activation_derivs(m) is not None for m in acts)
            and len({lin.bias is None for lin in linears}) == 1
        )

    def _split(self, theta: Tensor) -> tuple[list[Tensor], list[Tensor | None]]:
        """Per-layer weight and bias views of a flat ``(m,)`` or row-batched ``(K, m)`` tensor."""
        parts = torch.split(theta, self.sizes, dim=-1)
        lead = theta.shape[:-1]
        step = 2 if self.has_bias else 1
        Ws = [parts[step * i].view(*lead, *s) for i, s in enumerate(self.shapes)]
        bs = [parts[step * i + 1] if self.has_bias else None for i in range(len(self.shapes))]
        return Ws, bs

    def prepare(self, theta: Tensor, X: Tensor, y: Tensor) -> dict[str, Any]:
        """Forward and backward pass at ``theta``: the gradient and the activations HVPs need."""
        Ws, bs = self._split(theta)
        hs, d1, d2 = [X.flatten(1)], [], []
        for i, (W, b, c) in enumerate(zip(Ws, bs, self.mult, strict=True)):
            a = c * (hs[-1] @ W.T)
            a = a + b if b is not None else a
            if i < len(self.acts):
                h, p1, p2 = self.acts[i](a)
                hs.append(h)
                d1.append(p1)
                d2.append(p2)
        f = self.kappa * a
        B = f.shape[0]
        if self.loss_name == "cross_entropy":
            P = torch.softmax(f, dim=-1)
            onehot = nn.functional.one_hot(y, f.shape[-1]).to(f.dtype)
            e = self.kappa * (P - onehot) / B
        else:
            P = None
            e = self.kappa * 2.0 * (f - y.reshape(f.shape)) / f.numel()
        es: list[Tensor] = [e] * len(Ws)
        qd2: list[Tensor] = [e] * len(self.acts)
        grads: list[Tensor] = [e] * len(self.sizes)
        step = 2 if self.has_bias else 1
        for i in range(len(Ws) - 1, -1, -1):
            es[i] = e
            grads[step * i] = (self.mult[i] * (e.T @ hs[i])).reshape(-1)
            if self.has_bias:
                grads[step * i + 1] = e.sum(0)
            if i > 0:
                q = self.mult[i] * (e @ Ws[i])
                qd2[i - 1] = q * d2[i - 1]
                e = q * d1[i - 1]
        return {"g": torch.cat(grads), "W": Ws, "h": hs, "d1": d1, "qd2": qd2, "e": es, "P": P}

    def hvp(self, cache: dict[str, Any], V: Tensor) -> Tensor:
        """``(H V^T)^T`` for ``V`` of shape ``(K, m)`` (rows are vectors)."""
        Ws, hs, es = cache["W"], cache["h"], cache["e"]
        dW, db = self._split(V)
        L = len(Ws)
        adots: list[Tensor] = []
        hdots: list[Tensor] = []
        for i in range(L):
            ad = torch.matmul(hs[i], dW[i].mT)
            if i > 0:
                ad = ad + hdots[-1] @ Ws[i].T
            if self.mult[i] != 1.0:
                ad = ad * self.mult[i]
            if db[i] is not None:
                ad = ad + db[i].unsqueeze(1)
            if i < L - 1:
                adots.append(ad)
                hdots.append(cache["d1"][i] * ad)
        fdot = ad if self.kappa == 1.0 else self.kappa * ad
        if cache["P"] is not None:
            P = cache["P"]
            edot = P * (fdot - (P * fdot).sum(-1, keepdim=True))
            edot = edot * (self.kappa / fdot.shape[1])
        else:
            edot = fdot * (2.0 * self.kappa / (fdot.shape[1] * fdot.shape[2]))
        out = torch.empty_like(V)
        offsets = [0]
        for s in self.sizes:
            offsets.append(offsets[-1] + s)
        step = 2 if self.has_bias else 1
        K = V.shape[0]
        for i in range(L - 1, -1, -1):
            gW = torch.matmul(edot.mT, hs[i])
            if i > 0:
                gW = gW + torch.matmul(es[i].T, hdots[i - 1])
            if self.mult[i] != 1.0:
                gW = gW * self.mult[i]
            j = step * i
            out[:, offsets[j] : offsets[j + 1]] = gW.reshape(K, -1)
            if self.has_bias:
                out[:, offsets[j + 1] : offsets[j + 2]] = edot.sum(1)
            if i > 0:
                q = edot @ Ws[i] + torch.matmul(es[i], dW[i])
                if self.mult[i] != 1.0:
                    q = q * self.mult[i]
                edot = q * cache["d1"][i - 1] + cache["qd2"][i - 1] * adots[i - 1]
        return out


def make_engine(
    space: ParamSpace, loss: str | LossFn, engine: str = "auto"
) -> FuncEngine | MLPEngine:
    """The gradient engine for a model and loss: ``"auto"`` (fast path when it applies), ``"mlp"``, ``"func"``."""
    name, fn = resolve_loss(loss)
    if engine not in ("auto", "mlp", "func"):
        raise ValueError(f"engine: expected 'auto', 'mlp' or 'func', got {engine!r}")
    fast = MLPEngine.supports(space, name)
    if engine == "mlp" and not fast:
        raise ValueError(
            "engine: expected a trainers.models.MLP with all its parameters, a supported "
            "activation and loss 'cross_entropy' or 'mse' for engine='mlp', got "
            f"{type(space.model).__name__} with loss {name or 'callable'}"
        )
    if engine == "mlp" or (engine == "auto" and fast):
        return MLPEngine(space, name)  # type: ignore[arg-type]
    return FuncEngine(space, fn)
