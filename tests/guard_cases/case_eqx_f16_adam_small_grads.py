"""An Equinox regressor converted to float16 to halve its memory, trained with
`optax.adamw(1e-4)`: its gradients are of order 1e-3, and the first update
turns weights into +/-inf.

Reported: https://github.com/FluxML/Optimisers.jl/issues/167
(FluxML/Optimisers.jl#167): "Adam optimizer can produce NaNs with Float16 due
to small epsilon ... x = Float16[0.579, -0.729, 0.5493], δx =
Float16[-0.001497, 0.0001875, -0.013176] ... after update x = Float16[Inf,
-Inf, 0.5493]"; the same in keras-team/keras#11860 ("adam optimizer does not
work with FP16 ... There is no issue when using FP32").

The reporter's own values: the gradient entries of 1.9e-4 and 1.5e-3 have
squares that vanish in float16 once scaled by (1 - b2), so ``nu`` is 0 while
``mu`` is not, and ``mu / (sqrt(nu) + eps)`` is +/-inf. The guard must name
the optimizer state, and a float16-sized eps (or float32 moments) as the fix.
"""

import equinox as eqx
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

tx = jaxnan.skip_nonfinite(optax.adamw(1e-4))


def to_half(model):
    return jax.tree.map(
        lambda x: x.astype(jnp.float16) if eqx.is_inexact_array(x) else x, model
    )


@eqx.filter_jit
def train_step(model, opt_state, x, y):
    def loss_fn(model):
        pred = jax.vmap(model)(x).astype(jnp.float32)
        return jnp.mean((pred - y) ** 2)

    loss, grads = eqx.filter_value_and_grad(loss_fn)(model)
    params = eqx.filter(model, eqx.is_array)
    updates, opt_state = tx.update(grads, opt_state, params, loss=loss)
    return eqx.apply_updates(model, updates), opt_state, loss


def run(guard=jaxnan.guard, log=None, steps=6):
    rng = np.random.default_rng(8)
    model = to_half(eqx.nn.Linear(3, 1, key=jax.random.key(8)))
    model = eqx.tree_at(
        lambda m: m.weight, model, jnp.array([[0.579, -0.729, 0.5493]], jnp.float16)
    )
    opt_state = tx.init(eqx.filter(model, eqx.is_array))
    step = guard(train_step, max_streak=3, verbose=False, log=log)
    try:
        for _ in range(steps):
            x = rng.normal(0, 0.01, (8, 3)).astype(np.float16)
            y = (np.asarray(jax.vmap(model)(x), np.float32) + 1e-3).astype(np.float32)
            model, opt_state, loss = step(model, opt_state, x, y)
        step.finish()
    except jaxnan.NonFiniteError:
        pass
    return step
