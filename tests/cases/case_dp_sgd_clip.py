"""DP-SGD-style step: per-example gradients with vmap, each rescaled to norm C
as g / norm * C: an example whose gradient is exactly zero (a padded example
with weight 0) gives 0/0 = NaN. The gradients themselves are finite, so this
is the update phase (safe form: g / jnp.maximum(1.0, norm / C))."""

import jax
import jax.numpy as jnp
import optax

EXPECT = {
    "primitive": "div",
    "phase": "update",
    "cause": "update",
    "seen": "div received a zero denominator: 0/0 at 6 of 18 positions",
}

CLIP = 1.0
tx = optax.sgd(0.1)


def example_loss(params, x, y, weight):
    pred = jnp.tanh(x @ params["w"])
    return weight * jnp.sum((pred - y) ** 2)


def dp_step(params, opt_state, xs, ys, weights):
    grads = jax.vmap(jax.grad(example_loss), in_axes=(None, 0, 0, 0))(
        params, xs, ys, weights
    )
    norms = jnp.sqrt(sum(jnp.sum(g**2, axis=(1, 2)) for g in jax.tree.leaves(grads)))

    def rescale(g):
        return g / norms[:, None, None] * CLIP  # <- creates

    clipped = jax.tree.map(rescale, grads)
    mean = jax.tree.map(lambda g: g.mean(0), clipped)
    updates, opt_state = tx.update(mean, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


def make():
    params = {"w": jnp.array([[0.5, -0.3], [0.2, 0.1], [0.0, 0.4]])}
    xs = jnp.array([[1.0, 0.0, 2.0], [0.5, 1.0, -1.0], [0.0, 0.0, 0.0]])
    ys = jnp.array([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    weights = jnp.array([1.0, 1.0, 0.0])  # the third example is padding
    return dp_step, (params, tx.init(params), xs, ys, weights)
