r"""Training restricted to an affine subspace :math:`\theta = \theta_0 + P z`.

Section 3.6 of "Understanding Gradient Descent through the Training Jacobian" (an anonymous submission under double-blind review, no arXiv id given); "the paper" below.

Following Li et al. (2018) and Song et al. (2024), the paper re-parameterises the network as

.. math:: \theta_t = \theta_0 + P z_t, \qquad z_0 = 0,

with :math:`P \in \mathbb{R}^{m \times n}` a basis of the subspace under study (the bulk, the
chaotic or stable subspace of the training Jacobian, the complement of the bulk, or a random
subspace) and trains :math:`z` with the same optimizer and schedule as the full network. The
gradient in :math:`z` is :math:`P^\top \nabla_\theta L(\theta_0 + P z)`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from estimators.seeding import Seed, make_generator
from linops import Params
from trainers._base import Direction, Trainer, make_optimizer
from trainers._schedules import Schedule, as_schedule

__all__ = ["SubspaceTrainer", "subspace_basis"]


class SubspaceTrainer(Trainer):
    r"""Train :math:`z` in :math:`\theta = \theta_0 + P z` (the paper's section 3.6, equation 3).

    Parameters
    ----------
    model
        The network; its current parameters (or ``theta0``) are :math:`\theta_0`.
    loss_fn
        ``loss_fn(outputs, targets)``.
    basis
        :math:`P`, shape ``(m, n)`` (columns span the subspace; orthonormal columns make
        :math:`z` a coordinate vector, as with singular vectors).
    theta0
        Flat :math:`\theta_0` (default: the model's parameters).
    optimizer
        ``"sgd"``, ``"adam"``, ``"adamw"`` or a factory, applied to :math:`z`.
    lr
        Learning rate: a number or a :class:`trainers.functional.Schedule` (for example
        ``CosineLR(0.1, 625)``, the schedule of the unrestricted run), applied per step.
    params
        Which parameters :math:`\theta` covers (see :class:`linops.ParamSpace`).
    **optimizer_kw
        Passed to the optimizer (``momentum``, ``weight_decay``, ...).

    Examples
    --------
    >>> import torch
    >>> from trainers.models import MLP
    >>> net = MLP(3, 2, widths=4).double()
    >>> P = torch.linalg.qr(torch.randn(26, 5, dtype=torch.float64))[0]
    >>> t = SubspaceTrainer(net, torch.nn.functional.cross_entropy, P, lr=0.1)
    >>> t.values["z"].shape
    torch.Size([5])
    """

    def __init__(
        self,
        model: torch.nn.Module,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        basis: torch.Tensor,
        *,
        theta0: torch.Tensor | None = None,
        optimizer: str | Callable[..., torch.optim.Optimizer] = "sgd",
        lr: float | Schedule = 0.1,
        params: Params | None = None,
        **optimizer_kw: Any,  # forwarded to the optimizer (see Trainer)
    ) -> None:
        self.schedule = as_schedule(lr)
        super().__init__(
            model, loss_fn, optimizer=optimizer, params=params, lr=self.schedule(0), **optimizer_kw
        )
        m = self.space.dim
        if (
            not isinstance(basis, torch.Tensor)
            or basis.ndim != 2
            or basis.shape[0] != m
            or basis.shape[1] < 1
        ):
            shape = tuple(basis.shape) if isinstance(basis, torch.Tensor) else type(basis).__name__
            raise ValueError(f"basis: expected a tensor of shape ({m}, n) with n >= 1, got {shape}")
        dtype = self.space.dtype
        if theta0 is None:
            theta0 = self.space.flat_values()
        if not isinstance(theta0, torch.Tensor) or theta0.shape != (m,):
            shape = (
                tuple(theta0.shape) if isinstance(theta0, torch.Tensor) else type(theta0).__name__
            )
            raise ValueError(f"theta0: expected a tensor of shape ({m},), got {shape}")
        self.theta0 = theta0.detach().to(dtype).clone()
        self.basis = basis.detach().to(dtype)
        self.values = {"z": torch.zeros(basis.shape[1], dtype=dtype)}
        self.initial_values = {"z": self.values["z"].clone()}
        self.optimizer = make_optimizer(
            self.values.values(), optimizer, lr=self.schedule(0), **optimizer_kw
        )

    def theta(self, z: torch.Tensor | None = None) -> torch.Tensor:
        r""":math:`\theta_0 + P z` (flat)."""
        return self.theta0 + self.basis @ (self.values["z"] if z is None else z)

    def forward(
        self, x: torch.Tensor, values: Mapping[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        r"""Model outputs at :math:`\theta_0 + P z`."""
        z = (values or self.values)["z"]
        return self.space.functional_call(self.space.unflatten(self.theta(z)), x)

    def direction(self, x: torch.Tensor, y: torch.Tensor) -> Direction:
        r"""Loss and :math:`\nabla_z L = P^\top \nabla_\theta L(\theta_0 + P z)`."""
        theta = self.theta().requires_grad_(True)
        loss = self.loss_fn(self.space.functional_call(self.space.unflatten(theta), x), y)
        (g,) = torch.autograd.grad(loss, theta)
        return Direction(float(loss.detach()), {"z": self.basis.T @ g})

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """One step at the scheduled learning rate."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.schedule(self.steps_done)
        return super().step(x, y)


def subspace_basis(
    kind: str,
    k: int,
    *,
    sigma: torch.Tensor | None = None,
    vectors: torch.Tensor | None = None,
    dim: int | None = None,
    seed: Seed = 0,
) -> torch.Tensor:
    r"""Make a basis :math:`P` for :class:`SubspaceTrainer` from a training-Jacobian SVD (sec. 3.6).

    Parameters
    ----------
    kind
        ``"bulk"`` (the ``k`` singular vectors with :math:`|\sigma - 1|` smallest),
        ``"chaotic"`` (the ``k`` largest :math:`\sigma`), ``"stable"`` (the ``k`` smallest),
        ``"complement"`` (everything but the bulk at ``m - k``: the ``k`` vectors with
        :math:`|\sigma - 1|` largest) or ``"random"`` (an orthonormal Gaussian basis).
    k
        Dimension of the subspace.
    sigma
        Singular values, descending (not needed for ``"random"``).
    vectors
        Singular vectors as columns, in the order of ``sigma`` (right singular vectors:
        directions at initialisation).
    dim
        Ambient dimension for ``"random"`` (default ``vectors.shape[0]``).
    seed
        Seed of the random basis.

    Returns
    -------
    torch.Tensor
        ``(m, k)``.

    Examples
    --------
    >>> import torch
    >>> V, s = torch.eye(4, dtype=torch.float64), torch.tensor([9.0, 1.01, 1.0, 0.2], dtype=torch.float64)
    >>> subspace_basis("bulk", 1, sigma=s, vectors=V).argmax().item()
    2
    """
    kinds = ("bulk", "chaotic", "stable", "complement", "random")
    if kind not in kinds:
        raise ValueError(f"kind: expected one of {kinds}, got {kind!r}")
    if kind == "random":
        m = dim if dim is not None else (vectors.shape[0] if vectors is not None else None)
        if m is None:
            raise ValueError(
                "dim: expected the ambient dimension (or vectors) for a random basis, got None"
            )
        _check_k(k, m)
        g = make_generator(seed)
        return torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))[0]
    if sigma is None or vectors is None:
        raise ValueError(
            f"sigma, vectors: expected the singular values and vectors for kind {kind!r}, got None"
        )
    s = torch.as_tensor(sigma, dtype=torch.float64)
    if vectors.ndim != 2 or vectors.shape[1] != s.shape[0]:
        raise ValueError(
            f"vectors: expected {s.shape[0]} columns (one per singular value), got shape {tuple(vectors.shape)}"
        )
    _check_k(k, s.shape[0])
    dist = (s - 1).abs()
    order = {
        "bulk": torch.argsort(dist, stable=True),
        "complement": torch.argsort(dist, descending=True, stable=True),
        "chaotic": torch.argsort(s, descending=True, stable=True),
        "stable": torch.argsort(s, stable=True),
    }[kind]
    return vectors[:, order[:k]]


def _check_k(k: int, m: int) -> None:
    if not isinstance(k, int) or not 1 <= k <= m:
        raise ValueError(f"k: expected an integer in [1, {m}], got {k!r}")
