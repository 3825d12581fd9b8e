"""Linear regression trained for 40 optax SGD steps in lax.scan with a learning
rate far above 2/L: the weights oscillate with growing amplitude until a
value overflows float32.

What really happens (checked step by step): the gradients and the updates stay
finite; the first nonfinite value is the squared residual of the forward pass
at step 12 (pred ~ 2e20, squared past 3.4e38), so the cause is `overflow` in
the forward pass, not `update` (lr * grad never overflows first) and not
`exploding_gradient` (the gradient at step 12 is computed from that inf).
Clipping the gradients or lowering the learning rate is the fix."""

import jax
import jax.numpy as jnp
import optax
from jax import lax

EXPECT = {
    "primitive": "integer_pow",
    "phase": "forward",
    "cause": "overflow",
    "iteration": (12,),
    "seen": "integer_pow received max |x| 2.37e+20 and overflowed float32",
}

tx = optax.sgd(learning_rate=3.0)


def mse(params, x, y):
    pred = x @ params["w"] + params["b"]
    return jnp.mean((pred - y) ** 2)  # <- creates


def train(params, x, y):
    def step(carry, _):
        params, opt_state = carry
        value, grads = jax.value_and_grad(mse)(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), value

    (params, _), losses = lax.scan(step, (params, tx.init(params)), None, length=40)
    return params, losses


def make():
    x = jnp.array([[1.0, 2.0], [2.0, 1.0], [3.0, 3.0], [0.5, 1.5]])
    y = jnp.array([1.0, 0.0, 2.0, 1.0])
    params = {"w": jnp.zeros(2), "b": jnp.array(0.0)}
    return train, (params, x, y)
