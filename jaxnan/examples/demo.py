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
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxnan

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


class _Progress:
    """A `rich` progress bar when rich is installed, a line per 10 steps if not."""

    def __init__(self, steps: int, fancy: bool):
        self.steps, self.bar, self.task = steps, None, None
        if fancy:
            try:
                import rich.progress as rp
            except ImportError:
                rp = None
            if rp is not None:
                self.bar = rp.Progress(
                    rp.TextColumn("training"),
                    rp.BarColumn(),
                    rp.MofNCompleteColumn(),
                    rp.TextColumn("{task.fields[status]}"),
                    rp.TimeElapsedColumn(),
                    transient=False,
                )
                self.task = self.bar.add_task("train", total=steps, status="")

    def __enter__(self):
        if self.bar is not None:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def update(self, step: int, figures: Any, bad: int) -> None:
        status = f"bad steps {bad}"
        healthy = [f for f in figures if not f[4]]
        if healthy:
            status = f"loss {healthy[-1][1]:7.4f}  {status}"
        if self.bar is not None:
            self.bar.update(self.task, completed=step + 1, status=status)
        elif (step + 1) % 10 == 0 or step + 1 == self.steps:
            print(f"step {step + 1:3d}/{self.steps}  {status}", flush=True)


def _table(summary: dict, incidents: list) -> str:
    """The final summary as plain text."""
    lines = [
        "",
        "summary",
        f"  steps        {summary['steps']}",
        f"  bad steps    {summary['bad_steps']} (skipped {summary['skipped']}, "
        f"rolled back {summary['rolled_back']})",
        f"  warnings     {summary['warnings']} (before any NaN)",
        f"  causes       {summary['causes']}",
        "",
        f"  {'step':>4}  {'action':<12} {'cause':<16} {'where':<14} examples",
    ]
    for i in incidents:
        rows = ",".join(str(r) for r in i.rows) if i.rows else "-"
        what = f"{i.leaf} rows {rows}" if i.leaf else ("-" if not i.rows else rows)
        lines.append(
            f"  {i.step:>4}  {i.action.value:<12} {i.cause:<16} "
            f"{i.where or '-':<14} {what}"
        )
    return "\n".join(lines)


def _rich_table(summary: dict, incidents: list) -> bool:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        return False
    table = Table(title="jaxnan.guard incidents")
    for col in ("step", "action", "cause", "where", "examples"):
        table.add_column(col)
    for i in incidents:
        rows = ", ".join(str(r) for r in i.rows)
        what = f"{i.leaf} rows {rows}" if i.leaf else rows
        table.add_row(str(i.step), i.action.value, i.cause, i.where or "-", what)
    console = Console()
    console.print(table)
    console.print(
        f"steps {summary['steps']}, bad {summary['bad_steps']} (skipped "
        f"{summary['skipped']}, rolled back {summary['rolled_back']}), warnings "
        f"{summary['warnings']}, causes {summary['causes']}"
    )
    return True


def _mark_steps(ax, bad_steps, warned_steps) -> None:
    """Red lines at the bad (undone) steps, dashed orange at the warnings."""
    for s in bad_steps:
        ax.axvline(s, color="tab:red", alpha=0.5, lw=1)
    for s in warned_steps:
        ax.axvline(s, color="tab:orange", ls="--", lw=1)


def plot(figures, incidents, path: str) -> str | None:
    """Loss, gradient norm and update ratio per step, bad steps marked."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    steps = np.array([f[0] for f in figures])
    loss = np.array([f[1] for f in figures])
    gnorm = np.array([f[2] for f in figures])
    ratio = np.array([f[3] for f in figures])
    bad = np.array([f[4] for f in figures])
    warned = [i.step for i in incidents if i.action == "warned"]
    fig, axes = plt.subplots(3, 1, figsize=(8, 7), sharex=True)
    panels = ((loss, "loss"), (gnorm, "grad norm"), (ratio, "update / param"))
    for ax, (values, name) in zip(axes, panels):
        ok = ~bad & np.isfinite(values)
        ax.semilogy(steps[ok], np.abs(values[ok]), ".-", lw=1, label=name)
        _mark_steps(ax, steps[bad], warned)
        ax.set_ylabel(name)
    axes[0].set_title("jaxnan.guard: red = bad step (undone), orange = early warning")
    axes[-1].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


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
    with _Progress(steps, progress) as bar:
        for i in range(steps):
            batch = make_batch(rng, w_true, i)
            lr = learning_rate(i)
            params, opt_state, _ = step(params, opt_state, batch, lr)
            bad = sum(1 for x in step.incidents if x.action != "warned")
            bar.update(i, step.figures, bad)
    summary = step.summary()
    finite = bool(jaxnan.all_finite(params))
    final = next((f[1] for f in reversed(step.figures) if not f[4]), float("nan"))
    print(
        f"\nfinished: {steps} steps, {summary['bad_steps']} bad, final loss "
        f"{final:.4f}, params finite: {finite}"
    )
    if not (progress and _rich_table(summary, step.incidents)):
        print(_table(summary, step.incidents))
    if log:
        print(f"incident log (JSON lines): {log}")
    if plot_path:
        _save_plot(step, plot_path)
    return 0


def _save_plot(step, path: str) -> None:
    """Writes the plot of a run and says where (or how to get matplotlib)."""
    written = plot(step.figures, step.incidents, path)
    if written:
        print(f"plot: {os.path.abspath(written)}")
    else:
        print("plot: skipped (pip install matplotlib, or jaxnan[plot])")
