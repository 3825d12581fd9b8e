"""A Flax NNX transformer LM in bfloat16, with hand-written attention.

Parameters are float32 (``param_dtype``), activations bfloat16 (``dtype``);
the loss is computed on float32 logits. The safe attention masks with the
score dtype's own finfo.min; the planted bug builds the causal bias in float32
(finfo(float32).min) and casts it to bfloat16, where it becomes -inf.
"""

import jax
import jax.numpy as jnp
import optax
from flax import nnx

bf16 = jnp.bfloat16


class Attention(nnx.Module):
    def __init__(self, d, heads, rngs, float32_bias=False):
        self.qkv = nnx.Linear(d, 3 * d, dtype=bf16, rngs=rngs)
        self.out = nnx.Linear(d, d, dtype=bf16, rngs=rngs)
        self.heads, self.float32_bias = heads, float32_bias

    def __call__(self, x):
        b, t, d = x.shape
        q, k, v = jnp.split(self.qkv(x).reshape(b, t, 3 * self.heads, -1), 3, axis=2)
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k) * (d // self.heads) ** -0.5
        causal = jnp.tril(jnp.ones((t, t), bool))
        if self.float32_bias:
            bias = jnp.where(causal, 0.0, jnp.finfo(jnp.float32).min)
            s = s + bias.astype(s.dtype)  # bug: low-precision-cast
        else:
            s = jnp.where(causal, s, jnp.finfo(s.dtype).min)
        p = jax.nn.softmax(s.astype(jnp.float32), axis=-1).astype(bf16)
        return self.out(jnp.einsum("bhqk,bkhd->bqhd", p, v).reshape(b, t, d))


class LM(nnx.Module):
    def __init__(self, vocab=64, d=32, heads=4, layers=2, *, float32_bias, rngs):
        self.embed = nnx.Embed(vocab, d, dtype=bf16, rngs=rngs)
        self.attn = nnx.List(
            [Attention(d, heads, rngs, float32_bias) for _ in range(layers)]
        )
        self.norms = nnx.List(
            [nnx.RMSNorm(d, dtype=bf16, rngs=rngs) for _ in range(layers)]
        )
        self.head = nnx.Linear(d, vocab, dtype=bf16, rngs=rngs)

    def __call__(self, tokens):
        x = self.embed(tokens)
        for attn, norm in zip(self.attn, self.norms):
            x = x + attn(norm(x))
        return self.head(x).astype(jnp.float32)


def _make(bug):
    model = nnx.eval_shape(lambda: LM(float32_bias=bug, rngs=nnx.Rngs(0)))
    graphdef, params = nnx.split(model)
    tokens = jnp.zeros((2, 16), jnp.int32)

    def loss(params, tokens):
        logits = nnx.merge(graphdef, params)(tokens[:, :-1])
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
        return ce.mean()

    return loss, (params, tokens)


def factory():
    return _make(bug=False)


def buggy_factory():
    return _make(bug=True)
