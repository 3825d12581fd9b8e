"""The demo: a training run that goes nonfinite three ways and is kept alive.

A small MLP classifier trains on synthetic data with a hand-written
cross-entropy (``log(softmax)``), under ``jaxnan.guard``. Three things go
wrong, as they do in real runs:

1. batch 12 holds a NaN feature (row 6): a bad sample;
2. batch 25 holds an outlier row (row 19, features x1000): its logits are so
   large that `softmax` rounds a probability to 0 and `log` gives -inf;
3. from step 40 a learning-rate schedule bug multiplies the learning rate by
   1000 for a few steps: the gradient norm grows by orders of magnitude,
   the guard warns, and then the loss goes nonfinite.

The guard skips each bad step in the compiled program (nothing changes, bit
for bit), reads the health one step late (the device never waits), replays
the bad step once, prints one diagnosis per incident (leaf, row, line,
cause), rolls back to the last good snapshot, and writes a JSON-lines log,
a summary table and a plot.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxnan
from jaxnan.examples import demo_view

NAN_BATCH, NAN_ROW = 12, 6
OUTLIER_BATCH, OUTLIER_ROW = 25, 19
SURGE_START, SURGE_STEPS, SURGE_FACTOR = 40, 3, 1000.0
BASE_LR = 3e-3


def init_params(key, sizes=(16, 64, 64, 4)):
    """Dense layers as a plain params dict."""
    params = {}
    for i, (m, n) in enumerate(zip(sizes[:-1], sizes[1:])):
        key, k = jax.random.split(key)
        params[f"dense{i}"] = {
            "kernel": jax.random.normal(k, (m, n)) / np.sqrt(m),
            "bias": jnp.zeros(n),
        }
    return params


def model(params, x):
    """An MLP with gelu activations."""
    n = len(params)
    for i in range(n):
        layer = params[f"dense{i}"]
        x = x @ layer["kernel"] + layer["bias"]
        if i < n - 1:
            x = jax.nn.gelu(x)
    return x


def loss_fn(params, batch):
    """Hand-written cross-entropy (the bug: log of a softmax)."""
    probs = jax.nn.softmax(model(params, batch["x"]))
    return -jnp.mean(jnp.sum(batch["y"] * jnp.log(probs), axis=-1))


def make_batch(rng, w_true, step, size=32):
    """A batch of a 4-class problem; batches 12 and 25 carry a bad row."""
    x = rng.normal(size=(size, w_true.shape[0])).astype(np.float32)
    y = np.eye(w_true.shape[1], dtype=np.float32)[np.argmax(x @ w_true, axis=1)]
    if step == NAN_BATCH:
        x[NAN_ROW, 3] = np.nan  # a sensor dropout
    if step == OUTLIER_BATCH:
        x[OUTLIER_ROW] *= 1000.0  # a unit error
    return {"x": x, "y": y}


def learning_rate(step: int) -> np.float32:
    """3e-3, but 1000x too high for a few steps (a schedule bug on the host)."""
    surge = SURGE_START <= step < SURGE_START + SURGE_STEPS
    return np.float32(BASE_LR * (SURGE_FACTOR if surge else 1.0))


def make_train_step(tx):
    """The train step, written as without jaxnan (skip_nonfinite aside)."""

    def train_step(params, opt_state, batch, lr):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        direction, opt_state = tx.update(grads, opt_state, params, loss=loss)
        updates = jax.tree_util.tree_map(lambda d: -lr * d, direction)
        return optax.apply_updates(params, updates), opt_state, {"loss": loss}

    return train_step


def _print_plan(policy: str) -> None:
    """What the demo trains and what will go wrong."""
    print("jaxnan demo: MLP classifier, adam, hand-written cross-entropy")
    print(f"  step = jaxnan.guard(train_step, policy={policy!r})")
    print(
        f"  batch {NAN_BATCH}: NaN in row {NAN_ROW}; batch {OUTLIER_BATCH}: "
        f"outlier row {OUTLIER_ROW} (x1000); steps {SURGE_START}-"
        f"{SURGE_START + SURGE_STEPS - 1}: learning rate x{SURGE_FACTOR:g}\n"
    )


def run(
    steps: int = 60,
    *,
    plot_path: str | None = "jaxnan_demo.png",
    log: str | None = None,
    progress: bool = True,
    policy: str = "rollback",
    snapshot_every: int = 5,
) -> int:
    """Trains under `jaxnan.guard`, survives the bad steps, prints the summary."""
    rng = np.random.default_rng(0)
    w_true = rng.normal(size=(16, 4))
    params = init_params(jax.random.PRNGKey(0))
    tx = jaxnan.skip_nonfinite(optax.scale_by_adam())
    opt_state = tx.init(params)
    step = jaxnan.guard(
        make_train_step(tx), policy=policy, snapshot_every=snapshot_every, log=log
    )
    _print_plan(policy)
    with demo_view.Progress(steps, progress) as bar:
        for i in range(steps):
            batch = make_batch(rng, w_true, i)
            lr = learning_rate(i)
            params, opt_state, _ = step(params, opt_state, batch, lr)
            bar.update(i, step.figures, step.incidents)
    summary = step.summary()
    finite = bool(jaxnan.all_finite(params))
    final = next((f[1] for f in reversed(step.figures) if not f[4]), float("nan"))
    print(
        f"\nfinished: {steps} steps, {summary['bad_steps']} bad, final loss "
        f"{final:.4f}, params finite: {finite}"
    )
    print(demo_view.Undone.of(step.incidents).sentence(steps))
    if not (progress and demo_view.rich_table(summary, step.incidents)):
        print(demo_view.plain_table(summary, step.incidents))
    if log:
        print(f"incident log (JSON lines): {log}")
    if plot_path:
        _save_plot(step, plot_path)
    return 0


def _save_plot(step, path: str) -> None:
    """Writes the plot of a run and says where (or how to get matplotlib)."""
    written = demo_view.plot(step.figures, step.incidents, path)
    if written:
        print(f"plot: {os.path.abspath(written)}")
    else:
        print(f"plot: skipped, matplotlib is not installed ({demo_view.INSTALL})")
