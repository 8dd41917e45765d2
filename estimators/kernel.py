r"""Gram matrices of the theta-lazy analysis: NTK, per-layer Grams, their drift, RD.

The quantities of "Demystifying Lazy Training of Neural Networks from a Macroscopic Viewpoint"
(arXiv:2404.04859; "the paper" below).

For inputs :math:`x_1, \dots, x_n` and the Jacobian :math:`J_l = \partial f / \partial \theta_l`
of the outputs with respect to one group of parameters :math:`\theta_l` (the weights
:math:`W^{[l]}` of layer :math:`l`), the per-layer Gram matrix and the NTK are

.. math::

    G^{[l]}(\theta) = J_l J_l^\top \in \mathbb{R}^{n d_y \times n d_y}, \qquad
    K(\theta) = J J^\top = \sum_l G^{[l]}(\theta) \quad (\text{summing over all parameters}).

The paper's lazy-regime argument has three steps, each measurable here: the Grams at
initialisation are positive definite (:func:`gram_extremes`: :math:`\lambda_{\min}` and
:math:`\lambda_{\max}` by Lanczos), they stay close to their initial values
(:func:`gram_drift`: :math:`\|G(\theta_t) - G(\theta_0)\|_2 / \|G(\theta_0)\|_2`), and the
parameters stay close to initialisation, :math:`RD(W^{[l]}(t)) = \|W^{[l]}(t) - W^{[l]}(0)\|_F
/ \|W^{[l]}(0)\|_F` (:func:`relative_distance`, and the trainer callback
:class:`trainers.RelativeDistance`). :class:`GramDrift` records the Gram drift during training.

The paper normalises its Grams by the output scale (:math:`G/\kappa^2`); drift and the ratio
:math:`\lambda_{\min}/\lambda_{\max}` do not depend on that normalisation, so the operators here
are unnormalised (scale them with ``op * c`` if needed).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple, Protocol

import torch

from estimators.seeding import Seed
from linops import Data, TorchLinearOperator
from linops.jacobian import NTKOperator
from linops.lanczos import lanczos

__all__ = [
    "GramDrift",
    "GramSpectrum",
    "gram_drift",
    "gram_extremes",
    "gram_operator",
    "layer_parameter_names",
    "RelativeDistances",
    "relative_distance",
]


class GramSpectrum(NamedTuple):
    """Extreme eigenvalues of a Gram matrix.

    Attributes
    ----------
    lambda_min, lambda_max
        Smallest and largest eigenvalue.
    num_matvecs
        Operator products used.
    """

    lambda_min: float
    lambda_max: float
    num_matvecs: int


def layer_parameter_names(model: torch.nn.Module) -> list[str]:
    """Names of the weight matrices, layer by layer (parameters whose name ends in ``weight``).

    Examples
    --------
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    >>> layer_parameter_names(net)
    ['0.weight', '2.weight']
    """
    return [n for n, p in model.named_parameters() if n.endswith("weight") and p.requires_grad]


def _layer_params(
    model: torch.nn.Module, layer: int | str | Sequence[str] | None
) -> list[str] | None:
    if layer is None:
        return None
    if isinstance(layer, str):
        return [layer]
    if isinstance(layer, int) and not isinstance(layer, bool):
        names = layer_parameter_names(model)
        if not -len(names) <= layer < len(names):
            raise ValueError(
                f"layer: expected an integer in [{-len(names)}, {len(names) - 1}], got {layer}"
            )
        return [names[layer]]
    if isinstance(layer, Sequence):
        return list(layer)
    raise TypeError(f"layer: expected an int, a name, names or None, got {type(layer).__name__}")


def _model_at(model: torch.nn.Module, values: Mapping[str, torch.Tensor] | None) -> torch.nn.Module:
    """Return a copy of ``model`` with the given parameter values (all other state copied)."""
    if values is None:
        return model
    if not isinstance(values, Mapping):
        raise TypeError(
            f"params: expected a mapping from names to tensors, got {type(values).__name__}"
        )
    named = dict(model.named_parameters())
    unknown = [n for n in values if n not in named]
    if unknown:
        raise ValueError(f"params: {unknown} are not parameters of the model")
    new = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in new.named_parameters():
            if n in values:
                p.copy_(values[n])
    return new


def gram_operator(
    model: torch.nn.Module,
    inputs: Data,
    *,
    layer: int | str | Sequence[str] | None = None,
    values: Mapping[str, torch.Tensor] | None = None,
    output_index: int | None = None,
    **kwargs: Any,  # forwarded to linops.NTKOperator as they are
) -> NTKOperator:
    r"""Return the NTK :math:`K = J J^\top` or a per-layer Gram :math:`J_l J_l^\top` as an operator.

    Parameters
    ----------
    model
        The network.
    inputs
        ``(n, ...)`` inputs or an ``(X, y)`` pair.
    layer
        ``None``: all parameters (NTK); an int: the weight of that layer
        (:func:`layer_parameter_names` order, negative counts from the end); a parameter name
        or a list of names.
    values
        Parameter values by name at which to evaluate (default: the model's); parameters not
        named keep the model's values.
    output_index
        One output unit (``n x n``) instead of all (``n d_y x n d_y``).
    **kwargs
        Passed to :class:`linops.NTKOperator` (``dtype``, ``batch_size``, ...).

    Returns
    -------
    linops.NTKOperator
        Symmetric positive semi-definite.

    Examples
    --------
    >>> import torch
    >>> lin = torch.nn.Linear(2, 1, bias=False).double()
    >>> X = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    >>> gram_operator(lin, X, layer=0).to_dense().tolist()
    [[1.0, 1.0], [1.0, 2.0]]
    """
    at = _model_at(model, values)
    return NTKOperator(
        at, inputs, params=_layer_params(at, layer), output_index=output_index, **kwargs
    )


def gram_extremes(
    op: TorchLinearOperator | torch.Tensor,
    *,
    method: str = "lanczos",
    rtol: float | None = None,
    seed: Seed = 0,
) -> GramSpectrum:
    r""":math:`\lambda_{\min}` and :math:`\lambda_{\max}` of a symmetric PSD Gram matrix.

    Parameters
    ----------
    op
        The Gram operator (e.g. from :func:`gram_operator`) or a dense symmetric tensor.
    method
        ``"lanczos"`` (:func:`linops.lanczos`, ``which="SA"`` and ``"LA"``) or ``"dense"``
        (``eigvalsh`` of the assembled matrix, for small ``n``).
    rtol
        Lanczos tolerance relative to :math:`\|A\|` (:func:`linops.lanczos`'s ``tol``; default
        ``sqrt(eps)``); a small :math:`\lambda_{\min}` is resolved only to about
        ``rtol * lambda_max``.
    seed
        Randomness of the start vectors (an int ``s`` seeds the two runs ``s`` and ``s + 1``).

    Returns
    -------
    GramSpectrum
    """
    if method not in ("lanczos", "dense"):
        raise ValueError(f"method: expected 'lanczos' or 'dense', got {method!r}")
    if method == "dense":
        A = op if isinstance(op, torch.Tensor) else op.to_dense()
        w = torch.linalg.eigvalsh((A + A.T) / 2)
        return GramSpectrum(
            float(w[0]), float(w[-1]), A.shape[0] if not isinstance(op, torch.Tensor) else 0
        )
    second = seed + 1 if isinstance(seed, int) else seed
    lo = lanczos(op, 1, "SA", rtol=rtol, seed=seed)
    hi = lanczos(op, 1, "LA", rtol=rtol, seed=second)
    return GramSpectrum(
        float(lo.eigenvalues[0]), float(hi.eigenvalues[-1]), lo.num_matvecs + hi.num_matvecs
    )


def gram_drift(
    model: torch.nn.Module,
    inputs: Data,
    values_t: Mapping[str, torch.Tensor],
    values_0: Mapping[str, torch.Tensor] | None = None,
    *,
    layer: int | str | Sequence[str] | None = None,
    method: str = "lanczos",
    output_index: int | None = None,
    rtol: float = 1e-6,
    seed: Seed = 0,
) -> float:
    r"""Relative drift :math:`\|G(\theta_t) - G(\theta_0)\|_2 / \|G(\theta_0)\|_2` of the NTK or a layer Gram.

    Parameters
    ----------
    model, inputs
        The network (at :math:`\theta_0` unless ``values_0`` is given) and the probe inputs.
    values_t, values_0
        Parameter values by name.
    layer
        As in :func:`gram_operator` (``None``: the NTK).
    method
        ``"lanczos"``: largest-magnitude eigenvalue of the difference operator and largest
        eigenvalue of :math:`G(\theta_0)`, matrix-free; ``"dense"``: both assembled
        (``n d_y`` products each), for small probe sets.
    output_index
        One output unit.
    rtol, seed
        Lanczos tolerance (relative to the norms) and randomness of the start vectors.

    Returns
    -------
    float
    """
    if method not in ("lanczos", "dense"):
        raise ValueError(f"method: expected 'lanczos' or 'dense', got {method!r}")
    G_t = gram_operator(model, inputs, layer=layer, values=values_t, output_index=output_index)
    G_0 = gram_operator(model, inputs, layer=layer, values=values_0, output_index=output_index)
    if method == "dense":
        A_t, A_0 = G_t.to_dense(), G_0.to_dense()
        return float(torch.linalg.matrix_norm(A_t - A_0, 2) / torch.linalg.matrix_norm(A_0, 2))
    diff = lanczos(G_t - G_0, 1, "LM", rtol=rtol, seed=seed).eigenvalues
    base = lanczos(G_0, 1, "LA", rtol=rtol, seed=seed).eigenvalues
    return float(diff.abs().max()) / float(base[-1])


class RelativeDistances(NamedTuple):
    r"""Relative distances :math:`\|W(t) - W(0)\|_F / \|W(0)\|_F` from initialisation.

    Attributes
    ----------
    per_layer
        ``name -> RD`` for each parameter tensor.
    whole_model
        The same over all of them together (the concatenated vectors).
    """

    per_layer: dict[str, float]
    whole_model: float


def relative_distance(
    values_t: Mapping[str, torch.Tensor],
    values_0: Mapping[str, torch.Tensor],
    names: Iterable[str] | None = None,
) -> RelativeDistances:
    r"""Per-layer :math:`RD(W(t)) = \|W(t) - W(0)\|_F / \|W(0)\|_F` (the paper's RD).

    The toolkit's one RD: the trainer callback :class:`trainers.RelativeDistance` logs it.

    Parameters
    ----------
    values_t, values_0
        Parameter values by name.
    names
        Which (default: every name of ``values_0`` ending in ``weight``).

    Returns
    -------
    RelativeDistances

    Raises
    ------
    ValueError
        If a name is missing from either set of values.

    Examples
    --------
    >>> import torch
    >>> w0 = {"w.weight": torch.tensor([3.0, 4.0], dtype=torch.float64)}
    >>> relative_distance({"w.weight": torch.tensor([3.0, 4.5], dtype=torch.float64)}, w0)
    RelativeDistances(per_layer={'w.weight': 0.1}, whole_model=0.1)
    """
    names = list(names) if names is not None else [n for n in values_0 if n.endswith("weight")]
    missing = [n for n in names if n not in values_t or n not in values_0]
    if missing:
        raise ValueError(
            f"names: expected parameters present in both value sets, missing {missing}"
        )
    per_layer = {
        n: float((values_t[n] - values_0[n]).norm() / values_0[n].norm().clamp_min(1e-300))
        for n in names
    }
    diff = sum(float((values_t[n] - values_0[n]).norm()) ** 2 for n in names)
    base = sum(float(values_0[n].norm()) ** 2 for n in names)
    return RelativeDistances(per_layer, (diff / max(base, 1e-300)) ** 0.5 if names else 0.0)


class _TrainerView(Protocol):
    """What :class:`GramDrift` reads of a trainer (a ``trainers.Trainer``; estimators do not import trainers)."""

    @property
    def model(self) -> torch.nn.Module:
        """The trained model."""
        ...

    @property
    def values(self) -> Mapping[str, torch.Tensor]:
        """The current values of the trained parameters."""
        ...

    @property
    def initial_values(self) -> Mapping[str, torch.Tensor]:
        """Their values at step 0."""
        ...


class GramDrift:
    r"""Trainer callback: NTK (and optionally per-layer) Gram drift on a fixed probe set.

    Parameters
    ----------
    inputs
        Probe inputs.
    every
        Log at steps divisible by ``every``.
    layers
        ``False``: only the NTK; ``True``: also every layer of :func:`layer_parameter_names`.
    method
        ``"dense"`` (default; small probe sets) or ``"lanczos"``.

    Notes
    -----
    Logs ``gram_drift`` (and ``gram_drift/<name>``); :attr:`records` keeps ``(step, dict)``.
    """

    def __init__(
        self, inputs: Data, every: int = 1, *, layers: bool = False, method: str = "dense"
    ) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every: expected a positive integer, got {every!r}")
        self.inputs, self.every, self.layers, self.method = inputs, every, layers, method
        self.records: list[tuple[int, dict[str, float]]] = []

    def __call__(self, trainer: _TrainerView, step: int) -> dict[str, float] | None:
        """Log the Gram drift at steps divisible by ``every`` (else ``None``)."""
        if step % self.every:
            return None
        model = trainer.model
        p_t, p_0 = dict(trainer.values), dict(trainer.initial_values)
        out = {"gram_drift": gram_drift(model, self.inputs, p_t, p_0, method=self.method)}
        if self.layers:
            for name in layer_parameter_names(model):
                out[f"gram_drift/{name}"] = gram_drift(
                    model, self.inputs, p_t, p_0, layer=name, method=self.method
                )
        self.records.append((step, out))
        return out
