"""Angular loss between an embedding and its target direction: for a perfectly
aligned pair the cosine is exactly 1, arccos(1) = 0 is fine, but its derivative
-1/sqrt(1 - x**2) is infinite there (clip the cosine into (-1, 1))."""

import jax
import jax.numpy as jnp

EXPECT = {
    "primitive": "rsqrt",
    "phase": "backward",
    "cause": "unsafe_op",
    "seen": "rsqrt received 0.0 at 1 of 2 positions",
}


def angular_loss(params, batch):
    pred = batch["x"] * params["scale"]
    cos = jnp.sum(pred * batch["direction"], -1) / (
        jnp.linalg.norm(pred, axis=-1) * jnp.linalg.norm(batch["direction"], axis=-1)
    )
    angle = jnp.arccos(cos)  # <- creates
    return jnp.mean(angle**2)


def make():
    params = {"scale": jnp.array([2.0, 2.0, 2.0])}
    x = jnp.array([[1.0, 0.0, 0.0], [0.0, 3.0, 4.0]])
    direction = jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    return jax.value_and_grad(angular_loss), (params, {"x": x, "direction": direction})
