"""Gumbel-softmax relaxation written as torch.nn.functional.gumbel_softmax
does, gumbels = -log(E) with E ~ Exponential(1), replayed with the noise the
step drew: one draw is exactly 0.0, -log(0) = +inf (the first event), and
the softmax then computes inf - inf = NaN.

Reported: https://github.com/pytorch/pytorch/issues/22442
("torch.nn.functional.gumbel_softmax yields NaNs"), the exponential sampler
returning 0; also https://github.com/pytorch/pytorch/issues/22586.
"""

import jax
import jax.numpy as jnp

EXPECT = {
    "primitive": "log",
    "phase": "forward",
    "cause": "unsafe_op",
    "seen": "log received 0.0 at 1 of 24 positions",
}


def gumbel_softmax(logits, noise, tau=1.0):
    gumbels = -jnp.log(noise)  # <- creates
    return jax.nn.softmax((logits + gumbels) / tau, axis=-1)


def loss(params, x, noise, target):
    logits = x @ params["w"]
    y = gumbel_softmax(logits, noise)
    return jnp.mean((y @ params["codebook"] - target) ** 2)


def make():
    k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
    params = {
        "w": jax.random.normal(k1, (5, 8)) * 0.3,
        "codebook": jax.random.normal(k2, (8, 4)),
    }
    x = jax.random.normal(k3, (3, 5))
    noise = jax.random.exponential(k4, (3, 8)).at[1, 6].set(0.0)  # a zero draw
    return jax.value_and_grad(loss), (params, x, noise, jnp.zeros((3, 4)))
