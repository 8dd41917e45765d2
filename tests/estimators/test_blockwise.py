"""Blockwise Hessian spectra against dense float64 per-block eigenvalues; JS distance."""

from __future__ import annotations

import math

import pytest
import torch

from estimators.blockwise import (
    averaged_js_distance,
    blockwise_spectra,
    js_distance,
    layer_blocks,
)
from linops import HessianOperator, lanczos


def _problem() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(4, 5),
        torch.nn.Tanh(),
        torch.nn.Linear(5, 4),
        torch.nn.Tanh(),
        torch.nn.Linear(4, 3),
    ).double()
    X = torch.randn(24, 4, dtype=torch.float64)
    y = torch.arange(24) % 3
    return net, X, y


def _dense_hessian(net: torch.nn.Module, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Reverse-over-reverse Hessian of the loss in the flat parameters (no linops)."""
    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for p in net.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in net.parameters()])

    def loss(theta: torch.Tensor) -> torch.Tensor:
        parts = torch.split(theta, [math.prod(s) for s in shapes])
        values = {n: t.reshape(s) for n, t, s in zip(names, parts, shapes, strict=True)}
        out = torch.func.functional_call(net, values, (X,))
        return torch.nn.functional.cross_entropy(out, y)

    return torch.autograd.functional.hessian(loss, flat)


def _blocks_of(net: torch.nn.Module) -> dict[str, tuple[int, int]]:
    out, start = {}, 0
    for name, p in net.named_parameters():
        layer = name.rsplit(".", 1)[0]
        lo, _ = out.get(layer, (start, start))
        out[layer] = (lo, start + p.numel())
        start += p.numel()
    return out


def test_top_eigenvalues_and_nodes_match_dense_blocks() -> None:
    net, X, y = _problem()
    D = _dense_hessian(net, X, y)
    H = HessianOperator(net, torch.nn.CrossEntropyLoss(), (X, y))
    res = blockwise_spectra(H, k=3, rtol=1e-12, num_probes=2, num_steps=100, seed=0)
    assert list(res.blocks) == ["0", "2", "4"]
    for name, (lo, hi) in _blocks_of(net).items():
        Hbb = D[lo:hi, lo:hi]
        lam = torch.linalg.eigvalsh(Hbb)
        b = res.blocks[name]
        assert b.dim == hi - lo
        scale = float(lam.abs().max())
        torch.testing.assert_close(b.eigenvalues, lam[-3:], rtol=0, atol=1e-8 * scale)
        assert b.converged
        # a full Krylov space (num_steps capped at n_b): every node is an eigenvalue of H_bb
        gap = (b.nodes.reshape(-1, 1) - lam.reshape(1, -1)).abs().min(dim=1).values
        assert float(gap.max()) < 1e-8 * scale
        torch.testing.assert_close(b.weights.sum(1), torch.ones(2, dtype=torch.float64))


def test_density_moments_match_dense_traces() -> None:
    """``n_b E[sum_j tau_j theta_j^p] = tr(H_bb^p)``, p = 0..3, within 5 standard errors."""
    net, X, y = _problem()
    D = _dense_hessian(net, X, y)
    H = HessianOperator(net, torch.nn.CrossEntropyLoss(), (X, y))
    N = 60
    res = blockwise_spectra(H, eigenvalues=False, num_probes=N, num_steps=3, seed=1)
    for name, (lo, hi) in _blocks_of(net).items():
        Hbb, n = D[lo:hi, lo:hi], hi - lo
        b = res.blocks[name]
        assert b.eigenvalues.numel() == 0
        for p in range(4):
            A = torch.linalg.matrix_power(Hbb, p)
            per_probe = n * (b.weights * b.nodes**p).sum(1)  # 3 nodes: exact to degree 5
            var = 2 * (float((A**2).sum()) - float((torch.diagonal(A) ** 2).sum()))
            se = math.sqrt(var / N)
            assert float(per_probe.mean()) == pytest.approx(
                float(torch.trace(A)), abs=5 * se + 1e-9
            )
        assert b.trace.estimate == pytest.approx(float(torch.trace(Hbb)), abs=5 * b.trace.stderr)


def test_lockstep_equals_each_block_alone() -> None:
    """Sharing passes changes nothing: block b's result is Lanczos on H over b's parameters."""
    net, X, y = _problem()
    loss = torch.nn.CrossEntropyLoss()
    H = HessianOperator(net, loss, (X, y), max_vectors=4)
    blocks = {"first": ["0.weight", "0.bias"], "last": "4"}
    res = blockwise_spectra(H, blocks, k=2, num_probes=3, num_steps=5, seed=3)
    for name, sel in blocks.items():
        alone = lanczos(HessianOperator(net, loss, (X, y), params=sel), 2, "LA", rtol=1e-12)
        torch.testing.assert_close(res.blocks[name].eigenvalues, alone.eigenvalues)
    assert res.num_matvecs == sum(b.num_matvecs for b in res.blocks.values())
    # every pass carries up to 4 columns, from either block
    assert res.num_passes < res.num_matvecs / 2
    assert res.num_rounds <= res.num_passes
    assert res.blocks["first"].params == ["0.weight", "0.bias"]


def test_bad_blocks_are_refused() -> None:
    net, X, y = _problem()
    H = HessianOperator(net, torch.nn.CrossEntropyLoss(), (X, y), params="4")
    with pytest.raises(ValueError, match="not among the operator's parameters"):
        blockwise_spectra(H, {"a": "0"})
    H = HessianOperator(net, torch.nn.CrossEntropyLoss(), (X, y))
    with pytest.raises(ValueError, match="in both"):
        blockwise_spectra(H, {"a": "4", "b": "4.bias"})
    with pytest.raises(TypeError, match="model operator"):
        blockwise_spectra(torch.eye(3, dtype=torch.float64))
    assert layer_blocks(H) == {"0": ["0.weight", "0.bias"], "2": ["2.weight", "2.bias"]} | {
        "4": ["4.weight", "4.bias"]
    }


def test_js_distance_properties() -> None:
    g = torch.Generator().manual_seed(0)
    p, q = torch.rand(50, generator=g), torch.rand(50, generator=g)
    assert js_distance(p, p) == 0.0
    # densities are normalised (the square root turns rounding of 1e-16 into 1e-8)
    assert js_distance(p, 3 * p) == pytest.approx(0.0, abs=1e-7)
    assert js_distance(p, q) == pytest.approx(js_distance(q, p), abs=1e-15)
    assert 0 < js_distance(p, q) < 1
    assert js_distance([1.0, 0.0, 0.0], [0.0, 0.0, 2.0]) == pytest.approx(1.0)
    # by hand: P = (1, 0), Q = (1/2, 1/2): JS^2 = (1/2)(log2(4/3)) + (1/2)(1/2 log2(2/3) + 1/2 log2 2)
    want = 0.5 * math.log2(4 / 3) + 0.25 * math.log2(2 / 3) + 0.25
    assert js_distance([1.0, 0.0], [1.0, 1.0]) == pytest.approx(math.sqrt(want), rel=1e-12)
    r = torch.rand(50, generator=g)
    assert js_distance(p, r) <= js_distance(p, q) + js_distance(q, r) + 1e-12  # a metric
    D, mean = averaged_js_distance(torch.stack([p, q, r]))
    torch.testing.assert_close(D, D.T)
    assert torch.all(torch.diagonal(D) == 0)
    assert mean == pytest.approx(float(D[0, 1] + D[0, 2] + D[1, 2]) / 3)
    assert math.isnan(averaged_js_distance(p[None])[1])
    with pytest.raises(ValueError, match="non-negative"):
        js_distance([1.0, -1.0], [1.0, 1.0])
    for bad in (float("inf"), float("nan")):  # inf gave 0.0 (a nan inside, hidden by max)
        with pytest.raises(ValueError, match="finite non-negative"):
            js_distance([1.0, bad], [1.0, 2.0])


def test_identical_blocks_have_zero_distance() -> None:
    """Two copies of one layer (same weights, symmetric roles) have equal block spectra."""
    torch.manual_seed(0)
    a, b = torch.nn.Linear(3, 1).double(), torch.nn.Linear(3, 1).double()
    b.load_state_dict(a.state_dict())

    class Twin(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = a, b

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([self.a(x), self.b(x)], dim=1)

    X = torch.randn(10, 3, dtype=torch.float64)
    H = HessianOperator(Twin(), torch.nn.MSELoss(), (X, torch.zeros(10, 2, dtype=torch.float64)))
    res = blockwise_spectra(H, k=2, num_probes=50, num_steps=4, seed=0)
    torch.testing.assert_close(res.blocks["a"].eigenvalues, res.blocks["b"].eigenvalues)
    # same operator, different probes: only the probes' noise separates the densities
    assert res.js_mean < 0.1


def test_plot_writes_a_png(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    from reports.blockwise import plot_blockwise_spectra

    net, X, y = _problem()
    H = HessianOperator(net, torch.nn.CrossEntropyLoss(), (X, y))
    res = blockwise_spectra(H, k=1, num_probes=2, num_steps=6, seed=0)
    path = tmp_path / "blocks.png"
    plot_blockwise_spectra(res, path, model="a 3-layer tanh MLP")
    assert path.stat().st_size > 1000


def test_symlog_axis_is_scale_invariant_and_normalised() -> None:
    """Densities in asinh(lambda / linthresh): unchanged when H and linthresh scale together,
    integrating to about 1 in the axis' units, on a grid of eigenvalues; linear on request."""
    net, X, y = _problem()
    ce = torch.nn.CrossEntropyLoss()
    kw = {"eigenvalues": False, "num_probes": 3, "num_steps": 4, "seed": 2}
    res = blockwise_spectra(HessianOperator(net, ce, (X, y)), **kw)
    big = blockwise_spectra(HessianOperator(net, lambda o, t: 1e3 * ce(o, t), (X, y)), **kw)
    assert res.axis == "symlog" and big.linthresh == pytest.approx(1e3 * res.linthresh)
    assert big.js_mean == pytest.approx(res.js_mean, abs=1e-9)
    torch.testing.assert_close(big.grid, 1e3 * res.grid, rtol=1e-8, atol=0)
    t = torch.asinh(res.grid / res.linthresh)
    dt = float(t[1] - t[0])
    torch.testing.assert_close(t[1:] - t[:-1], torch.full_like(t[1:], dt), rtol=1e-8, atol=1e-8)
    for name, b in res.blocks.items():
        torch.testing.assert_close(big.blocks[name].density, b.density, rtol=1e-6, atol=1e-9)
        assert float(b.density.sum()) * dt == pytest.approx(1.0, abs=1e-3)
    lin = blockwise_spectra(HessianOperator(net, ce, (X, y)), axis="linear", **kw)
    assert lin.axis == "linear"
    for b in lin.blocks.values():
        assert float(b.density.sum()) * float(lin.grid[1] - lin.grid[0]) == pytest.approx(
            1.0, abs=1e-3
        )
    with pytest.raises(ValueError, match="axis"):
        blockwise_spectra(HessianOperator(net, ce, (X, y)), axis="log", **kw)


def test_blocks_with_few_distinct_eigenvalues_keep_their_nodes_in_their_spectra() -> None:
    """Lanczos finds an invariant subspace of a bias block ``60 I`` after one step: the padding
    nodes were 0, outside every block's spectrum; they set the common sigma (1.21 against 0.078
    symlog units) and the grid, and the JS distance of the two blocks came out 0.029, not 0.68."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3)).double()
    X, Y = torch.randn(30, 4, dtype=torch.float64), torch.randn(30, 3, dtype=torch.float64)
    H = HessianOperator(net, torch.nn.MSELoss(reduction="sum"), (X, Y))
    D = H.to_dense()
    res = blockwise_spectra(H, {"w": ["0.weight"], "b": ["0.bias"]}, k=2, num_probes=3, seed=0)
    axes = []
    for name, (lo, hi) in {"w": (0, 12), "b": (12, 15)}.items():
        lam = torch.linalg.eigvalsh(D[lo:hi, lo:hi])
        nodes = res.blocks[name].nodes
        gap = (nodes.reshape(-1, 1) - lam.reshape(1, -1)).abs().min(dim=1).values
        assert float(gap.max()) < 1e-10 * float(lam.max())
        axes.append(torch.asinh(nodes[res.blocks[name].weights > 0] / res.linthresh))
    span = float(torch.cat(axes).max() - torch.cat(axes).min())
    assert res.sigma == pytest.approx(span / 12, rel=1e-12)  # the rule over real nodes only
