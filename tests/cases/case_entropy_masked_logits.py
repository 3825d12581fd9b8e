"""Policy-gradient loss with an entropy bonus over masked actions: invalid
actions get logit -inf, log_softmax gives them -inf, and the entropy
-(exp(logp) * logp).sum() computes 0 * -inf = NaN.

Reported: https://github.com/huggingface/trl/pull/7251 (entropy_from_logits
returns NaN for zero-probability tokens, 0 * -inf; fixes trl#7221).
"""

import jax
import jax.numpy as jnp

EXPECT = {
    "primitive": "mul",
    "phase": "forward",
    "cause": "unsafe_op",
    "seen": "mul received 0 * inf at 2 of 12 positions",
}


def entropy_from_logits(logits):
    logps = jax.nn.log_softmax(logits, axis=-1)
    return -(jnp.exp(logps) * logps).sum(-1)  # <- creates


def policy_loss(params, obs, actions, advantages, valid):
    logits = obs @ params["w"] + params["b"]
    logits = jnp.where(valid, logits, -jnp.inf)  # action masking
    logp = jax.nn.log_softmax(logits)
    logp_a = jnp.take_along_axis(logp, actions[:, None], axis=-1)[:, 0]
    pg = -(advantages * logp_a).mean()
    return pg - 0.01 * entropy_from_logits(logits).mean()


def make():
    k1, k2 = jax.random.split(jax.random.key(0))
    params = {"w": jax.random.normal(k1, (5, 4)) * 0.1, "b": jnp.zeros(4)}
    obs = jax.random.normal(k2, (3, 5))
    actions = jnp.array([0, 1, 3])
    advantages = jnp.array([1.0, -0.5, 0.3])
    valid = jnp.array([[1, 1, 0, 1], [1, 1, 1, 1], [0, 1, 1, 1]], bool)
    return jax.value_and_grad(policy_loss), (params, obs, actions, advantages, valid)
