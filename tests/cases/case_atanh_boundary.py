"""Tanh-squashed Gaussian policy (SAC) evaluating the log-probability of
replay-buffer actions clipped to exactly +/-1: arctanh(1) = inf."""

import jax
import jax.numpy as jnp

EXPECT = {
    "primitive": "atanh",
    "phase": "forward",
    "cause": "unsafe_op",
    "seen": "atanh received +/-1.0 at 1 of 4 positions",
}


def log_prob(params, obs, action):
    mean = obs @ params["mu"]
    log_std = jnp.clip(obs @ params["log_std"], -5.0, 2.0)
    pre_tanh = jnp.arctanh(action)  # <- creates
    z = (pre_tanh - mean) / jnp.exp(log_std)
    gauss = -0.5 * z**2 - log_std - 0.5 * jnp.log(2 * jnp.pi)
    return jnp.sum(gauss - jnp.log1p(-(action**2) + 1e-6), -1)


def actor_loss(params, batch):
    return -jnp.mean(log_prob(params, batch["obs"], batch["action"]))


def make():
    params = {"mu": jnp.full((3, 2), 0.1), "log_std": jnp.zeros((3, 2))}
    obs = jnp.array([[0.1, 0.2, 0.3], [1.0, -1.0, 0.5]])
    action = jnp.clip(jnp.array([[0.3, -0.5], [1.7, 0.2]]), -1.0, 1.0)
    return jax.value_and_grad(actor_loss), (params, {"obs": obs, "action": action})
