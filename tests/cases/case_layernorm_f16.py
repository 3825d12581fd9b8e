"""A hand-written LayerNorm with a tiny epsilon (1e-12, which is 0 in float16)
in a float16 residual stream whose activations drifted to ~5000: jnp.sum
accumulates in float32 and the row sum 80000 does not fit back into float16
(convert_element_type overflows; finite in float32: precision). Then
x - inf, inf / inf = NaN."""

import jax
import jax.numpy as jnp

EXPECT = {
    "primitive": "convert_element_type",
    "phase": "forward",
    "cause": "precision",
    "seen": "convert_element_type received max |x| 80000.0 and overflowed float16",
}


def layer_norm(x, gamma, beta, eps=1e-12):
    d = x.shape[-1]
    mean = x.sum(-1, keepdims=True) / d  # <- creates
    var = ((x - mean) ** 2).sum(-1, keepdims=True) / d
    return gamma * (x - mean) / jnp.sqrt(var + eps) + beta


def block(params, x):
    h = x.astype(jnp.float16) @ params["w"].astype(jnp.float16)
    gamma = params["gamma"].astype(jnp.float16)
    beta = params["beta"].astype(jnp.float16)
    return layer_norm(h, gamma, beta).astype(jnp.float32)


def loss(params, batch):
    return jnp.mean((block(params, batch["x"]) - batch["y"]) ** 2)


def make():
    d = 16
    params = {
        "w": jnp.diag(jnp.linspace(4000.0, 6000.0, d)),
        "gamma": jnp.ones(d),
        "beta": jnp.zeros(d),
    }
    batch = {"x": jnp.ones((2, d)), "y": jnp.zeros((2, d))}
    return jax.value_and_grad(loss), (params, batch)
