"""estimators.spectrum, .perturbation and .dimension (the training-Jacobian analysis of
"Understanding Gradient Descent through the Training Jacobian", sections 2-3.6) against dense
references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.func import functional_call, jacrev

from estimators.dimension import training_dimension, training_dimension_dense
from estimators.perturbation import (
    bulk_overlap,
    kl_perturbation,
    linearity_test,
    ood_inputs,
    parameter_function_jacobian,
    random_subspace_similarity,
)
from estimators.spectrum import (
    RegionRow,
    bulk_order,
    left_right_cosine,
    region_table,
    spectral_regions,
    svd_training_jacobian,
)
from linops import TrainingJacobianOperator
from trainers.functional import SGD, CosineLR, DataSchedule, TrainingRun
from trainers.models import MLP

F64 = torch.float64


@pytest.fixture(scope="module")
def tiny():
    g = torch.Generator().manual_seed(0)
    X, y = torch.rand(16, 4, generator=g, dtype=F64), torch.randint(0, 3, (16,), generator=g)
    model = MLP(4, 3, widths=(5,), activation="gelu", seed=g).double()
    run = TrainingRun(
        model, "cross_entropy", DataSchedule(X, y, 8, epochs=4), SGD(0.9), CosineLR(0.2, 8)
    )
    theta0 = run.initial_values()
    return run, theta0, jacrev(run)(theta0), X


def test_svd_and_cosines(tiny) -> None:
    _, _, J, _ = tiny
    res = svd_training_jacobian(J)
    np.testing.assert_allclose(
        res.singular_values.numpy(), np.linalg.svd(J.numpy(), compute_uv=False), rtol=1e-12
    )
    recon = res.left_vectors @ torch.diag(res.singular_values) @ res.right_vectors.T
    torch.testing.assert_close(recon, J, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(res.cosine, (res.left_vectors * res.right_vectors).sum(0))
    assert torch.all(res.cosine.abs() <= 1 + 1e-12)
    # symmetric positive definite: left = right, cosine 1
    A = torch.randn(6, 6, dtype=F64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(
        svd_training_jacobian(A @ A.T + torch.eye(6, dtype=F64)).cosine, torch.ones(6, dtype=F64)
    )


def test_regions_and_table() -> None:
    s = torch.tensor([40.0, 2.0, 1.05, 1.0 + 1e-4, 1.0, 1.0 - 1e-5, 0.95, 0.3], dtype=F64)
    r = spectral_regions(s, chaotic_threshold=1.1, bulk_tol=1e-3, stable_threshold=0.9)
    assert (r.chaotic, r.bulk, r.stable, r.other) == (2, 3, 1, 2)
    rows = region_table(s.numpy(), thresholds=[1e-1, 1e-4])
    assert rows[0] == RegionRow(threshold=0.1, chaotic=2, bulk=5, stable=1)
    assert rows[1] == RegionRow(threshold=1e-4, chaotic=3, bulk=3, stable=2)
    assert bulk_order(s)[:3].tolist() == [4, 5, 3]
    with pytest.raises(ValueError, match="thresholds: expected stable_threshold <= 1 - bulk_tol"):
        spectral_regions(s, chaotic_threshold=1.0, bulk_tol=0.1)
    with pytest.raises(ValueError, match="sigma: expected a 1-d array"):
        spectral_regions(torch.ones(2, 2))
    with pytest.raises(ValueError, match="U, V: expected two matrices of the same shape"):
        left_right_cosine(torch.ones(3, 2), torch.ones(3, 3))
    with pytest.raises(ValueError, match="J: expected a square matrix"):
        svd_training_jacobian(torch.ones(3, 2))


def test_linearity_small_stimuli_follow_jacobian(tiny) -> None:
    run, theta0, J, _ = tiny
    res = svd_training_jacobian(J)
    u, v, s = res.left_vectors[:, 0], res.right_vectors[:, 0], float(res.singular_values[0])
    lin = linearity_test(run, theta0, u, v, s, stimuli=[1e-5, 1e-4])
    np.testing.assert_allclose(lin.response, lin.predicted, rtol=1e-3)
    assert np.all(lin.orthogonal < 1e-3 * np.abs(lin.response))


def test_kl_perturbation_matches_loop(tiny) -> None:
    run, theta0, _, X = tiny
    space = run.space
    g = torch.Generator().manual_seed(4)
    D = torch.randn(run.dim, 3, generator=g, dtype=F64)
    D[:, 2] = 0.0
    kl = kl_perturbation(space, theta0, D, X, scale=0.1, batch_size=2)

    def probs(th):
        return torch.softmax(functional_call(space.model, space.unflatten(th), (X,)), -1)

    p = probs(theta0)
    for i in range(3):
        q = probs(theta0 + 0.1 * D[:, i])
        ref = (p * (p.log() - q.log())).sum(-1).mean()
        torch.testing.assert_close(kl[i], ref, atol=1e-12, rtol=1e-10)
    assert abs(float(kl[2])) < 1e-15
    sets = ood_inputs(X, seed=0)
    torch.testing.assert_close(sets.inverted, 1 - X)
    assert sets.noise.shape == X.shape and float(sets.noise.min()) >= 0
    with pytest.raises(ValueError, match="directions: expected shape"):
        kl_perturbation(space, theta0, D[:5], X)


def test_parameter_function_jacobian_and_overlaps(tiny) -> None:
    run, theta0, J, X = tiny
    space = run.space
    pfj = parameter_function_jacobian(space, theta0, X, chunk=5)

    def f(th):
        return torch.log_softmax(
            functional_call(space.model, space.unflatten(th), (X,)), -1
        ).reshape(-1)

    torch.testing.assert_close(
        pfj, torch.autograd.functional.jacobian(f, theta0), atol=1e-12, rtol=1e-12
    )
    res = svd_training_jacobian(J)
    Vb = res.right_vectors[:, bulk_order(res.singular_values)]
    ks = [1, 5, run.dim]
    same = bulk_overlap(Vb, Vb, ks)
    np.testing.assert_allclose(same, 1.0, atol=1e-10)
    base = random_subspace_similarity(Vb, ks, seed=0)
    assert base[-1] == pytest.approx(1.0) and np.all(base[:2] < 0.9)


def test_training_dimension_on_dense_matrix() -> None:
    g = torch.Generator().manual_seed(0)
    m, r = 80, 17
    U = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=F64))[0]
    W = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=F64))[0]
    s = torch.logspace(1, -1, r, dtype=F64)
    J = (
        torch.eye(m, dtype=F64)
        + U @ torch.diag(s) @ W.T
        + 1e-7 * torch.randn(m, m, generator=g, dtype=F64)
    )
    for method in ("krylov", "range_finder"):
        res = training_dimension(J, 1e-3, num_matvecs=60, block_size=4, method=method)
        assert res.rank == training_dimension_dense(J, 1e-3) == r
        assert res.num_matvecs <= 60 and res.basis_size < m
    with pytest.raises(ValueError, match="method: expected 'deflated', 'krylov' or 'range_finder'"):
        training_dimension(J, 1e-3, method="dense")
    with pytest.raises(ValueError, match="num_matvecs: expected at least 2"):
        training_dimension(J, 1e-3, num_matvecs=1)
    with pytest.raises(ValueError, match="op: expected a square operator"):
        training_dimension(torch.ones(3, 4, dtype=F64), 1e-3)


def test_training_dimension_matrix_free_on_training_run(tiny) -> None:
    run, theta0, J, _ = tiny
    op = TrainingJacobianOperator(run, theta0)
    tau = 1e-6
    res = training_dimension(op, tau, num_matvecs=2 * run.dim, block_size=4)
    assert res.rank == training_dimension_dense(J, tau)
    assert res.num_matvecs == op.num_matvecs


def test_training_jacobian_report_is_json_ready(tmp_path) -> None:
    import json

    from reports import plot_training_jacobian_report, training_jacobian_report

    r = training_jacobian_report(quick=True)
    assert r["dim"] == 1210 and len(r["singular_values"]) == 1210
    assert r["rank_matrix_free"] == r["rank_dense"] and r["products_matrix_free"] <= 605
    json.dumps(r)
    assert plot_training_jacobian_report(r, tmp_path / "tj.png").exists()


def test_training_dimension_deflated_matrix_free_on_training_run(tiny) -> None:
    """Deflated SLQ through the training run: exact with a gap above, within its error below."""
    run, theta0, J, _ = tiny
    op = TrainingJacobianOperator(run, theta0)
    res = training_dimension(op, 0.5, num_matvecs=2 * run.dim, block_size=4, method="deflated")
    assert res.rank == training_dimension_dense(J, 0.5)  # 7, all deflated: 0.5 sits in a gap
    assert res.num_matvecs == op.num_matvecs <= 2 * run.dim
    res = training_dimension(op, 0.05, num_matvecs=2 * run.dim, block_size=4, method="deflated")
    assert abs(res.rank - training_dimension_dense(J, 0.05)) <= 4 * res.error_estimate + 4  # + b
