"""A Flax linen LM with hand-written causal self-attention and a padding mask."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

PAD = 0


class CausalSelfAttention(nn.Module):
    heads: int
    query_padding: bool = False

    @nn.compact
    def __call__(self, x, keep):
        b, t, d = x.shape
        qkv = nn.Dense(3 * d)(x).reshape(b, t, 3, self.heads, d // self.heads)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        att = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(d // self.heads)
        causal = jnp.tril(jnp.ones((t, t), bool))
        mask = causal[None, None] & keep[:, None, None, :]  # key padding
        if self.query_padding:
            mask = mask & keep[:, None, :, None]  # a padded query keeps no key
        att = jnp.where(mask, att, -jnp.inf)
        att = jax.nn.softmax(att, axis=-1)  # bug: masked-softmax-all-masked
        y = jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, t, d)
        return nn.Dense(d)(y)


class LM(nn.Module):
    vocab: int = 50
    d: int = 32
    heads: int = 4
    layers: int = 2
    query_padding: bool = False

    @nn.compact
    def __call__(self, tokens):
        keep = tokens != PAD
        x = nn.Embed(self.vocab, self.d)(tokens)
        x = x + self.param("pos", nn.initializers.normal(0.02), (16, self.d))
        for _ in range(self.layers):
            x = x + CausalSelfAttention(self.heads, self.query_padding)(
                nn.LayerNorm()(x), keep
            )
            h = nn.gelu(nn.Dense(4 * self.d)(nn.LayerNorm()(x)))
            x = x + nn.Dense(self.d)(h)
        return nn.Dense(self.vocab)(nn.LayerNorm()(x))


def _make(bug):
    model = LM(query_padding=bug)
    tokens = jnp.ones((2, 16), jnp.int32)
    params = jax.eval_shape(model.init, jax.random.key(0), tokens)

    def loss(params, tokens, targets):
        logits = model.apply(params, tokens)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        weight = (targets != PAD).astype(ce.dtype)
        return jnp.sum(ce * weight) / jnp.maximum(jnp.sum(weight), 1.0)

    return loss, (params, tokens, tokens)


def factory():
    return _make(bug=False)


def buggy_factory():
    return _make(bug=True)
