"""A segmentation model trained with AdamW under a hand-written warm-up
scheduler, run with warm-up switched off (``warmup_steps = 0``): the
scheduler's ``step / warmup_steps`` is 0/0 and the learning rate is nan.

Reported: https://github.com/mlcommons/hpc/pull/27 (mlcommons/hpc#27): "The
updated scheduler in the previous PR yields nan LR if no warmup is used."

The rate is injected with `optax.inject_hyperparams`, so the optimizer state
holds it from `init` on; every update is nan from finite gradients and
`skip_nonfinite` skips it, the count never advances and the run gives up.
Located alone it is a poisoned optimizer state (the nan is in the step's
arguments: phase ``input``), whose fix, restoring a checkpoint, would not
help; the poisoned leaf is the learning rate, so the cause is the schedule,
and its fix is to guard the warm-up's division.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxnan

EXPECT = {
    "cause": "learning_rate",
    "phase": "input",
    "steps": (0, 0),
    "fix": ("schedule", "warm-up of at least 1 step"),
    "not_fix": ("epsilon", "eps="),
    "evidence": "learning rate at optimizer step 0 is nan",
    "persistent": True,
}

START_LR, WARMUP_STEPS = 1e-3, 0  # warm-up switched off


def lr_schedule(step):
    warmup = jnp.minimum(1.0, step / WARMUP_STEPS)  # 0 / 0 at step 0
    return START_LR * warmup


tx = jaxnan.skip_nonfinite(
    optax.inject_hyperparams(optax.adamw)(learning_rate=lr_schedule, weight_decay=1e-2)
)


def segment(params, images):
    h = jax.nn.relu(images @ params["enc"])
    return h @ params["dec"]


def train_step(params, opt_state, images, masks):
    def loss_fn(params):
        logits = segment(params, images)
        return optax.sigmoid_binary_cross_entropy(logits, masks).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params, loss=loss)
    return optax.apply_updates(params, updates), opt_state, loss


def run(guard=jaxnan.guard, log=None, steps=12):
    rng = np.random.default_rng(2)
    k1, k2 = jax.random.split(jax.random.key(2))
    params = {
        "enc": jax.random.normal(k1, (16, 8)) * 0.25,
        "dec": jax.random.normal(k2, (8, 16)) * 0.35,
    }
    opt_state = tx.init(params)
    step = guard(train_step, max_streak=3, verbose=False, log=log)
    try:
        for _ in range(steps):
            images = rng.normal(size=(8, 16)).astype(np.float32)
            masks = (images > 0.5).astype(np.float32)
            params, opt_state, loss = step(params, opt_state, images, masks)
        step.finish()
    except jaxnan.NonFiniteError:
        pass
    return step
