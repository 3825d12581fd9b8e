"""A token classifier kept in float16 (parameters and optimizer state) and
trained with `optax.adam(1e-3)`: embedding rows of tokens that are not in the
batch get exactly zero gradients, and the update is nan on the first step.

Reported: https://github.com/google-deepmind/optax/issues/1754
(google-deepmind/optax#1754): "When params are float16 ... `eps` (default
1e-8) rounds to exactly 0.0. On any step with an exactly-zero gradient
(masked/padded tokens, a frozen-then-unfrozen layer, an unused embedding row)
both moment estimates are 0, so the denominator becomes sqrt(0) + 0 == 0,
giving 0 / 0 = NaN."

Flax linen `nn.Embed` and `nn.Dense` with ``param_dtype=jnp.float16``. The
loss and the gradients are finite; the update is not: Adam's denominator
``sqrt(nu) + eps`` is 0.0 in float16 for the unused rows (0/0) and for the
small gradients of the head, whose squares underflow (x/0, the first one the
replay meets). `skip_nonfinite` skips the step, the next one fails the same
way, and the run gives up. The cause is the optimizer state, and the fix
names the epsilon float16 can hold and float32 moments.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxnan

EXPECT = {
    "cause": "update",
    "phase": "update",
    "steps": (0, 0),
    "fix": ("eps=1e-4 for float16", "float32"),
    "evidence": "the update divides in float16",
    "persistent": True,
}


class Classifier(nn.Module):
    vocab: int = 32

    @nn.compact
    def __call__(self, tokens):
        emb = nn.Embed(self.vocab, 8, param_dtype=jnp.float16, dtype=jnp.float16)
        h = emb(tokens).mean(axis=1)
        return nn.Dense(4, param_dtype=jnp.float16, dtype=jnp.float16)(h)


model = Classifier()
tx = jaxnan.skip_nonfinite(optax.adam(1e-3))


def train_step(params, opt_state, tokens, labels):
    def loss_fn(params):
        logits = model.apply(params, tokens).astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params, loss=loss)
    return optax.apply_updates(params, updates), opt_state, loss


def run(guard=jaxnan.guard, log=None, steps=8):
    rng = np.random.default_rng(6)
    params = jax.jit(model.init)(jax.random.key(6), jnp.zeros((1, 5), jnp.int32))
    opt_state = tx.init(params)
    step = guard(train_step, max_streak=3, verbose=False, log=log)
    try:
        for _ in range(steps):
            tokens = rng.integers(0, 20, (16, 5)).astype(np.int32)  # 20-31 unused
            labels = (tokens[:, 0] % 4).astype(np.int32)
            params, opt_state, loss = step(params, opt_state, tokens, labels)
        step.finish()
    except jaxnan.NonFiniteError:
        pass
    return step
