"""An Equinox attention layer (as equinox.nn.MultiheadAttention was written
before 2023) taking the additive attention bias from the data pipeline: 0
for visible keys, -inf for padding. A query row that sees no key at all is
all -inf and softmax computes -inf - (-inf) = NaN. The -inf in the argument
is intended; the event is the softmax.

Reported: https://github.com/patrick-kidger/equinox/pull/274 (a fully masked
row gives NaN; the fix masks with the smallest finite float), also
https://github.com/FluxML/NNlib.jl/issues/572.
"""

import equinox as eqx
import jax
import jax.numpy as jnp

EXPECT = {
    "primitive": "sub",
    "phase": "forward",
    "cause": "unsafe_op",
    "seen": "sub received -inf - -inf at 3 of 9 positions",
}


class SelfAttention(eqx.Module):
    query: eqx.nn.Linear
    key: eqx.nn.Linear
    value: eqx.nn.Linear

    def __init__(self, size, key):
        kq, kk, kv = jax.random.split(key, 3)
        self.query = eqx.nn.Linear(size, size, key=kq)
        self.key = eqx.nn.Linear(size, size, key=kk)
        self.value = eqx.nn.Linear(size, size, key=kv)

    def __call__(self, x, bias):
        q = jax.vmap(self.query)(x)
        k = jax.vmap(self.key)(x)
        v = jax.vmap(self.value)(x)
        logits = q @ k.T / jnp.sqrt(q.shape[-1]) + bias
        weights = jax.nn.softmax(logits, axis=-1)  # <- creates
        return weights @ v


def make():
    model = SelfAttention(8, jax.random.key(0))
    params, static = eqx.partition(model, eqx.is_array)

    def loss(params, x, bias, y):
        model = eqx.combine(params, static)
        return jnp.mean((model(x, bias) - y) ** 2)

    x = jax.random.normal(jax.random.key(1), (3, 8))
    visible = jnp.array([[1, 1, 0], [1, 1, 0], [0, 0, 0]], bool)
    bias = jnp.where(visible, 0.0, -jnp.inf)
    return eqx.filter_value_and_grad(loss), (params, x, bias, jnp.zeros((3, 8)))
