"""Mixed-precision softmax written by hand in float16 without subtracting the
max: exp(13.8) = 985000 exceeds float16's 65504 (finite in float32: precision)."""

import jax
import jax.numpy as jnp

EXPECT = {
    "primitive": "exp",
    "phase": "forward",
    "cause": "precision",
    "seen": "exp received max 13.8, overflow above 11.1 for float16",
}


def softmax_f16(logits):
    e = jnp.exp(logits)  # <- creates
    return e / jnp.sum(e, axis=-1, keepdims=True)


def loss(params, batch):
    h = batch["x"].astype(jnp.float16) @ params["w"].astype(jnp.float16)
    probs = softmax_f16(h)
    return jnp.mean(jnp.sum(probs.astype(jnp.float32) * batch["y"], axis=-1))


def make():
    params = {"w": jnp.full((4, 5), 2.0, jnp.float32)}
    x = jnp.linspace(0.0, 2.0, 12, dtype=jnp.float32).reshape(3, 4)
    batch = {"x": x, "y": jax.nn.one_hot(jnp.array([0, 1, 2]), 5)}
    return jax.value_and_grad(loss), (params, batch)
