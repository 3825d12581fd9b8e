"""Losses with NaN bugs and their suppressed twins, for the CLI tests."""

import jax
import jax.numpy as jnp


def factory():
    def loss(x):
        r = jnp.where(x > 0, jnp.sqrt(x), 0.0)  # cli: where-nan-grad
        return jnp.sum(jnp.log(jax.nn.softmax(r)))  # cli: log-softmax

    return loss, (jnp.ones(4),)


def warnings_factory():
    def loss(x):
        return jnp.sum(jnp.log(jax.nn.softmax(x)))  # cli: log-softmax

    return loss, (jnp.ones(4),)


def suppressed():
    def loss(x):
        r = jnp.where(x > 0, jnp.sqrt(x), 0.0)  # jaxnan: ignore[where-nan-grad]
        return jnp.sum(jnp.log(jax.nn.softmax(r)))  # jaxnan: ignore

    return loss, (jnp.ones(4),)


def misspelled():
    def loss(x):
        return jnp.sum(jnp.log(jax.nn.softmax(x)))  # jaxnan: ignore[log-softmx]

    return loss, (jnp.ones(4),)


def clean():
    def loss(x):
        return jnp.sum(jax.nn.log_softmax(x))

    return loss, (jnp.ones(4),)


def not_a_pair():
    return jnp.ones(4)


def raising():
    def loss(x):
        return jnp.sum(x @ jnp.ones((3, 2)))  # shapes do not match

    return loss, (jnp.ones(4),)


def loss_itself(x):
    return jnp.sum(jnp.log(jax.nn.softmax(x)))
