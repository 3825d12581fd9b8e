"""A small decoder-only transformer LM in Flax NNX with a causal mask."""

import jax
import jax.numpy as jnp
import optax
from flax import nnx


class Block(nnx.Module):
    def __init__(self, d, heads, rngs):
        self.ln1 = nnx.LayerNorm(d, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(
            num_heads=heads, in_features=d, decode=False, rngs=rngs
        )
        self.ln2 = nnx.LayerNorm(d, rngs=rngs)
        self.fc1 = nnx.Linear(d, 4 * d, rngs=rngs)
        self.fc2 = nnx.Linear(4 * d, d, rngs=rngs)

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
        mask = nnx.make_causal_mask(tokens)
        for block in self.blocks:
            x = block(x, mask)
        return self.head(self.ln_f(x))


def factory():
    # abstract parameters (ShapeDtypeStruct leaves): lint only traces
    model = nnx.eval_shape(lambda: TransformerLM(rngs=nnx.Rngs(0)))
    graphdef, params = nnx.split(model)
    tokens = jnp.zeros((2, 16), jnp.int32)

    def loss(params, tokens):
        m = nnx.merge(graphdef, params)
        logits = m(tokens[:, :-1])
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
        return ce.mean()

    return loss, (params, tokens)
