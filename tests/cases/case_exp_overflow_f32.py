"""Poisson regression with rate = exp(X @ w) on unscaled count features: the
linear predictor reaches ~100 and exp overflows float32 (above 88.7)."""

import jax
import jax.numpy as jnp

EXPECT = {
    "primitive": "exp",
    "phase": "forward",
    "cause": "overflow",
    "seen": "exp received max 110, overflow above 88.7 for float32",
}


def poisson_nll(params, batch):
    eta = batch["x"] @ params["w"] + params["b"]
    rate = jnp.exp(eta)  # <- creates
    return jnp.mean(rate - batch["y"] * eta)


def make():
    params = {"w": jnp.array([0.5, 0.25, 1.0]), "b": jnp.array(0.1)}
    x = jnp.array([[3.0, 4.0, 2.0], [120.0, 80.0, 30.0], [1.0, 0.0, 5.0]])
    batch = {"x": x, "y": jnp.array([2.0, 50.0, 3.0])}
    return jax.value_and_grad(poisson_nll), (params, batch)
