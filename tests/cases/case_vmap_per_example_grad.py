"""Per-example gradients with jax.vmap(jax.grad(...)) (the Flax per-example
gradient recipe) of a loss written as the squared norm of the residual,
jnp.linalg.norm(pred - y) ** 2: a padded example has zero features and a
zero target, its residual is the zero vector, and the norm's derivative
x / norm(x) is 0/0 there (the squared norm itself is smooth).

Reported: https://github.com/jax-ml/jax/issues/21723 ("NaN when computing
gradient of squared norm evaluated at 0"), also
https://github.com/jax-ml/jax/issues/4177 and https://github.com/google/flax/issues/858.
"""

import jax
import jax.numpy as jnp

EXPECT = {
    "primitive": "div",
    "phase": "backward",
    "cause": "unsafe_op",
    "seen": "div received a zero denominator",
}


def loss_fn(params, x, y):
    pred = jnp.tanh(x @ params["w1"]) @ params["w2"]
    return jnp.linalg.norm(pred - y) ** 2  # <- creates


def per_example_grads(params, xs, ys):
    grads = jax.vmap(jax.grad(loss_fn), in_axes=(None, 0, 0))(params, xs, ys)
    norms = jnp.sqrt(sum(jnp.sum(g**2, axis=(1, 2)) for g in grads.values()))
    return grads, norms


def make():
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    params = {
        "w1": jax.random.normal(k1, (6, 8)) * 0.3,
        "w2": jax.random.normal(k2, (8, 3)) * 0.3,
    }
    xs = jax.random.normal(k3, (4, 6)).at[3].set(0.0)  # example 3 is padding
    ys = jnp.ones((4, 3)).at[3].set(0.0)
    return per_example_grads, (params, xs, ys)
