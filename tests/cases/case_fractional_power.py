"""A power-law activation h ** 1.5 applied to pre-activations that can be
negative: a fractional power of a negative number is NaN."""

import jax
import jax.numpy as jnp

EXPECT = {
    "primitive": "pow",
    "phase": "forward",
    "cause": "unsafe_op",
    "seen": "pow received a negative base (min -1.65) with a fractional exponent (1.5)",
}


def model(params, x):
    h = x @ params["w1"] + params["b1"]
    h = h**1.5  # <- creates
    return h @ params["w2"]


def loss(params, batch):
    return jnp.mean((model(params, batch["x"]) - batch["y"]) ** 2)


def make():
    params = {
        "w1": jnp.array([[1.0, -1.0], [0.5, 0.5]]),
        "b1": jnp.array([0.1, 0.1]),
        "w2": jnp.ones((2, 1)),
    }
    batch = {"x": jnp.array([[1.0, 2.0], [2.0, 0.5]]), "y": jnp.zeros((2, 1))}
    return jax.value_and_grad(loss), (params, batch)
