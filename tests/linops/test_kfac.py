"""KFACOperator: closed forms against dense float64 algebra, the GGN of one layer, curvlinops."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from linops import EmpiricalFisherOperator, FisherOperator, GGNOperator, inverse
from linops.ekfac import EKFACOperator
from linops.kfac import KFACOperator

F64 = torch.float64
LOSSES = {"ce": nn.CrossEntropyLoss, "mse": nn.MSELoss, "bce": nn.BCEWithLogitsLoss}


def _setup(loss: str, n: int = 12) -> tuple[nn.Module, list]:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    X = torch.randn(n, 4, dtype=F64)
    y = {
        "ce": torch.randint(0, 3, (n,)),
        "mse": torch.randn(n, 3, dtype=F64),
        "bce": torch.randint(0, 2, (n, 3)).double(),
    }[loss]
    return model, [(X[:5], y[:5]), (X[5:], y[5:])]


def _rel(A: torch.Tensor, B: torch.Tensor) -> float:
    return float((A - B).abs().max() / B.abs().max())


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_one_linear_layer_with_mse_is_the_ggn(reduction: str, bias: bool) -> None:
    torch.manual_seed(0)
    lin = nn.Linear(4, 3, bias=bias).double()
    X, y = torch.randn(12, 4, dtype=F64), torch.randn(12, 3, dtype=F64)
    loss = nn.MSELoss(reduction=reduction)
    data = [(X[:5], y[:5]), (X[5:], y[5:])]
    K = KFACOperator(lin, loss, data, separate_weight_and_bias=False).to_dense()
    assert _rel(K, GGNOperator(lin, loss, (X, y)).to_dense()) < 1e-12
    # separate weight and bias blocks drop the cross terms: no longer the GGN
    if bias:
        Ks = KFACOperator(lin, loss, data).to_dense()
        assert _rel(Ks, GGNOperator(lin, loss, (X, y)).to_dense()) > 1e-3


def _dense_kfac(K: KFACOperator, kron=lambda A, G: torch.kron(G, A)) -> torch.Tensor:
    """Block diagonal of kron(G, A) from the factors, independently: row-major weights, and
    for a joint block the (W | b) rows permuted into the flat order (W row-major, then b)."""
    blocks = []
    for A, G in K._blocks():
        B = kron(A, G)
        out, cols = G.shape[0], A.shape[0]
        if not K.separate and cols > 1:
            inn = cols - 1  # the last column of (W | b) is the bias
            perm = [
                i * inn + j if j < inn else out * inn + i for i in range(out) for j in range(cols)
            ]
            P = torch.zeros(len(perm), len(perm), dtype=F64)
            P[perm, torch.arange(len(perm))] = 1.0
            B = P @ B @ P.T
        blocks.append(B)
    return torch.block_diag(*blocks)


@pytest.mark.parametrize("separate", [True, False])
@pytest.mark.parametrize("fisher_type", ["type-2", "mc", "empirical"])
def test_closed_forms(fisher_type: str, separate: bool) -> None:
    model, data = _setup("ce")
    K = KFACOperator(
        model, nn.CrossEntropyLoss(), data, fisher_type=fisher_type, seed=1,
        separate_weight_and_bias=separate, mc_samples=2 if fisher_type == "mc" else 1,
    )  # fmt: skip
    D = K.to_dense()
    assert _rel(D, _dense_kfac(K)) < 1e-13  # the parameter order of the flat vector
    assert abs(K.trace() - float(torch.trace(D))) < 1e-12 * abs(float(torch.trace(D)))
    assert abs(K.frobenius_norm() - float(torch.linalg.matrix_norm(D))) < 1e-12 * K.frobenius_norm()
    lam = 1e-2
    eye = torch.eye(D.shape[0], dtype=F64)
    assert abs(K.logdet(lam) - float(torch.logdet(D + lam * eye))) < 1e-10 * D.shape[0]
    inv = K.inverse(lam).to_dense()
    assert _rel(inv, torch.linalg.inv(D + lam * eye)) < 1e-10

    # heuristic damping: (A + pi sqrt(lam) I)^-1 (x) (G + sqrt(lam)/pi I)^-1, built densely
    def damped(A: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
        pi = float(((torch.trace(A) / A.shape[0]) / (torch.trace(G) / G.shape[0])).sqrt())
        Ad = A + max(pi * lam**0.5, 1e-8) * torch.eye(A.shape[0], dtype=F64)
        Gd = G + max(lam**0.5 / pi, 1e-8) * torch.eye(G.shape[0], dtype=F64)
        return torch.kron(torch.linalg.inv(Gd), torch.linalg.inv(Ad))

    assert _rel(K.inverse(lam, heuristic=True).to_dense(), _dense_kfac(K, damped)) < 1e-10


def test_kfac_preconditions_cg_on_the_ggn() -> None:
    model, data = _setup("ce", n=40)
    X = torch.cat([x for x, _ in data])
    y = torch.cat([t for _, t in data])
    G = GGNOperator(model, nn.CrossEntropyLoss(), (X, y))
    lam = 1e-3
    K = KFACOperator(model, nn.CrossEntropyLoss(), data)
    B = torch.randn(G.shape[0], 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    plain = inverse(G, damping=lam, rtol=1e-10, block=False)
    pre = inverse(G, damping=lam, rtol=1e-10, block=False, preconditioner=K.inverse(lam))
    ref = torch.linalg.solve(G.to_dense() + lam * torch.eye(G.shape[0], dtype=F64), B)
    assert _rel(pre @ B, ref) < 1e-8 and _rel(plain @ B, ref) < 1e-8
    assert pre.info.iterations < plain.info.iterations


def test_curvlinops_agreement() -> None:
    curvlinops = pytest.importorskip("curvlinops")
    for loss in ("ce", "mse", "bce"):
        for reduction in ("mean", "sum"):
            for fisher_type in ("type-2", "mc", "empirical"):
                model, data = _setup(loss)
                fn = LOSSES[loss](reduction=reduction)
                kw = {"mc_samples": 2} if fisher_type == "mc" else {}
                theirs = curvlinops.KFACLinearOperator(
                    model, fn, list(model.parameters()), data, fisher_type=fisher_type,
                    seed=5, check_deterministic=False, **kw,
                )  # fmt: skip
                eye = torch.eye(theirs.shape[1], dtype=F64)
                ours = KFACOperator(model, fn, data, fisher_type=fisher_type, seed=5, **kw)
                assert _rel(ours.to_dense(), theirs @ eye) < 1e-12, (loss, reduction, fisher_type)
                if (loss, reduction) == ("ce", "mean"):
                    inv = curvlinops.KFACInverseLinearOperator(
                        theirs, damping=1e-2, use_exact_damping=True
                    )
                    assert _rel(ours.inverse(1e-2).to_dense(), inv @ eye) < 1e-12
                    assert abs(ours.trace() - float(theirs.trace)) < 1e-12 * ours.trace()
                    fro = float(theirs.frobenius_norm)
                    assert abs(ours.frobenius_norm() - fro) < 1e-12 * fro


def test_errors() -> None:
    model, data = _setup("ce")
    with pytest.raises(ValueError, match="fisher_type: expected one of"):
        KFACOperator(model, nn.CrossEntropyLoss(), data, fisher_type="exact")
    with pytest.raises(ValueError, match="mc_samples: expected an integer >= 1"):
        KFACOperator(model, nn.CrossEntropyLoss(), data, mc_samples=0)
    with pytest.raises(ValueError, match="loss_fn: expected nn.CrossEntropyLoss"):
        KFACOperator(model, nn.L1Loss(), data)
    conv = nn.Sequential(nn.Conv2d(2, 2, 3, groups=2), nn.Flatten(), nn.Linear(8, 3)).double()
    Xi = torch.randn(4, 2, 4, 4, dtype=F64)
    cdata = (Xi, torch.zeros(4, dtype=torch.long))
    circular = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1, padding_mode="circular"), nn.Flatten())
    with pytest.raises(ValueError, match="padding_mode='zeros'"):
        KFACOperator(circular.double(), nn.CrossEntropyLoss(), cdata)
    # leaving a convolution out of params is fine
    KFACOperator(conv, nn.CrossEntropyLoss(), cdata, params=["2.weight", "2.bias"]).to_dense()
    norm = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3)).double()
    with pytest.raises(ValueError, match="params: expected only weights and biases of nn.Linear"):
        KFACOperator(
            norm, nn.MSELoss(), (torch.randn(4, 4, dtype=F64), torch.zeros(4, 3, dtype=F64))
        )
    with pytest.raises(ValueError, match="kfac_approx: expected 'expand' or 'reduce'"):
        KFACOperator(model, nn.CrossEntropyLoss(), data, kfac_approx="mean")
    with pytest.raises(ValueError, match="damping: expected a number > 0"):
        KFACOperator(model, nn.CrossEntropyLoss(), data).inverse(0.0)


@pytest.mark.parametrize("fisher_type", ["type-2", "empirical"])
def test_ekfac_eigenvalues_are_the_exact_blocks_diagonal_in_the_kfac_basis(
    fisher_type: str,
) -> None:
    """E = diag(Q^T F_l Q) with Q = Q_G (x) Q_A and F_l the layer's block of the exact Fisher
    (type-2: the FisherOperator; empirical: the EmpiricalFisherOperator), built independently."""
    model, data = _setup("mse")
    fn = nn.MSELoss()
    E = EKFACOperator(model, fn, data, fisher_type=fisher_type)
    full = (FisherOperator if fisher_type == "type-2" else EmpiricalFisherOperator)(model, fn, data)
    F = full.to_dense()
    names, sizes = E.space.names, [p.numel() for p in model.parameters()]
    offsets = dict(
        zip(names, torch.cumsum(torch.tensor([0, *sizes[:-1]]), 0).tolist(), strict=True)
    )
    for k, (QA, QG, Ew, Eb) in E._eigen().items():
        wn, bn = E.layers[k]
        i = offsets[wn]
        Fw = F[i : i + QG.shape[0] * QA.shape[0], i : i + QG.shape[0] * QA.shape[0]]
        Q = torch.kron(QG, QA)
        assert _rel(Ew.reshape(-1), torch.diagonal(Q.T @ Fw @ Q)) < 1e-10
        j = offsets[bn]
        Fb = F[j : j + QG.shape[0], j : j + QG.shape[0]]
        assert _rel(Eb[:, 0], torch.diagonal(QG.T @ Fb @ QG)) < 1e-10
    D = E.to_dense()
    lam = 1e-2
    eye = torch.eye(D.shape[0], dtype=F64)
    assert abs(E.trace() - float(torch.trace(D))) < 1e-12 * E.trace()
    assert abs(E.frobenius_norm() - float(torch.linalg.matrix_norm(D))) < 1e-12 * E.frobenius_norm()
    assert abs(E.logdet(lam) - float(torch.logdet(D + lam * eye))) < 1e-10 * D.shape[0]
    assert _rel(E.inverse(lam).to_dense(), torch.linalg.inv(D + lam * eye)) < 1e-10
    with pytest.raises(ValueError, match="heuristic: expected False for EKFAC"):
        E.inverse(lam, heuristic=True)


def test_ekfac_curvlinops_agreement() -> None:
    curvlinops = pytest.importorskip("curvlinops")
    for loss, reduction, fisher_type, separate in [
        ("ce", "mean", "type-2", True), ("mse", "sum", "mc", False),
        ("bce", "mean", "empirical", True), ("ce", "sum", "mc", True),
    ]:  # fmt: skip
        model, data = _setup(loss)
        fn = LOSSES[loss](reduction=reduction)
        kw = {"mc_samples": 2} if fisher_type == "mc" else {}
        theirs = curvlinops.EKFACLinearOperator(
            model, fn, list(model.parameters()), data, fisher_type=fisher_type, seed=5,
            separate_weight_and_bias=separate, check_deterministic=False, **kw,
        )  # fmt: skip
        ours = EKFACOperator(
            model, fn, data, fisher_type=fisher_type, seed=5, separate_weight_and_bias=separate,
            **kw,
        )  # fmt: skip
        eye = torch.eye(theirs.shape[1], dtype=F64)
        assert _rel(ours.to_dense(), theirs @ eye) < 1e-12, (loss, reduction, fisher_type)


@pytest.mark.parametrize("cls", [KFACOperator, EKFACOperator])
def test_state_saves_and_loads(cls: type) -> None:
    import io

    model, data = _setup("ce")
    op = cls(model, nn.CrossEntropyLoss(), data, fisher_type="mc", seed=4)
    buf = io.BytesIO()
    torch.save(op.state_dict(), buf)
    buf.seek(0)
    other_data = [(torch.zeros_like(x), y) for x, y in data]  # would give other factors
    fresh = cls(model, nn.CrossEntropyLoss(), other_data, fisher_type="mc", seed=4)
    fresh.load_state_dict(torch.load(buf))
    assert _rel(fresh.to_dense(), op.to_dense()) < 1e-15
    wrong = cls(model, nn.CrossEntropyLoss(), data, fisher_type="mc", seed=5)
    with pytest.raises(ValueError, match="state: expected seed=5 for this operator, got 4"):
        wrong.load_state_dict(op.state_dict())


def _cnn_case() -> tuple[nn.Module, list]:
    from trainers.models import SmallCNN

    torch.manual_seed(0)
    model = SmallCNN(1, 3, channels=(2, 3), image_size=8).double()
    X = torch.randn(10, 1, 8, 8, dtype=F64)
    y = torch.randint(0, 3, (10,))
    return model, [(X[:4], y[:4]), (X[4:], y[4:])]


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_conv_input_factor_from_unfolded_patches(approx: str) -> None:
    """A of the first convolution from F.unfold directly: expand averages the N L patch outer
    products, reduce the outer products of the per-sample mean patch."""
    model, data = _cnn_case()
    K = KFACOperator(model, nn.CrossEntropyLoss(), data, kfac_approx=approx)
    X = torch.cat([x for x, _ in data])
    conv = model.features[0]
    P = nn.functional.unfold(X, conv.kernel_size, padding=conv.padding).transpose(1, 2)
    if approx == "expand":
        ref = torch.einsum("nli,nlj->ij", P, P) / (P.shape[0] * P.shape[1])
    else:
        m = P.mean(1)
        ref = m.T @ m / P.shape[0]
    A, _ = K.compute_factors()["features.0"]
    assert _rel(A, ref) < 1e-13
    D = K.to_dense()
    assert _rel(D, _dense_kfac(K)) < 1e-13  # conv weights flattened as (out, in kh kw)
    assert abs(K.trace() - float(torch.trace(D))) < 1e-12 * K.trace()


def test_weight_sharing_curvlinops_agreement() -> None:
    curvlinops = pytest.importorskip("curvlinops")
    model, data = _cnn_case()
    torch.manual_seed(1)
    seq = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2), nn.Flatten()).double()
    Xs = torch.randn(8, 5, 4, dtype=F64)  # 5 positions share each Linear's weight
    seq_data = [(Xs[:3], torch.randn(3, 10, dtype=F64)), (Xs[3:], torch.randn(5, 10, dtype=F64))]
    for net, fn, batches in [(model, nn.CrossEntropyLoss(), data), (seq, nn.MSELoss(), seq_data)]:
        for approx in ("expand", "reduce"):
            for fisher_type in ("type-2", "mc", "empirical"):
                kw = {"mc_samples": 2} if fisher_type == "mc" else {}
                common = {"fisher_type": fisher_type, "seed": 5, "kfac_approx": approx, **kw}
                theirs = curvlinops.KFACLinearOperator(
                    net, fn, list(net.parameters()), batches, check_deterministic=False, **common
                )
                eye = torch.eye(theirs.shape[1], dtype=F64)
                ours = KFACOperator(net, fn, batches, **common).to_dense()
                assert _rel(ours, theirs @ eye) < 1e-12, (type(net).__name__, approx, fisher_type)
        for fisher_type in ("type-2", "empirical"):  # EKFAC: per-sample sums over positions
            theirs = curvlinops.EKFACLinearOperator(
                net, fn, list(net.parameters()), batches, check_deterministic=False,
                fisher_type=fisher_type,
            )  # fmt: skip
            ours = EKFACOperator(net, fn, batches, fisher_type=fisher_type).to_dense()
            assert _rel(ours, theirs @ torch.eye(theirs.shape[1], dtype=F64)) < 1e-12


def test_ekfac_with_weight_sharing_sums_squared_per_sample_gradients() -> None:
    """sum(E) of a layer is basis-free: sum_n sum_r ||dW (f_n . s_r)||_F^2, here by brute force
    (one backward pass per sample and output, on the model itself)."""
    torch.manual_seed(1)
    seq = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2), nn.Flatten()).double()
    X = torch.randn(8, 5, 4, dtype=F64)
    data = [(X[:3], torch.randn(3, 10, dtype=F64)), (X[3:], torch.randn(5, 10, dtype=F64))]
    E = EKFACOperator(seq, nn.MSELoss(reduction="sum"), data)
    totals = {"0": [0.0, 0.0], "2": [0.0, 0.0]}
    for n in range(8):
        for r in range(10):
            seq.zero_grad()
            (seq(X[n : n + 1])[0, r] * 2**0.5).backward()  # S_n = sqrt(2) I for the squared error
            for k in totals:
                totals[k][0] += float(seq.get_submodule(k).weight.grad.pow(2).sum())
                totals[k][1] += float(seq.get_submodule(k).bias.grad.pow(2).sum())
    for k, (_, _, Ew, Eb) in E._eigen().items():
        assert abs(float(Ew.sum()) - totals[k][0]) < 1e-12 * totals[k][0]
        assert abs(float(Eb.sum()) - totals[k][1]) < 1e-12 * totals[k][1]


def test_cnn_mse_bce_kfac_and_ekfac_curvlinops_agreement() -> None:
    """KFAC and EKFAC, expand and reduce, on the CNN with MSE (mean) and BCE (sum)."""
    curvlinops = pytest.importorskip("curvlinops")
    model, data = _cnn_case()
    X = torch.cat([x for x, _ in data])
    g = torch.Generator().manual_seed(2)
    for fn, y in [
        (nn.MSELoss(), torch.randn(10, 3, generator=g, dtype=F64)),
        (nn.BCEWithLogitsLoss(reduction="sum"), torch.randint(0, 2, (10, 3), generator=g).double()),
    ]:
        batches = [(X[:4], y[:4]), (X[4:], y[4:])]
        params = list(model.parameters())
        for approx in ("expand", "reduce"):
            for fisher_type in ("type-2", "mc", "empirical"):
                kw = {"mc_samples": 2} if fisher_type == "mc" else {}
                common = {"fisher_type": fisher_type, "seed": 5, "kfac_approx": approx, **kw}
                for theirs_cls, ours_cls in [
                    (curvlinops.KFACLinearOperator, KFACOperator),
                    (curvlinops.EKFACLinearOperator, EKFACOperator),
                ]:
                    theirs = theirs_cls(
                        model, fn, params, batches, check_deterministic=False, **common
                    )
                    eye = torch.eye(theirs.shape[1], dtype=F64)
                    ours = ours_cls(model, fn, batches, **common).to_dense()
                    assert _rel(ours, theirs @ eye) < 1e-12, (
                        ours_cls.__name__,
                        approx,
                        fisher_type,
                    )


@pytest.mark.parametrize("cls", [KFACOperator, EKFACOperator])
@pytest.mark.parametrize("separate", [True, False])
def test_products_in_every_block_layout(cls: type, separate: bool) -> None:
    """Row-major, column-major, one vector, a strided column, a non-contiguous block: A @ X."""
    model, data = _setup("ce")
    K = cls(model, nn.CrossEntropyLoss(), data, separate_weight_and_bias=separate)
    D = K.to_dense()
    inv = K.inverse(0.1)
    Dinv = torch.linalg.inv(D + 0.1 * torch.eye(D.shape[0], dtype=F64))
    g = torch.Generator().manual_seed(0)
    X = torch.randn(D.shape[0], 5, dtype=F64, generator=g)
    blocks = [X, X.T.contiguous().T, X[:, :1].clone(), X[:, 2:3], X[:, ::2], X[:, 0]]
    for B in blocks:
        assert _rel(K @ B, D @ B) < 1e-13
        assert _rel(inv @ B, Dinv @ B) < 1e-10
    if cls is KFACOperator:
        H = K.inverse(0.1, heuristic=True)
        Hd = H.to_dense()
        for B in blocks:
            assert _rel(H @ B, Hd @ B) < 1e-13


def _conv_net(padding: object) -> nn.Module:
    torch.manual_seed(4)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=padding), nn.ReLU(), nn.Conv2d(3, 2, (2, 3), padding=padding),
        nn.Flatten(), nn.LazyLinear(3),
    ).double()  # fmt: skip


@pytest.mark.parametrize("padding", ["same", "valid"])
def test_string_padding_patches_reproduce_the_convolution(padding: str) -> None:
    """The unfolded patches of a 'same' (asymmetric for the even kernel) or 'valid' convolution
    times the flattened kernel give the layer's own outputs; KFAC runs on such a model."""
    from linops._kfac_sources import shared_inputs as _shared_inputs

    model = _conv_net(padding)
    X = torch.randn(5, 2, 6, 6, dtype=F64)
    model(X)  # materialise the lazy layer
    x = X
    for mod in model[:3]:
        if isinstance(mod, nn.Conv2d):
            P = _shared_inputs(mod, x)  # (n, L, c kh kw)
            out = mod(x)
            ref = out.flatten(2).transpose(1, 2) - mod.bias
            assert _rel(P @ mod.weight.reshape(mod.weight.shape[0], -1).T, ref) < 1e-13
        x = mod(x)
    K = KFACOperator(model, nn.CrossEntropyLoss(), (X, torch.randint(0, 3, (5,))))
    assert _rel(K.to_dense(), _dense_kfac(K)) < 1e-13


@pytest.mark.parametrize("fisher_type", ["type-2", "mc", "empirical"])
def test_chain_route_factors_equal_the_hooks(fisher_type: str) -> None:
    """Factors from the chain's stored inputs and one batched backward sweep equal the module
    hooks' (autograd) ones, on an MLP with tanh and on a CNN with pooling."""
    torch.manual_seed(2)
    cnn = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(3, 2, 2),
        nn.Flatten(), nn.Linear(2, 3),
    ).double()  # fmt: skip
    Xi = torch.randn(7, 2, 4, 4, dtype=F64)
    cases = [
        _setup("ce"),
        (cnn, [(Xi[:3], torch.randint(0, 3, (3,))), (Xi[3:], torch.randint(0, 3, (4,)))]),
    ]
    for model, data in cases:
        for approx in ("expand", "reduce"):
            kw = {"fisher_type": fisher_type, "seed": 3, "kfac_approx": approx, "mc_samples": 2}
            chained = KFACOperator(model, nn.CrossEntropyLoss(), data, **kw)
            hooked = KFACOperator(model, nn.CrossEntropyLoss(), data, route="autograd", **kw)
            fc, fh = chained.compute_factors(), hooked.compute_factors()
            assert chained.route == "chain" and hooked.route == "autograd"
            for k in fc:
                assert _rel(fc[k][0], fh[k][0]) < 1e-13 and _rel(fc[k][1], fh[k][1]) < 1e-13


@pytest.mark.parametrize("route", ["auto", "autograd"])
def test_forward_multiplier_one_layer_mse_is_the_ggn(route: str) -> None:
    """trainers.models.MLP's layers compute y = c W x + b (NTK parameterisation): the weight's
    input factor carries c, so one layer with MSE is still exactly the GGN."""
    from trainers.models import MLP

    model = MLP(4, 3, widths=(), parameterization="ntk", seed=0).double()
    assert model.layers[0].multiplier != 1.0
    X, y = torch.randn(9, 4, dtype=F64), torch.randn(9, 3, dtype=F64)
    K = KFACOperator(model, nn.MSELoss(), (X, y), separate_weight_and_bias=False, route=route)
    assert _rel(K.to_dense(), GGNOperator(model, nn.MSELoss(), (X, y)).to_dense()) < 1e-12


def test_kfac_preconditioner_option_cuts_cg_products() -> None:
    """inverse(G, preconditioner="kfac") builds the KFAC of G's model, loss and data itself
    (no products of G). On a linear model's GGN with badly scaled inputs (KFAC's input factor
    captures them; separate bias blocks drop only the weight-bias cross terms) it cuts CG's
    products 139 -> 13 (asserted: by more than 4x). It is no general win: on the tanh MLPs of
    this file and the digits MLP it needs more products than plain CG (bench/curvature.py)."""
    torch.manual_seed(0)
    model = nn.Linear(20, 5).double()
    X = torch.randn(100, 20, dtype=F64) * torch.logspace(-2, 2, 20, dtype=F64) + 1.0
    data = [(X[:40], torch.randn(40, 5, dtype=F64)), (X[40:], torch.randn(60, 5, dtype=F64))]
    G = GGNOperator(model, nn.MSELoss(), data)
    D = G.to_dense()
    lam = 1e-6 * float(torch.linalg.eigvalsh(D)[-1])
    B = torch.randn(G.shape[0], 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    ref = torch.linalg.solve(D + lam * torch.eye(G.shape[0], dtype=F64), B)
    plain = inverse(G, damping=lam, rtol=1e-10, block=False)
    pre = inverse(G, damping=lam, rtol=1e-10, block=False, preconditioner="kfac")
    assert _rel(pre @ B, ref) < 1e-7 and _rel(plain @ B, ref) < 1e-7
    assert pre.info.num_matvecs * 4 < plain.info.num_matvecs, (
        pre.info.num_matvecs, plain.info.num_matvecs
    )  # fmt: skip
    K = KFACOperator(model, nn.MSELoss(), data).inverse(lam).to_dense()
    assert _rel(pre.preconditioner.to_dense(), K) < 1e-12  # the same KFAC, same damping
    mlp, mdata = _setup("ce")
    ef = EmpiricalFisherOperator(mlp, nn.CrossEntropyLoss(), mdata)
    pe = inverse(ef, damping=1e-2, rtol=1e-10, preconditioner="kfac")
    pe @ torch.ones(ef.shape[0], dtype=F64)
    Ke = KFACOperator(mlp, nn.CrossEntropyLoss(), mdata, fisher_type="empirical")
    assert _rel(pe.preconditioner.to_dense(), Ke.inverse(1e-2).to_dense()) < 1e-13
    with pytest.raises(ValueError, match="preconditioner: 'kfac' expected A to be a GGNOperator"):
        inverse(torch.eye(3, dtype=F64), damping=1.0, preconditioner="kfac") @ torch.ones(
            3, dtype=F64
        )


@pytest.mark.parametrize("separate", [True, False])
@pytest.mark.parametrize("bias", [False, True])
def test_one_grouped_conv_with_mse_at_one_position_is_the_ggn(bias: bool, separate: bool) -> None:
    """Each group is a convolution of its own: with one output position and MSE, KFAC's
    per-group blocks are the GGN's (its blocks between groups are zero), against a GGN built
    independently from torch.func.jacrev."""
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 4, 3, groups=2, bias=bias).double()  # 3x3 input: one position
    X, y = torch.randn(7, 6, 3, 3, dtype=F64), torch.randn(7, 4, 1, 1, dtype=F64)
    loss = nn.MSELoss(reduction="sum")
    K = KFACOperator(conv, loss, (X, y), separate_weight_and_bias=separate)
    assert list(K.factors or K.compute_factors()) == ["[0]", "[1]"]
    params = dict(conv.named_parameters())

    def out(theta: torch.Tensor) -> torch.Tensor:
        parts, at = {}, 0
        for name, p in params.items():
            parts[name], at = theta[at : at + p.numel()].view_as(p), at + p.numel()
        return torch.func.functional_call(conv, parts, (X,)).reshape(-1)

    theta = torch.cat([p.detach().reshape(-1) for p in params.values()])
    J = torch.func.jacrev(out)(theta)
    ggn = 2 * J.T @ J
    if bias and separate:  # separate blocks drop the weight-bias coupling: compare those
        w = params["weight"].numel()
        ggn[:w, w:], ggn[w:, :w] = 0, 0
    assert _rel(K.to_dense(), ggn) < 1e-12


def test_depthwise_conv_blocks_are_consistent() -> None:
    """A depthwise CNN with cross-entropy: one block per channel, closed forms, inverse and
    EKFAC consistent with the dense matrix, and no coupling between groups."""
    torch.manual_seed(1)
    net = nn.Sequential(
        nn.Conv2d(3, 3, 3, padding=1, groups=3), nn.Tanh(), nn.Flatten(), nn.Linear(27, 4)
    ).double()
    X, y = torch.randn(10, 3, 3, 3, dtype=F64), torch.randint(0, 4, (10,))
    K = KFACOperator(net, nn.CrossEntropyLoss(), (X, y))
    D = K.to_dense()
    assert [k for k in K.compute_factors()][:3] == ["0[0]", "0[1]", "0[2]"]
    torch.testing.assert_close(D, D.T, rtol=0, atol=1e-15)
    for i in range(3):  # channel i's 3x3 weights, then its bias after all the weights
        A, G = K.compute_factors()[f"0[{i}]"]
        w, b = slice(9 * i, 9 * i + 9), 27 + i
        torch.testing.assert_close(D[w, w], torch.kron(G, A), rtol=1e-12, atol=1e-15)
        assert float(D[b, b]) == pytest.approx(float(G[0, 0]), rel=1e-12)
    first, second = slice(0, 9), slice(9, 18)
    assert float(D[first, second].abs().max()) == 0.0
    lam, eye = 1e-2, torch.eye(D.shape[0], dtype=F64)
    assert K.trace() == pytest.approx(float(torch.trace(D)), rel=1e-12)
    assert K.logdet(lam) == pytest.approx(float(torch.logdet(D + lam * eye)), rel=1e-10)
    assert _rel(K.inverse(lam).to_dense(), torch.linalg.inv(D + lam * eye)) < 1e-10
    E = EKFACOperator(net, nn.CrossEntropyLoss(), (X, y)).to_dense()
    assert float(E[first, second].abs().max()) == 0.0
    assert _rel(E, E.T) < 1e-12


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_grouped_conv_average_variant_is_curvlinops(approx: str) -> None:
    """``grouped="average"`` is curvlinops 3.0.1's grouped-convolution KFAC to 1e-12; the
    default per-group blocks differ from it on the grouped layer."""
    curvlinops = pytest.importorskip("curvlinops")
    torch.manual_seed(2)
    net = nn.Sequential(
        nn.Conv2d(4, 6, 3, padding=1, groups=2), nn.Tanh(), nn.Flatten(), nn.Linear(54, 3)
    ).double()
    X, y = torch.randn(8, 4, 3, 3, dtype=F64), torch.randint(0, 3, (8,))
    fn = nn.CrossEntropyLoss()
    theirs = curvlinops.KFACLinearOperator(
        net,
        fn,
        list(net.parameters()),
        [(X, y)],
        kfac_approx=approx,
        fisher_type="type-2",
        check_deterministic=False,
    )
    dense = theirs @ torch.eye(theirs.shape[1], dtype=F64)
    ours = KFACOperator(net, fn, (X, y), kfac_approx=approx, grouped="average")
    assert _rel(ours.to_dense(), dense) < 1e-12
    blocks = KFACOperator(net, fn, (X, y), kfac_approx=approx).to_dense()
    assert _rel(blocks, dense) > 1e-3
    with pytest.raises(ValueError, match="grouped: expected 'blocks' or 'average'"):
        KFACOperator(net, fn, (X, y), grouped="mean")


class _Scaled(nn.Linear):
    """Its own forward: 2 (W x + b), not the W x + b that KFAC's factors assume."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2.0 * super().forward(x)


class _Tied(nn.Module):
    """The layer's weight also used outside the layer."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) + 0.3 * x @ self.lin.weight


class _Multiplied(nn.Linear):
    """y = 3 W x + b, declared through the ``multiplier`` attribute."""

    multiplier = 3.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(3.0 * x, self.weight, self.bias)


@pytest.mark.parametrize("cls", [KFACOperator, EKFACOperator])
@pytest.mark.parametrize(
    "make",
    [
        lambda: _Scaled(4, 3),
        lambda: nn.Sequential(_Scaled(4, 5), nn.Tanh(), nn.Linear(5, 3)),
        _Tied,
        lambda: nn.Sequential(
            nn.Linear(4, 5), nn.Tanh(), _Multiplied(5, 3).requires_grad_(True)
        ).apply(lambda m: setattr(m, "multiplier", 2.0) if isinstance(m, _Multiplied) else None),
    ],
    ids=["subclass-forward", "subclass-in-a-sequential", "tied-weight", "wrong-multiplier"],
)
def test_layers_that_do_not_compute_w_x_plus_b_are_refused(cls: type, make) -> None:
    """Hooks see a layer's input and output, not how its weight entered: checked, not assumed."""
    torch.manual_seed(0)
    model = make().double()
    X = torch.randn(6, 4, dtype=F64)
    y = torch.randn(6, model(X).shape[1], dtype=F64)
    with pytest.raises(ValueError, match="is not layer .* output gradient times its input"):
        cls(model, nn.MSELoss(), (X, y)).to_dense()


def test_multihead_attention_out_projection_is_refused() -> None:
    """nn.MultiheadAttention reads out_proj's weight directly, never calling out_proj."""

    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(4, 2, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = x.view(x.shape[0], 2, 4)
            return self.attn(h, h, h, need_weights=False)[0].flatten(1)

    torch.manual_seed(0)
    model = Attention().double().eval()
    X, y = torch.randn(5, 8, dtype=F64), torch.randn(5, 8, dtype=F64)
    params = ["attn.out_proj.weight", "attn.out_proj.bias"]
    with pytest.raises(ValueError, match="'attn.out_proj.weight' is not layer 'attn.out_proj'"):
        KFACOperator(model, nn.MSELoss(), (X, y), params=params).to_dense()


@pytest.mark.parametrize("bias", [False, True])
def test_one_layer_with_a_forward_multiplier_or_an_output_hook_with_mse_is_the_ggn(
    bias: bool,
) -> None:
    """KFAC equals the GGN for one layer and MSE, also when the layer's output is changed by a
    forward hook (the factors see the layer's own output) or declares c W x + b."""
    torch.manual_seed(0)
    hooked = nn.Linear(4, 3, bias=bias).double()
    hooked.register_forward_hook(lambda mod, inp, out: 0.5 * out)
    for lin in (hooked, _Multiplied(4, 3, bias=bias).double()):
        X, y = torch.randn(9, 4, dtype=F64), torch.randn(9, 3, dtype=F64)
        K = KFACOperator(lin, nn.MSELoss(), (X, y), separate_weight_and_bias=False).to_dense()
        assert _rel(K, GGNOperator(lin, nn.MSELoss(), (X, y)).to_dense()) < 1e-12


class _InplaceAfterLinear(nn.Module):
    """Not a chain (the routes' recogniser does not read it): hooks; ReLU in place on an output."""

    def __init__(self, inplace: bool) -> None:
        super().__init__()
        self.a, self.b, self.inplace = nn.Linear(4, 5), nn.Linear(5, 3), inplace

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        h = h.relu_() if self.inplace else h.relu()
        return self.b(h) + 0.0 * x.sum()


def test_an_in_place_activation_on_a_layer_output_leaves_its_gradients_alone() -> None:
    torch.manual_seed(0)
    ref = _InplaceAfterLinear(False).double()
    model = _InplaceAfterLinear(True).double()
    model.load_state_dict(ref.state_dict())
    X, y = torch.randn(8, 4, dtype=F64), torch.randint(0, 3, (8,))
    for cls in (KFACOperator, EKFACOperator):
        ours = cls(model, nn.CrossEntropyLoss(), (X, y))
        assert _rel(ours.to_dense(), cls(ref, nn.CrossEntropyLoss(), (X, y)).to_dense()) < 1e-14
        assert ours.route == "autograd"


class _Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(torch.tanh(self.a(x)))


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_a_layer_called_twice_shares_its_weight_over_both_calls(approx: str) -> None:
    r"""Both calls are the weight's shared positions (arXiv:2311.00636), by hand: inputs x and
    h = tanh(z_1), z_1 = W x + b; output gradients of f . s_r (f = W h + b, s_r = sqrt(2) e_r:
    MSE, sum) g_2 = s_r at the second call's output and g_1 = (s_r W) * (1 - h^2) at the
    first's. expand: A = (x^T x + h^T h) / 2N, G = sum_r g_1^T g_1 + g_2^T g_2; reduce: A of
    the mean input (x + h) / 2, G of the summed gradient g_1 + g_2."""
    torch.manual_seed(0)
    model = _Twice().double()
    X, y = torch.randn(7, 4, dtype=F64), torch.randn(7, 4, dtype=F64)
    K = KFACOperator(model, nn.MSELoss(reduction="sum"), (X, y), kfac_approx=approx)
    A, G = K.compute_factors()["a"]
    W, b = model.a.weight.detach(), model.a.bias.detach()
    h = torch.tanh(X @ W.T + b)
    ref_G = torch.zeros(4, 4, dtype=F64)
    for r in range(4):
        g2 = torch.zeros(7, 4, dtype=F64)
        g2[:, r] = 2**0.5
        g1 = (g2 @ W) * (1 - h**2)
        ref_G += g1.T @ g1 + g2.T @ g2 if approx == "expand" else (g1 + g2).T @ (g1 + g2)
    if approx == "expand":
        ref_A = (X.T @ X + h.T @ h) / 14
    else:
        m = (X + h) / 2
        ref_A = m.T @ m / 7
    assert _rel(A, ref_A) < 1e-13
    assert _rel(G, ref_G) < 1e-13


def test_a_selected_layer_the_forward_never_calls_has_a_zero_block() -> None:
    class Unused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.u = nn.Linear(4, 3), nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.a(x)

    torch.manual_seed(0)
    model = Unused().double()
    X, y = torch.randn(6, 4, dtype=F64), torch.randn(6, 3, dtype=F64)
    for approx in ("expand", "reduce"):
        K = KFACOperator(model, nn.MSELoss(), (X, y), kfac_approx=approx).to_dense()
        alone = KFACOperator(model, nn.MSELoss(), (X, y), params=["a"], kfac_approx=approx)
        assert _rel(K[:15, :15], alone.to_dense()) < 1e-14
        assert not K[15:].any() and not K[:, 15:].any()


@pytest.mark.parametrize("fisher_type", ["type-2", "empirical"])
@pytest.mark.parametrize("cls", [KFACOperator, EKFACOperator])
def test_ignored_targets_leave_the_factors(cls: type, fisher_type: str) -> None:
    """KFAC of data with ignored targets (cross-entropy's ignore_index) is KFAC of the kept
    samples: their inputs are not in A (it used them and counted them in N: 0.70 relative)."""
    for route_model in (
        _setup("ce")[0],  # a chain
        _InplaceAfterLinear(False).double(),  # hooks
    ):
        torch.manual_seed(4)
        X, y = torch.randn(9, 4, dtype=F64), torch.randint(0, 3, (9,))
        y[[0, 4, 5]] = -100
        kept = y != -100
        for reduction in ("mean", "sum"):
            loss = nn.CrossEntropyLoss(reduction=reduction)
            ours = cls(route_model, loss, [(X[:4], y[:4]), (X[4:], y[4:])], fisher_type=fisher_type)
            ref = cls(route_model, loss, (X[kept], y[kept]), fisher_type=fisher_type)
            assert _rel(ours.to_dense(), ref.to_dense()) < 1e-13


def test_cross_entropy_over_positions_and_all_ignored_targets_are_refused() -> None:
    class Tagger(nn.Module):  # (N, C, T) logits: one softmax per position
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x).transpose(1, 2)

    X = torch.randn(5, 2, 4, dtype=F64)
    with pytest.raises(ValueError, match=r"expected \(N, C\) logits for KFAC of cross-entropy"):
        KFACOperator(
            Tagger().double(), nn.CrossEntropyLoss(), (X, torch.zeros(5, 2).long())
        ).trace()
    model, _ = _setup("ce")
    y = torch.full((4,), -100)
    X = torch.randn(4, 4, dtype=F64)
    with pytest.raises(ValueError, match="every target ignored"):
        KFACOperator(model, nn.CrossEntropyLoss(), (X, y)).to_dense()
    with pytest.raises(ValueError, match="every target is cross-entropy's ignore_index"):
        KFACOperator(model, nn.CrossEntropyLoss(reduction="sum"), (X, y)).to_dense()


def test_empirical_kfac_keeps_the_loss_options_and_logdet_refuses_negative_damping() -> None:
    """KFAC's empirical gradients rebuilt the loss as type(loss)(reduction="sum"), dropping a
    custom ignore_index (an IndexError on -1); logdet(-1e-3) returned nan."""
    torch.manual_seed(0)
    model, _ = _setup("ce")
    X, y = torch.randn(8, 4, dtype=F64), torch.randint(0, 3, (8,))
    y[[1, 6]] = -1
    kept = y != -1
    loss = nn.CrossEntropyLoss(ignore_index=-1)
    for cls in (KFACOperator, EKFACOperator):
        ours = cls(model, loss, (X, y), fisher_type="empirical").to_dense()
        ref = cls(model, loss, (X[kept], y[kept]), fisher_type="empirical").to_dense()
        assert _rel(ours, ref) < 1e-13
        op = cls(model, nn.CrossEntropyLoss(), (X[kept], y[kept]))
        for bad in (-1e-3, float("nan"), float("inf")):
            with pytest.raises(ValueError, match="damping: expected a number >= 0"):
                op.logdet(bad)
        assert math.isfinite(op.logdet(1e-3))


class _ScaledConv(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2.0 * super().forward(x)


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("padding", [0, "same"])
def test_convolutions_that_do_not_compute_w_x_plus_b_are_refused(groups: int, padding) -> None:
    """The check's convolution gradient comes from the convolution's own kernel: a subclass
    scaling its output is refused, the plain layer with the same settings is not."""
    torch.manual_seed(0)
    X, y = torch.randn(5, 2, 6, 6, dtype=F64), torch.randint(0, 3, (5,))
    for conv, refused in ((_ScaledConv, True), (nn.Conv2d, False)):
        layer = conv(
            2, 4, 3, padding=padding, dilation=2 if padding == "same" else 1, groups=groups
        )
        model = nn.Sequential(layer, nn.Tanh(), nn.Flatten(), nn.LazyLinear(3)).double()
        model(X)  # materialise the lazy head
        K = KFACOperator(model, nn.CrossEntropyLoss(), (X, y))
        if refused:
            with pytest.raises(ValueError, match="'0.weight' is not layer '0'"):
                K.to_dense()
        else:
            K.to_dense()
            if groups > 1 or padding == "same":  # the hooks route, where the check runs
                assert K.route == "autograd"


def test_probability_targets_one_sample_is_the_ggn() -> None:
    """With one sample KFAC is exact (a single Kronecker term); for cross-entropy with
    probability targets it equals the GGN (curvlinops 3.0.1 differs from it by 4.4 here)."""
    torch.manual_seed(0)
    lin = nn.Linear(4, 3).double()
    X = torch.randn(1, 4, dtype=F64)
    t = torch.softmax(torch.randn(1, 3, dtype=F64), dim=1)
    for reduction in ("mean", "sum"):
        loss = nn.CrossEntropyLoss(reduction=reduction)
        K = KFACOperator(lin, loss, (X, t), separate_weight_and_bias=False).to_dense()
        assert _rel(K, GGNOperator(lin, loss, (X, t)).to_dense()) < 1e-12


def test_a_layer_called_with_a_keyword_input_is_recorded() -> None:
    """``self.lin(input=x)`` passes no positional argument to the forward hook."""

    class Keyword(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(input=x)

    torch.manual_seed(0)
    model = Keyword().double()
    X, y = torch.randn(6, 4, dtype=F64), torch.randn(6, 3, dtype=F64)
    K = KFACOperator(model, nn.MSELoss(), (X, y), separate_weight_and_bias=False).to_dense()
    assert _rel(K, GGNOperator(model, nn.MSELoss(), (X, y)).to_dense()) < 1e-12


def test_state_logdet_and_empty_blocks_edge_cases() -> None:
    """logdet(0) of a singular KFAC (cross-entropy's Hessian is singular) was the log of
    round-off (-394), not -inf; a state of other widths loaded silently; two identically built
    type-2 operators (seed=None) could not share a state; an (n, 0) block raised in reshape."""
    model, data = _setup("ce")
    for cls in (KFACOperator, EKFACOperator):
        K = cls(model, nn.CrossEntropyLoss(), data)
        assert K.logdet(0.0) == -math.inf
        assert math.isfinite(K.logdet(1e-3))
        other = cls(model, nn.CrossEntropyLoss(), data)  # seed=None: another drawn seed
        other.load_state_dict(K.state_dict())
        v = torch.randn(K.shape[1], 3, dtype=F64)
        torch.testing.assert_close(other @ v, K @ v, rtol=1e-13, atol=1e-15)
        assert (K @ v[:, :0]).shape == (K.shape[0], 0)
        assert (K.inverse(1e-2) @ v[:, :0]).shape == (K.shape[0], 0)
        torch.manual_seed(3)
        wider = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
        with pytest.raises(ValueError, match="state: expected factors of shapes"):
            cls(wider, nn.CrossEntropyLoss(), data).load_state_dict(K.state_dict())
    torch.manual_seed(0)  # non-singular: one Linear, MSE, full-rank inputs: logdet(0) finite
    lin = nn.Linear(3, 2).double()
    X, y = torch.randn(20, 3, dtype=F64), torch.randn(20, 2, dtype=F64)
    for cls in (KFACOperator, EKFACOperator):
        K = cls(lin, nn.MSELoss(), (X, y))
        want = float(torch.linalg.slogdet(K.to_dense())[1])
        assert K.logdet(0.0) == pytest.approx(want, rel=1e-12)
    mc = KFACOperator(model, nn.CrossEntropyLoss(), data, fisher_type="mc", seed=1)
    with pytest.raises(ValueError, match="state: expected seed=2"):  # the draws depend on it
        KFACOperator(model, nn.CrossEntropyLoss(), data, fisher_type="mc", seed=2).load_state_dict(
            mc.state_dict()
        )


@pytest.mark.parametrize("fisher_type", ["empirical", "type-2", "mc"])
@pytest.mark.parametrize("cls", [KFACOperator, EKFACOperator])
@pytest.mark.parametrize("loss", ["mse", "bce"])
def test_outputs_with_extra_dimensions_equal_the_flattened_model(
    loss: str, cls: type, fisher_type: str
) -> None:
    """``(N, 1, d)`` outputs and targets: the loss sees the outputs as the model gives them.

    The empirical gradients were taken of outputs flattened to ``(N, d)`` against targets of
    ``(N, 1, d)``, which broadcast to ``(N, N, d)`` (torch only warns about the sizes): the
    factor ``G`` was 11.7x too large on four samples of one output.
    """
    torch.manual_seed(0)
    lin = nn.Linear(3, 2).double()
    X = torch.randn(6, 1, 3, dtype=torch.float64)
    y = torch.randn(6, 1, 2, dtype=torch.float64)
    fn: nn.Module = nn.MSELoss(reduction="sum")
    if loss == "bce":
        y, fn = torch.rand(6, 1, 2, dtype=torch.float64), nn.BCEWithLogitsLoss()
    kw = {"fisher_type": fisher_type, "seed": 0}
    eye = torch.eye(8, dtype=F64)
    deep = cls(lin, fn, (X, y), **kw) @ eye
    flat = cls(lin, fn, (X[:, 0], y[:, 0]), **kw) @ eye
    assert _rel(deep, flat) < 1e-14
    # one output squeezed away, (N,) outputs and targets: G was 9.2x too large
    one = nn.Linear(3, 1).double()
    squeezed = nn.Sequential(one, nn.Flatten(0))
    eye = torch.eye(4, dtype=F64)
    K1 = cls(squeezed, fn, (X[:, 0], y[:, 0, 0]), **kw) @ eye
    assert _rel(K1, cls(one, fn, (X[:, 0], y[:, 0, :1]), **kw) @ eye) < 1e-14


def test_heuristic_inverse_of_a_block_with_a_zero_factor_is_its_exact_inverse() -> None:
    """A dead ReLU layer zeroes layer 2's ``A`` and layer 0's ``G``: Martens & Grosse's ratio
    is then 0 or infinite, which gave a ``ZeroDivisionError`` (and about 1e-142 in place of
    ``1 / lambda`` with the other factor nonzero); the zero blocks' inverse is ``I / lambda``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)).double()
    with torch.no_grad():
        model[0].bias.fill_(-100.0)
    X, y = torch.randn(6, 4, dtype=F64), torch.randint(0, 3, (6,))
    lam = 1e-2
    for params in (None, ["0.weight", "0.bias"]):  # only layer 0: its G = 0, its A is not
        K = KFACOperator(model, nn.CrossEntropyLoss(), (X, y), params=params)
        n = K.shape[0]
        H = K.inverse(lam, heuristic=True) @ torch.eye(n, dtype=F64)
        E = K.inverse(lam) @ torch.eye(n, dtype=F64)
        assert torch.isfinite(H).all()
        zero = (K @ torch.eye(n, dtype=F64)).abs().sum(0) == 0  # the zero blocks' columns
        assert int(zero.sum()) == (25 + 15 if params is None else 25)
        torch.testing.assert_close(H[zero][:, zero], torch.eye(int(zero.sum()), dtype=F64) / lam)
        torch.testing.assert_close(H[zero][:, zero], E[zero][:, zero])
        assert float(H[zero][:, ~zero].abs().sum()) == 0.0


def test_ignored_targets_of_folded_sequence_outputs_are_refused() -> None:
    """Logits (N, T, C) folded by output= to (N (T - 1), C) with -100 labels (a language
    model's dict batch): the ignore mask, one entry per folded row, was applied to the
    layers' (N, T, d) inputs and raised a bare IndexError; which inputs an ignored target
    belongs to is unknown there: refused, naming what to do."""

    class Seq(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

    torch.manual_seed(0)
    model = Seq().double()
    X = torch.randn(3, 4, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (3 * 3,))
    y[[1, 5]] = -100
    fold = lambda o: o[:, :-1].flatten(0, 1)  # noqa: E731
    kw = {"output": fold, "label_key": "labels"}
    with pytest.raises(ValueError, match="cannot tell which layer inputs"):
        KFACOperator(model, nn.CrossEntropyLoss(), [{"x": X, "labels": y}], **kw).compute_factors()
    y[[1, 5]] = 0  # without ignored targets it runs
    assert KFACOperator(model, nn.CrossEntropyLoss(), [{"x": X, "labels": y}], **kw).trace() > 0
