"""Pairwise-distance loss guarded by jnp.where: the where hides 0 from the value,
not from the gradient (the double-where trap): d/dx sqrt(x) at 0 is 0.5/0."""

import jax
import jax.numpy as jnp

EXPECT = {
    "primitive": "div",
    "phase": "backward",
    "cause": "unsafe_op",
    "seen": "div received a zero denominator: x/0 (e.g. 0.5/0) at 3 of 9 positions",
}


def pairwise_distances(points):
    diff = points[:, None, :] - points[None, :, :]
    d2 = jnp.sum(diff**2, axis=-1)
    return jnp.where(d2 > 0, jnp.sqrt(d2), 0.0)  # <- creates


def loss(params, batch):
    points = batch["x"] @ params["w"]
    dist = pairwise_distances(points)
    return jnp.mean((dist - batch["target"]) ** 2)


def make():
    params = {"w": jnp.eye(3, dtype=jnp.float32)}
    x = jnp.array([[0.0, 1.0, 2.0], [1.0, 0.0, 0.5], [2.0, 2.0, 1.0]])
    batch = {"x": x, "target": jnp.ones((3, 3))}
    return jax.value_and_grad(loss), (params, batch)
