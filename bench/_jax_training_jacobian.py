"""JAX reference for the dense training Jacobian of
"Understanding Gradient Descent through the Training Jacobian" (anonymous submission): ``jax.jacfwd`` through the whole run.

The paper computes the training Jacobian with ``jax.jacfwd`` (its section 3, footnote 2).
This module reproduces that computation for the setup of :func:`trainers.setups.digits_mlp_run`
(an MLP with one GELU hidden layer, mean cross-entropy, fixed batch order, SGD with PyTorch-style
momentum and cosine decay), with the same flat parameter layout as ``linops.ParamSpace``
(``W1`` row-major ``(out, in)``, ``b1``, ``W2``, ``b2``), so the two matrices can be compared.
It is the benchmark's baseline; the toolkit itself does not depend on JAX.
"""

from __future__ import annotations

import math

import numpy as np


def jax_training_jacobian(
    theta0: np.ndarray,
    X: np.ndarray,
    y: np.ndarray,
    *,
    width: int,
    batch_size: int,
    epochs: int,
    lr: float,
    momentum: float,
    dtype: str = "float32",
) -> tuple[np.ndarray, np.ndarray]:
    """``(J, theta_T)`` by ``jax.jit(jax.jacfwd(train))`` (the training loop is a ``lax.scan``)."""
    import jax

    if dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    d_in, d_out = X.shape[1], int(y.max()) + 1
    n = len(X)
    steps_per_epoch = math.ceil(n / batch_size)
    T = epochs * steps_per_epoch
    if n % batch_size:
        raise ValueError(
            f"batch_size: expected a divisor of {n} for the JAX reference, got {batch_size}"
        )
    Xb = jnp.asarray(X, dtype=dtype).reshape(steps_per_epoch, batch_size, d_in)
    Yb = jnp.asarray(y).reshape(steps_per_epoch, batch_size)
    lrs = jnp.asarray([lr * 0.5 * (1 + math.cos(math.pi * t / T)) for t in range(T)], dtype=dtype)
    s1, s2 = width * d_in, width * d_in + width
    s3 = s2 + d_out * width

    def loss(th, xb, yb):
        W1, b1 = th[:s1].reshape(width, d_in), th[s1:s2]
        W2, b2 = th[s2:s3].reshape(d_out, width), th[s3:]
        h = jax.nn.gelu(xb @ W1.T + b1, approximate=False)
        logp = jax.nn.log_softmax(h @ W2.T + b2)
        return -jnp.mean(jnp.take_along_axis(logp, yb[:, None], axis=1))

    def train(th):
        def body(carry, t):
            th, buf = carry
            g = jax.grad(loss)(th, Xb[t % steps_per_epoch], Yb[t % steps_per_epoch])
            buf = momentum * buf + g
            return (th - lrs[t] * buf, buf), None

        (th, _), _ = jax.lax.scan(body, (th, jnp.zeros_like(th)), jnp.arange(T))
        return th

    th0 = jnp.asarray(theta0, dtype=dtype)
    J = jax.jit(jax.jacfwd(train))(th0).block_until_ready()
    return np.asarray(J), np.asarray(jax.jit(train)(th0))
