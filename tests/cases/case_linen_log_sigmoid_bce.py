"""A Flax linen binary classifier (TrainState) with the binary cross-entropy
written from the formula, -(y log(sigmoid(z)) + (1 - y) log(1 - sigmoid(z))):
a confident logit of 40 makes sigmoid(z) round to exactly 1.0 in float32 and
log(1 - 1) = log(0) = -inf (jax.nn.log_sigmoid or
optax.sigmoid_binary_cross_entropy are the stable forms).

Reported: https://github.com/huggingface/candle/issues/2561
("binary_cross_entropy_with_logit numerically unstable for high logits":
sigmoid gives 1.0, log(0)); also https://github.com/pytorch/pytorch/issues/49844.
"""

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from flax.training import train_state

EXPECT = {
    "primitive": "log",
    "phase": "forward",
    "cause": "unsafe_op",
    "seen": "log received 0.0 at 4 of 4 positions",
}


class Classifier(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(1)(nn.tanh(nn.Dense(8)(x)))[:, 0]


def bce(logits, labels):
    p = jax.nn.sigmoid(logits)
    return -(labels * jnp.log(p) + (1 - labels) * jnp.log(1 - p))  # <- creates


def make():
    model = Classifier()
    x = jnp.array([[0.1, 0.2], [1.0, -1.0], [0.3, 0.3], [-0.5, 0.2]])
    params = model.init(jax.random.key(0), x)["params"]
    params["Dense_0"]["bias"] = jnp.array([40.0])  # an overconfident head
    state = train_state.TrainState.create(
        apply_fn=model.apply, params=params, tx=optax.adam(1e-3)
    )
    labels = jnp.array([1.0, 0.0, 1.0, 1.0])

    def train_step(state, x, labels):
        def loss_fn(params):
            logits = state.apply_fn({"params": params}, x)
            return bce(logits, labels).mean()

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(grads=grads), loss

    return train_step, (state, x, labels)
