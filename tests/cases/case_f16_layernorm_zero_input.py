"""An Equinox model run in float16 with a hand-written layer norm using
eps=1e-12 (the BERT default), fed a batch whose padding rows are all zeros:
the variance is 0, the epsilon is 0.0 in float16, rsqrt(0) = inf and then
(x - mean) * inf = 0 * inf = NaN. In float32 the same step is finite.

Reported: https://github.com/pytorch/pytorch/issues/41527
("torch.nn.functional.layer_norm returns nan for fp16 all 0 tensor", eps=1e-12);
see also https://github.com/tensorflow/tensorflow/pull/24979.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import lax

EXPECT = {
    "primitive": "rsqrt",
    "phase": "forward",
    "cause": "precision",
    "seen": "1e-12 is 0.0 in float16",
}


class LayerNorm(eqx.Module):
    weight: jax.Array
    bias: jax.Array
    eps: float = 1e-12

    def __call__(self, x):
        mean = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean((x - mean) ** 2, axis=-1, keepdims=True)
        inv = lax.rsqrt(var + self.eps)  # <- creates
        return (x - mean) * inv * self.weight + self.bias


class Encoder(eqx.Module):
    embed: eqx.nn.Linear
    norm: LayerNorm
    head: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.embed = eqx.nn.Linear(16, 16, use_bias=False, key=k1)
        self.norm = LayerNorm(jnp.ones(16), jnp.zeros(16))
        self.head = eqx.nn.Linear(16, 4, key=k2)

    def __call__(self, x):
        return self.head(self.norm(self.embed(x)))


def make():
    model = Encoder(jax.random.key(0))
    model = jax.tree_util.tree_map(
        lambda a: a.astype(jnp.float16) if eqx.is_inexact_array(a) else a, model
    )
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def loss(params, x, y):
        model = eqx.combine(params, static)
        pred = jax.vmap(model)(x).astype(jnp.float32)
        return jnp.mean((pred - y) ** 2)

    x = jnp.concatenate([jnp.ones((2, 16)), jnp.zeros((2, 16))]).astype(jnp.float16)
    y = jnp.zeros((4, 4))
    return jax.value_and_grad(loss), (params, x, y)
