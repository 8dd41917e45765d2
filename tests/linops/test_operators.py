"""Model operators against dense float64 references built independently with torch.func."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse.linalg as sla
import torch
from torch.func import functional_call, hessian, jacrev

import linops
from linops.testing import check_operator
from tests.cases import CASES, Case

RTOL = 1e-10
ROUTES = ["auto", "autograd"]  # auto: the chain route (linops/_chain.py) on every case


def _flat_fn(case: Case):
    """theta (flat, in named_parameters order of the selected names) -> dict of tensors."""
    named = dict(case.model.named_parameters())
    names = case.params or list(named)
    shapes = [named[n].shape for n in names]
    sizes = [named[n].numel() for n in names]
    theta0 = torch.cat([named[n].detach().reshape(-1) for n in names])

    def unflat(theta):
        return {
            n: t.reshape(s)
            for n, t, s in zip(names, torch.split(theta, sizes), shapes, strict=True)
        }

    return theta0, unflat


def _dense_jacobian(case: Case, X=None):
    theta0, unflat = _flat_fn(case)
    X = case.X if X is None else X
    return jacrev(lambda th: functional_call(case.model, unflat(th), (X,)).reshape(-1))(theta0)


def _dense_hessian(case: Case):
    theta0, unflat = _flat_fn(case)
    return hessian(
        lambda th: case.loss(functional_call(case.model, unflat(th), (case.X,)), case.y)
    )(theta0)


def _dense_ggn(case: Case):
    theta0, unflat = _flat_fn(case)
    out = functional_call(case.model, unflat(theta0), (case.X,)).detach()
    Jf = jacrev(lambda th: functional_call(case.model, unflat(th), (case.X,)))(theta0)
    Jf = Jf.reshape(out.numel(), -1)
    H_out = hessian(lambda o: case.loss(o.reshape(out.shape), case.y))(out.reshape(-1))
    return Jf.T @ H_out @ Jf


def _close(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


ids = [c.name for c in CASES]


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("case", CASES, ids=ids)
@pytest.mark.parametrize("batch_size", [None, 2])
def test_jacobian_matches_jacrev(case: Case, batch_size: int | None, route: str) -> None:
    J = linops.JacobianOperator(case.model, case.X, case.params, batch_size=batch_size, route=route)
    D = _dense_jacobian(case)
    assert J.shape == tuple(D.shape)
    assert _close(J.to_dense(), D) < RTOL
    V = torch.randn(J.shape[1], 5, dtype=torch.float64)
    Y = torch.randn(J.shape[0], 4, dtype=torch.float64)
    assert _close(J @ V, D @ V) < RTOL
    assert _close(J.T @ Y, D.T @ Y) < RTOL
    assert _close(J @ V[:, 0], D @ V[:, 0]) < RTOL
    assert _close(J.rmatvec(Y[:, 0]), D.T @ Y[:, 0]) < RTOL
    check_operator(J, dense=D)
    if route == "auto":  # every case is a chain (the CNN of convolutions and max pooling)
        assert J.route == "chain"


@pytest.mark.parametrize("case", CASES[:3], ids=ids[:3])
def test_jacobian_output_index_is_a_row_slice(case: Case) -> None:
    D = _dense_jacobian(case)
    d_out = D.shape[0] // len(case.X)
    j = d_out - 1
    J = linops.JacobianOperator(case.model, case.X, case.params, output_index=j)
    assert _close(J.to_dense(), D[j::d_out]) < RTOL


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_ntk_is_j_jt(case: Case) -> None:
    D = _dense_jacobian(case)
    K = linops.NTKOperator(case.model, case.X, params=case.params, batch_size=3)
    assert K.is_symmetric
    assert _close(K.to_dense(), D @ D.T) < RTOL
    X2 = case.X[:2] * 0.5
    D2 = _dense_jacobian(case, X2)
    K12 = linops.NTKOperator(case.model, case.X, X2, params=case.params)
    assert K12.shape == (D.shape[0], D2.shape[0])
    assert _close(K12.to_dense(), D @ D2.T) < RTOL
    assert _close(K12.H.to_dense(), D2 @ D.T) < RTOL


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("case", CASES, ids=ids)
@pytest.mark.parametrize("batch_size", [None, 2])
def test_hessian_matches_torch_func(case: Case, batch_size: int | None, route: str) -> None:
    H = linops.HessianOperator(
        case.model, case.loss, (case.X, case.y), case.params, batch_size=batch_size, route=route
    )
    D = _dense_hessian(case)
    assert _close(H.to_dense(), D) < RTOL
    check_operator(H, dense=D)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("case", CASES, ids=ids)
def test_ggn_matches_explicit_jt_h_j(case: Case, route: str) -> None:
    G = linops.GGNOperator(
        case.model, case.loss, (case.X, case.y), case.params, batch_size=4, route=route
    )
    D = _dense_ggn(case)
    assert _close(G.to_dense(), D) < RTOL
    check_operator(G, dense=D)


def test_data_loader_batches_give_the_same_operator() -> None:
    case = CASES[0]
    ds = torch.utils.data.TensorDataset(case.X, case.y)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, shuffle=False)
    H = linops.HessianOperator(case.model, case.loss, loader)
    assert _close(H.to_dense(), _dense_hessian(case)) < RTOL


@pytest.mark.parametrize("case", CASES[:2], ids=ids[:2])
def test_output_hessian_exact_and_finite_difference(case: Case) -> None:
    theta0, unflat = _flat_fn(case)
    x = case.X[:1]
    D = hessian(lambda th: functional_call(case.model, unflat(th), (x,))[0, 1])(theta0)
    exact = linops.OutputHessianOperator(case.model, x, 1, params=case.params)
    assert _close(exact.to_dense(), D) < RTOL
    fd = linops.OutputHessianOperator(
        case.model, x, 1, method="finite_difference", params=case.params
    )
    assert _close(fd.to_dense(), D) < 1e-7
    grad = jacrev(lambda th: functional_call(case.model, unflat(th), (x,))[0, 1])(theta0)
    assert _close(exact.gradient(), grad) < RTOL


def test_float32_operators_return_float32() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    X, y = torch.randn(6, 3), torch.randint(0, 2, (6,))
    H = linops.HessianOperator(model, torch.nn.functional.cross_entropy, (X, y))
    assert H.dtype == np.float32
    # float64 in: computed in the operator's float32, returned in the promoted float64
    assert (H @ np.ones(H.shape[1])).dtype == np.float64
    assert (H @ np.ones(H.shape[1], dtype=np.float32)).dtype == np.float32
    assert (H @ torch.ones(H.shape[1])).dtype == torch.float32
    assert (H @ torch.ones(H.shape[1], dtype=torch.float64)).dtype == torch.float64
    J64 = linops.JacobianOperator(model, X, dtype=torch.float64)
    assert (J64 @ torch.ones(J64.shape[1], dtype=torch.float64)).dtype == torch.float64


# ------------------------------------------------------------------ scipy solvers run directly
def test_scipy_eigsh_svds_lsqr_cg_agree_with_dense() -> None:
    case = CASES[0]
    H = linops.HessianOperator(case.model, case.loss, (case.X, case.y))
    Hd = _dense_hessian(case).numpy()
    evals = np.linalg.eigvalsh(Hd)
    top = sla.eigsh(H, k=3, which="LA", tol=1e-12)[0]
    np.testing.assert_allclose(np.sort(top), evals[-3:], rtol=1e-9)

    J = linops.JacobianOperator(case.model, case.X)
    Jd = _dense_jacobian(case).numpy()
    s = sla.svds(J, k=3, tol=1e-12, random_state=0)[1]
    np.testing.assert_allclose(np.sort(s), np.linalg.svd(Jd, compute_uv=False)[:3][::-1], rtol=1e-9)

    b = np.random.default_rng(0).standard_normal(J.shape[0])
    x_lsqr = sla.lsqr(J, b, atol=1e-14, btol=1e-14, iter_lim=2000)[0]
    x_ref = np.linalg.lstsq(Jd, b, rcond=None)[0]
    # the normal equations hold, and the residual is as small as the dense least-squares one
    np.testing.assert_allclose(Jd.T @ (Jd @ x_lsqr - b), 0, atol=1e-8)
    res, res_ref = np.linalg.norm(Jd @ x_lsqr - b), np.linalg.norm(Jd @ x_ref - b)
    assert res <= res_ref + 1e-9 * np.linalg.norm(b)

    G = linops.GGNOperator(case.model, case.loss, (case.X, case.y))
    shifted = G + 1e-1 * linops.IdentityOperator(G.shape[0])
    rhs = np.random.default_rng(1).standard_normal(G.shape[0])
    x_cg, info = sla.cg(shifted, rhs, rtol=1e-12, maxiter=5000)
    assert info == 0
    Gd = _dense_ggn(case).numpy() + 1e-1 * np.eye(G.shape[0])
    np.testing.assert_allclose(x_cg, np.linalg.solve(Gd, rhs), rtol=1e-7)


# ------------------------------------------------------------------ bad input, clear errors
def _small():
    model = torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)
    ).double()
    X, y = torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 2, (5,))
    return model, X, y


def test_errors_on_bad_vectors() -> None:
    model, X, y = _small()
    H = linops.HessianOperator(model, torch.nn.functional.cross_entropy, (X, y))
    n = H.shape[1]
    with pytest.raises(ValueError, match=r"x: dimension mismatch, expected shape \(26,\)"):
        H @ torch.ones(n + 1, dtype=torch.float64)
    with pytest.raises(TypeError, match="x: expected float16, float32, float64, complex64 or"):
        H @ np.ones(n, dtype=np.longdouble)
    bad = torch.ones(n, dtype=torch.float64)
    bad[3] = float("nan")
    with pytest.raises(ValueError, match="x: contains NaN or inf"):
        H @ bad
    with pytest.raises(ValueError, match="x: contains NaN or inf"):
        H @ np.full(n, np.inf)
    with pytest.raises(TypeError, match="expected a numeric array"):
        H @ np.array(["a"] * n)
    J = linops.JacobianOperator(model, X)
    with pytest.raises(ValueError, match=r"y: dimension mismatch"):
        J.rmatvec(np.ones(3))


def test_errors_on_bad_data_models_losses_params() -> None:
    model, X, y = _small()
    ce = torch.nn.functional.cross_entropy
    with pytest.raises(ValueError, match="data: expected at least one sample"):
        linops.HessianOperator(model, ce, (X[:0], y[:0])) @ torch.ones(26, dtype=torch.float64)
    with pytest.raises(ValueError, match="data: expected at least one sample"):
        linops.JacobianOperator(model, X[:0])
    frozen = torch.nn.Linear(2, 2)
    frozen.requires_grad_(False)
    with pytest.raises(ValueError, match="model: expected at least one trainable parameter"):
        linops.JacobianOperator(frozen, X)
    no_reduction = torch.nn.CrossEntropyLoss(reduction="none")
    H = linops.HessianOperator(model, no_reduction, (X, y))
    with pytest.raises(ValueError, match="loss_fn: CrossEntropyLoss has reduction='none'"):
        H @ torch.ones(26, dtype=torch.float64)
    with pytest.raises(
        ValueError, match=r"params: \['nope'\] are not parameters|params: 'nope' is neither"
    ):
        linops.JacobianOperator(model, X, params=["nope"])
    with pytest.raises(ValueError, match="does not belong to the model"):
        linops.JacobianOperator(model, X, params=[torch.nn.Parameter(torch.ones(2))])
    with pytest.raises(ValueError, match="data: expected inputs and targets of equal length"):
        linops.HessianOperator(model, ce, (X, y[:2])) @ torch.ones(26, dtype=torch.float64)
    with pytest.raises(ValueError, match="output_index: expected an integer in"):
        linops.JacobianOperator(model, X, output_index=5)
    with pytest.raises(ValueError, match="reduction: expected"):
        linops.HessianOperator(model, ce, (X, y), reduction="max")
    with pytest.raises(TypeError, match="loss_fn: expected a callable"):
        linops.HessianOperator(model, "ce", (X, y))
    with pytest.raises(ValueError, match="method: expected 'exact' or 'finite_difference'"):
        linops.OutputHessianOperator(model, X[:1], 0, method="fd")


def test_refuses_training_mode_dropout_and_reshuffling_loaders() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Dropout(0.5), torch.nn.Linear(4, 2))
    X, y = torch.randn(5, 3), torch.randint(0, 2, (5,))
    with pytest.raises(ValueError, match=r"model: is in training mode and contains \['Dropout'\]"):
        linops.JacobianOperator(model, X)
    linops.JacobianOperator(model, X, allow_train_mode=True)  # the escape hatch
    model.eval()
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(X, y), batch_size=2, shuffle=True
    )
    with pytest.raises(
        ValueError, match="data: the DataLoader.s sampler .RandomSampler. draws a different order"
    ):
        linops.HessianOperator(model, torch.nn.functional.cross_entropy, loader)
    linops.HessianOperator(model, torch.nn.functional.cross_entropy, loader, allow_reshuffle=True)


def test_batchnorm_buffers_are_held_fixed_in_eval_mode() -> None:
    torch.manual_seed(1)
    model = torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2)
    ).double()
    X = torch.randn(6, 3, dtype=torch.float64)
    model.train()
    model(X)  # give the running statistics non-trivial values
    model.eval()
    before = model[1].running_mean.clone()
    case = Case(
        "bn", model, X, torch.zeros(6, dtype=torch.long), torch.nn.functional.cross_entropy, None
    )
    J = linops.JacobianOperator(model, X)
    assert _close(J.to_dense(), _dense_jacobian(case)) < RTOL
    assert torch.equal(model[1].running_mean, before)


def test_inputs_only_operators_read_a_list_of_tensors_as_batches() -> None:
    """A list of two equal-length input batches was read as an (X, y) pair: half the data was
    silently dropped. A list is batches; a tuple is (X, y) with y ignored."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)
    ).double()
    X = torch.randn(8, 4, dtype=torch.float64)
    J = linops.JacobianOperator(model, X).to_dense()
    for batches in ([X[:4], X[4:]], [X[:3], X[3:6], X[6:]], [X[:5], X[5:]]):
        got = linops.JacobianOperator(model, batches).to_dense()
        assert torch.allclose(got, J, rtol=1e-14, atol=1e-14)
    K = linops.NTKOperator(model, [X[:4], X[4:]])
    assert K.shape == (24, 24)
    assert torch.allclose(K.to_dense(), J @ J.T, rtol=1e-13, atol=1e-13)
    pair = linops.JacobianOperator(model, (X, torch.zeros(8, dtype=torch.long)))
    assert torch.allclose(pair.to_dense(), J, rtol=1e-14, atol=1e-14)
    with pytest.raises(ValueError, match="equal length, got 4 and 3 .input batches: pass them"):
        linops.JacobianOperator(model, (X[:4], X[4:7]))


def test_a_batch_of_zero_weight_classes_only_adds_nothing() -> None:
    """CrossEntropyLoss(weight=...) over batches, one holding only classes of weight 0: torch's
    loss on that batch alone is 0 / 0; it raised "the product contains NaN". Also ignore_index."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)
    ).double()
    X = torch.randn(8, 4, dtype=torch.float64)
    y = torch.tensor([1, 2, 0, 0, 0, 1, 2, 0])
    weighted = torch.nn.CrossEntropyLoss(weight=torch.tensor([0.0, 1.0, 3.0], dtype=torch.float64))
    ignored = y.masked_fill(y == 0, -100)
    for loss, t in ((weighted, y), (torch.nn.CrossEntropyLoss(), ignored)):
        batches = [(X[:2], t[:2]), (X[2:5], t[2:5]), (X[5:], t[5:])]
        for cls in (linops.HessianOperator, linops.GGNOperator, linops.EmpiricalFisherOperator):
            ref = cls(model, loss, (X, t)).to_dense()
            got = cls(model, loss, batches).to_dense()
            assert torch.allclose(got, ref, rtol=1e-13, atol=1e-15), cls.__name__
        ef = linops.EmpiricalFisherOperator(model, loss, batches).diagonal()
        assert torch.allclose(ef, ref.diagonal(), rtol=1e-13, atol=1e-15)


def test_an_empty_batch_among_others_is_refused_by_name() -> None:
    """It failed deep inside ('cannot reshape tensor of 0 elements')."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 3)).double()
    X, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    data = [(X[:3], y[:3]), (X[:0], y[:0]), (X[3:], y[3:])]
    for cls in (linops.GGNOperator, linops.EmpiricalFisherOperator, linops.KFACOperator):
        with pytest.raises(ValueError, match="data: batch 1 has no samples"):
            cls(model, torch.nn.CrossEntropyLoss(), data).to_dense()
    with pytest.raises(ValueError, match="data: batch 1 has no samples"):
        linops.JacobianOperator(model, [{"input": X[:2]}, {"input": X[:0]}]).to_dense()
