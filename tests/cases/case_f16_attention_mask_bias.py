"""Attention in float16 with the padding bias built as flax.linen.attention
built it in 2021: lax.select(mask > 0, 0.0, -1e10) cast to the compute dtype.
-1e10 is -inf in float16 (max 65504), and a padding query that sees no key
gets a row of -inf: the softmax computes -inf - (-inf) = NaN. In float32 or
bfloat16 the bias stays finite and the step is fine.

Reported: https://github.com/google/flax/issues/982 ("Attention in float16
produces NaNs when using mask"); also
https://github.com/google-deepmind/alphafold/issues/724 (a 1e9 mask bias).
"""

import jax
import jax.numpy as jnp
from jax import lax

EXPECT = {
    "primitive": "convert_element_type",
    "phase": "forward",
    "cause": "precision",
    "seen": "-1e+10 is -inf in float16",
}


def attention(q, k, v, mask, dtype=jnp.float16):
    attention_bias = lax.select(
        mask > 0,
        jnp.full(mask.shape, 0.0).astype(dtype),
        jnp.full(mask.shape, -1e10).astype(dtype),  # <- creates
    )
    logits = q @ jnp.swapaxes(k, -1, -2) / jnp.sqrt(q.shape[-1]).astype(dtype)
    weights = jax.nn.softmax(logits + attention_bias, axis=-1)
    return weights @ v


def loss(params, x, mask, y):
    h = x.astype(jnp.float16)
    q = h @ params["wq"].astype(jnp.float16)
    k = h @ params["wk"].astype(jnp.float16)
    v = h @ params["wv"].astype(jnp.float16)
    out = attention(q, k, v, mask).astype(jnp.float32)
    return jnp.mean((out - y) ** 2)


def make():
    ks = jax.random.split(jax.random.key(0), 4)
    d = 8
    params = {n: jax.random.normal(k, (d, d)) / d**0.5 for n, k in zip("qkv", ks)}
    params = {"w" + n: w for n, w in params.items()}
    x = jax.random.normal(ks[3], (2, 4, d))
    keep = jnp.array([[1, 1, 1, 0], [1, 1, 0, 0]])
    mask = keep[:, :, None] * keep[:, None, :]  # padding queries see no key
    return jax.value_and_grad(loss), (params, x, mask, jnp.zeros((2, 4, d)))
