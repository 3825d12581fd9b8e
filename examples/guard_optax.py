"""A plain optax training loop with `jaxnan.guard`: one added line.

An MLP regression on synthetic data; batch `bad_step` holds a NaN feature in
row 3. The guard skips that step inside the compiled program (parameters and
Adam moments untouched), reads it one step late, and prints one diagnosis
naming `batch['x']`, row 3 and the cause.

Run: python examples/guard_optax.py
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxnan


def init(key, sizes=(8, 32, 1)):
    params = []
    for m, n in zip(sizes[:-1], sizes[1:]):
        key, k = jax.random.split(key)
        params.append(
            {"w": jax.random.normal(k, (m, n)) / np.sqrt(m), "b": jnp.zeros(n)}
        )
    return params


def predict(params, x):
    for layer in params[:-1]:
        x = jax.nn.relu(x @ layer["w"] + layer["b"])
    return x @ params[-1]["w"] + params[-1]["b"]


def loss_fn(params, batch):
    return jnp.mean((predict(params, batch["x"])[:, 0] - batch["y"]) ** 2)


tx = jaxnan.skip_nonfinite(optax.adamw(1e-3))


@jax.jit
def train_step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params, loss=loss)
    return optax.apply_updates(params, updates), opt_state, {"loss": loss}


def main(steps: int = 50, bad_step: int = 20, batch_size: int = 32) -> dict:
    rng = np.random.default_rng(0)
    params = init(jax.random.key(0))
    opt_state = tx.init(params)
    step = jaxnan.guard(train_step)  # the one added line
    for i in range(steps):
        x = rng.normal(size=(batch_size, 8)).astype(np.float32)
        if i == bad_step:
            x[3, 5] = np.nan
        batch = {"x": x, "y": np.sin(x.sum(1)).astype(np.float32)}
        params, opt_state, metrics = step(params, opt_state, batch)
    return {"summary": step.summary(), "incidents": step.incidents, "params": params}


if __name__ == "__main__":
    print(main()["summary"])
