r"""Propagation of ``K`` tangents and cotangents through a chain's steps (:mod:`linops._chain`).

:func:`tangents_forward` pushes parameter tangents forward (the JVP, and the forward sweep of
the HVP); :func:`backward` pulls output cotangents back to the parameters (the VJP, and with
``second`` the HVP's backward sweep). The formulas are in :mod:`linops._chain`'s docstring.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from linops._layers import Affine, Conv, Flatten, Pool
from linops.params import BlockViews

if TYPE_CHECKING:
    from linops._chain import Chain

__all__ = ["Tangent", "backward", "tangents_forward", "unbatch"]

Tensor = torch.Tensor


# Tangents and cotangents of step values are laid out ``(n, K, width)``: sample, vector,
# feature. Then every product of a layer with K vectors is one 2-d matrix product, e.g.
# ``x (n, in) @ [dW_1^T ... dW_K^T] (in, K out)`` and ``dx (n K, in) @ W^T``, except the
# products with the K weight tangents of a layer whose weight outgrows its activations
# (:func:`_weight_dominated`): those read the tangents where they lie in the block.
class Tangent:
    """The K parameter tangents of one product, with the layouts the matrix products take."""

    def __init__(self, tangents: Sequence[Tensor], batched: bool) -> None:
        #: the tangents as given, ``(K, *shape)``: views of the product's ``(m, K)`` block
        self.raw = list(tangents) if batched else [t[None] for t in tangents]
        self.K = self.raw[0].shape[0]
        self._T: dict[int, Tensor] = {}
        self._fwd: dict[int, Tensor] = {}
        self._bwd: dict[int, Tensor] = {}

    def tangent(self, i: int) -> Tensor:
        """``(K, *shape)``, each vector's tangent contiguous (a row-major block's copied once)."""
        if i not in self._T:
            t = self.raw[i]
            self._T[i] = t if t[0].is_contiguous() else t.contiguous()
        return self._T[i]

    def _in_rows(self, i: int) -> Tensor | None:
        """``(out, in, K)``: a weight's K tangents where a row-major block holds them, or None.

        None also once they have been copied (:meth:`tangent`): the copy is then read.
        """
        if i in self._T:
            return None
        t = self.raw[i].permute(1, 2, 0)
        return t if t.is_contiguous() else None

    def weight_forward(self, i: int, x: Tensor) -> Tensor:
        """``(n, K, out)``: ``x dW_k^T`` for the K weight tangents ``dW_k`` ``(out, in)``."""
        K, out, inp = self.raw[i].shape
        n = x.shape[0]
        if K > 1 and _weight_dominated(n, out, inp):
            rows = self._in_rows(i) if K >= 16 else None
            if rows is not None:  # one product (n, in) @ (in, K) per output unit
                return torch.bmm(x.expand(out, n, inp), rows).permute(1, 2, 0).contiguous()
            y = x.new_empty((n, K, out))  # one product (n, in) @ (in, out) per vector
            torch.bmm(x.expand(K, n, inp), self.tangent(i).transpose(1, 2), out=y.transpose(0, 1))
            return y
        if i not in self._fwd:  # (in, K out): the K transposed tangents side by side
            self._fwd[i] = self.tangent(i).permute(2, 0, 1).reshape(inp, K * out)
        return (x @ self._fwd[i]).view(n, K, out)

    def weight_backward_add(self, i: int, e: Tensor, gx: Tensor) -> None:
        """``gx[:, k] += e dW_k`` for the K weight tangents, ``e`` ``(n, out)``, ``gx`` ``(n, K, in)``."""
        K, out, inp = self.raw[i].shape
        n = e.shape[0]
        if K > 1 and _weight_dominated(n, out, inp):
            rows = self._in_rows(i)
            if rows is not None:  # (n, out) @ (out, in K), read in place
                gx.add_((e @ rows.reshape(out, inp * K)).view(n, inp, K).transpose(1, 2))
            else:
                gx.transpose(0, 1).baddbmm_(e.expand(K, n, out), self.tangent(i))
            return
        if i not in self._bwd:  # (out, K in): the K tangents side by side
            self._bwd[i] = self.tangent(i).transpose(0, 1).reshape(out, K * inp)
        gx.view(n, K * inp).addmm_(e, self._bwd[i])


def _weight_dominated(n: int, out: int, inp: int) -> bool:
    """Whether a weight ``(out, in)`` has more entries than its ``n`` inputs and outputs.

    Then the products with the layer's K weight tangents read each tangent where it lies in
    the block (:class:`Tangent`) instead of a copy of all K side by side: the copy streams
    ``K out in`` entries through memory for products of ``2 n K out in`` flops, and on a
    wide layer with few samples it cost more than the products. On the 1024 x 1024 layer of
    ``bench/operators.py``'s 1M-parameter MLP (n = 32, K = 32, column-major, one thread,
    beside a running benchmark): the tangents' products 91 -> 33 ms forward, 162 -> 42 ms
    for ``e dW_k`` and 102 -> 21 ms for ``e^T dx_k``; at n = 256, 216 -> 147, 266 -> 130,
    214 -> 137 ms. On a 128 x 64 layer with n = 1797 the side-by-side products were 20-25%
    faster, hence the rule. A row-major block's rows hold a weight's K tangents side by
    side: there one product ``(n, in) @ (in, K)`` per output unit reads them (2 threads,
    quiet: 17 against 199 ms forward at n = 32, K = 32), but not below K = 16, where those
    products are thin (n = 256, K = 8: 53 against 37 ms with the copy).
    """
    return out * inp > n * (out + inp)


def tangents_forward(
    chain: Chain,
    xs: list[Tensor],
    derivs: list,
    tan: Tangent,
    patches: dict[int, Tensor | None],
    keep: bool = False,
) -> list[Tensor | None]:
    """``dx_t`` of every step input and of the output (``None`` where zero), ``(n, K, width)``.

    Elementwise steps scale their (freshly computed) input tangent in place, which spares a
    tensor of ``n K width`` per step, unless ``keep`` asks for the inputs of the steps with a
    second-order term (the HVP's backward sweep reads them); those entries then hold the
    step's output instead. ``patches`` caches the unfolded inputs of convolutions (see
    :func:`_conv_forward`) across products.
    """
    K = tan.K
    dxs: list[Tensor | None] = [None] * len(xs)
    for t in range(chain.first, len(chain.steps)):
        s, x, dx = chain.steps[t], xs[t], dxs[t]
        n = x.shape[0]
        if isinstance(s, Affine):
            out, inp = s.weight.shape
            y = None
            if s.w_index is not None:
                y = tan.weight_forward(s.w_index, x)
            if dx is not None:
                if y is None:
                    y = (dx.reshape(n * K, inp) @ s.weight.T).view(n, K, out)
                else:
                    y.view(n * K, out).addmm_(dx.reshape(n * K, inp), s.weight.T)
            if y is not None and s.scale != 1.0:
                y.mul_(s.scale)
            if s.b_index is not None:
                db = tan.raw[s.b_index].contiguous()  # strided, its broadcast add was slower
                y = _fresh(db.expand(n, K, out)) if y is None else y.add_(db)
            dxs[t + 1] = y
        elif isinstance(s, Conv):
            dxs[t + 1] = _conv_forward(s, x, dx, tan, xs[t + 1].shape, patches, t)
        elif dx is None:
            continue
        elif isinstance(s, Pool):
            dxs[t + 1] = s.tangent(dx, derivs[t])
        elif isinstance(s, Flatten):
            dxs[t + 1] = dx.reshape(n, K, -1)
        elif s.derivs is None:
            dxs[t + 1] = dx.mul_(s.scale)
        elif keep and derivs[t][1] is not None:
            dxs[t + 1] = dx * derivs[t][0].unsqueeze(1)
        else:
            dxs[t + 1] = dx.mul_(derivs[t][0].unsqueeze(1))
    return dxs


def _fresh(t: Tensor) -> Tensor:
    """Return a contiguous copy of ``t`` in new memory, never ``t`` itself or a view of it.

    A step's tangent is scaled in place by the elementwise steps after it, and a bias
    tangent expanded over one sample (and one pixel) is already contiguous: ``contiguous()``
    returned the caller's own vectors, which the next activation then scaled.
    """
    return t.clone(memory_format=torch.contiguous_format)


#: largest unfolded input (entries) a convolution keeps for its batched weight tangents
_MAX_PATCHES = 2**24


def _conv_forward(
    s: Conv,
    x: Tensor,
    dx: Tensor | None,
    tan: Tangent,
    out_shape: torch.Size,
    patches: dict[int, Tensor | None],
    t: int,
) -> Tensor | None:
    """``dW * x + W * dx + db`` for the K tangents, ``(n, K, out, h, w)``.

    The K weight tangents are one convolution with K times the output channels. With K > 1
    it is computed as ``[dW_1; ...; dW_K] @ patches(x)`` instead, from the primal input's
    patches unfolded once and kept in ``patches[t]`` (when they have at most ``_MAX_PATCHES``
    entries). oneDNN's convolution of few input channels into many output channels was the
    slow part: on the first layer of ``bench/operators.py``'s CNN (1600 digits, 1 -> 8
    channels, K = 8) it took 3.2 ms per vector against 0.32 ms for the patches' product, and
    10.6 / 2.5 / 4.7 against 5.3 / 1.0 / 2.2 ms on 512 inputs of layers 1 -> 6 (5x5, 32x32),
    3 -> 8 (3x3, 16x16), 6 -> 16 (5x5, 14x14). A whole 32-vector product of that CNN took from
    5% more to 14% less time with the patches here only (H, GGN, J; two interleaved rounds),
    and 17-42% less with them here and in :func:`_conv_backward`'s weight cotangents, against
    none (H, GGN, J, J^T; ten alternating rounds).
    """
    n, K, shape = x.shape[0], tan.K, (x.shape[0], tan.K, *out_shape[1:])
    y = None
    if s.w_index is not None:
        w = tan.tangent(s.w_index)
        unfolded = _patches(s, x, out_shape, patches, t) if K > 1 else None
        if unfolded is not None:
            y = torch.matmul(w.reshape(K * w.shape[1], -1), unfolded).view(shape)
        else:
            y = s(x, w.reshape(-1, *w.shape[2:])).view(shape)
    if dx is not None:  # the K input tangents as one convolution over n K images
        z = s(dx.reshape(n * K, *dx.shape[2:]), s.weight).view(shape)
        y = z if y is None else y.add_(z)
    if s.b_index is not None:
        db = tan.raw[s.b_index].contiguous().view(1, K, -1, 1, 1)
        y = _fresh(db.expand(shape)) if y is None else y.add_(db)
    return y


def _patches(
    s: Conv,
    x: Tensor,
    out_shape: torch.Size,
    cache: dict[int, Tensor | None],
    t: int,
    weight_grad: bool = False,
) -> Tensor | None:
    """Return ``s.unfold(x)``, made once per batch, or None if it would be too large.

    For the weight cotangents (``weight_grad``) also None when a patch is longer than an output
    channel, as the product's ``(n, K out, in kh kw)`` result would then outgrow ``g``.
    """
    if weight_grad and s.weight[0].numel() > out_shape[2] * out_shape[3]:
        return None
    if t not in cache:
        size = x.shape[0] * s.weight[0].numel() * out_shape[2] * out_shape[3]
        cache[t] = s.unfold(x) if size <= _MAX_PATCHES else None
    return cache[t]


def _conv_backward(
    s: Conv,
    x: Tensor,
    g: Tensor,
    out: list[Tensor | None],
    second: tuple[Tensor | None, Tensor, Tangent] | None,
    need_input: bool,
    unfolded: Tensor | None = None,
) -> Tensor | None:
    """Accumulate the parameter cotangents of ``g`` ``(n, K, out, h, w)``; return ``x``'s.

    With ``second = (dx, e, tangent)`` the terms of the gradient's tangent that involve the
    primal error ``e`` of the step's output are added (as ``es[t + 1]`` in :func:`backward`).
    With ``unfolded``, the patches of ``x`` (:meth:`Conv.unfold`), the K weight cotangents are
    ``sum_n g_n patches_n^T``, a batched product that beat oneDNN's weight gradient from few
    input channels (:func:`_patches` says when it is used).
    """
    n, K = g.shape[0], g.shape[1]
    o, c, *kernel = s.weight.shape
    dx, e, tan = second if second is not None else (None, None, None)
    if s.w_index is not None:
        if unfolded is not None:
            gw = torch.matmul(g.reshape(n, K * o, -1), unfolded.transpose(1, 2)).sum(0)
        else:
            gw = s.weight_grad(x, (K * o, c, *kernel), g.reshape(n, K * o, *g.shape[3:]))
        gw = gw.view(K, o, c, *kernel)
        if dx is not None and e is not None:  # e (*) dx_k, all k as one weight gradient
            h = s.weight_grad(dx.reshape(n, K * c, *dx.shape[3:]), (o, K * c, *kernel), e)
            gw.add_(h.view(o, K, c, *kernel).transpose(0, 1))
        _add(out, s.w_index, gw)
    if s.b_index is not None:
        # over pixels, then samples: 4-6x faster than one reduction over dims (0, 3, 4)
        _add(out, s.b_index, g.flatten(3).sum(3).sum(0))
    if not need_input:
        return None
    gx = s.input_grad((n * K, *x.shape[1:]), s.weight, g.reshape(n * K, o, *g.shape[3:]))
    gx = gx.view(n, K, *x.shape[1:])
    if tan is not None and e is not None and s.w_index is not None:  # e (*)^T dW_k, all k
        w = tan.tangent(s.w_index).transpose(0, 1).reshape(o, K * c, *kernel)
        gx.view(n, K * c, *x.shape[2:]).add_(s.input_grad((n, K * c, *x.shape[2:]), w, e))
    return gx


def backward(
    chain: Chain,
    xs: list[Tensor],
    derivs: list,
    cot: Tensor,
    patches: dict[int, Tensor | None],
    second: tuple[list[Tensor | None], list[Tensor], list[Tensor | None], Tangent] | None = None,
) -> list[Tensor]:
    r"""Parameter cotangents ``(K, *shape)`` of output cotangents ``cot`` ``(n, K, d)``.

    With ``second = (dxs, es, d2es, tangent)`` (forward tangents, primal errors
    :math:`e_{t+1}`, :math:`\phi''(x_t) \odot e_{t+1}` and the parameter tangents) this is
    the tangent of the gradient, the HVP's backward sweep, and ``cot`` is :math:`\dot e_T`.
    ``patches`` is the cache of :func:`_conv_forward`.
    """
    n, K = cot.shape[0], cot.shape[1]
    space = chain.space
    out: list[Tensor | None] = [None] * len(space.names)
    dxs: list[Tensor | None] | None = None
    es: list[Tensor] = []  # read only with ``second``
    d2es: list[Tensor | None] = []
    tan: Tangent | None = None
    if second is not None:
        dxs, es, d2es, tan = second
    g = cot
    owned = False  # whether g may be scaled in place: not while it is (a view of) the caller's
    # (K, m): every parameter's K cotangents in place, made when a wide layer's weight
    # cotangents are written there directly (then the caller's join of the parameters is a
    # view, not a copy of the block)
    dest: BlockViews | None = None
    for t in range(len(chain.steps) - 1, chain.first - 1, -1):
        s, x = chain.steps[t], xs[t]
        dx = dxs[t] if dxs is not None else None
        if isinstance(s, Affine):
            o, inp = s.weight.shape
            if s.w_index is not None:
                wide = K > 1 and _weight_dominated(n, o, inp)
                if wide and out[s.w_index] is None:
                    if dest is None:
                        dest = BlockViews(space, cot.new_empty((K, space.dim)).T)
                    gw = dest[s.w_index]
                    torch.bmm(g.permute(1, 2, 0), x.expand(K, n, inp), out=gw)
                else:
                    gw = (g.reshape(n, K * o).T @ x).view(K, o, inp)
                if dx is not None and wide:
                    gw.baddbmm_(es[t + 1].T.expand(K, o, n), dx.transpose(0, 1))
                elif dx is not None:
                    gw.add_((es[t + 1].T @ dx.reshape(n, K * inp)).view(o, K, inp).transpose(0, 1))
                if s.scale != 1.0:
                    gw.mul_(s.scale)
                _add(out, s.w_index, gw)
            if s.b_index is not None:
                _add(out, s.b_index, g.sum(0))
            if t == chain.first:
                break
            gx = (g.reshape(n * K, o) @ s.weight).view(n, K, inp)
            if tan is not None and s.w_index is not None:
                tan.weight_backward_add(s.w_index, es[t + 1], gx)
            g = gx if s.scale == 1.0 else gx.mul_(s.scale)
        elif isinstance(s, Conv):
            conv_second = (dx, es[t + 1], tan) if tan is not None else None
            unfolded = _patches(s, x, xs[t + 1].shape, patches, t, True) if K > 1 else None
            gc = _conv_backward(s, x, g, out, conv_second, t != chain.first, unfolded)
            if gc is None:
                break
            g = gc
        elif isinstance(s, Pool):
            g = s.adjoint(g, derivs[t], x.shape)
        elif isinstance(s, Flatten):
            g = g.reshape(n, K, *x.shape[1:])
        elif s.derivs is None:
            g = g.mul_(s.scale) if owned else s.scale * g
        else:
            d1 = derivs[t][0].unsqueeze(1)
            g = g.mul_(d1) if owned else g * d1
            d2e = d2es[t] if dx is not None else None
            if dx is not None and d2e is not None:
                g.addcmul_(d2e.unsqueeze(1), dx)
        owned = owned or not isinstance(s, Flatten)  # every other step makes a new g
    if dest is not None:  # the other parameters' cotangents into their places too
        for r, d in zip(out, dest, strict=True):
            if r is None:
                d.zero_()
            elif r.data_ptr() != d.data_ptr():
                d.copy_(r.view_as(d))
        return dest
    return [
        o.view(K, *shape) if o is not None else cot.new_zeros((K, *shape))
        for o, shape in zip(out, space.shapes, strict=True)
    ]


def _add(out: list[Tensor | None], i: int, g: Tensor) -> None:
    """Accumulate (a layer that appears twice in the chain shares its parameters)."""
    prev = out[i]
    out[i] = g if prev is None else prev + g


def unbatch(res: list[Tensor], batched: bool) -> list[Tensor]:
    return res if batched else [r[0] for r in res]
