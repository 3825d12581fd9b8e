"""HMM forward algorithm in log space inside lax.scan: a frame whose emission
mask rules out every state makes alpha all -inf, and at the next step
logsumexp of all -inf takes log(0) (iteration 2 of the scan)."""

import jax
import jax.numpy as jnp
from jax import lax

EXPECT = {
    "primitive": "log",
    "phase": "forward",
    "cause": "unsafe_op",
    "iteration": (2,),
    "seen": "log received 0.0 at 3 of 3 positions",
}


def log_likelihood(params, emissions, emission_mask):
    allowed = jnp.array([[1, 1, 0], [0, 1, 1], [1, 0, 1]], bool)
    log_trans = jax.nn.log_softmax(
        jnp.where(allowed, params["trans"], -jnp.inf), axis=-1
    )
    log_emit = jnp.where(emission_mask, emissions @ params["emit"], -jnp.inf)

    def step(alpha, frame):
        scores = alpha[:, None] + log_trans
        alpha = jax.nn.logsumexp(scores, axis=0) + frame  # <- creates
        return alpha, None

    alpha, _ = lax.scan(step, log_emit[0], log_emit[1:])
    return -jax.nn.logsumexp(alpha)


def make():
    params = {
        "trans": jnp.zeros((3, 3)),
        "emit": jnp.array([[0.5, -0.2, 0.1], [0.3, 0.3, -0.4]]),
    }
    emissions = jnp.ones((5, 2))
    emission_mask = jnp.ones((5, 3), bool).at[2].set(False)
    return jax.value_and_grad(log_likelihood), (params, emissions, emission_mask)
