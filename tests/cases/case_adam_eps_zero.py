"""An optax train step with adam(eps=0.0): an embedding row that never appears
in the batch has zero gradient, and the update m / sqrt(v) is 0/0 while the
gradients are all finite."""

import jax
import jax.numpy as jnp
import optax

EXPECT = {
    "primitive": "div",
    "phase": "update",
    "cause": "update",
    "seen": "div received a zero denominator: 0/0 at 12 of 24 positions",
}

tx = optax.adam(1e-2, eps=0.0)


def loss(params, tokens, targets):
    emb = params["embed"][tokens]
    logits = emb @ params["out"]
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, targets))


def train_step(params, opt_state, tokens, targets):
    value, grads = jax.value_and_grad(loss)(params, tokens, targets)
    updates, opt_state = tx.update(grads, opt_state, params)  # <- creates
    return optax.apply_updates(params, updates), opt_state, value


def make():
    k1, k2 = jax.random.split(jax.random.key(6))
    params = {
        "embed": jax.random.normal(k1, (6, 4)) * 0.1,
        "out": jax.random.normal(k2, (4, 6)) * 0.1,
    }
    opt_state = tx.init(params)
    tokens = jnp.array([0, 1, 2])
    targets = jnp.array([1, 2, 3])
    return train_step, (params, opt_state, tokens, targets)
