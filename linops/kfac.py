r"""Kronecker-factored approximate curvature (KFAC) of the Fisher family (``Linear``, ``Conv2d``).

For a linear layer :math:`z = W a + b` the block of the Fisher / GGN (module docstring of
:mod:`linops.fisher`, same :math:`c`) is :math:`c\sum_n \tilde a_n\tilde a_n^\top \otimes
\sum_r \hat g_{nr}\hat g_{nr}^\top` with :math:`\tilde a = (a, 1)` and :math:`\hat g_{nr} =
J_{z,n}^\top s_{nr}` the backpropagated columns of the per-sample output-space factor
:math:`S_n` (:math:`S_nS_n^\top` = the loss Hessian for ``"type-2"``, the :math:`M` sampled
gradients over :math:`\sqrt M` for ``"mc"``, the gradient at the data's label for
``"empirical"``). KFAC replaces the sum of Kronecker products by one (Martens & Grosse 2015):

.. math:: B_\ell = A_\ell \otimes G_\ell, \qquad A_\ell = \frac1N \sum_n \tilde a_n \tilde
   a_n^\top, \qquad G_\ell = c \sum_n \sum_r \hat g_{nr} \hat g_{nr}^\top,

block-diagonal over layers, so it equals the exact block for a single layer with MSE (where
:math:`\hat g` does not depend on :math:`n`). With ``separate_weight_and_bias`` (default) the
bias gets its own block :math:`G_\ell` and the weight :math:`A_\ell` without the ones. The
scaling and, for ``"mc"``, the label draws (per batch, per sample ``m``, from a generator
seeded with ``seed``) are those of curvlinops 3.0.1's ``KFACLinearOperator``. With the row-major
flattening of ``W`` (``out x in``) the product is :math:`V \mapsto G_\ell V A_\ell`.

The module is over 500 lines for one concept, the Kronecker factors: their two sources
(chain-route stored inputs, module hooks), the layer kinds and the factored products,
inverse and closed forms act on the same per-layer state; a split is planned once EKFAC's
share of it settles.

References
----------
.. [1] J. Martens and R. Grosse, "Optimizing neural networks with Kronecker-factored
   approximate curvature", ICML 2015. arXiv:1503.05671
.. [2] R. Eschenhagen, A. Immer, R. E. Turner, F. Schneider and P. Hennig,
   "Kronecker-factored approximate curvature for modern neural network architectures",
   NeurIPS 2023. arXiv:2311.00636
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import nn

from linops._chain import Chain, ChainMismatch
from linops._chain import _forward_checked as forward_checked_chain
from linops._layers import Affine, Conv, Flatten, Pool
from linops._types import Data, LossFunction, Params
from linops.base import TorchLinearOperator
from linops.fisher import _exact_factor, _fisher_family, _int_seed
from linops.hessian import _LossOperator

__all__ = ["KFACOperator"]  # EKFACOperator: linops.ekfac

Tensor = torch.Tensor
_TYPES = ("type-2", "mc", "empirical")


class KFACOperator(_LossOperator):
    r"""KFAC :math:`\bigoplus_\ell A_\ell \otimes G_\ell` (module docstring) as an operator.

    Parameters
    ----------
    model, loss_fn, data, params, **kwargs
        As in :class:`linops.FisherOperator` (CE, MSE, BCE-with-logits; mean or sum);
        ``params`` must select only weights and biases of ``nn.Linear`` and ``nn.Conv2d``
        (``groups=1``, ``padding_mode="zeros"``; integer, ``"same"`` or ``"valid"`` padding)
        layers. A layer's forward multiplier (a ``multiplier`` attribute: ``y = c W x + b``)
        enters the weight's input factor.
    fisher_type
        ``"type-2"`` (default: exact loss Hessian, the GGN's KFAC), ``"mc"`` or
        ``"empirical"``.
    mc_samples, seed
        For ``"mc"``: labels per sample and the seed of their generator.
    separate_weight_and_bias
        Separate blocks for a layer's weight and bias (default), or one block of
        :math:`(W, b)` with the inputs augmented by ones.
    kfac_approx
        For weight sharing (the :math:`L` patches of a convolution, the middle axes of a
        ``Linear`` on ``(N, ..., d_in)``; arXiv:2311.00636): ``"expand"`` (default) counts
        every position as a sample, :math:`A = \frac{1}{NL}\sum_{n,l}\tilde a_{nl}\tilde
        a_{nl}^\top`, :math:`G = c\sum_{n,l,r}\hat g_{nlr}\hat g_{nlr}^\top`; ``"reduce"``
        uses the mean input and the summed gradient of each sample.

    Attributes
    ----------
    factors
        ``{module name: (A, G)}``, computed at the first product (one pass over the data:
        on the chain route one batched backward sweep of all factor columns, otherwise one
        autograd backward pass per column).
    route
        ``"chain"`` or ``"autograd"`` (module hooks), known once the factors are computed.

    Raises
    ------
    ValueError
        For an unsupported loss, ``fisher_type`` or ``kfac_approx``, parameters outside
        ``nn.Linear`` / ``nn.Conv2d`` layers, or a selected grouped or non-zero-padding-mode
        convolution (all at construction).

    Examples
    --------
    >>> import torch
    >>> lin = torch.nn.Linear(2, 1, bias=False).double()
    >>> X = torch.tensor([[1.0, 0.0], [1.0, 2.0]], dtype=torch.float64)
    >>> y = torch.zeros(2, 1, dtype=torch.float64)
    >>> loss = torch.nn.MSELoss(reduction="sum")  # one layer, MSE: KFAC = GGN = 2 X^T X
    >>> KFACOperator(lin, loss, (X, y)).to_dense().round(decimals=12).tolist()
    [[4.0, 4.0], [4.0, 8.0]]
    """

    #: blocks are read in whichever layout they come (:meth:`_map_blocks`): no transposed copy
    column_major_blocks = False

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFunction,
        data: Data,
        params: Params | None = None,
        *,
        fisher_type: str = "type-2",
        mc_samples: int = 1,
        seed: int | torch.Generator | None = None,
        separate_weight_and_bias: bool = True,
        kfac_approx: str = "expand",
        **kwargs: Any,  # the model operators' keywords (dtype, device, ...), forwarded
    ) -> None:
        self.family = _fisher_family(loss_fn)
        if kfac_approx not in ("expand", "reduce"):
            raise ValueError(f"kfac_approx: expected 'expand' or 'reduce', got {kfac_approx!r}")
        self.kfac_approx = kfac_approx
        if fisher_type not in _TYPES:
            raise ValueError(f"fisher_type: expected one of {_TYPES}, got {fisher_type!r}")
        if not isinstance(mc_samples, int) or isinstance(mc_samples, bool) or mc_samples < 1:
            raise ValueError(f"mc_samples: expected an integer >= 1, got {mc_samples!r}")
        kwargs.setdefault("max_vectors", 1024)  # products are small matmuls: no chunking
        super().__init__(model, loss_fn, data, params, **kwargs)
        self.fisher_type, self.mc_samples = fisher_type, mc_samples
        self.seed, self.separate = _int_seed(seed), bool(separate_weight_and_bias)
        self.layers = self._linear_layers()
        self.factors: dict[str, tuple[Tensor, Tensor]] | None = None
        self._corrected: dict[str, tuple[Tensor, ...]] | None = None  # EKFAC's eigenvalues
        self._slot_cache: list[_Slot] | None = None

    def _linear_layers(self) -> dict[str, tuple[str | None, str | None]]:
        """Map each selected layer to its ``(weight name, bias name)``."""
        layers: dict[str, tuple[str | None, str | None]] = {}
        for name, mod in self.space.model.named_modules():
            if isinstance(mod, nn.Linear | nn.Conv2d):
                w, b = f"{name}.weight" if name else "weight", f"{name}.bias" if name else "bias"
                pair = (w if w in self.space.names else None, b if b in self.space.names else None)
                if pair == (None, None):
                    continue
                layers[name] = pair
                if isinstance(mod, nn.Conv2d) and (mod.groups != 1 or mod.padding_mode != "zeros"):
                    raise ValueError(
                        f"model: KFAC supports nn.Conv2d with groups=1 and padding_mode='zeros' "
                        f"(integer, 'same' or 'valid' padding), got {name or 'the model'}: {mod}; "
                        "leave the layer out of params=, or use the exact operators "
                        "(GGNOperator, FisherOperator)"
                    )
        covered = {p for pair in layers.values() for p in pair if p is not None}
        missing = [n for n in self.space.names if n not in covered]
        if missing:
            raise ValueError(
                "params: expected only weights and biases of nn.Linear / nn.Conv2d layers for "
                "KFAC, got "
                f"{missing[:3]}"
            )
        return layers

    def _reset_derived(self) -> None:
        super()._reset_derived()
        self.factors = None

    # ------------------------------------------------------------------ the factors
    def _output_factor(self, out: Tensor, y: Tensor, gen: torch.Generator) -> Tensor:
        r"""Return the per-sample output-space factor columns ``(r, n, d)``.

        The caller scales them by :math:`\sqrt{c_b}` (the batch's share of :math:`c`:
        :math:`w_b / W_b`).
        """
        n, d = out.shape
        if self.fisher_type == "type-2":
            S = _exact_factor(self.family, out).permute(2, 0, 1)
        elif self.fisher_type == "empirical":
            with torch.enable_grad():
                o = out.detach().requires_grad_(True)
                S = torch.autograd.grad(self._unreduced(o, y), o)[0][None]
        else:
            S = torch.stack([self._draw(out, gen) for _ in range(self.mc_samples)])
            S = S / math.sqrt(self.mc_samples)
        return S

    def _unreduced(self, out: Tensor, y: Tensor) -> Tensor:
        r"""Sum the per-sample losses (``reduction="sum"``): their gradients are :math:`\hat g_n`."""
        kind: Any = type(self.loss_fn) if isinstance(self.loss_fn, nn.Module) else None
        if kind is not None:
            return kind(reduction="sum")(out, y)
        fn: Any = {
            "cross_entropy": nn.functional.cross_entropy,
            "mse": nn.functional.mse_loss,
            "bce": nn.functional.binary_cross_entropy_with_logits,
        }[self.family]
        return fn(out, y, reduction="sum")

    def _draw(self, out: Tensor, gen: torch.Generator) -> Tensor:
        r"""Return :math:`\nabla_f \ell(f, \tilde y)` for one label drawn per sample.

        Drawn as curvlinops' ``KFACLinearOperator.draw_label`` draws it.
        """
        if self.family == "mse":
            eps = torch.randn(out.shape, device=out.device, dtype=out.dtype, generator=gen)
            return -2 * math.sqrt(0.5) * eps  # 2 (f - y~) with y~ = f + sqrt(1/2) eps
        if self.family == "cross_entropy":
            p = out.softmax(dim=1)
            lab = p.multinomial(num_samples=1, generator=gen).squeeze(-1)
            return p - nn.functional.one_hot(lab, out.shape[1]).to(out.dtype)
        p = out.sigmoid()
        return p - p.bernoulli(generator=gen)

    def _layer_gradients(self) -> Any:
        r"""Yield per batch ``(inputs, grads)`` of every layer.

        Each layer's (augmented) inputs ``(n, L, d_in)`` and, per factor column ``r``, its
        backpropagated ``(n, L, d_out)`` gradients, scaled so that
        :math:`G_\ell = \sum g^\top g` (one pass; the generator re-seeded, so every pass
        draws the same labels). On the chain route (:mod:`linops._chain`: the model is a
        recognised chain reproducing its outputs) the inputs are the chain's stored step inputs
        and the gradients one batched backward sweep of all columns; otherwise module hooks
        and one autograd backward pass per column. A weight's input carries the layer's
        forward multiplier (``y = c W x + b``: the weight's gradient is :math:`c\,g x^\top`).
        """
        gen = torch.Generator(device=self.device).manual_seed(self.seed)
        reduction = self._reduce()
        for w, (x, y) in zip(self._weights(), self.batches, strict=True):

            def scaled(f: Tensor, y: Any = y, w: float = w) -> Tensor:
                normaliser: Any = reduction.normaliser
                W_b = 1.0 if reduction.kind == "sum" else float(normaliser(f, y))
                f2 = f.reshape(f.shape[0], -1).detach()
                return self._output_factor(f2, y, gen) * math.sqrt(w / W_b)

            def chained(chain: Chain, x: Any = x, scaled: Any = scaled) -> Any:
                return self._chain_batch(chain, x, scaled)

            found = self._route_graph(chained, lambda: None)
            inputs, grads = found if found is not None else self._hook_batch(x, scaled)
            for k, (_, bn) in self.layers.items():
                if not self.separate and bn is not None:
                    a = inputs[k]
                    inputs[k] = torch.cat([a, torch.ones_like(a[..., :1])], dim=-1)
            yield inputs, grads

    def _hook_batch(self, x: Any, scaled: Any) -> tuple[dict[str, Tensor], list[dict[str, Tensor]]]:
        """One batch's layer inputs and output gradients from module hooks and autograd."""
        modules = dict(self.space.model.named_modules())
        names = list(self.layers)
        inputs: dict[str, Tensor] = {}
        outputs: dict[str, Tensor] = {}
        hooks = []
        for name in names:

            def hook(
                mod: nn.Module, args: Any, out: Tensor, name: str = name,
            ) -> None:  # fmt: skip
                inputs[name], outputs[name] = args[0].detach(), out

            hooks.append(modules[name].register_forward_hook(hook))
        try:
            with torch.enable_grad():
                values = self.space.values().items()
                f = self.space.functional_call(
                    {k: v.detach().requires_grad_(True) for k, v in values}, x
                )
        finally:
            for h in hooks:
                h.remove()
        for k in names:
            c = float(getattr(modules[k], "multiplier", 1.0)) if self.layers[k][0] else 1.0
            a = _shared_inputs(modules[k], inputs[k])  # (n, L, d_in): L shared positions
            inputs[k] = a if c == 1.0 else c * a
        S = scaled(f)
        f2 = f.reshape(f.shape[0], -1)
        grads = [
            {k: _shared_outputs(modules[k], g) for k, g in zip(names, torch.autograd.grad(
                f2, [outputs[k] for k in names], grad_outputs=S[r], retain_graph=True
            ), strict=True)}
            for r in range(S.shape[0])
        ]  # fmt: skip
        return inputs, grads

    def _chain_batch(
        self, chain: Chain, x: Tensor, scaled: Any
    ) -> tuple[dict[str, Tensor], list[dict[str, Tensor]]]:
        """One batch's layer inputs and output gradients from the chain's stored forward pass.

        All factor columns go back through the chain at once, as ``(n, R, ...)`` cotangents.

        Raises
        ------
        ChainMismatch
            If the chain does not reproduce the model on ``x`` (the caller falls back to hooks).
        """
        xs, derivs, model_shape = forward_checked_chain(chain, x)
        modules = dict(self.space.model.named_modules())
        layer_of = {}
        for k, (wn, bn) in self.layers.items():
            for pn in (wn, bn):
                if pn is not None:
                    layer_of[self.space.names.index(pn)] = k
        f = xs[-1]
        S = scaled(f.reshape(f.shape[0], *model_shape))
        n, R = f.shape[0], S.shape[0]
        g = S.transpose(0, 1)  # (n, R, d)
        inputs: dict[str, Tensor] = {}
        outs: dict[str, Tensor] = {}
        for t in range(len(chain.steps) - 1, chain.first - 1, -1):
            st, xt = chain.steps[t], xs[t]
            if isinstance(st, Affine | Conv) and (st.w_index is not None or st.b_index is not None):
                k = layer_of[st.w_index if st.w_index is not None else st.b_index]  # type: ignore[index]
                if k in inputs:  # a layer used twice: the hooks' convention is not defined
                    raise ChainMismatch(f"layer {k!r} appears twice in the chain")
                c = st.scale if isinstance(st, Affine) and st.w_index is not None else 1.0
                a = _shared_inputs(modules[k], xt)
                inputs[k] = a if c == 1.0 else c * a
                outs[k] = g
            if t == chain.first:
                break
            if isinstance(st, Affine):
                o, i = st.weight.shape
                g = (g.reshape(n * R, o) @ st.weight).view(n, R, i)
                g = g if st.scale == 1.0 else st.scale * g
            elif isinstance(st, Conv):
                o = st.weight.shape[0]
                flat = g.reshape(n * R, o, *g.shape[3:])
                g = st.input_grad((n * R, *xt.shape[1:]), st.weight, flat).view(n, R, *xt.shape[1:])
            elif isinstance(st, Pool):
                g = st.adjoint(g, derivs[t], xt.shape)
            elif isinstance(st, Flatten):
                g = g.reshape(n, R, *xt.shape[1:])
            elif st.derivs is None:
                g = st.scale * g
            else:
                g = g * derivs[t][0].unsqueeze(1)
        per_column = {k: g.transpose(0, 1).contiguous() for k, g in outs.items()}  # (R, n, ...)
        grads = [
            {k: _shared_outputs(modules[k], per_column[k][r]) for k in self.layers}
            for r in range(R)
        ]
        return inputs, grads

    def compute_factors(self) -> dict[str, tuple[Tensor, Tensor]]:
        """Return the Kronecker factors ``{module name: (A, G)}`` (computed once, then kept)."""
        if self.factors is None:
            N = self.num_samples
            A: dict[str, Any] = dict.fromkeys(self.layers, 0)
            G: dict[str, Any] = dict.fromkeys(self.layers, 0)
            expand = self.kfac_approx == "expand"
            for inputs, grads in self._layer_gradients():
                for k in self.layers:
                    a = inputs[k]
                    if expand:  # every shared position a sample: mean over N L
                        a = a.reshape(-1, a.shape[-1]) / math.sqrt(inputs[k].shape[1])
                    else:  # reduce: the mean input and the summed gradient per sample
                        a = a.mean(dim=1)
                    A[k] = A[k] + a.mT @ a / N
                    for g in grads:
                        g = g[k].reshape(-1, g[k].shape[-1]) if expand else g[k].sum(dim=1)
                        G[k] = G[k] + g.mT @ g
            self.factors = {k: (A[k], G[k]) for k in self.layers}
        return self.factors

    # ------------------------------------------------------------------ products
    def _apply(self, X: Tensor, adjoint: bool = False) -> Tensor:
        """Products are small matrix products on the factors: none of the model operators' passes.

        The data-pass machinery of model operators (measured passes, batched-route probes, the
        check of the output) is skipped: the factors are finite once computed, and symmetric.
        """
        return TorchLinearOperator._apply(self, X, adjoint)

    def _matmat_torch(self, X: Tensor) -> Tensor:
        factors = self.compute_factors()
        return self._map_blocks(
            X,
            lambda k, V, lay, out: lay.right(lay.left(factors[k][1], V), factors[k][0], out),
            lambda k, V, lay, out: lay.left(factors[k][1], V, out),
        )

    def state_dict(self) -> dict[str, Any]:
        """Return what a later session needs to skip the data passes (``torch.save``-able).

        The factors (and EKFAC's corrected eigenbasis) with the settings that produced them.
        """
        state = {
            "class": type(self).__name__, "layers": dict(self.layers),
            "fisher_type": self.fisher_type, "mc_samples": self.mc_samples, "seed": self.seed,
            "separate_weight_and_bias": self.separate, "kfac_approx": self.kfac_approx,
            "factors": self.compute_factors(),
        }  # fmt: skip
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Use saved factors instead of computing them.

        Raises
        ------
        ValueError
            If the state comes from another class, other layers or other settings.
        """
        expected = {
            "class": type(self).__name__, "layers": dict(self.layers),
            "fisher_type": self.fisher_type, "mc_samples": self.mc_samples, "seed": self.seed,
            "separate_weight_and_bias": self.separate, "kfac_approx": self.kfac_approx,
        }  # fmt: skip
        for key, value in expected.items():
            if state.get(key) != value:
                raise ValueError(
                    f"state: expected {key}={value!r} for this operator, got {state.get(key)!r}"
                )
        kw = {"dtype": self.torch_dtype, "device": self.device}
        self.factors = {k: (A.to(**kw), G.to(**kw)) for k, (A, G) in state["factors"].items()}
        if "corrected" in state:
            self._corrected = {
                k: tuple(t.to(**kw) for t in v) for k, v in state["corrected"].items()
            }

    def _slots(self) -> list[_Slot]:
        """Return where each layer's weight and bias sit in the flat vector (computed once)."""
        if self._slot_cache is None:
            space, starts, slots = self.space, {}, []
            offset = 0
            for name, numel in zip(space.names, space.numels, strict=True):
                starts[name], offset = offset, offset + numel
            for k, (wn, bn) in self.layers.items():
                w = b = None
                rows = cols = 0
                if wn is not None:  # (out, in, kh, kw) conv weights as (out, in kh kw)
                    shape = space.shapes[space.names.index(wn)]
                    rows, cols = shape[0], math.prod(shape[1:])
                    w = slice(starts[wn], starts[wn] + rows * cols)
                if bn is not None:
                    numel = space.numels[space.names.index(bn)]
                    b = slice(starts[bn], starts[bn] + numel)
                slots.append(_Slot(k, w, rows, cols, b))
            self._slot_cache = slots
        return self._slot_cache

    def _map_blocks(self, X: Tensor, weight: Any, bias: Any) -> Tensor:
        """Apply ``weight(k, V, lay, out)`` and ``bias(k, V, lay, out)`` per layer, in one pass.

        ``V`` is a free view of the ``K`` columns' part of a layer: ``out x in`` matrices (the
        bias appended as a last column for a joint block; ``out x 1`` for a separate bias)
        stacked along the axis of ``lay`` (:class:`_Layout`), which also gives the products
        acting on them; ``out`` (or None) is where the result may be written. A row-major block
        is read as ``(out, in, K)``, a column-major one as ``(K, out, in)`` and one vector as
        ``(out, in)``, so no product copies or transposes the block.
        """
        if X.shape[1] == 1:  # a strided column (of a wider block) is gathered once
            lay, Z = _ONE, X[:, 0] if X.stride(0) == 1 else X[:, 0].contiguous()
        elif X.T.is_contiguous():  # column-major
            lay, Z = _COLS, X.T
        else:
            lay, Z = _ROWS, X if X.is_contiguous() else X.contiguous()
        Y = torch.empty_like(Z) if lay is _ROWS else None
        pieces: list[tuple[int, Tensor]] = []

        def put(part: slice, R: Tensor) -> None:
            if Y is None:
                pieces.append((part.start, lay.flat(R)))
            elif R.data_ptr() != Y[part].data_ptr():
                Y[part] = R.reshape(-1, Y.shape[1])

        for s in self._slots():
            Vw = lay.view(Z, s.w, s.rows, s.cols) if s.w is not None else None
            vb = lay.view(Z, s.b, -1, 1) if s.b is not None else None
            if Vw is not None and vb is not None and not self.separate:
                R = weight(s.layer, torch.cat([Vw, vb], dim=lay.in_axis), lay, None)
                Rw, Rb = R.split([s.cols, 1], dim=lay.in_axis)
                put(s.w, Rw)  # type: ignore[arg-type]
                put(s.b, Rb)  # type: ignore[arg-type]
                continue
            if Vw is not None:
                out = lay.view(Y, s.w, s.rows, s.cols) if Y is not None else None  # type: ignore[arg-type]
                put(s.w, weight(s.layer, Vw, lay, out))  # type: ignore[arg-type]
            if vb is not None:
                out = lay.view(Y, s.b, -1, 1) if Y is not None else None  # type: ignore[arg-type]
                put(s.b, bias(s.layer, vb, lay, out))  # type: ignore[arg-type]
        if Y is not None:
            return Y
        pieces.sort(key=lambda p: p[0])
        return lay.join([p for _, p in pieces])

    def _eigen_map(self, X: Tensor, eig: dict, f: Any) -> Tensor:
        r""":math:`V \mapsto Q_G[(Q_G^\top V Q_A) \odot f(E)]Q_A^\top` per block."""
        D = {k: (f(e[2]), f(e[3])) for k, e in eig.items()}

        def weight(k: str, V: Tensor, lay: _Layout, out: Tensor | None) -> Tensor:
            QA, QG = eig[k][0], eig[k][1]
            rotated = lay.scale(lay.right(lay.left(QG.mT, V), QA), D[k][0])
            return lay.right(lay.left(QG, rotated), QA.mT, out)

        def bias(k: str, V: Tensor, lay: _Layout, out: Tensor | None) -> Tensor:
            QG = eig[k][1]
            return lay.left(QG, lay.scale(lay.left(QG.mT, V), D[k][1]), out)

        return self._map_blocks(X, weight, bias)

    def _blocks(self) -> list[tuple[Tensor, Tensor]]:
        """Return ``(A, G)`` of every diagonal block (a separate bias block has ``A = [[1]]``)."""
        one = torch.ones(1, 1, dtype=self.torch_dtype, device=self.device)
        blocks = []
        factors = self.compute_factors()
        for k, (wn, bn) in self.layers.items():
            A, G = factors[k]
            if wn is not None:
                blocks.append((A, G))
            if bn is not None and (self.separate or wn is None):
                blocks.append((one, G))
        return blocks

    def trace(self) -> float:
        r""":math:`\sum_\ell \operatorname{tr}A_\ell \operatorname{tr}G_\ell` (no products)."""
        return float(sum(torch.trace(A) * torch.trace(G) for A, G in self._blocks()))

    def frobenius_norm(self) -> float:
        r""":math:`(\sum_\ell \|A_\ell\|_F^2 \|G_\ell\|_F^2)^{1/2}`."""
        sq = sum((A**2).sum() * (G**2).sum() for A, G in self._blocks())
        return float(sq) ** 0.5

    def logdet(self, damping: float = 0.0) -> float:
        r"""Return :math:`\log\det(B + \lambda I) = \sum_\ell \sum_{ij} \log(a_i g_j + \lambda)`.

        From the factors' eigenvalues (``-inf`` for a singular undamped KFAC).
        """
        total = 0.0
        for A, G in self._blocks():
            a, g = torch.linalg.eigvalsh(A).clamp(min=0), torch.linalg.eigvalsh(G).clamp(min=0)
            total += float(torch.log(a[:, None] * g[None, :] + damping).sum())
        return total

    def inverse(self, damping: float, *, heuristic: bool = False) -> TorchLinearOperator:
        r""":math:`(B + \lambda I)^{-1}` in closed form, per block.

        Exact damping: with :math:`A = Q_A\,\mathrm{diag}(a)Q_A^\top`, :math:`G = Q_G\,
        \mathrm{diag}(g)Q_G^\top`, :math:`V \mapsto Q_G[(Q_G^\top V Q_A) \oslash (g a^\top +
        \lambda)]Q_A^\top`. ``heuristic=True``: Martens & Grosse's factored damping (2015,
        Section 6.3), :math:`(A + \pi\sqrt\lambda I)^{-1} \otimes (G + \sqrt\lambda/\pi\,
        I)^{-1}` with :math:`\pi^2 = (\operatorname{tr}A/\dim A)/(\operatorname{tr}G/\dim G)`
        (each shift at least 1e-8, as curvlinops' ``min_damping``).

        Raises
        ------
        ValueError
            For a damping that is not positive.
        """
        if not isinstance(damping, int | float) or not damping > 0:
            raise ValueError(f"damping: expected a number > 0, got {damping!r}")
        from linops.ekfac import _EigenInverse

        return _EigenInverse(self, float(damping), heuristic)

    def _eigen(self) -> dict[str, tuple[Tensor, ...]]:
        r"""Return per layer ``(Q_A, Q_G, E, E_bias)``: the blocks' eigenbasis and eigenvalues.

        :math:`E = g a^\top` (``E_bias = g`` for a separate bias block).
        """
        out: dict[str, tuple[Tensor, ...]] = {}
        for k, (A, G) in self.compute_factors().items():
            a, QA = torch.linalg.eigh(A)
            g, QG = torch.linalg.eigh(G)
            out[k] = (QA, QG, g[:, None] * a[None, :], g[:, None])
        return out


class _Layout:
    r"""Products on a stack of ``out x in`` matrices ``V_c`` (see :meth:`view` for the layouts).

    ``left(M, V)`` is :math:`M V_c`, ``right(V, M)`` :math:`V_c M`, ``scale(V, D)``
    :math:`V_c \odot D`, for every ``c``; ``view`` reads rows ``part`` of the block as such a
    stack. The row-major layout (``kind="rows"``) writes results straight into the output
    block (``out=``); the others gather them by one concatenation (``flat``, ``join``).
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.in_axis = 2 if kind == "columns" else 1

    def view(self, Z: Tensor, part: slice, rows: int, cols: int) -> Tensor:
        """Rows ``part`` of the block as ``(K, rows, cols)``, ``(rows, cols)`` or ``(rows, cols, K)``."""
        if self.kind == "columns":  # Z = X^T, (K, n)
            return Z[:, part].view(Z.shape[0], rows, cols)
        if self.kind == "one":  # Z = X[:, 0]
            return Z[part].view(rows, cols)
        return Z[part].view(rows, cols, Z.shape[1])

    def left(self, M: Tensor, V: Tensor, out: Tensor | None = None) -> Tensor:
        if self.kind != "rows":
            return M @ V
        R = torch.mm(
            M, V.reshape(V.shape[0], -1), out=None if out is None else out.view(M.shape[0], -1)
        )
        return R.view(M.shape[0], *V.shape[1:])

    def right(self, V: Tensor, M: Tensor, out: Tensor | None = None) -> Tensor:
        return torch.matmul(M.mT, V, out=out) if self.kind == "rows" else V @ M

    def scale(self, V: Tensor, D: Tensor) -> Tensor:
        return V * D[..., None] if self.kind == "rows" else V * D

    def flat(self, R: Tensor) -> Tensor:
        return R.reshape(R.shape[0], -1) if self.kind == "columns" else R.reshape(-1)

    def join(self, pieces: list[Tensor]) -> Tensor:
        if self.kind == "columns":
            return torch.cat(pieces, dim=1).T
        return torch.cat(pieces)[:, None]


_COLS, _ROWS, _ONE = _Layout("columns"), _Layout("rows"), _Layout("one")


class _Slot(NamedTuple):
    """A layer's place in the flat vector: its weight as ``rows x cols`` and its bias."""

    layer: str
    w: slice | None
    rows: int
    cols: int
    b: slice | None


def _shared_inputs(mod: Any, a: Tensor) -> Tensor:
    """Return a layer's inputs as ``(n, L, d_in)``: the ``L`` positions sharing its weight.

    The unfolded patches of a ``Conv2d``, the middle axes of a ``Linear`` on ``(n, ..., d_in)``.
    """
    if isinstance(mod, nn.Linear):
        return a.reshape(a.shape[0], -1, a.shape[-1])
    padding: Any = mod.padding
    if isinstance(padding, str):  # "valid": none; "same" (stride 1): torch's split, extra right
        total = [
            d * (k - 1) if padding == "same" else 0
            for d, k in zip(mod.dilation, mod.kernel_size, strict=True)
        ]
        a = nn.functional.pad(
            a, [total[1] // 2, total[1] - total[1] // 2, total[0] // 2, total[0] - total[0] // 2]
        )
        padding = 0
    patches = nn.functional.unfold(
        a, mod.kernel_size, dilation=mod.dilation, padding=padding, stride=mod.stride
    )
    return patches.transpose(1, 2)


def _shared_outputs(mod: nn.Module, g: Tensor) -> Tensor:
    """Output gradients as ``(n, L, d_out)``, matching :func:`_shared_inputs`."""
    if isinstance(mod, nn.Conv2d):
        return g.flatten(2).transpose(1, 2)
    return g.reshape(g.shape[0], -1, g.shape[-1])


def kfac_preconditioner(A: Any, damping: float, *, heuristic: bool = False) -> TorchLinearOperator:
    r"""Return :math:`(B + \lambda I)^{-1}` for the KFAC :math:`B` of a model operator ``A``.

    The KFAC of ``A``'s model, loss, data and parameters (at ``A``'s values, dtype and
    device), of the matching Fisher type: ``"type-2"`` for a :class:`linops.GGNOperator`, a
    :class:`linops.HessianOperator` (its GGN part) or an exact :class:`linops.FisherOperator`;
    ``"mc"`` with the same samples and seed for a Monte-Carlo one; ``"empirical"`` for a
    :class:`linops.EmpiricalFisherOperator`. Used by ``linops.inverse(A, damping=λ,
    preconditioner="kfac")``: built from data passes only (no products of ``A``).

    Raises
    ------
    ValueError
        If ``A`` is not such a model operator (build ``KFACOperator(...).inverse(λ)`` and pass
        it as the preconditioner instead).
    """
    from linops.fisher import EmpiricalFisherOperator, FisherOperator
    from linops.hessian import GGNOperator, HessianOperator

    kw: dict[str, Any] = {}
    if isinstance(A, EmpiricalFisherOperator):
        kw["fisher_type"] = "empirical"
    elif isinstance(A, FisherOperator) and A.mc_samples is not None:
        kw |= {"fisher_type": "mc", "mc_samples": A.mc_samples, "seed": A.seed}
    elif not isinstance(A, GGNOperator | HessianOperator | FisherOperator):
        raise ValueError(
            "preconditioner: 'kfac' expected A to be a GGNOperator, HessianOperator, "
            f"FisherOperator or EmpiricalFisherOperator, got {type(A).__name__}; pass "
            "preconditioner=KFACOperator(model, loss_fn, data).inverse(damping) instead"
        )
    batches = A.batches
    K = KFACOperator(
        A.model, A.loss_fn, batches.source, params=A.space.values(), dtype=A.torch_dtype,
        device=A.device, batch_size=batches.batch_size, reduction=A._reduction,
        label_key=A.label_key, **kw,
    )  # fmt: skip
    return K.inverse(damping, heuristic=heuristic)
