"""A gradient-checkpointed (jax.checkpoint) MLP block whose softplus is written
as log(1 + exp(x)): a pre-activation of ~120 overflows exp in float32
(jax.nn.softplus is the stable form)."""

import jax
import jax.numpy as jnp

EXPECT = {
    "primitive": "exp",
    "phase": "forward",
    "cause": "overflow",
    "seen": "exp received max 240.0, overflow above 88.7 for float32",
}


@jax.checkpoint
def block(w, h):
    z = h @ w
    return jnp.log(1.0 + jnp.exp(z))  # <- creates


def loss(params, x, y):
    h = x
    for w in params["layers"]:
        h = block(w, h)
    return jnp.mean((h - y) ** 2)


def make():
    params = {"layers": [jnp.eye(4) * 2.0, jnp.eye(4) * 3.0, jnp.eye(4) * 4.0]}
    x = jnp.array([[1.0, -1.0, 10.0, 0.5]])
    return jax.value_and_grad(loss), (params, x, jnp.zeros((1, 4)))
