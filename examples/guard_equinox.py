"""Equinox training with `eqx.filter_jit` and `jaxnan.guard`.

The step is written as in Equinox's examples: ``(model, opt_state, batch)``
with `eqx.filter_value_and_grad` and `eqx.apply_updates`. Batch `bad_step`
holds an Inf in row 7.

Run: python examples/guard_equinox.py
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxnan


class Model(eqx.Module):
    layers: list

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.layers = [eqx.nn.Linear(8, 32, key=k1), eqx.nn.Linear(32, 4, key=k2)]

    def __call__(self, x):
        return self.layers[1](jax.nn.relu(self.layers[0](x)))


tx = jaxnan.skip_nonfinite(optax.adam(1e-3))


@eqx.filter_jit
def train_step(model, opt_state, batch):
    def loss_fn(model):
        logits = jax.vmap(model)(batch["x"])
        return optax.softmax_cross_entropy_with_integer_labels(
            logits, batch["y"]
        ).mean()

    loss, grads = eqx.filter_value_and_grad(loss_fn)(model)
    params = eqx.filter(model, eqx.is_array)
    updates, opt_state = tx.update(grads, opt_state, params, loss=loss)
    return eqx.apply_updates(model, updates), opt_state, loss


def main(steps: int = 30, bad_step: int = 10, batch_size: int = 32) -> dict:
    rng = np.random.default_rng(0)
    model = Model(jax.random.key(0))
    opt_state = tx.init(eqx.filter(model, eqx.is_array))
    step = jaxnan.guard(train_step)  # the one added line
    for i in range(steps):
        x = rng.normal(size=(batch_size, 8)).astype(np.float32)
        if i == bad_step:
            x[7, 2] = np.inf
        y = jnp.asarray(x[:, :4].argmax(1))
        model, opt_state, loss = step(model, opt_state, {"x": x, "y": y})
    return {"summary": step.summary(), "incidents": step.incidents, "model": model}


if __name__ == "__main__":
    print(main()["summary"])
