"""ForwardGradientTrainer: trains with any guesser and optimizer, same history and callbacks."""

from __future__ import annotations

import pytest
import torch

from estimators.guesses import DirectionalDescent, WTranspose
from trainers import BackpropTrainer
from trainers.data import synthetic_classification
from trainers.forward import ForwardGradientTrainer, GuessCosine
from trainers.models import MLP

F = torch.nn.functional


def _data():
    return synthetic_classification(128, d=6, num_classes=3, n_test=64, seed=0)


def _net(seed=0):
    return MLP(6, 3, (16, 16), seed=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "guesser", ["w_transpose", "downstream", "activation_mixing", "self_sharpening"]
)
def test_training_reduces_loss(guesser):
    ds = _data()
    t = ForwardGradientTrainer(_net(), F.cross_entropy, guesser=guesser, optimizer="adam", lr=1e-2)
    h = t.fit(
        ds.X_train,
        ds.y_train,
        epochs=15,
        batch_size=32,
        validation=(ds.X_test, ds.y_test),
        progress=False,
    )
    assert h.metrics["train_loss"][-1] < 0.8 * h.metrics["train_loss"][0]
    assert len(h.loss) == 15 * 4 and "test_accuracy" in h.metrics


def test_guess_cosine_callback_and_reproducibility():
    ds = _data()
    runs, trainers = [], []
    for _ in range(2):
        t = ForwardGradientTrainer(
            _net(), F.cross_entropy, guesser=WTranspose(), optimizer="sgd", lr=0.1, seed=3
        )
        h = t.fit(
            ds.X_train,
            ds.y_train,
            epochs=1,
            batch_size=64,
            callbacks=[GuessCosine(per_layer=True)],
            progress=False,
        )
        runs.append(h)
        trainers.append(t)
    assert runs[0].loss == runs[1].loss
    cos = runs[0].metrics["cosine"]
    assert len(cos) == 2
    # the logged cosine is that of the last guess to backprop's gradient at the same point
    t = trainers[0]
    assert t.last_guess is not None and t.last_batch is not None
    x, y, values = t.last_batch
    leaves = {n: v.clone().requires_grad_(True) for n, v in values.items()}
    loss = F.cross_entropy(torch.func.functional_call(t.model, leaves, (x,)), y)
    grads = torch.autograd.grad(loss, list(leaves.values()))
    g = torch.cat([gr.reshape(-1) for gr in grads])
    guess = torch.cat([t.last_guess.grads[n].reshape(-1) for n in leaves])
    want = float(guess @ g / (guess.norm() * g.norm()))
    assert cos[-1] == pytest.approx(want, rel=1e-5, abs=1e-7)
    w = torch.cat([t.last_guess.grads[n].reshape(-1) for n in ("layers.0.weight", "layers.0.bias")])
    gw = torch.cat([gr.reshape(-1) for gr in grads[:2]])
    want0 = float(w @ gw / (w.norm() * gw.norm()))
    assert runs[0].metrics["cosine/layers.0"][-1] == pytest.approx(want0, rel=1e-5, abs=1e-7)
    # the model itself is never modified
    t2 = ForwardGradientTrainer(_net(), F.cross_entropy, guesser="directional_descent")
    assert isinstance(t2.guesser, DirectionalDescent)


def test_matches_backprop_with_the_exact_guess_limit():
    """With cos = 1 the matched-cosine guess is (g.g/||g||^2) g = g: backprop's trajectory."""
    ds = _data()
    a = ForwardGradientTrainer(_net(), F.cross_entropy, guesser="matched_cosine", lr=0.1)
    a.guesser.cosine = 1.0
    b = BackpropTrainer(_net(), F.cross_entropy, lr=0.1)
    ha = a.fit(ds.X_train, ds.y_train, epochs=2, batch_size=64, shuffle=False, progress=False)
    hb = b.fit(ds.X_train, ds.y_train, epochs=2, batch_size=64, shuffle=False, progress=False)
    assert ha.loss == pytest.approx(hb.loss, rel=1e-4)


def test_errors():
    with pytest.raises(TypeError, match="guesser: expected a GradientGuesser"):
        ForwardGradientTrainer(_net(), F.cross_entropy, guesser=42)
    with pytest.raises(ValueError, match="name: expected one of"):
        ForwardGradientTrainer(_net(), F.cross_entropy, guesser="nope")
    with pytest.raises(ValueError, match="every: expected a positive integer"):
        GuessCosine(every=0)
