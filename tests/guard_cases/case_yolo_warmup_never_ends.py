"""A detector's box regression head trained with a linear warm-up whose length
was computed from the wrong epoch count: the warm-up never ends, the learning
rate keeps rising step after step, and the loss goes nan.

Reported: https://github.com/YunYang1994/TensorFlow2.0-Examples/issues/8
(YunYang1994/TensorFlow2.0-Examples#8): "STEP 749 lr: 0.000599 ... total_loss:
9.07 / STEP 750 lr: 0.000600 giou_loss: nan", answered "the learning rate keeps
rising": global_steps stayed below warmup_steps = WARMUP_EPOCHS *
steps_per_epoch.

Written as the reporter's loop: `optax.inject_hyperparams` so that the loop can
print the learning rate, which rises linearly for the whole run. Once it
passes the head's stability limit the box loss climbs geometrically for a few
steps and overflows float32. The cause is the learning rate (the loss climbed
before the NaN), and the fix that helps is a lower learning rate (the guard's
also names the rate of that step, read from the injected state).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxnan

EXPECT = {
    "cause": "learning_rate",
    "phase": "forward",
    "steps": (100, 200),
    "fix": ("Lower the learning rate",),
    "evidence": "loss grew",
    "persistent": True,
}

STEPS_PER_EPOCH, WARMUP_EPOCHS, LR_INIT = 10, 1000, 80.0
warmup_steps = WARMUP_EPOCHS * STEPS_PER_EPOCH  # should have been 2 epochs
schedule = optax.linear_schedule(0.0, LR_INIT, warmup_steps)
tx = jaxnan.skip_nonfinite(optax.inject_hyperparams(optax.sgd)(learning_rate=schedule))


def box_loss(params, images, boxes):
    pred = images @ params["w"] + params["b"]
    return jnp.mean(jnp.sum((pred - boxes) ** 2, axis=-1))


@jax.jit
def train_step(params, opt_state, images, boxes):
    loss, grads = jax.value_and_grad(box_loss)(params, images, boxes)
    updates, opt_state = tx.update(grads, opt_state, params, loss=loss)
    return optax.apply_updates(params, updates), opt_state, loss


def run(guard=jaxnan.guard, log=None, steps=220):
    rng = np.random.default_rng(1)
    feats = rng.normal(0, 1.0, (320, 16)).astype(np.float32)
    boxes = feats @ rng.normal(0, 0.5, (16, 4)).astype(np.float32)
    boxes += rng.normal(0, 0.1, boxes.shape).astype(np.float32)
    params = {"w": jnp.zeros((16, 4)), "b": jnp.zeros(4)}
    opt_state = tx.init(params)
    step = guard(train_step, max_streak=2, verbose=False, log=log)
    try:
        for i in range(steps):
            rows = slice(32 * (i % 10), 32 * (i % 10 + 1))
            params, opt_state, loss = step(params, opt_state, feats[rows], boxes[rows])
        step.finish()
    except jaxnan.NonFiniteError:
        pass
    return step
