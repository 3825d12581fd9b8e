"""An Equinox MLP regressor with LayerNorm and an optax optimiser step."""

import equinox as eqx
import jax
import jax.numpy as jnp
import optax


class Net(eqx.Module):
    mlp: eqx.nn.MLP
    norm: eqx.nn.LayerNorm

    def __init__(self, key):
        self.mlp = eqx.nn.MLP(8, 1, 32, 2, activation=jax.nn.silu, key=key)
        self.norm = eqx.nn.LayerNorm(8)

    def __call__(self, x):
        return self.mlp(self.norm(x))


def factory():
    net = eqx.filter_eval_shape(Net, jax.random.key(0))  # abstract: lint only traces
    params, static = eqx.partition(
        net, lambda leaf: eqx.is_array(leaf) or isinstance(leaf, jax.ShapeDtypeStruct)
    )
    x = jnp.ones((5, 8))
    y = jnp.zeros((5, 1))

    def loss(params, x, y):
        model = eqx.combine(params, static)
        pred = jax.vmap(model)(x)
        return optax.huber_loss(pred, y).mean() + 0.5 * jnp.mean((pred - y) ** 2)

    return loss, (params, x, y)
