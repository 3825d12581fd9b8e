"""A diffusion UNet residual block (Flax linen), DDPM-style noise prediction.

GroupNorm, SiLU, a sinusoidal timestep embedding and a residual connection;
the loss is the epsilon-prediction MSE at timesteps drawn from a cosine
schedule. The planted bug is a hand-written GroupNorm without an epsilon.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp


def timestep_embedding(t, dim):
    half = dim // 2
    freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half) / half)
    args = t[:, None].astype(jnp.float32) * freqs[None]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class GroupNorm(nn.Module):
    groups: int = 4

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        g = x.reshape(b, h, w, self.groups, c // self.groups)
        mean = g.mean(axis=(1, 2, 4), keepdims=True)
        var = g.var(axis=(1, 2, 4), keepdims=True)
        g = (g - mean) / jnp.sqrt(var)  # bug: sqrt-zero-grad, div-no-epsilon
        return g.reshape(b, h, w, c) * self.param("scale", nn.initializers.ones, (c,))


class ResBlock(nn.Module):
    channels: int
    hand_written_norm: bool = False

    def norm(self):
        return GroupNorm(4) if self.hand_written_norm else nn.GroupNorm(4)

    @nn.compact
    def __call__(self, x, t):
        h = nn.Conv(self.channels, (3, 3))(nn.silu(self.norm()(x)))
        temb = nn.Dense(self.channels)(nn.silu(timestep_embedding(t, 32)))
        h = h + temb[:, None, None, :]
        h = nn.Conv(self.channels, (3, 3))(nn.silu(self.norm()(h)))
        return x + h


def cosine_alpha_bar(steps=100, s=0.008):
    t = jnp.linspace(0, 1, steps + 1)
    f = jnp.cos((t + s) / (1 + s) * jnp.pi / 2) ** 2
    return jnp.clip(f[1:] / f[0], 1e-5, 0.9999)


def _make(bug):
    model = ResBlock(8, hand_written_norm=bug)
    x0 = jnp.zeros((2, 8, 8, 8))
    t = jnp.zeros((2,), jnp.int32)
    params = jax.eval_shape(model.init, jax.random.key(0), x0, t)
    alpha_bar = cosine_alpha_bar()

    def loss(params, x0, t, noise):
        a = alpha_bar[t][:, None, None, None]
        x_t = jnp.sqrt(a) * x0 + jnp.sqrt(1.0 - a) * noise
        pred = model.apply(params, x_t, t)
        return jnp.mean((pred - noise) ** 2)

    return loss, (params, x0, t, x0)


def factory():
    return _make(bug=False)


def buggy_factory():
    return _make(bug=True)
