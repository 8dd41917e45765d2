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

The factors' sources (chain-route stored inputs, module hooks) are in
:mod:`linops._kfac_sources`, the block products on a flat vector in :mod:`linops._kron`;
this module holds the operator: its settings, factors, products, closed forms and inverse.

References
----------
.. [1] J. Martens and R. Grosse, "Optimizing neural networks with Kronecker-factored
   approximate curvature", ICML 2015. arXiv:1503.05671
.. [2] R. Eschenhagen, A. Immer, R. E. Turner, F. Schneider and P. Hennig,
   "Kronecker-factored approximate curvature for modern neural network architectures",
   NeurIPS 2023. arXiv:2311.00636
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

from linops._chain import Chain
from linops._checks import check_damping
from linops._kfac_sources import chain_batch, hook_batch
from linops._kron import Layout, Slot, map_blocks
from linops._types import Data, LossFunction, Params
from linops.base import TorchLinearOperator
from linops.fisher import _exact_factor, _fisher_family, _int_seed, _kept_samples
from linops.hessian import _LossOperator

__all__ = ["KFACOperator"]  # EKFACOperator: linops.ekfac

Tensor = torch.Tensor
_TYPES = ("type-2", "mc", "empirical")


class KFACOperator(_LossOperator):
    r"""KFAC :math:`\bigoplus_\ell A_\ell \otimes G_\ell` (module docstring) as an operator.

    Parameters
    ----------
    model, loss_fn, data, params, **kwargs
        As in :class:`linops.FisherOperator` (CE with ``(N, C)`` logits, MSE,
        BCE-with-logits; mean or sum; samples whose CE target is ``ignore_index`` enter
        neither factor, so :math:`A` averages over the samples in the loss);
        ``params`` must select only weights and biases of ``nn.Linear`` and ``nn.Conv2d``
        (``padding_mode="zeros"``; integer, ``"same"`` or ``"valid"`` padding) layers. A
        layer's forward multiplier (a ``multiplier`` attribute: ``y = c W x + b``) enters the
        weight's input factor. A grouped convolution (``groups = G > 1``, depthwise ones
        included) gets one Kronecker block per group, ``A_i`` from the patches of its own
        input channels and ``G_i`` from its own output channels (each group is a convolution
        of its own; the blocks between groups are dropped as those between layers are), which
        is exact for a single grouped ``Conv2d`` with MSE at one output position. curvlinops
        3.0.1 instead averages the inputs over the groups and keeps one ``out x out`` factor
        (a heuristic): ``grouped="average"`` gives that variant.
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
    grouped
        For grouped convolutions: ``"blocks"`` (default; one Kronecker block per group, see
        above) or ``"average"`` (curvlinops 3.0.1's: the input channels averaged over the
        groups, one block per layer).

    Notes
    -----
    On the hooks route each call of a layer is recorded: its input and its own output
    :math:`W a + b`, before the model's forward hooks change it and before an in-place
    operation overwrites it. A layer called several times shares its weight over all its calls'
    positions (expand: every position of every call a sample of :math:`A`; reduce: the mean
    input and summed gradient over them), as arXiv:2311.00636 treats weight sharing.
    curvlinops 3.0.1 instead adds one :math:`A` per call (each averaged over its own
    positions), so its :math:`A` is larger by the number of calls, and reads the output after
    the model's forward hooks. Once, on the first batch, the recorded inputs and output
    gradients must give autograd's gradient of every selected parameter for a random
    cotangent; a layer that does not compute :math:`W a + b` (a subclass with its own
    ``forward``, a weight also used outside the layer, as ``nn.MultiheadAttention``'s
    ``out_proj`` and tied weights are) is refused instead of approximated wrongly.

    Attributes
    ----------
    factors
        ``{block: (A, G)}`` (a block is a module's name, ``"name[i]"`` for group ``i`` of a
        grouped convolution), computed at the first product (one pass over the data:
        on the chain route one batched backward sweep of all factor columns, otherwise one
        autograd backward pass per column).
    route
        ``"chain"`` or ``"autograd"`` (module hooks), known once the factors are computed.

    Raises
    ------
    ValueError
        For an unsupported loss, ``fisher_type`` or ``kfac_approx``, parameters outside
        ``nn.Linear`` / ``nn.Conv2d`` layers, or a selected convolution with a padding mode
        other than zeros (all at construction); at the first product, for a selected layer
        whose parameters' gradients are not its output gradient times its input (Notes).

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
    #: products are on the factors, not through the batches' graphs: never taken in slots
    _slotted_directions = ()

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
        grouped: str = "blocks",
        **kwargs: Any,  # the model operators' keywords (dtype, device, ...), forwarded
    ) -> None:
        self.family = _fisher_family(loss_fn)
        if kfac_approx not in ("expand", "reduce"):
            raise ValueError(f"kfac_approx: expected 'expand' or 'reduce', got {kfac_approx!r}")
        self.kfac_approx = kfac_approx
        if grouped not in ("blocks", "average"):
            raise ValueError(f"grouped: expected 'blocks' or 'average', got {grouped!r}")
        self.grouped = grouped
        if fisher_type not in _TYPES:
            raise ValueError(f"fisher_type: expected one of {_TYPES}, got {fisher_type!r}")
        if not isinstance(mc_samples, int) or isinstance(mc_samples, bool) or mc_samples < 1:
            raise ValueError(f"mc_samples: expected an integer >= 1, got {mc_samples!r}")
        kwargs.setdefault("max_vectors", 1024)  # products are small matmuls: no chunking
        super().__init__(model, loss_fn, data, params, **kwargs)
        self.fisher_type, self.mc_samples = fisher_type, mc_samples
        self.seed, self.separate = _int_seed(seed), bool(separate_weight_and_bias)
        self.layers = self._linear_layers()
        self.units = self._units()
        self.factors: dict[str, tuple[Tensor, Tensor]] | None = None
        self._corrected: dict[str, tuple[Tensor, ...]] | None = None  # EKFAC's eigenvalues
        self._slot_cache: list[Slot] | None = None

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
                if isinstance(mod, nn.Conv2d) and mod.padding_mode != "zeros":
                    raise ValueError(
                        f"model: KFAC supports nn.Conv2d with padding_mode='zeros' "
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

    def _units(self) -> dict[str, tuple[str, int, int]]:
        """Map each Kronecker block's key to ``(module name, group, groups)``.

        A layer is one block; a grouped ``Conv2d`` (``groups = G > 1``) is ``G`` blocks,
        ``"name[i]"``, one per group: each group is a convolution of its own, from its
        ``C_in / G`` input channels to its ``C_out / G`` output channels.
        """
        modules = dict(self.space.model.named_modules())
        units: dict[str, tuple[str, int, int]] = {}
        for name in self.layers:
            groups = int(getattr(modules[name], "groups", 1))
            if groups == 1 or self.grouped == "average":
                units[name] = (name, 0, 1)
            else:
                units |= {f"{name}[{i}]": (name, i, groups) for i in range(groups)}
        return units

    def _split_groups(
        self, inputs: dict[str, Tensor], grads: list[dict[str, Tensor]]
    ) -> tuple[dict[str, Tensor], list[dict[str, Tensor]]]:
        """Key a batch's layer inputs and output gradients by block: a group's own slices.

        Unfolded patches are channel-major (``C_in kh kw``), so group ``i``'s inputs are the
        ``i``-th of ``G`` equal slices of the last axis, its output gradients likewise.
        """
        ins: dict[str, Tensor] = {}
        outs: list[dict[str, Tensor]] = [{} for _ in grads]
        for k, (name, i, groups) in self.units.items():
            a = inputs[name]
            d = a.shape[-1] // groups
            ins[k] = a[..., i * d : (i + 1) * d]
            for r, g in enumerate(grads):
                o = g[name].shape[-1] // groups
                outs[r][k] = g[name][..., i * o : (i + 1) * o]
        return ins, outs

    def _reset_derived(self) -> None:
        super()._reset_derived()
        self.factors = None

    # ------------------------------------------------------------------ the factors
    def _output_factor(self, out: Tensor, y: Tensor, gen: torch.Generator) -> Tensor:
        r"""Return the per-sample output-space factor columns ``(r, n, d)`` (``d``: an output's size).

        The caller scales them by :math:`\sqrt{c_b}` (the batch's share of :math:`c`:
        :math:`w_b / W_b`).
        """
        n = out.shape[0]
        if self.fisher_type == "empirical":  # the loss on the outputs as the model gives them
            with torch.enable_grad():
                o = out.detach().requires_grad_(True)
                S = torch.autograd.grad(self._unreduced(o, y), o)[0].reshape(1, n, -1)
            return S
        out = out.reshape(n, -1)
        if self.fisher_type == "type-2":
            S = _exact_factor(self.family, out).permute(2, 0, 1)
        else:
            S = torch.stack([self._draw(out, gen) for _ in range(self.mc_samples)])
            S = S / math.sqrt(self.mc_samples)
        return S

    def _unreduced(self, out: Tensor, y: Tensor) -> Tensor:
        r"""Sum the per-sample losses (``reduction="sum"``): their gradients are :math:`\hat g_n`."""
        if isinstance(self.loss_fn, nn.Module):  # a copy: keeps ignore_index and the like
            summed: Any = copy.copy(self.loss_fn)
            summed.reduction = "sum"
            return summed(out, y)
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
        r"""Yield per batch ``(inputs, grads, kept)`` of every layer.

        Each layer's (augmented) inputs ``(n, L, d_in)`` and, per factor column ``r``, its
        backpropagated ``(n, L, d_out)`` gradients, scaled so that
        :math:`G_\ell = \sum g^\top g` (one pass; the generator re-seeded, so every pass
        draws the same labels). On the chain route (:mod:`linops._chain`: the model is a
        recognised chain reproducing its outputs) the inputs are the chain's stored step inputs
        and the gradients one batched backward sweep of all columns; otherwise module hooks
        and one autograd backward pass per column. A weight's input carries the layer's
        forward multiplier (``y = c W x + b``: the weight's gradient is :math:`c\,g x^\top`).
        ``kept``: the samples in the loss (None: all; cross-entropy's ignored targets are not,
        and their gradients are zero).
        """
        gen = torch.Generator(device=self.device).manual_seed(self.seed)
        for b, (w, (x, y)) in enumerate(zip(self._weights(), self.batches, strict=True)):
            kept = _kept_samples(self.loss_fn, y)

            def scaled(f: Tensor, y: Any = y, w: float = w, kept: Any = kept) -> Tensor:
                if self.family == "cross_entropy" and f.dim() != 2:
                    raise ValueError(
                        "loss_fn: expected (N, C) logits for KFAC of cross-entropy, got outputs "
                        f"of shape {tuple(f.shape)} (fold the positions into the batch: "
                        "(N T, C) logits and (N T,) targets)"
                    )
                W_b = self._batch_normaliser(f, y)
                # W_b = 0: every target ignored, the batch adds nothing (its weight is 0 too)
                S = self._output_factor(f.detach(), y, gen) * (math.sqrt(w / W_b) if W_b else 0.0)
                return S if kept is None else S * kept.to(S.dtype)[:, None]

            def chained(chain: Chain, x: Any = x, scaled: Any = scaled) -> Any:
                return chain_batch(self.space, self.layers, chain, x, scaled)

            found = self._route_graph(chained, lambda: None)
            if found is None:
                average = self.grouped == "average"
                found = hook_batch(
                    self.space, self.layers, x, scaled, average_groups=average, check=b == 0
                )
            inputs, grads = self._split_groups(*found)
            for k, (name, _, _) in self.units.items():
                if not self.separate and self.layers[name][1] is not None:
                    a = inputs[k]
                    inputs[k] = torch.cat([a, torch.ones_like(a[..., :1])], dim=-1)
            yield inputs, grads, kept

    def compute_factors(self) -> dict[str, tuple[Tensor, Tensor]]:
        """Return the Kronecker factors ``{module name: (A, G)}`` (computed once, then kept).

        With a ``process_group`` each rank accumulates over its own data and one all-reduce
        sums the factors (and the count of ignored targets), so every rank holds the factors
        of the whole dataset.
        """
        if self.factors is None:
            N = self.num_samples
            expand = self.kfac_approx == "expand"

            def local() -> list[Tensor]:
                A: dict[str, Any] = dict.fromkeys(self.units, 0)
                G: dict[str, Any] = dict.fromkeys(self.units, 0)
                ignored = 0
                for inputs, grads, kept in self._layer_gradients():
                    ignored += 0 if kept is None else int((~kept).sum())
                    for k in self.units:
                        if kept is not None and kept.shape[0] != inputs[k].shape[0]:
                            raise ValueError(
                                f"data: {kept.numel()} targets with cross-entropy's "
                                f"ignore_index against {inputs[k].shape[0]} samples at layer "
                                f"{k!r}: outputs folded by output= (a language model's "
                                "(N T, C) logits) cannot tell which layer inputs the ignored "
                                "targets belong to; give KFAC targets without ignored "
                                "entries (drop the padding), or use FisherOperator / "
                                "GGNOperator, which take them"
                            )
                        a = inputs[k] if kept is None else inputs[k][kept]
                        if expand:  # every shared position a sample: mean over N L
                            a = a.reshape(-1, a.shape[-1]) / math.sqrt(inputs[k].shape[1])
                        else:  # reduce: the mean input and the summed gradient per sample
                            a = a.mean(dim=1)
                        A[k] = A[k] + a.mT @ a / N
                        for g in grads:
                            g = g[k].reshape(-1, g[k].shape[-1]) if expand else g[k].sum(dim=1)
                            G[k] = G[k] + g.mT @ g
                count = torch.tensor([float(ignored)], dtype=self.torch_dtype, device=self.device)
                return [t for k in self.units for t in (A[k], G[k])] + [count]

            parts = self._global_sums(local, "Kronecker factors")
            ignored = round(float(parts.pop()))
            if ignored == N:
                raise ValueError("data: every target is cross-entropy's ignore_index")
            scale = N / (N - ignored)  # A is the mean over the samples in the loss
            self.factors = {
                k: (parts[2 * i] * scale if ignored else parts[2 * i], parts[2 * i + 1])
                for i, k in enumerate(self.units)
            }
        return self.factors

    def _global_sums(self, local: Any, what: str) -> list[Tensor]:
        """``local()``, summed over the ranks of the process group (if any)."""
        if self.process_group is None:
            return local()
        from linops.distributed import global_tensor_sums

        self._weights()  # its collective (the loss normaliser) before the guarded local work
        return global_tensor_sums(self, local, what=what)

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
            "grouped": self.grouped,
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
            "grouped": self.grouped,
        }  # fmt: skip
        if self.fisher_type != "mc":  # only the Monte-Carlo labels depend on the seed
            del expected["seed"]
        for key, value in expected.items():
            if state.get(key) != value:
                raise ValueError(
                    f"state: expected {key}={value!r} for this operator, got {state.get(key)!r}"
                )
        for s in self._slots():  # the same layer names over other widths: refused
            joint = not self.separate and s.w is not None and s.b is not None
            d_in = (s.cols + joint) if s.w is not None else 1
            d_out = s.rows if s.w is not None else (s.b.stop - s.b.start)  # type: ignore[union-attr]
            A, G = state["factors"][s.layer]
            if tuple(A.shape) != (d_in, d_in) or tuple(G.shape) != (d_out, d_out):
                raise ValueError(
                    f"state: expected factors of shapes ({d_in}, {d_in}) and ({d_out}, {d_out}) "
                    f"for layer {s.layer!r}, got {tuple(A.shape)} and {tuple(G.shape)}"
                )
        kw = {"dtype": self.torch_dtype, "device": self.device}
        self.factors = {k: (A.to(**kw), G.to(**kw)) for k, (A, G) in state["factors"].items()}
        if "corrected" in state:
            self._corrected = {
                k: tuple(t.to(**kw) for t in v) for k, v in state["corrected"].items()
            }

    def _slots(self) -> list[Slot]:
        """Return where each layer's weight and bias sit in the flat vector (computed once)."""
        if self._slot_cache is None:
            space, starts, slots = self.space, {}, []
            offset = 0
            for name, numel in zip(space.names, space.numels, strict=True):
                starts[name], offset = offset, offset + numel
            for k, (name, i, groups) in self.units.items():
                wn, bn = self.layers[name]
                w = b = None
                rows = cols = 0
                if wn is not None:  # (out, in, kh, kw) conv weights as (out, in kh kw)
                    shape = space.shapes[space.names.index(wn)]
                    rows, cols = shape[0] // groups, math.prod(shape[1:])
                    first = starts[wn] + i * rows * cols  # group i: rows i out/G ...
                    w = slice(first, first + rows * cols)
                if bn is not None:
                    numel = space.numels[space.names.index(bn)] // groups
                    b = slice(starts[bn] + i * numel, starts[bn] + (i + 1) * numel)
                slots.append(Slot(k, w, rows, cols, b))
            self._slot_cache = slots
        return self._slot_cache

    def _map_blocks(self, X: Tensor, weight: Any, bias: Any) -> Tensor:
        """Apply per-layer maps ``weight`` and ``bias`` to a block (:func:`linops._kron.map_blocks`)."""
        return map_blocks(X, self._slots(), self.separate, weight, bias)

    def _eigen_map(self, X: Tensor, eig: dict, f: Any) -> Tensor:
        r""":math:`V \mapsto Q_G[(Q_G^\top V Q_A) \odot f(E)]Q_A^\top` per block."""
        D = {k: (f(e[2]), f(e[3])) for k, e in eig.items()}

        def weight(k: str, V: Tensor, lay: Layout, out: Tensor | None) -> Tensor:
            QA, QG = eig[k][0], eig[k][1]
            rotated = lay.scale(lay.right(lay.left(QG.mT, V), QA), D[k][0])
            return lay.right(lay.left(QG, rotated), QA.mT, out)

        def bias(k: str, V: Tensor, lay: Layout, out: Tensor | None) -> Tensor:
            QG = eig[k][1]
            return lay.left(QG, lay.scale(lay.left(QG.mT, V), D[k][1]), out)

        return self._map_blocks(X, weight, bias)

    def _blocks(self) -> list[tuple[Tensor, Tensor]]:
        """Return ``(A, G)`` of every diagonal block (a separate bias block has ``A = [[1]]``)."""
        one = torch.ones(1, 1, dtype=self.torch_dtype, device=self.device)
        blocks = []
        factors = self.compute_factors()
        for k, (name, _, _) in self.units.items():
            wn, bn = self.layers[name]
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

        From the factors' eigenvalues (``-inf`` for a singular undamped KFAC: without damping,
        a factor's eigenvalues below ``dim * eps`` of its largest count as zero).

        Raises
        ------
        ValueError
            For a negative or non-finite damping.
        """
        check_damping(damping)

        def products() -> Any:
            for A, G in self._blocks():
                a, g = (torch.linalg.eigvalsh(M).clamp(min=0) for M in (A, G))
                if damping == 0:  # each factor's rounding level, before the products
                    a, g = _rounded_to_zero(a, len(a)), _rounded_to_zero(g, len(g))
                yield (a[:, None] * g[None, :]).reshape(-1), 0

        return _damped_logdet(products(), damping)

    def inverse(self, damping: float, *, heuristic: bool = False) -> TorchLinearOperator:
        r""":math:`(B + \lambda I)^{-1}` in closed form, per block.

        Exact damping: with :math:`A = Q_A\,\mathrm{diag}(a)Q_A^\top`, :math:`G = Q_G\,
        \mathrm{diag}(g)Q_G^\top`, :math:`V \mapsto Q_G[(Q_G^\top V Q_A) \oslash (g a^\top +
        \lambda)]Q_A^\top`. ``heuristic=True``: Martens & Grosse's factored damping (2015,
        Section 6.3), :math:`(A + \pi\sqrt\lambda I)^{-1} \otimes (G + \sqrt\lambda/\pi\,
        I)^{-1}` with :math:`\pi^2 = (\operatorname{tr}A/\dim A)/(\operatorname{tr}G/\dim G)`
        (each shift at least 1e-8, as curvlinops' ``min_damping``). A block with a zero
        factor (a dead layer's inputs, a layer the loss does not reach) is zero, and its
        inverse :math:`I/\lambda` exactly: :math:`\pi` is 0 or infinite there, and the factored
        damping gave about 1e-142 in place of :math:`1/\lambda` (or a ``ZeroDivisionError``).

        Raises
        ------
        ValueError
            For a damping that is not positive.
        """
        damping = check_damping(damping, allow_zero=False)
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


def _rounded_to_zero(x: Tensor, size: int) -> Tensor:
    """``x`` (non-negative eigenvalues) with those below ``size * eps`` of the largest set to 0.

    Eigenvalues of a singular ``size x size`` factor come out of ``eigvalsh`` at about
    ``eps`` of the largest, not 0: their logarithm was a finite -394 for a singular KFAC whose
    undamped log-determinant is ``-inf``.
    """
    tiny = size * torch.finfo(x.dtype).eps * float(x.max()) if x.numel() else 0.0
    return torch.where(x <= tiny, torch.zeros_like(x), x)


def _damped_logdet(blocks: Any, damping: float) -> float:
    r"""Return :math:`\sum \log(v + \lambda)` over the eigenvalues ``v`` of ``(v, size)`` blocks.

    Undamped, a block's values below ``size * eps`` of its largest count as zero
    (:func:`_rounded_to_zero`): only then does a value at the rounding level matter.
    """
    total = 0.0
    for v, size in blocks:
        v = v.clamp(min=0)
        if damping == 0:
            v = _rounded_to_zero(v, size)
        total += float(torch.log(v + damping).sum())
    return total
