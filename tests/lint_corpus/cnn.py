"""A small Flax (linen) CNN classifier with BatchNorm and dropout."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax


class CNN(nn.Module):
    classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Conv(8, (3, 3))(x)
        x = nn.BatchNorm(use_running_average=not train)(x)
        x = nn.relu(x)
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        x = nn.Conv(16, (3, 3))(x)
        x = nn.relu(x)
        x = x.reshape(x.shape[0], -1)
        x = nn.Dropout(0.1, deterministic=not train)(x)
        return nn.Dense(self.classes)(x)


def _make(bug):
    model = CNN()
    images = jnp.zeros((4, 8, 8, 1))
    labels = jnp.zeros((4,), jnp.int32)
    variables = jax.eval_shape(  # abstract parameters: lint only traces
        functools.partial(model.init, train=False), jax.random.key(0), images
    )
    params, stats = variables["params"], variables["batch_stats"]

    def loss(params, stats, images, labels, key):
        logits, _ = model.apply(
            {"params": params, "batch_stats": stats},
            images,
            train=True,
            rngs={"dropout": key},
            mutable=["batch_stats"],
        )
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        l2 = sum(jnp.sum(p**2) for p in jax.tree_util.tree_leaves(params))
        if bug:
            return ce + 1e-4 * jnp.sqrt(l2)  # bug: sqrt-zero-grad
        return ce + 1e-4 * l2

    return loss, (params, stats, images, labels, jax.random.key(1))


def factory():
    return _make(bug=False)


def buggy_factory():
    return _make(bug=True)
