"""Resuming from a checkpoint whose weights were written after a bad step:
the parameters already hold NaN (poisoned state, not a data problem)."""

import jax
import jax.numpy as jnp
import optax

EXPECT = {
    "primitive": None,
    "phase": "input",
    "cause": "poisoned_state",
    "leaf": "params['dense']['kernel']",
}


def make():
    tx = optax.adam(1e-3)
    params = {
        "dense": {
            "kernel": jnp.ones((4, 2)).at[1, 0].set(jnp.nan),
            "bias": jnp.zeros(2),
        }
    }
    opt_state = tx.init(
        {k: {n: jnp.zeros_like(v) for n, v in d.items()} for k, d in params.items()}
    )

    def loss(params, x, y):
        pred = x @ params["dense"]["kernel"] + params["dense"]["bias"]
        return jnp.mean((pred - y) ** 2)

    def train_step(params, opt_state, x, y):
        value, grads = jax.value_and_grad(loss)(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    x = jnp.ones((5, 4))
    y = jnp.zeros((5, 2))
    return train_step, (params, opt_state, x, y)
