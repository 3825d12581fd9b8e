"""A hand-written custom_vjp sigmoid that keeps e = exp(-x) as the residual
and computes the derivative as e / (1 + e)**2: for a very negative logit
(x = -200) exp(200) overflows float32 to inf, the value 1 / (1 + inf) = 0 is
fine, but the backward pass divides inf by inf = NaN. (Use s * (1 - s)
from the output.)

Reported: https://github.com/jax-ml/jax/issues/777 ("Gradient of np.exp
sometimes causes invalid values": grad of 1/(1+exp(-x)) is NaN at x=-200);
the inf/inf analysis is in https://github.com/jax-ml/jax/pull/540.
"""

import jax
import jax.numpy as jnp

EXPECT = {
    "primitive": "exp",
    "phase": "backward",
    "cause": "overflow",
    "seen": "exp received max 200.0, overflow above 88.7 for float32",
}


@jax.custom_vjp
def sigmoid(x):
    return 1.0 / (1.0 + jnp.exp(-x))


def sigmoid_fwd(x):
    e = jnp.exp(-x)  # <- creates
    return 1.0 / (1.0 + e), e


def sigmoid_bwd(e, g):
    return (g * e / (1.0 + e) ** 2,)


sigmoid.defvjp(sigmoid_fwd, sigmoid_bwd)


def loss(w, x, y):
    p = sigmoid(x @ w)
    return jnp.mean((p - y) ** 2)


def make():
    w = jnp.array([10.0, -5.0])
    x = jnp.array([[1.0, 0.0], [-20.0, 0.0], [0.5, 0.5]])  # logit -200 for row 1
    y = jnp.array([1.0, 0.0, 1.0])
    return jax.value_and_grad(loss), (w, x, y)
