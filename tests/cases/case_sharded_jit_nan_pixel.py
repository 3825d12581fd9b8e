"""A linen MLP classifier trained with a batch sharded over 8 devices
(jax.jit with NamedSharding): one image of the dataset holds a NaN pixel
(a corrupted file decoded as NaN). The NaN is in the argument before any
equation runs: input data, at image 13, row 2, column 5.

Reported: https://github.com/google/flax/issues/2246 ("nan in loss", a Flax
beginner's training loop), the classic first suspect; see also
https://github.com/jaxleyverse/jaxley/issues/317 (list of NaN causes).
"""

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

EXPECT = {
    "primitive": None,
    "phase": "input",
    "cause": "input_data",
    "leaf": "batch['image']",
    "element": (13, 2, 5),
}


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(32)(x))
        return nn.Dense(10)(x)


def make():
    model = MLP()
    mesh = Mesh(jax.devices()[:8], ("batch",))
    images = jax.random.uniform(jax.random.key(1), (16, 8, 8))
    images = images.at[13, 2, 5].set(jnp.nan)
    batch = {"image": images, "label": jnp.arange(16) % 10}
    batch = jax.device_put(batch, NamedSharding(mesh, P("batch")))
    params = model.init(jax.random.key(0), images[:1])["params"]
    tx = optax.adam(1e-3)
    opt_state = tx.init(params)

    @jax.jit
    def train_step(params, opt_state, batch):
        def loss_fn(params):
            logits = model.apply({"params": params}, batch["image"])
            labels = batch["label"]
            return optax.softmax_cross_entropy_with_integer_labels(
                logits, labels
            ).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return train_step, (params, opt_state, batch)
