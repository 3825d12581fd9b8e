"""An Equinox MLP trained with SGD and momentum 0.9 at a learning rate just
past what momentum tolerates: the loss falls, then the weights grow a little
every step for tens of steps until they reach 1e15 and the loss
overflows.

Reported: https://github.com/BVLC/caffe/issues/373 (BVLC/caffe#373): "loss
become nan after a few thousand iterations. I dump the weights before that
iterations and I found that some weights in the inner product layers become
very large (e.g. +3e29). I check my shuffled input data and make sure they are
in reasonable range."

The guard's report names the largest parameter leaf (the "inner product
layer" the reporter dumped by hand), the climbing loss before the NaN, and the
learning rate as the cause.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxnan

EXPECT = {
    "cause": "learning_rate",
    "phase": "forward",
    "steps": (20, 200),
    "fix": ("Lower the learning rate",),
    "evidence": "largest parameter leaf",
    "persistent": True,
}

tx = jaxnan.skip_nonfinite(optax.sgd(0.15, momentum=0.9))


@eqx.filter_jit
def train_step(model, opt_state, x, y):
    def loss_fn(model):
        pred = jax.vmap(model)(x)
        return jnp.mean((pred - y) ** 2)

    loss, grads = eqx.filter_value_and_grad(loss_fn)(model)
    updates, opt_state = tx.update(
        grads, opt_state, eqx.filter(model, eqx.is_array), loss=loss
    )
    return eqx.apply_updates(model, updates), opt_state, loss


def run(guard=jaxnan.guard, log=None, steps=400):
    rng = np.random.default_rng(5)
    x = rng.normal(0, 1.0, (256, 8)).astype(np.float32)
    y = (x @ rng.normal(size=(8, 1))).astype(np.float32)
    model = eqx.nn.MLP(8, 1, width_size=16, depth=1, key=jax.random.key(5))
    opt_state = tx.init(eqx.filter(model, eqx.is_array))
    step = guard(train_step, max_streak=3, verbose=False, log=log)
    try:
        for i in range(steps):
            rows = slice(32 * (i % 8), 32 * (i % 8 + 1))
            model, opt_state, loss = step(model, opt_state, x[rows], y[rows])
        step.finish()
    except jaxnan.NonFiniteError:
        pass
    return step
