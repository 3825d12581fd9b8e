"""A pre-norm residual stack written as scan over layers with remat (the
MaxText / Flax scan-over-layers pattern): the norm computes the variance as
mean(h**2) - mean(h)**2. Layer 1's output bias has grown to ~3000, so at
layer 2 the two means cancel and the variance goes negative: rsqrt is NaN in
iteration 2 of the scan, not in layer 0.

Reported: https://github.com/google/flax/issues/1491 ("Variance can be
negative in BatchNorm computation, leading to NaN's": E[x**2] - E[x]**2 on
inputs with a large mean).
"""

import jax
import jax.numpy as jnp
from jax import lax

EXPECT = {
    "primitive": "rsqrt",
    "phase": "forward",
    "cause": "unsafe_op",
    "iteration": (2,),
    "seen": "rsqrt received negative values",
}


def rms_center_norm(h, eps=1e-6):
    mean = jnp.mean(h, axis=-1, keepdims=True)
    var = jnp.mean(h * h, axis=-1, keepdims=True) - mean * mean
    return (h - mean) * lax.rsqrt(var + eps)  # <- creates


def layer(h, p):
    y = jax.nn.gelu(rms_center_norm(h) @ p["w_in"]) @ p["w_out"] + p["b_out"]
    return h + y, None


def forward(params, x):
    h, _ = lax.scan(jax.checkpoint(layer), x, params["layers"])
    return h @ params["head"]


def loss_fn(params, x, y):
    return jnp.mean((forward(params, x) - y) ** 2)


def make():
    n_layers, d, f = 4, 16, 32
    k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
    layers = {
        "w_in": jax.random.normal(k1, (n_layers, d, f)) / d**0.5,
        "w_out": jax.random.normal(k2, (n_layers, f, d)) * 0.01,
        "b_out": jnp.zeros((n_layers, d)).at[1].set(3000.0),  # a drifted bias
    }
    params = {"layers": layers, "head": jax.random.normal(k3, (d, 1)) / d**0.5}
    x = jax.random.normal(k4, (8, d))
    return jax.value_and_grad(loss_fn), (params, x, jnp.zeros((8, 1)))
