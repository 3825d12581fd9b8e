"""Per-batch feature standardization (x - mean) / std: a feature that is
constant in the batch (a one-hot column that is always 0) has std 0 and the
division is 0/0."""

import jax
import jax.numpy as jnp

EXPECT = {
    "primitive": "div",
    "phase": "forward",
    "cause": "unsafe_op",
    "seen": "div received a zero denominator: 0/0 at 4 of 12 positions",
}


def standardize(x):
    return (x - x.mean(axis=0)) / x.std(axis=0)  # <- creates


def loss(params, batch):
    z = standardize(batch["x"])
    pred = z @ params["w"] + params["b"]
    return jnp.mean((pred - batch["y"]) ** 2)


def make():
    params = {"w": jnp.array([0.3, -0.2, 0.1]), "b": jnp.array(0.0)}
    x = jnp.array([[1.0, 0.0, 3.0], [2.0, 0.0, 1.0], [0.5, 0.0, 2.0], [1.5, 0.0, 0.0]])
    return jax.value_and_grad(loss), (params, {"x": x, "y": jnp.arange(4.0)})
