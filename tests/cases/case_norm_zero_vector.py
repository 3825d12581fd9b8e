"""Contrastive embedding loss with jnp.linalg.norm of an anchor-positive
difference that is exactly zero (a duplicated sample): the gradient of the
norm at the zero vector is 0.5/sqrt(0) = inf (use optax.safe_norm)."""

import jax
import jax.numpy as jnp

EXPECT = {
    "primitive": "div",
    "phase": "backward",
    "cause": "unsafe_op",
    "seen": "div received a zero denominator: x/0 (e.g. 0.5/0) at 1 of 1 position",
}


def embed(params, x):
    return jnp.tanh(x @ params["w1"]) @ params["w2"]


def loss(params, anchor, positive):
    a = embed(params, anchor)
    p = embed(params, positive)
    dist = jnp.linalg.norm(a - p)  # <- creates
    return dist + 0.1 * jnp.sum(params["w2"] ** 2)


def make():
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    params = {
        "w1": jax.random.normal(k1, (6, 8)) * 0.3,
        "w2": jax.random.normal(k2, (8, 4)) * 0.3,
    }
    anchor = jax.random.normal(k3, (6,))
    return jax.value_and_grad(loss), (params, anchor, anchor)
