"""A forecasting MLP trained on sliding windows of a sales series whose
target column has gaps (read as NaN): most windows are complete, the loss
"becomes nan during training", and nothing says the data is at fault.

Reported: https://github.com/Nixtla/neuralforecast/issues/186
(Nixtla/neuralforecast#186): "silent bug, training with NaNs values ... The
loss becomes `nan` during training but it is hard to notice that the problem
is in the data."

Windows are drawn in order; the ones that cover the gap (steps 23 and 24)
hold NaN targets. The guard must name the batch, not the model: cause
``input_data`` in phase ``input``, the leaf and rows at fault, and a fix that
cleans or drops those rows; the other batches train on.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxnan

EXPECT = {
    "cause": "input_data",
    "phase": "input",
    "steps": (23, 24),
    "fix": ("Clean or drop the rows with NaN/Inf in batch['y']",),
    "evidence": "nonfinite values in the arguments: batch['y']",
    "persistent": False,
}

INPUT, HORIZON = 24, 4
tx = jaxnan.skip_nonfinite(optax.adam(1e-3))


def forecast(params, x):
    h = jax.nn.relu(x @ params["w1"] + params["b1"])
    return h @ params["w2"] + params["b2"]


def train_step(params, opt_state, batch):
    def mae(params):
        return jnp.mean(jnp.abs(forecast(params, batch["x"]) - batch["y"]))

    loss, grads = jax.value_and_grad(mae)(params)
    updates, opt_state = tx.update(grads, opt_state, params, loss=loss)
    return optax.apply_updates(params, updates), opt_state, loss


def run(guard=jaxnan.guard, log=None, steps=40):
    rng = np.random.default_rng(15)
    t = np.arange(2000)
    sales = (10 + np.sin(t / 7) + 0.1 * rng.normal(size=t.size)).astype(np.float32)
    sales[23 * 16 * 2 + 30 : 23 * 16 * 2 + 34] = np.nan  # a gap in the target
    k = jax.random.split(jax.random.key(15), 2)
    params = {
        "w1": jax.random.normal(k[0], (INPUT, 32)) / np.sqrt(INPUT),
        "b1": jnp.zeros(32),
        "w2": jax.random.normal(k[1], (32, HORIZON)) / np.sqrt(32),
        "b2": jnp.zeros(HORIZON),
    }
    opt_state = tx.init(params)
    inputs = np.nan_to_num(sales)  # the inputs were imputed, the targets not
    step = guard(train_step, max_streak=3, verbose=False, log=log)
    try:
        for i in range(steps):
            starts = 2 * (16 * i + np.arange(16))
            x = np.stack([inputs[s : s + INPUT] for s in starts])
            y = np.stack([sales[s + INPUT : s + INPUT + HORIZON] for s in starts])
            params, opt_state, loss = step(params, opt_state, {"x": x, "y": y})
        step.finish()
    except jaxnan.NonFiniteError:
        pass
    return step
