"""Hand-written cross-entropy log(softmax(logits)) on a Flax NNX classifier:
a confident wrong logit makes a probability underflow to 0 and log(0) = -inf
(use jax.nn.log_softmax / optax.softmax_cross_entropy)."""

import jax
import jax.numpy as jnp
from flax import nnx

EXPECT = {
    "primitive": "log",
    "phase": "forward",
    "cause": "unsafe_op",
    "seen": "log received 0.0 at 14 of 24 positions",
}


class Classifier(nnx.Module):
    def __init__(self, din, dout, rngs):
        self.hidden = nnx.Linear(din, 16, rngs=rngs)
        self.out = nnx.Linear(16, dout, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.relu(self.hidden(x)))


def make():
    model = Classifier(4, 3, nnx.Rngs(0))
    graphdef, state = nnx.split(model)

    def loss(state, x, labels):
        logits = nnx.merge(graphdef, state)(x) * 200.0
        probs = jax.nn.softmax(logits, axis=-1)
        onehot = jax.nn.one_hot(labels, 3)
        return -jnp.mean(jnp.sum(onehot * jnp.log(probs), axis=-1))  # <- creates

    x = jax.random.normal(jax.random.key(2), (8, 4)) * 3.0
    labels = jnp.arange(8) % 3
    return jax.value_and_grad(loss), (state, x, labels)
