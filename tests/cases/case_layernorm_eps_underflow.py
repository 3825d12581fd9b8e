"""Evaluation step of a float16 model: RMS normalization with eps=1e-12 meets
padding tokens whose embedding is all zeros; the epsilon rounds to 0 in
float16, so the normalizer is 0 and 0/0 = NaN (float32 gives the same 0/0:
unsafe_op; the fix is eps >= 1e-5 or normalizing in float32)."""

import jax
import jax.numpy as jnp

EXPECT = {
    "primitive": "div",
    "phase": "forward",
    "cause": "unsafe_op",
    "seen": "div received a zero denominator: 0/0 at 16 of 32 positions",
}


def rms_norm(x, scale, eps=1e-12):
    rms = jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
    return scale * (x / rms)  # <- creates


def loss(params, tokens, targets):
    x = params["embed"].astype(jnp.float16)[tokens]
    h = rms_norm(x, params["scale"].astype(jnp.float16))
    logits = h.astype(jnp.float32) @ params["out"]
    picked = jnp.take_along_axis(logits, targets[:, None], -1)[:, 0]
    return jnp.mean(jax.nn.logsumexp(logits, -1) - picked)


def make():
    k1, k2 = jax.random.split(jax.random.key(7))
    embed = jax.random.normal(k1, (5, 8)).at[0].set(0.0)  # row 0: padding
    params = {
        "embed": embed,
        "scale": jnp.ones(8),
        "out": jax.random.normal(k2, (8, 5)),
    }
    tokens = jnp.array([3, 1, 0, 0])
    targets = jnp.array([1, 2, 0, 0])
    return loss, (params, tokens, targets)
