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


def _make(bug):
    net = eqx.filter_eval_shape(Net, jax.random.key(0))  # abstract: lint only traces
    params, static = eqx.partition(
        net, lambda leaf: eqx.is_array(leaf) or isinstance(leaf, jax.ShapeDtypeStruct)
    )
    x = jnp.ones((5, 8))
    y = jnp.zeros((5, 1))

    def loss(params, x, y):
        model = eqx.combine(params, static)
        pred = jax.vmap(model)(x)
        if bug:  # a root-squared error, zero-guarded the usual (wrong) way
            err = (pred - y) ** 2
            rse = jnp.where(err > 0, jnp.sqrt(err), 0.0)  # bug: where-nan-grad
            return jnp.mean(rse)
        return optax.huber_loss(pred, y).mean() + 0.5 * jnp.mean((pred - y) ** 2)

    return loss, (params, x, y)


def factory():
    return _make(bug=False)


def buggy_factory():
    return _make(bug=True)
