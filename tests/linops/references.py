"""Independent dense float64 references for the model operators (the zoo's oracle).

Everything here is built with ``torch.func`` on the concatenated data, a different code path
from the operators (retained graphs, batching, the chain route, the loaders):

* ``J`` by reverse mode, one output row at a time;
* ``H`` by **reverse-over-reverse**, one row at a time (``torch.autograd.functional`` without
  vectorization): never ``jvp(jacrev(...))`` nor ``jacrev(jacrev(...))``, whose vmapped
  double backward torch 2.13 gets wrong through ``layer_norm`` (11% off a finite difference on
  the zoo's residual LayerNorm MLP); cross-checked by a central finite difference of gradients
  (:meth:`Reference.fd_hessian_error`);
* the GGN as ``J^T (d^2 L / d f^2) J`` with the output Hessian by reverse-over-reverse;
* the Hessian of one output unit, summed over the inputs, by reverse-over-reverse.

The attention kernels without double-backward support are avoided the same way a user would
(the math SDPA backend, no fused fast paths).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.autograd.functional import jacobian as _jacobian
from torch.func import functional_call

Tensor = torch.Tensor


@contextlib.contextmanager
def plain_kernels() -> Iterator[None]:
    """Math SDPA and no fused multi-head-attention fast path, for the references."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)


class Reference:
    """Flat-parameter functions of a model on the concatenated data.

    Parameters
    ----------
    model
        A float64 model (buffers included).
    names
        The differentiated parameters, in the operator's order.
    X
        Concatenated inputs.
    output
        Selector applied to the model's return value (default: identity).
    call
        Optional replacement for ``functional_call(model, params, (x,))`` (a model whose
        second derivatives torch gets wrong is given an independent implementation here).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        names: list[str],
        X: Any,
        *,
        output: Callable[[Any], Tensor] | None = None,
        call: Callable[[dict[str, Tensor], Any], Any] | None = None,
    ) -> None:
        self.model, self.names, self.X = model, names, X
        named = dict(model.named_parameters())
        self.theta0 = torch.cat([named[n].detach().reshape(-1) for n in names]).double()
        self.shapes = [named[n].shape for n in names]
        self.output = output or (lambda out: out)
        self.call = call or (lambda p, x: functional_call(model, p, (x,)))

    def params(self, theta: Tensor) -> dict[str, Tensor]:
        parts = torch.split(theta, [s.numel() for s in self.shapes])
        return {n: p.reshape(s) for n, p, s in zip(self.names, parts, self.shapes, strict=True)}

    def outputs(self, theta: Tensor, X: Any = None) -> Tensor:
        with plain_kernels():
            return self.output(self.call(self.params(theta), self.X if X is None else X))

    def jacobian(self, X: Any = None) -> Tensor:
        """``(n d, m)``: rows sample-major."""
        J = jacrev(lambda t: self.outputs(t, X).reshape(-1))(self.theta0)
        return J.reshape(-1, self.theta0.numel())

    def hessian(self, loss: Callable[[Tensor, Tensor], Tensor], y: Tensor) -> Tensor:
        L = lambda t: loss(self.outputs(t), y)  # noqa: E731
        return jacrev(jacrev(L))(self.theta0)

    def ggn(self, loss: Callable[[Tensor, Tensor], Tensor], y: Tensor) -> Tensor:
        out = self.outputs(self.theta0).detach()
        flat = out.reshape(-1)
        Hout = jacrev(jacrev(lambda f: loss(f.reshape(out.shape), y)))(flat)
        J = self.jacobian()
        return J.T @ Hout @ J

    def output_hessian(self, x: Tensor, j: int) -> Tensor:
        f = lambda t: self.outputs(t, x).reshape(len(x), -1)[:, j].sum()  # noqa: E731
        return jacrev(jacrev(f))(self.theta0)

    def fd_hessian_error(
        self, H: Tensor, loss: Callable[[Tensor, Tensor], Tensor], y: Tensor, n: int = 2
    ) -> float:
        """Largest relative gap between ``H v`` and a central difference of gradients."""
        grad = jacrev(lambda t: loss(self.outputs(t), y))
        g = torch.Generator().manual_seed(0)
        worst = 0.0
        for _ in range(n):
            v = torch.randn(self.theta0.numel(), generator=g, dtype=torch.float64)
            h = 1e-4 / float(v.norm())
            fd = (grad(self.theta0 + h * v) - grad(self.theta0 - h * v)) / (2 * h)
            Hv = H @ v
            worst = max(worst, float((fd - Hv).norm() / max(float(Hv.norm()), 1e-30)))
        return worst


def jacrev(f: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """Reverse-mode Jacobian of ``f`` by a loop over output rows (no vmap)."""

    def jac(t: Tensor) -> Tensor:
        return _jacobian(f, t, create_graph=torch.is_grad_enabled() and t.requires_grad)

    return jac
