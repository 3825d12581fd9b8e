"""A loss with two NaN bugs, for the CLI test."""

import jax
import jax.numpy as jnp


def factory():
    def loss(x):
        r = jnp.where(x > 0, jnp.sqrt(x), 0.0)  # cli: where-nan-grad
        return jnp.sum(jnp.log(jax.nn.softmax(r)))  # cli: log-softmax

    return loss, (jnp.ones(4),)


def warnings_only():
    def loss(x):
        return jnp.sum(jnp.log(jax.nn.softmax(x)))

    return loss, (jnp.ones(4),)
