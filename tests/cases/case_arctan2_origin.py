"""Heading loss of a 2-D motion model: atan2(vy, vx) of a particle at rest is
atan2(0, 0) = 0 in the value, but its derivative y/(x**2 + y**2) is 0/0."""

import jax
import jax.numpy as jnp

EXPECT = {
    "primitive": "div",
    "phase": "backward",
    "cause": "unsafe_op",
    "seen": "div received a zero denominator: 0/0 at 1 of 3 positions",
}


def heading_loss(params, batch):
    velocity = batch["state"] @ params["dynamics"]
    heading = jnp.arctan2(velocity[:, 1], velocity[:, 0])  # <- creates
    return jnp.mean((heading - batch["target_heading"]) ** 2)


def make():
    params = {"dynamics": jnp.array([[1.0, 0.0], [0.0, 1.0]])}
    state = jnp.array([[1.0, 1.0], [0.0, 0.0], [-1.0, 2.0]])
    batch = {"state": state, "target_heading": jnp.array([0.5, 0.0, 2.0])}
    return jax.value_and_grad(heading_loss), (params, batch)
