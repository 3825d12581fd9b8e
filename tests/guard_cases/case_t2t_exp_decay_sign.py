"""A Transformer-style model trained with an "exp" learning-rate decay scheme
written by hand after warm-up; the exponent has its sign flipped, so past the
warm-up step the rate doubles every few steps and the loss goes NaN right
after the warm-up.

Reported: https://github.com/tensorflow/tensor2tensor/issues/614
(tensorflow/tensor2tensor#614): "NaN loss occured with exp and sqrt
learning_rate_decay_scheme, and almost come up at `warmup step`."

The schedule is a plain function of the step, passed to `optax.adam` and to
`jaxnan.guard(schedule=...)`, which evaluates it at the optimizer's count
when a step goes bad: the rate there is many times its median over the steps
before. The fix that helps is the schedule (the surge), not an epsilon.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxnan

EXPECT = {
    "cause": "learning_rate",
    "phase": "forward",
    "steps": (30, 60),
    "fix": ("schedule surges to", "stays at or below its peak"),
    "not_fix": ("epsilon", "eps="),
    "evidence": "x its median",
    "persistent": True,
}

BASE_LR, WARMUP, HALF_LIFE = 0.02, 30, 1.5


def lr_schedule(step):
    warm = BASE_LR * jnp.minimum(1.0, (step + 1) / WARMUP)
    decay = 0.5 ** ((WARMUP - step) / HALF_LIFE)  # meant (step - WARMUP)
    return jnp.where(step < WARMUP, warm, BASE_LR * decay)


tx = jaxnan.skip_nonfinite(optax.adam(lr_schedule))


def model(params, tokens):
    h = jnp.tanh(params["embed"][tokens].mean(axis=1))
    return h @ params["out"]


def train_step(params, opt_state, tokens, labels):
    def loss_fn(params):
        logits = model(params, tokens)
        logp = logits - jnp.log(jnp.sum(jnp.exp(logits), axis=-1, keepdims=True))
        return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=-1))

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params, loss=loss)
    return optax.apply_updates(params, updates), opt_state, loss


def run(guard=jaxnan.guard, log=None, steps=70):
    rng = np.random.default_rng(3)
    k1, k2 = jax.random.split(jax.random.key(3))
    params = {
        "embed": jax.random.normal(k1, (50, 16)) * 0.1,
        "out": jax.random.normal(k2, (16, 10)) * 0.1,
    }
    opt_state = tx.init(params)
    step = guard(train_step, max_streak=3, verbose=False, log=log, schedule=lr_schedule)
    try:
        for _ in range(steps):
            tokens = rng.integers(0, 50, (16, 6)).astype(np.int32)
            labels = (tokens[:, 0] % 10).astype(np.int32)
            params, opt_state, loss = step(params, opt_state, tokens, labels)
        step.finish()
    except jaxnan.NonFiniteError:
        pass
    return step
