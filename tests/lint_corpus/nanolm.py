"""optax's nanolm example (examples/nanolm.ipynb): a character-level transformer.

The model is the notebook's `NanoLM` (Flax linen), smaller; the loss is its
`loss_fun`. The planted bug is a hand-written label-smoothed cross-entropy.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

BLOCK_SIZE = 16
VOCAB = 65


class NanoLM(nn.Module):
    """NanoLM model."""

    vocab_size: int
    num_layers: int = 2
    num_heads: int = 4
    head_size: int = 8
    dropout_rate: float = 0.2
    embed_size: int = 32
    block_size: int = BLOCK_SIZE

    @nn.compact
    def __call__(self, x, training: bool):
        seq_len = x.shape[1]

        x = nn.Embed(self.vocab_size, self.embed_size)(x) + nn.Embed(
            self.block_size, self.embed_size
        )(jnp.arange(seq_len))
        for _ in range(self.num_layers):
            x_norm = nn.LayerNorm()(x)
            x = x + nn.MultiHeadDotProductAttention(
                num_heads=self.num_heads,
                qkv_features=self.head_size,
                out_features=self.head_size * self.num_heads,
                dropout_rate=self.dropout_rate,
            )(
                x_norm,
                x_norm,
                mask=jnp.tril(jnp.ones((x.shape[-2], x.shape[-2]))),
                deterministic=not training,
            )

            x = x + nn.Sequential(
                [
                    nn.Dense(4 * self.embed_size),
                    nn.relu,
                    nn.Dropout(self.dropout_rate, deterministic=not training),
                    nn.Dense(self.embed_size),
                ]
            )(nn.LayerNorm()(x))

        x = nn.LayerNorm()(x)
        return nn.Dense(self.vocab_size)(x)


def _make(bug):
    model = NanoLM(vocab_size=VOCAB)
    x = jnp.ones((4, BLOCK_SIZE), dtype=jnp.int32)
    var_params = jax.eval_shape(
        lambda k: model.init(k, x, training=False), jax.random.key(42)
    )

    def loss_fun(params, x, y, dropout_key):
        logits = model.apply(params, x, training=True, rngs={"dropout": dropout_key})
        if bug:
            smooth = optax.smooth_labels(jax.nn.one_hot(y, VOCAB), 0.1)
            logp = jnp.log(jax.nn.softmax(logits))  # bug: hand-written-cross-entropy
            return -jnp.sum(smooth * logp, axis=-1).mean()
        return optax.softmax_cross_entropy_with_integer_labels(
            logits=logits, labels=y
        ).mean()

    return loss_fun, (var_params, x, x, jax.random.key(0))


def factory():
    return _make(bug=False)


def buggy_factory():
    return _make(bug=True)
