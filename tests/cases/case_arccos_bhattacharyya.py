"""The Bhattacharyya angle arccos(sum(sqrt(p) * sqrt(q))) between two softmax
distributions, as the loss of a model that has converged (p == q): the cosine
is exactly 1, the loss is 0, but the derivative of arccos,
-1/sqrt(1 - x**2), is infinite there and every gradient is NaN.

Reported: https://github.com/jax-ml/jax/issues/15798 ("Gradient of arccos,
arcsin and arctan returns nans when optimization converges").
"""

import jax
import jax.numpy as jnp

EXPECT = {
    "primitive": "rsqrt",
    "phase": "backward",
    "cause": "unsafe_op",
    "seen": "rsqrt received 0.0 at 1 of 1 position",
}


def foo_loss(p, q):
    return jnp.arccos(jnp.vdot(jnp.sqrt(p), jnp.sqrt(q)))  # <- creates


model = jax.nn.softmax


def model_cost(q_logit, p_logit):
    q = model(q_logit)
    p = model(p_logit)
    return foo_loss(p, q)


def make():
    p_logit = jnp.zeros(4)  # the optimum: both distributions uniform
    return jax.value_and_grad(model_cost), (p_logit, p_logit)
