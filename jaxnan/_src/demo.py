"""The demo: a training run that goes nonfinite, is kept alive and diagnosed."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxnan._src import checks, transforms
from jaxnan._src.tree import all_finite


def _init(key, sizes):
    params = {}
    for i, (m, n) in enumerate(zip(sizes[:-1], sizes[1:])):
        key, k = jax.random.split(key)
        params[f"dense{i}"] = {
            "kernel": jax.random.normal(k, (m, n)) / np.sqrt(m),
            "bias": jnp.zeros(n),
        }
    return params


def _model(params, x):
    n = len(params)
    for i in range(n):
        layer = params[f"dense{i}"]
        x = x @ layer["kernel"] + layer["bias"]
        if i < n - 1:
            x = jax.nn.gelu(x)
    return x[..., 0]


def loss_fn(params, batch):
    """Mean squared error of a small MLP."""
    pred = _model(params, batch["x"])
    return jnp.mean((pred - batch["y"]) ** 2)


def run(steps: int = 60, bad_steps: tuple[int, ...] = (20, 21, 40)) -> int:
    """Trains a small MLP; the batches at `bad_steps` hold a NaN feature."""
    rng = np.random.default_rng(0)
    params = _init(jax.random.PRNGKey(0), [8, 64, 64, 1])
    tx = transforms.skip_nonfinite(
        optax.chain(transforms.clip_by_global_norm(1.0), optax.adam(1e-2)), max_streak=5
    )
    opt_state = tx.init(params)

    @jax.jit
    def train_step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params, loss=loss)
        return optax.apply_updates(params, updates), opt_state, loss

    w_true = rng.normal(size=8)
    print(
        "jaxnan demo: a 2-layer MLP, adam + jaxnan.skip_nonfinite + clip_by_global_norm"
    )
    print(f"batches {list(bad_steps)} carry a NaN feature (a corrupt data row)\n")
    first_bad = None
    for step in range(steps):
        x = rng.normal(size=(32, 8)).astype(np.float32)
        y = (np.sin(x @ w_true)).astype(np.float32)
        if step in bad_steps:
            x[3, 5] = np.nan
        batch = {"x": jnp.asarray(x), "y": jnp.asarray(y)}
        params, opt_state, loss = train_step(params, opt_state, batch)
        if step % 10 == 0 or step in bad_steps:
            skipped = int(opt_state.last_nonfinite_step) == step
            tag = "  <- nonfinite, step skipped" if skipped else ""
            print(f"step {step:3d}  loss {float(loss):9.4f}{tag}")
        if step in bad_steps and first_bad is None:
            first_bad = batch
    finite = bool(all_finite(params))
    print(
        f"\nskipped {int(opt_state.nonfinite_total)} of {steps} steps; "
        f"params finite: {finite}"
    )
    if first_bad is not None:
        report, _ = jax.jit(checks.check(jax.value_and_grad(loss_fn)))(
            params, first_bad
        )
        print(
            "\nDiagnosis of the first bad batch:\n" + (report.message() or "all finite")
        )
    return 0
