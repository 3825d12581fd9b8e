"""A small VAE (Flax linen): reparameterisation trick, Bernoulli decoder."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax


class VAE(nn.Module):
    latent: int = 4
    std_head: bool = False

    @nn.compact
    def __call__(self, x, key):
        h = nn.relu(nn.Dense(32)(x))
        mean = nn.Dense(self.latent)(h)
        logvar = nn.Dense(self.latent)(h)
        std = jnp.exp(0.5 * logvar)
        if self.std_head:  # predicting the variance directly
            std = jnp.sqrt(nn.Dense(self.latent)(h))  # bug: log-not-positive
        z = mean + std * jax.random.normal(key, mean.shape)
        logits = nn.Dense(x.shape[-1])(nn.relu(nn.Dense(32)(z)))
        return logits, mean, logvar


def _make(bug):
    model = VAE(std_head=bug)
    x = jnp.full((4, 16), 0.5)
    params = jax.eval_shape(model.init, jax.random.key(0), x, jax.random.key(1))[
        "params"
    ]  # abstract parameters: lint only traces

    def loss(params, x, key):
        logits, mean, logvar = model.apply({"params": params}, x, key)
        rec = optax.sigmoid_binary_cross_entropy(logits, x).sum(-1)
        kl = -0.5 * jnp.sum(1 + logvar - mean**2 - jnp.exp(logvar), axis=-1)
        return jnp.mean(rec + kl)

    return loss, (params, x, jax.random.key(2))


def factory():
    return _make(bug=False)


def buggy_factory():
    return _make(bug=True)
