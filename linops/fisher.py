r"""The Fisher family: empirical Fisher, Monte-Carlo Fisher and exact Fisher.

For a dataset :math:`\{(x_n, y_n)\}_{n=1}^N`, a model :math:`f_n = f(\theta; x_n)` with
Jacobian :math:`J_n = \partial f_n / \partial\theta` and a loss written as

.. math:: L(\theta) = c \sum_{n=1}^N \ell(f_n, y_n),

where :math:`\ell` is the *per-sample* loss summed over the sample's outputs and :math:`c` the
reduction's scale, the three matrices are

.. math::

    \text{EF} = c \sum_n J_n^\top \hat g_n \hat g_n^\top J_n, \qquad
    F = c \sum_n J_n^\top\, \mathbb{E}_{\tilde y \sim q(\cdot \mid f_n)}
        \big[\tilde g_n \tilde g_n^\top\big] J_n, \qquad
    F_M = c \sum_n J_n^\top \Big(\frac1M \sum_{m=1}^M \tilde g_{nm} \tilde g_{nm}^\top\Big) J_n,

with :math:`\hat g_n = \nabla_f \ell(f_n, y_n)` at the data's labels and
:math:`\tilde g_{nm} = \nabla_f \ell(f_n, \tilde y_{nm})` at labels drawn from the model's
predictive distribution :math:`q` (categorical for cross-entropy, :math:`\mathcal N(f_n,
\tfrac12 I)` for the squared error :math:`\|f - y\|^2`, Bernoulli for BCE-with-logits).
For these three losses :math:`\mathbb E[\tilde g \tilde g^\top] = \nabla^2_f \ell`, so the exact
Fisher equals the GGN.

**Scaling (the same as curvlinops 3.0.1).** ``reduction="sum"``: :math:`c = 1`.
``reduction="mean"``: :math:`c = 1/W` with :math:`W = \sum_b W_b` the loss's normaliser over
the data (:mod:`linops._reduction`): :math:`N` for cross-entropy, :math:`N C` for
``MSELoss`` and ``BCEWithLogitsLoss`` on ``C`` outputs per sample (torch averages over every
entry, so :math:`\ell` sums the sample's squared errors and :math:`c = 1/(NC)`). In every case
``L`` above is exactly torch's loss on the concatenated data.

In output space each batch contributes a block-diagonal matrix, one ``d x d`` block per sample
(a rank-one :math:`\hat g \hat g^\top`, a rank-``M`` sum, or the closed-form Hessian), applied
between the retained ``J`` and ``J^T`` of the model operators.

References
----------
.. [1] F. Kunstner, L. Balles and P. Hennig, "Limitations of the empirical Fisher
   approximation for natural gradient descent", NeurIPS 2019. arXiv:1905.12558
.. [2] J. Martens, "New insights and perspectives on the natural gradient method", JMLR 2020.
   arXiv:1412.1193
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from linops._autodiff import OutputGraph
from linops._chain import ChainOutputGraph
from linops._checks import check_loss_fn
from linops._reduction import _describe
from linops._types import Data, LossFunction, Params
from linops.hessian import _LossOperator
from linops.params import KeywordInputs

__all__ = ["EmpiricalFisherOperator", "FisherOperator"]

Tensor = torch.Tensor

#: the predictive distributions the Fisher samples from, by loss family
_FAMILIES = ("cross_entropy", "mse", "bce")


class _OutputBlock:
    r"""One batch: its retained output graph and the ``d x d`` per-sample blocks ``B_n``.

    ``apply(U)`` returns :math:`\\mathrm{scale}\\, B_n U_n` for ``U`` laid out ``(n, d)`` or
    ``(K, n, d)``; ``factor`` (``(n, d, r)``, or None for a closed form) holds :math:`S_n` with
    :math:`B_n = S_n S_n^\\top`.
    """

    def __init__(
        self, outputs: Any, factor: Tensor | None, closed: Any, scale: float,
        closed_factor: Any = None,
    ) -> None:  # fmt: skip
        self.outputs, self.factor, self.closed, self.scale = outputs, factor, closed, scale
        self.closed_factor: Any = closed_factor  # () -> (n, d, r) factor of the closed form

    def factor_matrix(self) -> Tensor:
        r""":math:`S_n` with :math:`\mathrm{scale}\, B_n = S_n S_n^\top`, ``(n, d, r)``."""
        S = self.factor if self.factor is not None else self.closed_factor()
        return math.sqrt(self.scale) * S

    def apply(self, U: Tensor) -> Tensor:
        if self.factor is None:
            return self.scale * self.closed(U)
        S = self.factor
        return self.scale * torch.einsum(
            "ndr,...nr->...nd", S, torch.einsum("ndr,...nd->...nr", S, U)
        )


class _OutputFactorOperator(_LossOperator):
    r""":math:`\sum_b w_b \sum_n J_n^\top B_n J_n` with output-space blocks from a subclass."""

    def _blocks(self, out: Tensor, model_shape: torch.Size, y: Tensor | None) -> _OutputBlock:
        raise NotImplementedError

    def _normaliser(self, out: Tensor, model_shape: torch.Size, y: Tensor | None) -> float:
        """:math:`W_b` of a mean reduction (1 for a sum): batch loss = per-sample sum / W_b."""
        return self._batch_normaliser(out.reshape(out.shape[0], *model_shape), y)

    def _build_graph(self, x: Tensor, y: Tensor | None) -> Any:
        outputs = self._route_graph(
            lambda chain: ChainOutputGraph(chain, x, None),
            lambda: OutputGraph(self.space, x, None),
        )
        block = self._blocks(outputs.out.detach(), outputs.model_shape, y)
        block.outputs = outputs
        return block

    def _matmat_torch(self, X: Tensor) -> Tensor:
        def product(block: _OutputBlock, tangents: list[Tensor], batched: bool) -> Any:
            U = block.outputs.jvp(tangents, batched)
            return block.outputs.vjp(block.apply(U), batched)

        return self._accumulate(X, product)

    def diagonal(self, *, max_samples: int = 32) -> Tensor:
        r"""Return the exact diagonal :math:`\sum_b w_b \sum_n \sum_r (J_n^\top s_{nr})^2`.

        From the per-sample output-space factors :math:`B_n = S_n S_n^\top` (``d x r``:
        :math:`\hat g_n` for the empirical Fisher, the :math:`M` sampled gradients over
        :math:`\sqrt M`, or :math:`\operatorname{diag}(\sqrt p) - p\sqrt p^\top`,
        :math:`\sqrt2 I`, :math:`\operatorname{diag}(\sqrt{\sigma(1-\sigma)})` for the
        exact Fisher = GGN) and per-sample Jacobians :math:`J_n` (``torch.func``: ``vmap`` of
        ``jacrev`` over ``max_samples`` samples at a time, ``max_samples * d * m`` numbers
        in memory; one sample at a time for models ``vmap`` cannot batch, such as recurrent
        layers; by ``torch.autograd.functional.jacobian``, one backward pass per output, for
        those ``torch.func`` cannot differentiate, such as non-reentrant checkpointing). No
        products with the operator; a tensor of length ``m`` on its device.

        Raises
        ------
        ValueError
            For ``max_samples`` below 1.
        """
        if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1:
            raise ValueError(f"max_samples: expected an integer >= 1, got {max_samples!r}")
        names = self.space.names
        values = tuple(self.space.values().values())

        def f(vals: tuple[Tensor, ...], xi: Any, fixed: dict[str, Any]) -> Tensor:
            params = dict(zip(names, vals, strict=True))
            if isinstance(xi, dict):  # one sample of keyword inputs
                one = KeywordInputs({**fixed, **{k: t[None] for k, t in xi.items()}})
                return self.space.functional_call(params, one).reshape(-1)
            return self.space.functional_call(params, xi[None]).reshape(-1)

        looped: list[bool] = []  # set once vmap has failed: one sample at a time from then on

        def jac(vals: tuple[Tensor, ...], x: Any) -> tuple[Tensor, ...]:
            fixed: dict[str, Any] = {}
            if isinstance(x, KeywordInputs):  # vmap over the batched tensors only
                batched = {k: v for k, v in x.values.items() if isinstance(v, Tensor) and v.dim()}
                fixed = {k: v for k, v in x.values.items() if k not in batched}
                x = batched
            if not looped:
                try:
                    return torch.func.vmap(torch.func.jacrev(f), in_dims=(None, 0, None))(
                        vals, x, fixed
                    )
                except RuntimeError:  # no batching rule (recurrent layers, EmbeddingBag)
                    looped.append(True)
            n = len(next(iter(x.values()))) if isinstance(x, dict) else len(x)
            rows = [
                one(vals, {k: v[i] for k, v in x.items()} if isinstance(x, dict) else x[i], fixed)
                for i in range(n)
            ]
            return tuple(torch.stack(parts) for parts in zip(*rows, strict=True))

        plain: list[bool] = []  # set once jacrev has failed: autograd's own jacobian from then on

        def one(vals: tuple[Tensor, ...], xi: Any, fixed: dict[str, Any]) -> tuple[Tensor, ...]:
            if not plain:
                try:
                    return torch.func.jacrev(f)(vals, xi, fixed)
                except RuntimeError:  # saved tensor hooks (non-reentrant checkpointing)
                    plain.append(True)
            jacobian = torch.autograd.functional.jacobian(lambda *v: f(v, xi, fixed), vals)
            return tuple(jacobian)

        total = torch.zeros(self.shape[0], dtype=self.torch_dtype, device=self.device)
        for w, (x, _), block in zip(self._weights(), self.batches, self._graphs(), strict=True):
            if w == 0.0:  # a batch of zero-weight classes only (as in _accumulate)
                continue
            S = block.factor_matrix()
            for i in range(0, len(x), max_samples):
                parts = jac(values, x[i : i + max_samples])
                J = torch.cat([t.reshape(t.shape[0], t.shape[1], -1) for t in parts], dim=2)
                total += w * torch.einsum("cdr,cdp->crp", S[i : i + max_samples], J).pow(2).sum(
                    (0, 1)
                )
        return total


class EmpiricalFisherOperator(_OutputFactorOperator):
    r"""The empirical Fisher :math:`\text{EF} = c \sum_n \nabla_\theta \ell_n \nabla_\theta \ell_n^\top`.

    The uncentred second moment of the per-sample gradients at the data's labels (module
    docstring for :math:`c` and :math:`\ell`; equal to curvlinops' ``EFLinearOperator``).
    Computed as :math:`c \sum_n J_n^\top \hat g_n \hat g_n^\top J_n` with :math:`\hat g_n` the
    per-sample loss gradient w.r.t. the outputs: a rank-one block per sample, so a product
    costs one JVP and one VJP on retained graphs, like the GGN.

    Parameters
    ----------
    model, loss_fn, data, params, reduction, output, process_group, **kwargs
        As in :class:`linops.GGNOperator`. Any loss that is a sum over samples works (the
        per-sample gradients are the rows of the batch loss's output gradient times
        :math:`W_b`); a plain function needs ``reduction`` (``"mean"``: over samples).

    Raises
    ------
    ValueError
        At the first product, for a plain loss function without ``reduction``.

    Examples
    --------
    >>> import torch
    >>> lin = torch.nn.Linear(2, 1, bias=False).double()
    >>> with torch.no_grad():
    ...     _ = lin.weight.copy_(torch.tensor([[1.0, 0.0]]))
    >>> X = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    >>> y = torch.zeros(2, 1, dtype=torch.float64)
    >>> loss = torch.nn.MSELoss(reduction="sum")  # g_1 = (2, 0), g_2 = 0
    >>> EmpiricalFisherOperator(lin, loss, (X, y)).to_dense().tolist()
    [[4.0, 0.0], [0.0, 0.0]]
    """

    def _blocks(self, out: Tensor, model_shape: torch.Size, y: Tensor | None) -> _OutputBlock:
        if _describe(self.loss_fn)[0] is None and self._reduction is None:
            raise ValueError(
                "reduction: expected 'mean' or 'sum' for a plain loss function (the empirical "
                "Fisher needs the per-sample scale of the loss), got None"
            )
        W = self._normaliser(out, model_shape, y)
        with torch.enable_grad():
            o = out.reshape(out.shape[0], *model_shape).requires_grad_(True)
            g = torch.autograd.grad(self.loss_fn(o, y), o)[0]
        # per-sample gradient g_n = W_b * (batch gradient)_n; block c g g^T with c = 1 / W_b
        # relative to the batch weight w_b of _accumulate: W_b * (batch grad) (batch grad)^T
        return _OutputBlock(None, g.reshape(out.shape[0], -1, 1).detach(), None, W)


class FisherOperator(_OutputFactorOperator):
    r"""The Fisher :math:`F` (exact) or its Monte-Carlo estimate :math:`F_M` (module docstring).

    Parameters
    ----------
    model, loss_fn, data, params, reduction, output, process_group, **kwargs
        As in :class:`linops.GGNOperator`. ``loss_fn``: ``nn.CrossEntropyLoss`` (class-index
        targets, ``(N, C)`` logits, no class weights or label smoothing), ``nn.MSELoss`` or
        ``nn.BCEWithLogitsLoss`` (no ``pos_weight`` or ``weight``), mean or sum, or the
        functionals ``F.cross_entropy``, ``F.mse_loss``,
        ``F.binary_cross_entropy_with_logits`` (mean). Samples whose cross-entropy target is
        ``ignore_index`` are not in the loss and add nothing (as in the GGN).
    mc_samples
        ``None`` (default): the exact Fisher, per sample the closed form
        :math:`\operatorname{diag}(p) - pp^\top` (cross-entropy, :math:`p` the softmax),
        :math:`2I` (squared error), :math:`\operatorname{diag}(\sigma(1-\sigma))` (BCE),
        which equals :class:`linops.GGNOperator` for these losses. An integer ``M``: labels
        drawn from the predictive distribution, ``M`` per sample; the operator is one fixed
        draw (a new ``seed`` gives another), and :math:`\|F_M - F\|` falls like
        :math:`1/\sqrt M`.
    seed
        Seed of the draws: an int (a ``torch.Generator`` on the operator's device seeded
        with it draws, batch after batch, exactly curvlinops' ``FisherMCLinearOperator``
        labels for the same seed), a ``torch.Generator`` (one int seed is drawn from it at
        construction) or ``None`` (fresh entropy, fixed at construction). The draws of
        cross-entropy and BCE labels do not depend on how the data is batched; the normal
        draws of the squared error do (torch draws normals in vectorised chunks), as
        curvlinops' do: the same seed over other batches is another, equally valid, draw.
        On outputs of more than two dimensions (sequences, ``(N, T, C)``) the sampled
        gradient of a sample spans all its positions, so its outer product has cross terms
        between positions (of mean zero); curvlinops flattens the outputs to ``N T`` loss
        terms and keeps only each position's own: both unbiased, different draws.

    Raises
    ------
    ValueError
        For an unsupported loss or ``mc_samples`` below 1 (at construction); for outputs
        that are not ``(N, C)`` with cross-entropy (at the first product).

    Examples
    --------
    >>> import torch
    >>> lin = torch.nn.Linear(2, 1, bias=False).double()
    >>> X = torch.tensor([[1.0, 0.0], [1.0, 2.0]], dtype=torch.float64)
    >>> y = torch.zeros(2, 1, dtype=torch.float64)
    >>> loss = torch.nn.MSELoss(reduction="sum")
    >>> FisherOperator(lin, loss, (X, y)).to_dense().tolist()  # 2 X^T X, the GGN
    [[4.0, 4.0], [4.0, 8.0]]
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFunction,
        data: Data,
        params: Params | None = None,
        *,
        mc_samples: int | None = None,
        seed: int | torch.Generator | None = None,
        **kwargs: Any,  # the model operators' keywords (dtype, device, ...), forwarded
    ) -> None:
        self.family = _fisher_family(loss_fn)
        if mc_samples is not None and (
            not isinstance(mc_samples, int) or isinstance(mc_samples, bool) or mc_samples < 1
        ):
            raise ValueError(f"mc_samples: expected None or an integer >= 1, got {mc_samples!r}")
        super().__init__(model, loss_fn, data, params, **kwargs)
        self.mc_samples = mc_samples
        self.seed = _int_seed(seed)
        self._generator: torch.Generator | None = None
        self._draw_states: list[Tensor] = []  # the generator's state before each batch's draw

    def _graphs(self, inputs: bool = False) -> Any:
        if not self._graph_cache:  # a pass that (re)builds graphs draws afresh from seed
            self._generator = torch.Generator(device=self.device).manual_seed(self.seed)
            self._draw_states = []
        yield from super()._graphs(inputs)

    def _blocks(self, out: Tensor, model_shape: torch.Size, y: Tensor | None) -> _OutputBlock:
        if self.family == "cross_entropy" and len(model_shape) != 1:
            raise ValueError(
                "loss_fn: expected (N, C) logits for the Fisher of cross-entropy, got outputs "
                f"of shape (N, {', '.join(map(str, model_shape))}); fold the positions into "
                "the batch: (N T, C) logits (output=lambda o: o.logits.flatten(0, -2) for a "
                "language model) and (N T,) targets (a dict batch's labels flattened too, "
                "shifted as the model's loss shifts them)"
            )
        W = self._normaliser(out, model_shape, y)
        scale = 1.0 / W if W else 0.0  # W = 0: every target ignored, the batch's weight is 0
        kept = _kept_samples(self.loss_fn, y)
        mask = None if kept is None else kept.to(out.dtype)[:, None]  # ignored: a zero block
        if self.mc_samples is None:
            block = _exact_block(self.family, out)
            return _OutputBlock(
                None, None, block if mask is None else lambda U: mask * block(U), scale,
                lambda: _exact_factor(self.family, out) * (1.0 if mask is None else mask[..., None]),
            )  # fmt: skip
        gen: Any = self._generator  # set by _graphs before any graph is built
        i = self._building_batch  # a graph rebuilt (not kept by the budget) draws as before
        if i < len(self._draw_states):
            gen.set_state(self._draw_states[i])
        else:
            self._draw_states.append(gen.get_state())
        G = _sample_output_grads(self.family, out, self.mc_samples, gen)  # drawn for all
        G = G if mask is None else G * mask
        return _OutputBlock(None, G.permute(1, 2, 0) / math.sqrt(self.mc_samples), None, scale)


def _kept_samples(loss_fn: LossFunction, y: Tensor | None) -> Tensor | None:
    """Return the samples in the loss (bool ``(n,)``), or None when every sample is.

    Cross-entropy drops the samples whose class-index target is its ``ignore_index``: they
    contribute nothing to the loss, its GGN, its Fisher or KFAC's factors (their inputs too).
    """
    family, _, options = _describe(loss_fn)
    if family != "cross_entropy" or y is None or y.is_floating_point():
        return None
    kept = y != options["ignore_index"]
    return None if bool(kept.all()) else kept


def _fisher_family(loss_fn: LossFunction) -> str:
    check_loss_fn(loss_fn)
    kinds = {
        nn.CrossEntropyLoss: "cross_entropy",
        nn.MSELoss: "mse",
        nn.BCEWithLogitsLoss: "bce",
        nn.functional.cross_entropy: "cross_entropy",
        nn.functional.mse_loss: "mse",
        nn.functional.binary_cross_entropy_with_logits: "bce",
    }
    family = kinds.get(type(loss_fn)) or (kinds.get(loss_fn) if callable(loss_fn) else None)
    plain = True
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        plain = loss_fn.weight is None and loss_fn.label_smoothing == 0.0
    if isinstance(loss_fn, nn.BCEWithLogitsLoss):
        plain = loss_fn.weight is None and loss_fn.pos_weight is None
    if family is None or not plain:
        raise ValueError(
            "loss_fn: expected nn.CrossEntropyLoss, nn.MSELoss or nn.BCEWithLogitsLoss (no "
            "class weights, label smoothing or pos_weight) or their functionals, whose "
            f"predictive distributions the Fisher samples from, got {loss_fn!r}"
        )
    return family


def _int_seed(seed: int | torch.Generator | None) -> int:
    if isinstance(seed, torch.Generator):
        return int(torch.randint(0, 2**62, (1,), generator=seed, device=seed.device))
    if seed is None:
        return torch.Generator().seed()
    if isinstance(seed, int) and not isinstance(seed, bool):
        return seed
    raise TypeError(f"seed: expected an int, a torch.Generator or None, got {seed!r}")


def _exact_block(family: str, out: Tensor) -> Any:
    r""":math:`U \mapsto \nabla^2_f \ell\, U` per sample, for ``(n, d)`` or ``(K, n, d)``."""
    if family == "mse":
        return lambda U: 2.0 * U
    if family == "bce":
        s = torch.sigmoid(out)
        h = s * (1 - s)
        return lambda U: h * U
    p = torch.softmax(out, dim=1)
    return lambda U: p * U - p * (p * U).sum(-1, keepdim=True)


def _exact_factor(family: str, out: Tensor) -> Tensor:
    r"""Return :math:`S_n` (``(n, d, d)``) with :math:`S_n S_n^\top = \nabla^2_f \ell` per sample.

    For cross-entropy :math:`\operatorname{diag}(\sqrt p) - p\sqrt p^\top` (as
    :math:`\sum_i p_i = 1`).
    """
    n, d = out.shape
    eye = torch.eye(d, dtype=out.dtype, device=out.device)
    if family == "mse":
        return math.sqrt(2.0) * eye.expand(n, d, d)
    if family == "bce":
        s = torch.sigmoid(out)
        return torch.diag_embed((s * (1 - s)).sqrt())
    p = torch.softmax(out, dim=1)
    return torch.diag_embed(p.sqrt()) - p[:, :, None] * p.sqrt()[:, None, :]


def _sample_output_grads(family: str, out: Tensor, M: int, gen: torch.Generator) -> Tensor:
    r""":math:`\tilde g_{nm}`, ``(M, n, d)``: per-sample loss gradients at sampled labels.

    The draws are those of curvlinops 3.0.1 (``make_grad_output_sampler``), call for call.
    """
    if family == "mse":
        mean = torch.zeros(M, *out.shape, dtype=out.dtype, device=out.device)
        return 2 * torch.normal(
            mean, torch.as_tensor(math.sqrt(0.5), device=out.device), generator=gen
        )
    if family == "cross_entropy":
        p = torch.softmax(out, dim=1)
        labels = p.multinomial(num_samples=M, replacement=True, generator=gen).T
        onehot = nn.functional.one_hot(labels, num_classes=out.shape[1]).to(out.dtype)
        return p.unsqueeze(0) - onehot
    p = torch.sigmoid(out).unsqueeze(0).expand(M, -1, -1)
    return p - p.bernoulli(generator=gen)
