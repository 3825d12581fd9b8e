"""optax's nanolm in float16, with a hand-written LayerNorm (mixed precision).

Parameters stay float32; activations are float16 (the modules' ``dtype``).
The safe LayerNorm computes its statistics in float32 as flax's does; the
planted bug is the same LayerNorm in float16 with the usual eps 1e-8.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

BLOCK_SIZE = 16
VOCAB = 65
f16 = jnp.float16


class LayerNorm(nn.Module):
    eps: float = 1e-5
    stats_in_float32: bool = True

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        bias = self.param("bias", nn.initializers.zeros, (x.shape[-1],))
        if self.stats_in_float32:
            x32 = x.astype(jnp.float32)
            mean = x32.mean(-1, keepdims=True)
            var = jnp.mean(jnp.square(x32 - mean), -1, keepdims=True)
            y = ((x32 - mean) * jax.lax.rsqrt(var + self.eps)).astype(x.dtype)
        else:
            mean = x.mean(-1, keepdims=True)
            sq = jnp.square(x - mean)  # bug: low-precision-overflow
            var = jnp.mean(sq, -1, keepdims=True)
            y = (x - mean) / jnp.sqrt(var + self.eps)  # bug: epsilon-underflow
        return y * scale.astype(x.dtype) + bias.astype(x.dtype)


class NanoLM(nn.Module):
    vocab_size: int
    num_layers: int = 2
    num_heads: int = 4
    head_size: int = 8
    embed_size: int = 32
    eps: float = 1e-5
    stats_in_float32: bool = True

    def norm(self):
        return LayerNorm(self.eps, self.stats_in_float32)

    @nn.compact
    def __call__(self, x):
        seq_len = x.shape[1]
        x = nn.Embed(self.vocab_size, self.embed_size, dtype=f16)(x) + nn.Embed(
            BLOCK_SIZE, self.embed_size, dtype=f16
        )(jnp.arange(seq_len))
        for _ in range(self.num_layers):
            x_norm = self.norm()(x)
            x = x + nn.MultiHeadDotProductAttention(
                num_heads=self.num_heads,
                qkv_features=self.head_size,
                out_features=self.head_size * self.num_heads,
                dtype=f16,
            )(x_norm, x_norm, mask=nn.make_causal_mask(x[..., 0]))
            h = nn.relu(nn.Dense(4 * self.embed_size, dtype=f16)(self.norm()(x)))
            x = x + nn.Dense(self.embed_size, dtype=f16)(h)
        return nn.Dense(self.vocab_size, dtype=f16)(self.norm()(x))


def _make(bug):
    model = NanoLM(VOCAB, eps=1e-8 if bug else 1e-5, stats_in_float32=not bug)
    x = jnp.ones((4, BLOCK_SIZE), dtype=jnp.int32)
    params = jax.eval_shape(model.init, jax.random.key(42), x)

    def loss_fun(params, x, y):
        logits = model.apply(params, x).astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return loss_fun, (params, x, x)


def factory():
    return _make(bug=False)


def buggy_factory():
    return _make(bug=True)
