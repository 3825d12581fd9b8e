"""An L3-norm penalty on small float16 weights: |w|**3 = 1e-12 underflows to 0
in float16, the norm 0 ** (1/3) = 0 is fine, but its derivative
(1/3) * s ** (-2/3) is inf at s = 0 and the gradient is NaN. In float32 the
sum is 1e-12 and everything is finite.

Reported: https://github.com/pytorch/pytorch/issues/43211 ("torch.norm gives
NaN gradient when I input small-value float16 tensor", a.norm(3) of 1e-4).
"""

import jax
import jax.numpy as jnp

EXPECT = {
    "primitive": "pow",
    "phase": "backward",
    "cause": "precision",
    "seen": "finite in float32",
}


def penalty(w):
    return jnp.linalg.norm(w, ord=3)  # <- creates


def loss(params, x, y):
    pred = x @ params["w"]
    return jnp.mean((pred - y) ** 2).astype(jnp.float32) + 0.1 * penalty(params["a"])


def make():
    params = {
        "w": jnp.full((4, 2), 0.5, jnp.float16),
        "a": jnp.array([1e-4], jnp.float16),
    }
    x = jnp.ones((3, 4), jnp.float16)
    y = jnp.ones((3, 2), jnp.float16)
    return jax.value_and_grad(loss), (params, x, y)
