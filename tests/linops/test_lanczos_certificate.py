"""Residuals certified from the products already taken (linops/_certify.py), issue 16.

Lanczos and svds keep ``A V`` (and ``A^H U``); the residual of a Ritz vector ``V s`` is
``(A V) s - theta V s`` up to the rounding of those recombinations, which is bounded column
by column. In float32 that bound used to be ``eps sum |s_i|`` (4.6 eps at 21 columns), too
close to ``rtol = 1e-6``, so every float32 run ended with a block product of ``k`` (Lanczos)
or ``2k`` (svds) vectors. Now the recombination runs in float64 and its rounding is measured.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from linops import TorchLinearOperator
from linops._certify import carry, recombine
from linops.lanczos import lanczos
from linops.svds import svds


class _Recording(TorchLinearOperator):
    """A dense matrix that records the width of every block it is applied to."""

    def __init__(self, A: torch.Tensor) -> None:
        self.A, self.widths = A, []
        super().__init__(tuple(A.shape), dtype=A.dtype, device=A.device)

    def _matmat_torch(self, X: torch.Tensor) -> torch.Tensor:
        self.widths.append(X.shape[1])
        return self.A @ X

    def _rmatmat_torch(self, X: torch.Tensor) -> torch.Tensor:
        self.widths.append(X.shape[1])
        return self.A.mH @ X


def _haar(n: int, r: int, seed: int) -> np.ndarray:
    return np.linalg.qr(np.random.default_rng(seed).standard_normal((n, r)))[0]


@pytest.mark.parametrize("name", ["1/i", "0.9^i"])
def test_float32_lanczos_certifies_without_a_final_product(name: str) -> None:
    """Top-10 at rtol 1e-6, ncv 21 in float32 (bench/algorithms.py's three 1.25-1.41x cases
    were these): the same products as float64 on the same matrix and start (no final block of
    10), converged, and every reported residual at least the true one of the float32 matrix."""
    n, k = 600, 10
    i = np.arange(1.0, n + 1)
    lam = 1 / i if name == "1/i" else 0.9 ** (i - 1)
    Q = _haar(n, n, 3)
    A64 = (Q * lam) @ Q.T
    A64 = (A64 + A64.T) / 2
    v0 = np.random.default_rng(0).standard_normal(n)
    counts = {}
    for dt in (torch.float64, torch.float32):
        op = _Recording(torch.from_numpy(A64).to(dt))
        res = lanczos(op, k, "LA", rtol=1e-6, ncv=21, v0=torch.from_numpy(v0).to(dt))
        assert res.converged
        counts[dt] = res.num_matvecs
        assert op.widths[-1] == 1  # the last product was a Lanczos step, not a check of k
        A = op.A.double()
        V, w = res.eigenvectors.double(), res.eigenvalues.double()
        true = torch.linalg.vector_norm(A @ V - V * w, dim=0)
        assert bool((res.residuals.double() >= true).all())
        assert float(res.residuals.max()) <= 1e-6 * float(np.abs(lam).max())
    assert counts[torch.float32] == counts[torch.float64]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(300, 200), (200, 300)])
def test_svds_certifies_without_final_products(dtype: torch.dtype, shape: tuple) -> None:
    """svds used two block products of k at the end; the recombined A V, A^H U certify the
    residuals (reported >= true, against the dense matrix in float64) without them.

    Up to the products' own rounding, which no certificate from the products can see: in
    float32, ``A v`` by the BLAS differs from the float64 product by up to about
    ``eps ||A||`` (0.44 ``eps`` above the reported residual on an AMD EPYC with MKL's AVX-512
    kernels, none on the CPUs of earlier runs).
    """
    m, n = shape
    r = min(m, n)
    s = 1 / np.arange(1.0, r + 1)
    A = (_haar(m, r, 0) * s) @ _haar(n, r, 1).T
    op = _Recording(torch.from_numpy(A).to(dtype))
    res = svds(op, 8, rtol=1e-6, ncv=20, seed=0)
    assert res.converged
    assert op.widths[-1] == 1 and op.widths[-2] == 1  # the last products were a step
    np.testing.assert_allclose(res.singular_values.double().numpy(), s[:8], rtol=1e-5)
    Ad = op.A.double()
    u, v = res.left_vectors.double(), res.right_vectors.double()
    sv = res.singular_values.double()
    true = torch.hypot(
        torch.linalg.vector_norm(Ad @ v - u * sv, dim=0),
        torch.linalg.vector_norm(Ad.T @ u - v * sv, dim=0),
    )
    products = float(torch.finfo(dtype).eps) * float(torch.linalg.matrix_norm(Ad, 2))
    assert bool((res.residuals.double() + products >= true).all())
    assert float(res.residuals.max()) <= 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.complex64, torch.float64])
def test_recombine_bounds_its_rounding(dtype: torch.dtype) -> None:
    """``d_Y`` bounds ``||round(X S) - X S||`` (exact reference: float64 entries of the
    inputs, summed in numpy's longdouble), ``residual`` bounds ``||AY - theta Y||``."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(5000, 21, generator=g, dtype=torch.float64).to(dtype)
    AX = 3 * torch.randn(5000, 21, generator=g, dtype=torch.float64).to(dtype)
    S = torch.randn(21, 6, generator=g, dtype=torch.float64)
    theta = torch.linspace(0.5, 2.0, 6, dtype=torch.float64).to(X.real.dtype)
    rc = recombine(X, AX, S, S, theta)
    ld = np.longdouble
    Xl, Sl = X.resolve_conj().numpy().astype(np.clongdouble if dtype.is_complex else ld), S.numpy()
    exact = Xl @ Sl.astype(ld)
    diff = rc.Y.numpy().astype(exact.dtype) - exact
    d = np.sqrt((np.abs(diff).astype(ld) ** 2).sum(axis=0)).astype(np.float64)
    assert np.all(rc.d_Y.numpy() >= d)
    if dtype != torch.float64:  # measured, so tight (float64 uses the eps sum |s_i| model)
        eps = torch.finfo(dtype).eps
        scale = np.linalg.norm(exact.astype(np.complex128), axis=0)
        assert np.all(rc.d_Y.numpy() <= 2 * eps * scale)
    Y, AY = rc.Y.to(torch.complex128), rc.AY.to(torch.complex128)
    res = torch.linalg.vector_norm(AY - Y * theta.double(), dim=0)
    assert bool((rc.residual >= res * (1 - 1e-12)).all())
    # in place: the first columns of X and AX become Y and AY
    X2, AX2 = X.clone(), AX.clone()
    rc2 = recombine(X2, AX2, S, S, inplace=True)
    assert torch.equal(X2[:, :6], rc.Y) and torch.equal(AX2[:, :6], rc.AY)
    assert torch.equal(rc2.d_Y, rc.d_Y)


def test_carry_is_the_smaller_of_two_bounds() -> None:
    err = torch.tensor([1.0, 0.0, 0.0, 0.0])
    S = torch.tensor([[1.0, 0.5], [0.0, 0.5], [0.0, 0.5], [0.0, 0.5]], dtype=torch.float64)
    np.testing.assert_allclose(carry(err, S).numpy(), [1.0, 0.5])
    err = torch.ones(4)
    np.testing.assert_allclose(carry(err, S).numpy(), [1.0, 2.0])  # ||s|| ||err|| = 2
