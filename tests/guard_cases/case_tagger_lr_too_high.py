"""A small sequence tagger trained with plain SGD: with lr=0.001 it trains, with
lr=0.01 or 0.1 "the train loss decreases first and then increases", then nan
for good.

Reported: https://github.com/guillaumegenthial/sequence_tagging/issues/47
(guillaumegenthial/sequence_tagging#47): "when I use lr = 0.001 in my model,
there is no problem; but lr = 0.01 or 0.1, the train loss decrease first and
then increase ... train loss:nan".

Here the tagger scores each token with a linen MLP on unnormalized features
(the squared error of a score regression). At lr=0.025 (0.01 trains) the loss
falls for three steps, then the weights oscillate with growing amplitude: the
loss climbs for five steps and a value overflows float32 in the forward pass
at step 8. Located alone it is an `overflow` at a line of the model; the climb
before it makes it the learning rate, and the fix that helps is a lower
learning rate.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxnan

EXPECT = {
    "cause": "learning_rate",
    "phase": "forward",
    "steps": (5, 20),
    "fix": ("Lower the learning rate",),
    "evidence": "loss grew",
    "persistent": True,
}


class Tagger(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(16)(x))
        return nn.Dense(1)(x)[..., 0]


model = Tagger()
tx = jaxnan.skip_nonfinite(optax.sgd(0.025))


def train_step(params, opt_state, batch):
    def loss_fn(params):
        scores = model.apply(params, batch["tokens"])
        return jnp.mean((scores - batch["tags"]) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params, loss=loss)
    return optax.apply_updates(params, updates), opt_state, loss


def run(guard=jaxnan.guard, log=None, steps=60):
    rng = np.random.default_rng(0)
    tokens = rng.normal(0, 3.0, (256, 12)).astype(np.float32)  # unnormalized
    tags = tokens @ rng.normal(size=12).astype(np.float32)
    params = jax.jit(model.init)(jax.random.key(0), tokens[:1])
    opt_state = tx.init(params)
    step = guard(train_step, max_streak=3, verbose=False, log=log)
    try:
        for i in range(steps):
            rows = slice(32 * (i % 8), 32 * (i % 8 + 1))
            batch = {"tokens": tokens[rows], "tags": tags[rows]}
            params, opt_state, loss = step(params, opt_state, batch)
        step.finish()
    except jaxnan.NonFiniteError:
        pass
    return step
