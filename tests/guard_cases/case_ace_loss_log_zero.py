"""Aggregation cross-entropy (ACE) for text recognition: the per-class
probabilities are accumulated over the frames and the loss takes their log.
Training runs for a while, then one batch holds a class whose accumulated
probability is exactly 0 and the loss is nan; the next batches are fine.

Reported: https://github.com/summerlvsong/Aggregation-Cross-Entropy/issues/2
(summerlvsong/Aggregation-Cross-Entropy#2): "for this line: torch.log(input).
The 'input' is the softmax score (0-1). If k-th class does not show in an
input, the accumulative softmax score of all time steps for k-th class is
very likely to be 0. Then this will result into torch.log(input) = nan."

Batch 17 is a saturated (clipped, very bright) line image: the frame logits
are so far apart that some class gets probability 0.0 at every frame. The
cause is an unsafe `log` of 0 (not the learning rate: nothing grew before),
transient, and the fix keeps the argument of the log above 0.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxnan

EXPECT = {
    "cause": "unsafe_op",
    "phase": "forward",
    "steps": (17, 17),
    "fix": ("Keep the argument of log above 0.0", "jnp.maximum(x, 1e-12)"),
    "evidence": "log received 0.0",
    "persistent": False,
}

T, FEATS, CLASSES = 12, 16, 8
tx = jaxnan.skip_nonfinite(optax.adam(1e-3))


def ace_loss(params, frames, counts):
    logits = frames @ params["w"] + params["b"]  # (batch, T, classes)
    probs = jax.nn.softmax(logits, axis=-1)
    y_bar = probs.mean(axis=1)  # accumulated over time
    n_bar = counts / T
    return -jnp.mean(jnp.sum(n_bar * jnp.log(y_bar), axis=-1))


def train_step(params, opt_state, frames, counts):
    loss, grads = jax.value_and_grad(ace_loss)(params, frames, counts)
    updates, opt_state = tx.update(grads, opt_state, params, loss=loss)
    return optax.apply_updates(params, updates), opt_state, loss


def run(guard=jaxnan.guard, log=None, steps=30):
    rng = np.random.default_rng(13)
    params = {
        "w": jnp.asarray(rng.normal(0, 0.3, (FEATS, CLASSES)), jnp.float32),
        "b": jnp.zeros(CLASSES),
    }
    opt_state = tx.init(params)
    step = guard(train_step, max_streak=3, verbose=False, log=log)
    try:
        for i in range(steps):
            frames = rng.normal(size=(4, T, FEATS)).astype(np.float32)
            if i == 17:
                frames *= 400.0  # a saturated line image
            labels = rng.integers(0, CLASSES, (4, T))
            counts = np.stack([np.bincount(r, minlength=CLASSES) for r in labels])
            params, opt_state, loss = step(
                params, opt_state, frames, counts.astype(np.float32)
            )
        step.finish()
    except jaxnan.NonFiniteError:
        pass
    return step
