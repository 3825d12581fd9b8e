"""A REINFORCE / actor-critic loss with a Gaussian policy (Flax linen).

log-probabilities of the taken actions, normalised advantages, an entropy
bonus and a value loss. The safe policy predicts log_std; the planted bug
predicts std with a Dense layer and takes its log.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp


class ActorCritic(nn.Module):
    actions: int = 2
    std_head: bool = False

    @nn.compact
    def __call__(self, obs):
        h = nn.tanh(nn.Dense(32)(nn.tanh(nn.Dense(32)(obs))))
        mu = nn.Dense(self.actions)(h)
        value = nn.Dense(1)(h)[..., 0]
        if self.std_head:
            std = nn.Dense(self.actions)(h)
            log_std = jnp.log(std)  # bug: log-not-positive
        else:
            log_std = self.param("log_std", nn.initializers.zeros, (self.actions,))
        return mu, log_std, value


def _make(bug):
    model = ActorCritic(std_head=bug)
    obs = jnp.zeros((32, 4))
    params = jax.eval_shape(model.init, jax.random.key(0), obs)
    actions, returns = jnp.zeros((32, 2)), jnp.zeros((32,))

    def loss(params, obs, actions, returns):
        mu, log_std, value = model.apply(params, obs)
        z = (actions - mu) * jnp.exp(-log_std)
        logp = jnp.sum(-0.5 * z**2 - log_std - 0.5 * math.log(2 * math.pi), -1)
        adv = jax.lax.stop_gradient(returns - value)
        adv = (adv - adv.mean()) / (adv.std() + 1e-8)
        entropy = jnp.sum(log_std + 0.5 * math.log(2 * math.pi * math.e), -1)
        pg = -jnp.mean(logp * adv) - 0.01 * jnp.mean(entropy)
        return pg + 0.5 * jnp.mean((returns - value) ** 2)

    return loss, (params, obs, actions, returns)


def factory():
    return _make(bug=False)


def buggy_factory():
    return _make(bug=True)
