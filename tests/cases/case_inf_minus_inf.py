"""Pairwise log-sum-exp of masked log-probabilities written by hand
(m + log(exp(a - m) + exp(b - m))): two masked entries give -inf - (-inf)."""

import jax
import jax.numpy as jnp

EXPECT = {
    "primitive": "sub",
    "phase": "forward",
    "cause": "unsafe_op",
    "seen": "sub received -inf - -inf at 1 of 2 positions",
}


def log_add(a, b):
    m = jnp.maximum(a, b)
    return m + jnp.log(jnp.exp(a - m) + jnp.exp(b - m))  # <- creates


def loss(params, batch):
    logp = jax.nn.log_softmax(batch["x"] @ params["w"], axis=-1)
    logp = jnp.where(batch["valid"], logp, -jnp.inf)
    total = log_add(logp[:, 0], logp[:, 1])
    return -jnp.mean(total)


def make():
    params = {"w": jnp.array([[1.0, -1.0, 0.5], [0.2, 0.3, -0.1]])}
    valid = jnp.array([[True, True, True], [False, False, True]])
    batch = {"x": jnp.array([[1.0, 2.0], [0.5, -1.0]]), "valid": valid}
    return jax.value_and_grad(loss), (params, batch)
