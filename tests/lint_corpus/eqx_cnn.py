"""An Equinox CNN for multi-label images, in the style of Equinox's MNIST example."""

import equinox as eqx
import jax
import jax.numpy as jnp
import optax


class CNN(eqx.Module):
    layers: list

    def __init__(self, key):
        k1, k2, k3 = jax.random.split(key, 3)
        self.layers = [
            eqx.nn.Conv2d(1, 4, kernel_size=3, key=k1),
            eqx.nn.MaxPool2d(kernel_size=2),
            jax.nn.relu,
            jnp.ravel,
            eqx.nn.Linear(4 * 9 * 9, 32, key=k2),
            jax.nn.sigmoid,
            eqx.nn.Linear(32, 5, key=k3),
        ]

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def _make(bug):
    model = eqx.filter_eval_shape(CNN, jax.random.key(0))
    params, static = eqx.partition(
        model, lambda x: eqx.is_array(x) or isinstance(x, jax.ShapeDtypeStruct)
    )
    x = jnp.zeros((8, 1, 12, 12))
    y = jnp.zeros((8, 5))

    def loss(params, x, y):
        model = eqx.combine(params, static)
        logits = jax.vmap(model)(x)
        if bug:
            p = jax.nn.sigmoid(logits)
            bce = -(y * jnp.log(p) + (1 - y) * jnp.log(1 - p))  # bug: log-sigmoid
            return jnp.mean(bce)
        return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, y))

    return loss, (params, x, y)


def factory():
    return _make(bug=False)


def buggy_factory():
    return _make(bug=True)
