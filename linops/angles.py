r"""Principal angles between subspaces, accurate for tiny angles, and subspace similarity.

For orthonormal bases :math:`Q_U \in \mathbb{R}^{n \times p}`, :math:`Q_V \in \mathbb{R}^{n
\times q}` (:math:`p \ge q`) the principal angles :math:`0 \le \theta_1 \le \dots \le
\theta_q \le \pi/2` have cosines :math:`\sigma_i(Q_U^H Q_V)` and sines
:math:`\sigma_i\big((I - Q_U Q_U^H) Q_V\big)`. Cosines lose all accuracy for angles below
:math:`\sqrt{\varepsilon}` and sines for angles near :math:`\pi/2`, so each angle is taken
from the sine when it is below :math:`\pi/4` and from the cosine otherwise (Knyazev &
Argentati 2002). Both lists are sorted by angle before they are combined, which is what makes
sets with tiny and large angles together come out right.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from linops import _krylov as kr
from linops._backend import array_kind, to_torch

__all__ = ["principal_angles", "subspace_similarity"]


def principal_angles(U: Any, V: Any) -> Any:
    r"""Principal angles between ``span(U)`` and ``span(V)``, in ascending order (radians).

    Parameters
    ----------
    U, V
        Bases as ``(n, p)`` and ``(n, q)`` torch tensors or numpy/CuPy arrays (columns need
        not be orthonormal, but must be linearly independent), or results with an
        ``eigenvectors`` / ``right_vectors`` field.

    Returns
    -------
    ``(min(p, q),)`` angles in :math:`[0, \pi/2]`, ascending; a torch tensor if either input
    is one (float64, on the first input's device), else a numpy array. Bases are
    orthonormalised in float64 whatever their dtype.

    Raises
    ------
    ValueError
        If the bases have different numbers of rows, are not 2-d, or are rank deficient.

    References
    ----------
    .. [1] A. V. Knyazev and M. E. Argentati, "Principal angles between subspaces in an
       A-based scalar product: algorithms and perturbation estimates", SIAM J. Sci. Comput.
       23(6), 2002. doi:10.1137/S1064827500377332

    Examples
    --------
    >>> import torch
    >>> U = torch.eye(3, dtype=torch.float64)[:, :2]
    >>> V = torch.tensor([[1.0], [0.0], [1e-10]], dtype=torch.float64)
    >>> float(principal_angles(U, V)[0])
    1e-10
    """
    kind = "torch" if "torch" in (_kind(U), _kind(V)) else _kind(U)
    Qu, Qv = _orthonormal(U, "U"), _orthonormal(V, "V")
    Qv = Qv.to(device=Qu.device, dtype=torch.promote_types(Qu.dtype, Qv.dtype))
    Qu = Qu.to(Qv.dtype)
    if Qu.shape[0] != Qv.shape[0]:
        raise ValueError(
            f"U, V: expected bases with the same number of rows, got {tuple(Qu.shape)} "
            f"and {tuple(Qv.shape)}"
        )
    if Qu.shape[1] < Qv.shape[1]:
        Qu, Qv = Qv, Qu
    cos = torch.linalg.svdvals(Qu.mH @ Qv).clamp(max=1.0)  # descending -> angles ascending
    resid = Qv - Qu @ (Qu.mH @ Qv)
    sin = torch.linalg.svdvals(resid).clamp(max=1.0).flip(0)  # ascending
    small = sin**2 < 0.5
    theta = torch.where(small, torch.arcsin(sin), torch.arccos(cos))
    return kr.to_output(theta.clamp(0.0, math.pi / 2), kind)


def subspace_similarity(U: Any, V: Any) -> float:
    r"""Mean cosine of the principal angles, :math:`\frac{1}{q}\sum_i \cos\theta_i \in [0, 1]`.

    1 for equal subspaces, 0 for orthogonal ones; the subspace-overlap measure of seed 004
    section 3.5.

    Examples
    --------
    >>> import numpy as np
    >>> subspace_similarity(np.eye(4)[:, :2], np.eye(4)[:, 1:3])
    0.5
    """
    theta = principal_angles(U, V)
    t = theta if isinstance(theta, torch.Tensor) else torch.as_tensor(theta)
    return float(torch.cos(t).mean())


def _kind(X: Any) -> str:
    return array_kind(_unwrap(X))


def _unwrap(X: Any) -> Any:
    for name in ("eigenvectors", "right_vectors"):
        if hasattr(X, name) and not hasattr(X, "shape"):
            return getattr(X, name)
    return X


def _orthonormal(X: Any, name: str) -> torch.Tensor:
    X = _unwrap(X)
    if isinstance(X, torch.Tensor):
        T = X
    else:
        T, _ = to_torch(X, dtype=torch.float64, device=torch.device("cpu"))
    # float64 throughout: small angles are only as accurate as the working precision
    T = T.to(torch.complex128 if T.is_complex() else torch.float64)
    if T.ndim != 2 or T.shape[1] == 0:
        raise ValueError(f"{name}: expected a 2-d basis (n, p) with p >= 1, got {tuple(T.shape)}")
    if not bool(torch.isfinite(T).all()):
        raise ValueError(f"{name}: expected finite entries, got NaN or inf")
    Q, R = torch.linalg.qr(T)
    d = torch.linalg.diagonal(R).abs()
    if bool(d.max() == 0) or bool(d.min() <= max(T.shape) * torch.finfo(T.dtype).eps * d.max()):
        raise ValueError(
            f"{name}: expected linearly independent columns, got a rank-deficient basis"
        )
    return Q
