"""A Flax NNX regression model trained with nnx.Optimizer(optax.sgd) at a
learning rate far above 2/L: for seven steps every loss is finite but the
parameters grow geometrically, until one step overflows float32. Given the
run's history (losses, gradient and parameter norms of the previous steps)
the cause is the learning rate, not an overflowing activation.

Reported: https://github.com/tensorflow/tensorflow/issues/38796 ("A high
learning rate may cause a nan or an inf loss with tf.keras.optimizers.SGD").
"""

import jax
import jax.numpy as jnp
import optax
from flax import nnx

EXPECT = {
    "primitive": "integer_pow",
    "phase": "forward",
    "cause": "learning_rate",
    "seen": "parameter norm grew",
}

HISTORY = {}


class Regressor(nnx.Module):
    def __init__(self, rngs):
        self.linear = nnx.Linear(8, 1, rngs=rngs)

    def __call__(self, x):
        return self.linear(x)


def loss_fn(model, x, y):
    return jnp.mean((model(x) - y) ** 2)  # <- creates


def make():
    model = Regressor(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.sgd(0.5), wrt=nnx.Param)
    graphdef, state = nnx.split((model, optimizer))
    x = 10.0 * jax.random.normal(jax.random.key(1), (64, 8))  # unscaled features
    y = x @ jnp.arange(8.0)[:, None]

    def train_step(state, x, y):
        model, optimizer = nnx.merge(graphdef, state)
        loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
        optimizer.update(model, grads)
        return loss, nnx.state((model, optimizer))

    step = jax.jit(train_step)
    history = {"loss": [], "grad_norm": [], "param_norm": []}
    while True:
        loss, new_state = step(state, x, y)
        if not jnp.isfinite(loss):
            break
        model, _ = nnx.merge(graphdef, state)
        grads = nnx.grad(loss_fn)(model, x, y)
        history["loss"].append(float(loss))
        history["grad_norm"].append(float(optax.tree.norm(grads)))
        history["param_norm"].append(float(optax.tree.norm(nnx.state(model))))
        state = new_state
    HISTORY.clear()
    HISTORY.update(history)
    return train_step, (state, x, y)
