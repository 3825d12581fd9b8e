"""A decoder-only transformer LM in Flax NNX: causal + padding masks, masked loss."""

import jax
import jax.numpy as jnp
import optax
from flax import nnx

PAD = 0


class Block(nnx.Module):
    def __init__(self, d, heads, rngs, dtype=jnp.float32):
        self.ln1 = nnx.LayerNorm(d, dtype=dtype, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(
            num_heads=heads, in_features=d, decode=False, dtype=dtype, rngs=rngs
        )
        self.ln2 = nnx.LayerNorm(d, dtype=dtype, rngs=rngs)
        self.fc1 = nnx.Linear(d, 4 * d, dtype=dtype, rngs=rngs)
        self.fc2 = nnx.Linear(4 * d, d, dtype=dtype, rngs=rngs)

    def __call__(self, x, mask):
        x = x + self.attn(self.ln1(x), mask=mask)
        return x + self.fc2(jax.nn.gelu(self.fc1(self.ln2(x))))


class TransformerLM(nnx.Module):
    def __init__(self, vocab=64, d=32, heads=4, layers=2, max_len=16, *, rngs):
        self.embed = nnx.Embed(vocab, d, rngs=rngs)
        self.pos = nnx.Embed(max_len, d, rngs=rngs)
        self.blocks = nnx.List([Block(d, heads, rngs) for _ in range(layers)])
        self.ln_f = nnx.LayerNorm(d, rngs=rngs)
        self.head = nnx.Linear(d, vocab, rngs=rngs)

    def __call__(self, tokens):
        t = tokens.shape[-1]
        x = self.embed(tokens) + self.pos(jnp.arange(t))
        mask = nnx.combine_masks(
            nnx.make_causal_mask(tokens),
            nnx.make_attention_mask(tokens != PAD, tokens != PAD),
        )
        for block in self.blocks:
            x = block(x, mask)
        return self.head(self.ln_f(x))


def _make(bug):
    # abstract parameters (ShapeDtypeStruct leaves): lint only traces
    model = nnx.eval_shape(lambda: TransformerLM(rngs=nnx.Rngs(0)))
    graphdef, params = nnx.split(model)
    tokens = jnp.zeros((2, 16), jnp.int32)

    def loss(params, tokens):
        m = nnx.merge(graphdef, params)
        logits = m(tokens[:, :-1])
        targets = tokens[:, 1:]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        real = targets != PAD
        if bug:
            return jnp.sum(ce * real) / jnp.sum(real)  # bug: div-no-epsilon
        return jnp.sum(ce * real) / jnp.maximum(jnp.sum(real), 1)

    return loss, (params, tokens)


def factory():
    return _make(bug=False)


def buggy_factory():
    return _make(bug=True)
