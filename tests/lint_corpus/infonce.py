"""A contrastive (InfoNCE / SimCLR) loss over two augmented views (Flax NNX).

Embeddings are L2-normalised, similarities scaled by a temperature, and the
positive pair of row i is column i. The planted bug normalises with
jnp.linalg.norm and no epsilon.
"""

import jax
import jax.numpy as jnp
import optax
from flax import nnx


class Encoder(nnx.Module):
    def __init__(self, rngs):
        self.fc1 = nnx.Linear(16, 32, rngs=rngs)
        self.fc2 = nnx.Linear(32, 8, rngs=rngs)

    def __call__(self, x):
        return self.fc2(nnx.relu(self.fc1(x)))


def _make(bug):
    model = nnx.eval_shape(lambda: Encoder(nnx.Rngs(0)))
    graphdef, params = nnx.split(model)
    views = jnp.zeros((2, 8, 16))

    def normalize(z):
        if bug:
            norm = jnp.linalg.norm(z, axis=-1, keepdims=True)  # bug: sqrt-zero-grad
            return z / norm  # bug: div-no-epsilon
        return z * jax.lax.rsqrt(jnp.sum(z**2, axis=-1, keepdims=True) + 1e-12)

    def loss(params, views, temperature=0.1):
        encoder = nnx.merge(graphdef, params)
        za, zb = normalize(encoder(views[0])), normalize(encoder(views[1]))
        logits = za @ zb.T / temperature
        labels = jnp.arange(logits.shape[0])
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    return loss, (params, views)


def factory():
    return _make(bug=False)


def buggy_factory():
    return _make(bug=True)
