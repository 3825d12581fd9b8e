"""A tabular regression batch with a missing value read as NaN (the classic
data problem): the NaN is in the argument before any equation runs."""

import jax
import jax.numpy as jnp

EXPECT = {
    "primitive": None,
    "phase": "input",
    "cause": "input_data",
    "leaf": "batch['x']",
}


def mlp(params, x):
    h = jax.nn.relu(x @ params["w1"] + params["b1"])
    return h @ params["w2"] + params["b2"]


def loss(params, batch):
    pred = mlp(params, batch["x"])[:, 0]
    return jnp.mean((pred - batch["y"]) ** 2)


def make():
    k1, k2 = jax.random.split(jax.random.key(3))
    params = {
        "w1": jax.random.normal(k1, (3, 8)) * 0.5,
        "b1": jnp.zeros(8),
        "w2": jax.random.normal(k2, (8, 1)) * 0.5,
        "b2": jnp.zeros(1),
    }
    prices = jnp.array([[2.5, 7.9, 1.0], [jnp.nan, 8.9, 1.0], [4.6, 3.1, 0.0]])
    batch = {"x": prices, "y": jnp.array([1.0, 2.0, 3.0])}
    return jax.value_and_grad(loss), (params, batch)
