"""Flax linen training with a `TrainState` and `jaxnan.guard`.

As in Flax's linen examples: a `TrainState` subclass carries BatchNorm
statistics; the step returns ``(state, metrics)``. Batch `bad_step` holds a
NaN in row 2; the guard restores everything the step wrote, the step counter
and the batch statistics included.

Run: python examples/guard_linen.py
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax.training import train_state

import jaxnan
import jaxnan.flax


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Dense(32)(x)
        x = nn.BatchNorm(use_running_average=not train)(x)
        return nn.Dense(4)(nn.relu(x))


class TrainState(train_state.TrainState):
    batch_stats: dict


@jax.jit
def train_step(state, batch):
    def loss_fn(params):
        logits, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats},
            batch["x"],
            train=True,
            mutable=["batch_stats"],
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(
            logits, batch["y"]
        ).mean()
        return loss, updates

    (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    # TrainState.apply_gradients has no `loss=`: this hands it to skip_nonfinite.
    state = jaxnan.flax.apply_gradients(state, grads=grads, loss=loss)
    state = state.replace(batch_stats=updates["batch_stats"])
    return state, {"loss": loss}


def main(steps: int = 30, bad_step: int = 10, batch_size: int = 32) -> dict:
    rng = np.random.default_rng(0)
    model = MLP()
    variables = model.init(jax.random.key(0), jnp.ones((1, 8)), train=False)
    state = TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        tx=jaxnan.skip_nonfinite(optax.adam(1e-3)),
    )
    step = jaxnan.guard(train_step)  # the one added line
    for i in range(steps):
        x = rng.normal(size=(batch_size, 8)).astype(np.float32)
        if i == bad_step:
            x[2, 0] = np.nan
        y = (x[:, :4].argmax(1)).astype(np.int32)
        state, metrics = step(state, {"x": x, "y": y})
    return {"summary": step.summary(), "incidents": step.incidents, "state": state}


if __name__ == "__main__":
    print(main()["summary"])
