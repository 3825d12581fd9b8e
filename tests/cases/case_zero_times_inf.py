"""A constrained policy loss with an infinite barrier for infeasible actions,
weighted by a per-constraint coefficient that is still 0 at the start of
training: 0 * inf = NaN."""

import jax
import jax.numpy as jnp

EXPECT = {
    "primitive": "mul",
    "phase": "forward",
    "cause": "unsafe_op",
    "seen": "mul received 0 * inf at 1 of 4 positions",
}


def loss(params, batch):
    actions = jnp.tanh(batch["obs"] @ params["policy"])
    feasible = jnp.abs(actions) < 0.9
    barrier = jnp.where(feasible, -jnp.log1p(-jnp.abs(actions)), jnp.inf)
    penalty = params["penalty_coef"] * barrier  # <- creates
    return jnp.mean((actions - batch["target"]) ** 2) + jnp.mean(penalty)


def make():
    params = {
        "policy": jnp.array([[3.0, 0.1], [2.0, -0.2]]),
        "penalty_coef": jnp.zeros(2),
    }
    obs = jnp.array([[1.0, 1.0], [0.1, 0.2]])
    batch = {"obs": obs, "target": jnp.zeros((2, 2))}
    return jax.value_and_grad(loss), (params, batch)
