"""bfloat16 activations with float32 parameters (cast at use, Haiku-style
mixed precision) and a batch norm whose variance is E[x**2] - E[x]**2: the
features sit near 50 with a spread of ~0.1, and in bfloat16 (8 bits of
mantissa, a step of 16 near 2500) the two means cancel to a negative
variance, so rsqrt is NaN. The same step computed in float32 is finite.

Reported: https://github.com/google-deepmind/dm-haiku/issues/396 ("batchnorm
with BF16 implementation ... results in NaN values"; the advice: upcast to
float32 around the batch norm).
"""

import jax
import jax.numpy as jnp
from jax import lax

EXPECT = {
    "primitive": "rsqrt",
    "phase": "forward",
    "cause": "precision",
    "seen": "finite in float32",
}


def batch_norm(x, scale, offset, eps=1e-3):
    mean = jnp.mean(x, axis=0)
    var = jnp.mean(x * x, axis=0) - mean * mean
    inv = lax.rsqrt(var + eps)  # <- creates
    return (x - mean) * inv * scale + offset


def forward(params, x):
    x = x.astype(jnp.bfloat16)
    h = x @ params["w1"].astype(jnp.bfloat16) + params["b1"].astype(jnp.bfloat16)
    h = batch_norm(
        h, params["scale"].astype(jnp.bfloat16), params["offset"].astype(jnp.bfloat16)
    )
    h = jax.nn.relu(h)
    return (h @ params["w2"].astype(jnp.bfloat16)).astype(jnp.float32)


def loss_fn(params, batch):
    logits = forward(params, batch["x"])
    return jnp.mean((logits - batch["y"]) ** 2)


def make():
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    d, h = 8, 16
    params = {
        "w1": jax.random.normal(k1, (d, h)) * 0.3,
        "b1": jnp.full((h,), 50.0),  # features with a large offset
        "scale": jnp.ones(h),
        "offset": jnp.zeros(h),
        "w2": jax.random.normal(k2, (h, 1)) / h**0.5,
    }
    batch = {"x": jax.random.normal(k3, (64, d)), "y": jnp.zeros((64, 1))}
    return jax.value_and_grad(loss_fn), (params, batch)
