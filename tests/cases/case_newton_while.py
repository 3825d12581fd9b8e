"""Whitening with a square root computed by Newton iterations in
lax.while_loop: the variance estimate went negative (-1.0), the first step
lands exactly on x = 0 and the second step divides by f'(0) = 0."""

import jax.numpy as jnp
from jax import lax

EXPECT = {
    "primitive": "div",
    "phase": "forward",
    "cause": "unsafe_op",
    "iteration": (1,),
    "seen": "div received a zero denominator: x/0 (e.g. 1.0/0) at 1 of 2 positions",
}


def newton_sqrt(a, iters=8):
    def cond(state):
        i, x = state
        return i < iters

    def body(state):
        i, x = state
        f = x * x - a
        df = 2.0 * x
        return i + 1, x - f / df  # <- creates

    _, x = lax.while_loop(cond, body, (0, jnp.ones_like(a)))
    return x


def whiten(stats, x):
    return (x - stats["mean"]) / newton_sqrt(stats["var"])


def make():
    stats = {"mean": jnp.array([0.5, 0.1]), "var": jnp.array([4.0, -1.0])}
    x = jnp.array([[1.0, 2.0], [0.0, -1.0]])
    return whiten, (stats, x)
