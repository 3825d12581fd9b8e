"""A count regression head trained with RAdam and a warm-up whose "minimum"
learning rate was set a hundred times above its peak: warm-up ends, the rate
jumps to the "minimum", and the loss goes NaN.

Reported: https://github.com/CyberZHG/keras-radam/issues/43
(CyberZHG/keras-radam#43): "after warmup completed, the loss value get NAN ...
RAdam(learning_rate=1e-5, total_steps=all_steps, warmup_proportion=0.05,
min_lr=learning_rate)" with learning_rate = 0.001.

Written with `optax.inject_hyperparams(optax.radam)` and `optax.join_schedules`:
a linear warm-up to 1e-3, then the constant 3.0 the user meant as a floor, on
a Poisson regression over raw (unscaled) features. The update ratio jumps a
thousandfold at the end of warm-up; the loss then climbs for twenty steps
until RAdam's second moment (the squared gradient) overflows in the update.
Located alone that is an `update` overflow; the loss climb after the surge
makes it the learning rate, and the fix that helps is a lower learning rate
after warm-up, not a larger epsilon.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxnan

EXPECT = {
    "cause": "learning_rate",
    "phase": "update",
    "steps": (20, 80),
    "fix": ("Lower the learning rate",),
    "not_fix": ("epsilon", "eps="),
    "evidence": "loss",
    "persistent": False,
}

WARMUP = 20
schedule = optax.join_schedules(
    [optax.linear_schedule(0.0, 1e-3, WARMUP), optax.constant_schedule(3.0)],
    [WARMUP],
)
tx = jaxnan.skip_nonfinite(
    optax.inject_hyperparams(optax.radam)(learning_rate=schedule)
)


def poisson_nll(params, x, counts):
    log_rate = x @ params["w"] + params["b"]
    return jnp.mean(jnp.exp(log_rate) - counts * log_rate)


def train_step(params, opt_state, x, counts):
    loss, grads = jax.value_and_grad(poisson_nll)(params, x, counts)
    updates, opt_state = tx.update(grads, opt_state, params, loss=loss)
    return optax.apply_updates(params, updates), opt_state, loss


def run(guard=jaxnan.guard, log=None, steps=45):
    rng = np.random.default_rng(4)
    w_true = rng.normal(0, 0.05, 24).astype(np.float32)
    params = {"w": jnp.zeros(24), "b": jnp.zeros(())}
    opt_state = tx.init(params)
    step = guard(train_step, max_streak=3, verbose=False, log=log)
    try:
        for _ in range(steps):
            x = rng.normal(
                0, 6.0, (64, 24)
            )  # raw, unscaled features.astype(np.float32)
            counts = rng.poisson(np.exp(x @ w_true)).astype(np.float32)
            params, opt_state, loss = step(params, opt_state, x, counts)
        step.finish()
    except jaxnan.NonFiniteError:
        pass
    return step
