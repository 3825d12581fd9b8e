"""A hand-written custom_vjp for a vector norm whose backward divides by the
norm without a guard: fine in the forward pass, 0/0 in the backward pass for
a zero residual. JAX traces the bwd function at the call site, so its
equations carry the line that calls `fast_norm` (backward phase), not a line
inside `fast_norm_bwd`."""

import jax
import jax.numpy as jnp


@jax.custom_vjp
def fast_norm(x):
    return jnp.sqrt(jnp.sum(x * x))


def fast_norm_fwd(x):
    n = fast_norm(x)
    return n, (x, n)


def fast_norm_bwd(res, g):
    x, n = res
    return (g * x / n,)


fast_norm.defvjp(fast_norm_fwd, fast_norm_bwd)

EXPECT = {
    "primitive": "div",
    "phase": "backward",
    "cause": "unsafe_op",
    "seen": "div received a zero denominator: 0/0 at 3 of 3 positions",
}


def loss(params, x):
    residual = x @ params["w"] - params["target"]
    return fast_norm(residual) + 0.01 * jnp.sum(params["w"] ** 2)  # <- creates


def make():
    params = {"w": jnp.eye(3), "target": jnp.array([1.0, 2.0, 3.0])}
    x = jnp.array([1.0, 2.0, 3.0])
    return jax.value_and_grad(loss), (params, x)
