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

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.func import grad, jvp, vmap

from linops._chain import _elementwise
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
        self.sizes = list(space.numels)

        def batch_loss(theta: Tensor, X: Tensor, y: Tensor) -> Tensor:
            return self.loss_fn(self.space.functional_call(self.space.unflatten(theta), X), y)

        self._grad = grad(batch_loss)

        def hvp_one(v: Tensor, theta: Tensor, X: Tensor, y: Tensor) -> Tensor:
            return jvp(lambda th: self._grad(th, X, y), (theta,), (v,))[1]

        self._hvp = vmap(hvp_one, in_dims=(0, None, None, None))

    def prepare(self, theta: Tensor, X: Tensor, y: Tensor) -> dict[str, Any]:
        """Gradient at ``theta`` on the batch, plus what :meth:`hvp` needs."""
        return {"g": self._grad(theta, X, y), "theta": theta, "X": X, "y": y}

    def hvp(
        self,
        cache: dict[str, Any],
        V: list[Tensor],
        out: list[Tensor] | None = None,
        beta: float = 0.0,
    ) -> list[Tensor]:
        """``out <- beta * out + H V`` per parameter block; ``V[i]`` has shape ``(K, n_i)``."""
        flat = self._hvp(torch.cat(V, dim=1), cache["theta"], cache["X"], cache["y"])
        return _accumulate(list(torch.split(flat, self.sizes, dim=1)), out, beta)


def _accumulate(res: list[Tensor], out: list[Tensor] | None, beta: float) -> list[Tensor]:
    if out is None:
        return [r.contiguous() for r in res]
    for o, r in zip(out, res, strict=True):
        if beta == 0.0:
            o.copy_(r)
        else:
            o.mul_(beta).add_(r)
    return out


# --------------------------------------------------------------------------- the MLP fast path
def _t(x: Tensor) -> Tensor:
    return x.T.contiguous()


class MLPEngine:
    r"""Hand-derived gradient and batched HVPs for :class:`trainers.models.MLP`.

    With :math:`h_0 = x`, :math:`a_l = c_l h_{l-1} W_l^\top + b_l`, :math:`h_l = \phi(a_l)`,
    :math:`f = \kappa a_{L+1}` and back-propagated errors :math:`e_l = \partial L / \partial a_l`,
    :math:`q_{l-1} = c_l e_l W_l`, :math:`e_{l-1} = q_{l-1} \odot \phi'(a_{l-1})`, the tangent of
    the gradient along :math:`(\dot W_l, \dot b_l)` is

    .. math::

        \dot a_l &= c_l(\dot h_{l-1} W_l^\top + h_{l-1} \dot W_l^\top) + \dot b_l,\quad
        \dot h_l = \phi'(a_l) \odot \dot a_l,\quad
        \dot e_{L+1} = \kappa^2\, \nabla^2_f \ell\, \dot a_{L+1} \\
        \dot g_{W_l} &= c_l(\dot e_l^\top h_{l-1} + e_l^\top \dot h_{l-1}),\quad
        \dot g_{b_l} = \textstyle\sum_{\text{batch}} \dot e_l \\
        \dot e_{l-1} &= c_l(\dot e_l W_l + e_l \dot W_l) \odot \phi'(a_{l-1})
        + q_{l-1} \odot \phi''(a_{l-1}) \odot \dot a_{l-1}

    (:math:`\dot h_0 = 0`), batched over the ``K`` tangents. Activation tangents are stored
    feature-major, ``(K, n, B)``, so that the two products that dominate the cost (first layer,
    forward and backward) are single matrix products ``(K n, p) x (p, B)`` and
    ``(K n, B) x (B, p)`` that write straight into their outputs; elementwise work is done in
    place in reused buffers.
    """

    name = "mlp"

    def __init__(self, space: ParamSpace, loss_name: str) -> None:
        model = space.model
        self.loss_name = loss_name
        self.linears = model.linear_layers()
        mods = list(model.layers)
        self.acts = [_elementwise(m) for m in mods if not isinstance(m, nn.Linear)]
        self.mult = [float(lin.multiplier) for lin in self.linears]
        self.kappa = float(model.kappa)
        self.has_bias = self.linears[0].bias is not None
        self.shapes = [tuple(lin.weight.shape) for lin in self.linears]
        sizes = []
        for n, p in self.shapes:
            sizes += [n * p, n] if self.has_bias else [n * p]
        self.sizes = sizes
        self._work: dict[tuple[int, int, torch.dtype], list[Tensor]] = {}

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
            and all(_elementwise(m) is not None for m in acts)
            and len({lin.bias is None for lin in linears}) == 1
        )

    def _layers(self, pieces: list[Tensor]) -> tuple[list[Tensor], list[Tensor | None]]:
        step = 2 if self.has_bias else 1
        Ws = [pieces[step * i] for i in range(len(self.shapes))]
        bs = [pieces[step * i + 1] if self.has_bias else None for i in range(len(self.shapes))]
        return Ws, bs

    def prepare(self, theta: Tensor, X: Tensor, y: Tensor) -> dict[str, Any]:
        """Forward and backward pass at ``theta``: the gradient and the activations HVPs need."""
        flatW, bs = self._layers(list(torch.split(theta, self.sizes)))
        Ws = [w.view(s) for w, s in zip(flatW, self.shapes, strict=True)]
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
        return {
            "g": torch.cat(grads),
            "W": Ws,
            "WT": [_t(W) for W in Ws],
            "h": hs,
            "hT": [_t(h) for h in hs],
            "d1T": [_t(d) for d in d1],
            "qd2T": [_t(q) for q in qd2],
            "e": es,
            "eT": [_t(e) for e in es],
            "PT": _t(P) if P is not None else None,
        }

    def _workspace(self, K: int, B: int, dtype: torch.dtype) -> list[Tensor]:
        key = (K, B, dtype)
        if key not in self._work:
            self._work.clear()
            self._work[key] = [torch.empty(K, n, B, dtype=dtype) for n, _ in self.shapes]
        return self._work[key]

    def hvp(
        self,
        cache: dict[str, Any],
        V: list[Tensor],
        out: list[Tensor] | None = None,
        beta: float = 0.0,
    ) -> list[Tensor]:
        """``out <- beta * out + H V`` per parameter block; ``V[i]`` has shape ``(K, n_i)``."""
        hT, WT = cache["hT"], cache["WT"]
        K, B, L = V[0].shape[0], hT[0].shape[1], len(self.shapes)
        if out is None:
            out, beta = [torch.empty_like(v) for v in V], 0.0
        dW, db = self._layers(V)
        oW, ob = self._layers(out)
        A = self._workspace(K, B, V[0].dtype)
        Hd: list[Tensor] = []  # hidden tangents, layout (n, K, B): deeper layers are single GEMMs
        for i, (n, p) in enumerate(self.shapes):
            torch.mm(dW[i].view(K * n, p), hT[i], out=A[i].view(K * n, B))
            if i > 0:
                inner = torch.mm(cache["W"][i], Hd[-1].view(p, K * B)).view(n, K, B)
                A[i].add_(inner.transpose(0, 1))
            if self.mult[i] != 1.0:
                A[i].mul_(self.mult[i])
            if db[i] is not None:
                A[i].add_(db[i].unsqueeze(-1))
            if i < L - 1:
                h = torch.empty(n, K, B, dtype=A[i].dtype)
                torch.mul(A[i].transpose(0, 1), cache["d1T"][i].unsqueeze(1), out=h)
                Hd.append(h)
        E = A[L - 1] if self.kappa == 1.0 else A[L - 1].mul_(self.kappa)
        if cache["PT"] is not None:
            PT = cache["PT"]
            E = PT * (E - (PT * E).sum(1, keepdim=True))
            E.mul_(self.kappa / B)
        else:
            E = E * (2.0 * self.kappa / (B * E.shape[1]))
        for i in range(L - 1, -1, -1):
            n, p = self.shapes[i]
            c = self.mult[i]
            oW[i].view(K * n, p).addmm_(E.view(K * n, B), cache["h"][i], beta=beta, alpha=c)
            if i > 0:
                # e_l^T dh_{l-1}: (p K, B) x (B, n) -> (p, K, n), added as (K, n, p)
                t = torch.mm(Hd[i - 1].view(p * K, B), cache["e"][i]).view(p, K, n)
                oW[i].view(K, n, p).add_(t.permute(1, 2, 0), alpha=c)
            if ob[i] is not None:
                if beta == 0.0:
                    torch.sum(E, dim=-1, out=ob[i])
                else:
                    ob[i].mul_(beta).add_(E.sum(-1))
            if i > 0:
                dWT = dW[i].view(K, n, p).transpose(1, 2).reshape(K * p, n)
                Q = torch.mm(dWT, cache["eT"][i]).view(K, p, B)
                En = E.transpose(0, 1).reshape(n, K * B)
                Q.add_(torch.mm(WT[i], En).view(p, K, B).transpose(0, 1))
                if c != 1.0:
                    Q.mul_(c)
                E = Q.mul_(cache["d1T"][i - 1]).addcmul_(cache["qd2T"][i - 1], A[i - 1])
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
