"""A deep Equinox MLP initialized with a far too large weight scale: the
activations grow ~10**4.5 per layer and a matmul overflows float32."""

import equinox as eqx
import jax
import jax.numpy as jnp

EXPECT = {
    "primitive": "dot_general",
    "phase": "forward",
    "cause": "overflow",
    "seen": "dot_general received max |x|",
}


class MLP(eqx.Module):
    layers: list

    def __init__(self, key, depth=12, width=16, init_scale=20000.0):
        keys = jax.random.split(key, depth)
        self.layers = [eqx.nn.Linear(width, width, use_bias=False, key=k) for k in keys]
        self.layers = [
            eqx.tree_at(lambda lin: lin.weight, lin, lin.weight * init_scale)
            for lin in self.layers
        ]

    def __call__(self, x):
        for layer in self.layers:
            x = jax.nn.relu(x @ layer.weight.T)  # <- creates
        return x


def loss(model, x):
    return jnp.mean(jax.vmap(model)(x))


def make():
    model = MLP(jax.random.key(4))
    x = jnp.ones((2, 16))
    grad_fn = eqx.filter_value_and_grad(loss)

    def value_and_grad(model, x):
        return grad_fn(model, x)

    return value_and_grad, (model, x)
