r"""Checks and hypothesis strategies for operators, for this package's tests and for users'.

:func:`check_operator` is a ``gradcheck`` for linear operators: it verifies the laws any
``A`` must satisfy (linearity, the adjoint identity :math:`\langle A x, y\rangle =
\langle x, A^\top y\rangle`, agreement of ``matvec`` and ``matmat``, symmetry where claimed,
agreement with a dense reference for small operators) on random vectors, and raises an
``AssertionError`` that says which law failed and by how much. The :class:`CheckReport` it
returns holds each law's relative error, and in ``skipped`` the laws it did not check and why
(``print(report)`` shows both).

The strategies build small random models, inputs and operators for property-based tests::

    from hypothesis import given
    from linops.testing import check_operator, jacobian_operators

    @given(jacobian_operators())
    def test_my_jacobian_laws(J):
        check_operator(J)
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import NamedTuple, cast

import torch
from hypothesis import strategies as st
from torch import nn

from linops._krylov import make_generator
from linops._types import OperatorLike
from linops.base import TorchLinearOperator, aslinearoperator

__all__ = [
    "CheckReport",
    "check_operator",
    "dense_operators",
    "hessian_operators",
    "inputs_for",
    "jacobian_operators",
    "small_models",
    "with_singular_values",
]


class CheckReport(NamedTuple):
    """Relative errors measured by :func:`check_operator`; ``skipped`` says what was not checked.

    A law that was not checked has the error ``nan`` and an entry in ``skipped`` (law name ->
    the reason, and how to run it); ``str(report)`` lists both.
    """

    linearity: float
    adjoint: float
    matvec_matmat: float
    symmetry: float
    dense: float
    #: the checks that did not run, by field name, with the reason
    skipped: Mapping[str, str] = MappingProxyType({})

    def __str__(self) -> str:
        """Return one line per law: its relative error, or ``skipped (reason)``."""
        lines = []
        for law in self._fields[:-1]:
            if law in self.skipped:
                lines.append(f"{law}: skipped ({self.skipped[law]})")
            else:
                lines.append(f"{law}: relative error {getattr(self, law):.3e}")
        return "\n".join(lines)


def check_operator(
    A: OperatorLike,
    *,
    dense: torch.Tensor | None = None,
    rtol: float | None = None,
    num_vectors: int = 3,
    seed: int | torch.Generator | None = 0,
    max_dense_size: int = 4096,
) -> CheckReport:
    """Check the laws a linear operator must satisfy; raise ``AssertionError`` if one fails.

    Parameters
    ----------
    A
        The operator (anything :func:`linops.aslinearoperator` accepts).
    dense
        A trusted dense matrix to compare with. Default: none given, and for operators with
        at most ``max_dense_size`` columns, ``A.to_dense()`` is checked column-by-column
        against ``A @ e_i`` products (consistency of the two paths).
    rtol
        Relative tolerance; default ``1e3 * eps`` of the operator's dtype (about 2e-13 in
        float64, 1e-4 in float32).
    num_vectors
        Number of random vectors per law.
    seed
        Seed of the random vectors: an int (default 0), a ``torch.Generator`` on the
        operator's device (advanced) or None (fresh entropy).
    max_dense_size
        Largest column count for which the dense comparison runs.

    Returns
    -------
    CheckReport
        The relative error of each law; ``report.skipped`` maps each law that was not
        checked (``nan`` in the report) to the reason: ``symmetry`` for an operator that
        does not claim ``is_symmetric``, ``dense`` for one with more than
        ``max_dense_size`` columns and no ``dense`` matrix given.

    Raises
    ------
    AssertionError
        Naming the first law whose relative error exceeds ``rtol``.

    Examples
    --------
    >>> import torch
    >>> report = check_operator(torch.randn(4, 3, dtype=torch.float64))
    >>> report.adjoint < 1e-12
    True
    >>> report.skipped
    {'symmetry': 'the operator does not claim is_symmetric'}
    """
    op = aslinearoperator(A)
    m, n = op.shape
    dtype, device = op.torch_dtype, op.device
    tol = rtol if rtol is not None else 1e3 * torch.finfo(dtype).eps
    g = make_generator(seed, device)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=dtype, device=device)

    X, Y = randn(n, num_vectors), randn(m, num_vectors)
    AX, ATY = op @ X, op.H @ Y
    a, b = randn(1).item(), randn(1).item()
    lin = _rel(
        op @ (a * X[:, 0] + b * X[:, 1 % num_vectors]), a * AX[:, 0] + b * AX[:, 1 % num_vectors]
    )
    _require(lin, tol, "linearity: A(a x + b y) != a A x + b A y")
    adj = _adjoint_error(X, AX, Y, ATY)
    _require(adj, tol, "adjoint identity: <A x, y> != <x, A^T y>")
    mv = max(_rel(op @ X[:, i], AX[:, i]) for i in range(num_vectors))
    _require(mv, tol, "matvec/matmat agreement: A @ x differs from column of A @ X")
    sym = den = float("nan")
    skipped: dict[str, str] = {}
    if op.is_symmetric:
        sym = _rel(AX, op.H @ X)
        _require(sym, tol, "symmetry: the operator claims to be symmetric but A x != A^T x")
    else:
        skipped["symmetry"] = "the operator does not claim is_symmetric"
    if dense is not None:
        D = dense.to(dtype=dtype, device=device)
        den = max(_rel(AX, D @ X), _rel(ATY, D.mH @ Y))
        _require(den, tol, "dense agreement: products differ from the given dense matrix")
    elif n <= max_dense_size:
        D = op.to_dense()
        den = _rel(D @ X, AX)
        _require(den, tol, "dense agreement: to_dense() @ x differs from A @ x")
    else:
        skipped["dense"] = (
            f"no dense matrix given and the operator has {n} columns > max_dense_size="
            f"{max_dense_size}; pass dense= or a larger max_dense_size to run it"
        )
    return CheckReport(lin, adj, mv, sym, den, skipped)


def _adjoint_error(X: torch.Tensor, AX: torch.Tensor, Y: torch.Tensor, ATY: torch.Tensor) -> float:
    r"""Return the largest relative adjoint defect over the columns.

    The defect is :math:`|\langle A x, y\rangle - \langle x, A^H y\rangle|` relative to
    :math:`\max(\|A x\| \|y\|, \|x\| \|A^H y\|)`.

    Both inner products are computed to within about eps times that scale, whereas
    :math:`\|A x\| \|y\|` alone can be far smaller when :math:`A x` cancels (a 1 x 2
    operator with ``x`` nearly orthogonal to its row failed at 4.5e-13 in float64). Each
    vector is normalised before the products, and the scales are compared through their
    logarithms, so tiny or huge operators neither underflow nor overflow.
    """
    n_x, n_ax, n_y, n_aty = (_col_scale(T) for T in (X, AX, Y, ATY))
    lhs = ((AX / n_ax) * (Y / n_y)).sum(0)
    rhs = ((X / n_x) * (ATY / n_aty)).sum(0)
    log_p, log_q = n_ax.log() + n_y.log(), n_x.log() + n_aty.log()
    top = torch.maximum(log_p, log_q)
    return float((lhs * (log_p - top).exp() - rhs * (log_q - top).exp()).abs().max())


def _col_scale(A: torch.Tensor) -> torch.Tensor:
    norms = A.norm(dim=0)
    return torch.where(norms > 0, norms, torch.ones_like(norms))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = max(float(b.abs().max()), float(a.abs().max()))
    if scale == 0:
        return 0.0
    return float(
        (a / scale - b / scale).norm() / max(float((b / scale).norm()), float((a / scale).norm()))
    )


def _require(err: float, tol: float, message: str) -> None:
    if not err <= tol:
        raise AssertionError(f"{message}: relative error {err:.3e} > rtol {tol:.3e}")


def with_singular_values(s: torch.Tensor, seed: int | torch.Generator | None = 0) -> torch.Tensor:
    r"""Return a dense float64 square matrix with singular values ``s``.

    The matrix is :math:`U \operatorname{diag}(s) W^\top` with random orthogonal ``U``, ``W``
    (QR factors of Gaussians from one generator made from ``seed``: an int, a CPU
    ``torch.Generator`` or None): a matrix with a known
    spectrum for checking rank, SVD and counting routines.
    """
    g = make_generator(seed, torch.device("cpu"))
    n = s.numel()
    U = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]
    W = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]
    return U @ torch.diag(s.to(torch.float64)) @ W.T


# --------------------------------------------------------------------------- strategies
_ACTS = (nn.Tanh, nn.GELU, nn.Softplus, nn.SiLU)


@st.composite
def small_models(
    draw: st.DrawFn, *, d_in: int | None = None, max_width: int = 6, max_depth: int = 2
) -> nn.Module:
    """Random small float64 MLPs (smooth activations, 1-3 outputs), seeded by hypothesis."""
    d_in = d_in or draw(st.integers(1, 4))
    depth = draw(st.integers(0, max_depth))
    widths = [draw(st.integers(1, max_width)) for _ in range(depth)]
    d_out = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    dims = [d_in, *widths, d_out]
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1], bias=draw(st.booleans())))
        if i < len(dims) - 2:
            layers.append(draw(st.sampled_from(_ACTS))())
    model = nn.Sequential(*layers).double().eval()
    model.d_in = d_in  # type: ignore[assignment]
    return model


@st.composite
def inputs_for(draw: st.DrawFn, model: nn.Module, *, max_samples: int = 5) -> torch.Tensor:
    """Random float64 inputs ``(n, d_in)`` for a model from :func:`small_models`."""
    n = draw(st.integers(1, max_samples))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, cast(int, model.d_in), generator=g, dtype=torch.float64)


@st.composite
def jacobian_operators(draw: st.DrawFn) -> TorchLinearOperator:
    """Jacobian operators of random small models on random inputs."""
    from linops.jacobian import JacobianOperator

    model = draw(small_models())
    X = draw(inputs_for(model))
    return JacobianOperator(model, X, batch_size=draw(st.integers(1, len(X))))


@st.composite
def hessian_operators(draw: st.DrawFn) -> TorchLinearOperator:
    """Loss Hessians (MSE, summed or averaged) of random small models on random data."""
    from linops.hessian import HessianOperator

    model = draw(small_models())
    X = draw(inputs_for(model))
    d_out = model(X[:1]).shape[1]
    y = torch.randn(len(X), d_out, dtype=torch.float64)
    loss = nn.MSELoss(reduction=draw(st.sampled_from(["mean", "sum"])))
    return HessianOperator(model, loss, (X, y), batch_size=draw(st.integers(1, len(X))))


@st.composite
def dense_operators(
    draw: st.DrawFn, *, max_size: int = 8, symmetric: bool | None = None
) -> TorchLinearOperator:
    """Random dense float64 operators (symmetric ones when ``symmetric`` is true)."""
    m = draw(st.integers(1, max_size))
    sym = draw(st.booleans()) if symmetric is None else symmetric
    n = m if sym else draw(st.integers(1, max_size))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    A = torch.randn(m, n, generator=g, dtype=torch.float64)
    if sym:
        A = A + A.T
        op = aslinearoperator(A)
        op.is_symmetric = True
        return op
    return aslinearoperator(A)
