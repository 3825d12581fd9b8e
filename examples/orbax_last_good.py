"""Checkpoint only states the guard verified: `step.last_good` with Orbax.

kyutai-labs/pocket-tts PR #262 lost a run by saving a NaN state over its
good checkpoints: the loop saved whatever the step returned, and with
``max_to_keep`` the last good checkpoints were deleted one save at a time.
Here the loop saves ``step.last_good``, the newest state `jaxnan.guard`
read healthy, so a NaN state is never written. The guard rolls back 5 steps
and skips a window of 2 batches after a bad one (the way PaLM restarted
before a spike and skipped batches), and writes every batch it took out of
training to ``bad_batches.jsonl``. The run is stopped inside that window (a
preemption) and resumed from the latest checkpoint: the resumed guard reads
the record and skips those batches itself.

`naive=True` runs the same loop without the guard, saving what the step
returns, to show what is lost.

Orbax is an optional dependency (``pip install jaxnan[orbax]``); jaxnan
itself never imports it.

Run: python examples/orbax_last_good.py
"""

from __future__ import annotations

import pathlib
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

import jaxnan


def init(key, sizes=(8, 16, 1)):
    params = []
    for m, n in zip(sizes[:-1], sizes[1:]):
        key, k = jax.random.split(key)
        params.append(
            {"w": jax.random.normal(k, (m, n)) / np.sqrt(m), "b": jnp.zeros(n)}
        )
    return params


def loss_fn(params, batch):
    x = batch["x"]
    for layer in params[:-1]:
        x = jax.nn.relu(x @ layer["w"] + layer["b"])
    pred = (x @ params[-1]["w"] + params[-1]["b"])[:, 0]
    return jnp.mean((pred - batch["y"]) ** 2)


def batch_at(position: int, bad: tuple[int, ...]) -> dict:
    """The batch at a data position (a deterministic loader); NaN rows in `bad`."""
    rng = np.random.default_rng(position)
    x = rng.normal(size=(16, 8)).astype(np.float32)
    if position in bad:
        x[4, 1] = np.nan
    return {"x": x, "y": np.sin(x.sum(1)).astype(np.float32)}


def make_step(tx):
    @jax.jit
    def train_step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params, loss=loss)
        return optax.apply_updates(params, updates), opt_state, loss

    return train_step


def manager(path: pathlib.Path) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=2, enable_async_checkpointing=False
    )
    return ocp.CheckpointManager(path, options=options)


def train(
    workdir: pathlib.Path,
    positions: range,
    *,
    bad: tuple[int, ...],
    save_every: int,
    resume: bool = False,
) -> dict:
    """Trains over `positions`, saving `step.last_good` every `save_every` calls."""
    tx = jaxnan.skip_nonfinite(optax.adam(1e-2))
    params = init(jax.random.key(0))
    opt_state = tx.init(params)
    mngr = manager(workdir / "checkpoints")
    start = 0
    if resume:  # from the latest checkpoint: a verified state
        latest = mngr.latest_step()
        target = {"params": params, "opt_state": opt_state}
        state = mngr.restore(latest, args=ocp.args.StandardRestore(target))
        params, opt_state = state["params"], state["opt_state"]
        start = latest + 1
    step = jaxnan.guard(
        make_step(tx),
        policy="rollback",
        snapshot_every=5,
        steps_back=5,
        skip_batches=2,
        bad_batches=workdir / "bad_batches.jsonl",  # read back when resuming
        start_step=start,
        verbose=False,
    )
    for position in positions[start:]:
        params, opt_state, _ = step(params, opt_state, batch_at(position, bad))
        if (position + 1) % save_every == 0:
            good = step.last_good  # waits for this step; None before any
            if good is not None:
                s, (p, o) = good
                mngr.save(s, args=ocp.args.StandardSave({"params": p, "opt_state": o}))
    step.finish()
    mngr.wait_until_finished()
    return {"params": params, "summary": step.summary(), "manager": mngr}


def naive(workdir: pathlib.Path, positions: range, *, bad, save_every) -> None:
    """The same loop without the guard, saving whatever the step returns."""
    tx = optax.adam(1e-2)
    params = init(jax.random.key(0))
    opt_state = tx.init(params)
    train_step = make_step(tx)
    mngr = manager(workdir / "naive")
    for position in positions:
        params, opt_state, _ = train_step(params, opt_state, batch_at(position, bad))
        if (position + 1) % save_every == 0:
            mngr.save(position, args=ocp.args.StandardSave({"params": params}))
    mngr.wait_until_finished()
    return mngr


def finite_checkpoints(mngr: ocp.CheckpointManager) -> dict[int, bool]:
    """``{step: every leaf finite}`` of the checkpoints a manager still keeps."""
    out = {}
    for s in mngr.all_steps():
        tree = mngr.restore(s, args=ocp.args.StandardRestore())
        out[s] = bool(jaxnan.all_finite(tree))
    return out


def main(
    steps: int = 40,
    bad: tuple[int, ...] = (23,),
    save_every: int = 10,
    stop_at: int = 25,
    workdir: str | None = None,
) -> dict:
    workdir = pathlib.Path(workdir or tempfile.mkdtemp())
    positions = range(steps)
    # The first launch stops after `stop_at` calls (a preemption) ...
    first = train(workdir, positions[:stop_at], bad=bad, save_every=save_every)
    saved = finite_checkpoints(first["manager"])
    record = jaxnan.BadBatches.load(workdir / "bad_batches.jsonl")
    # ... and the second resumes from the latest verified checkpoint.
    latest = first["manager"].latest_step()
    second = train(workdir, positions, bad=bad, save_every=save_every, resume=True)
    naive_mngr = naive(workdir, positions, bad=bad, save_every=save_every)
    out = {
        "saved": saved,
        "record": record,
        "first": first["summary"],
        "resumed_from": latest,
        "resumed": second["summary"],
        "params": second["params"],
        "final": finite_checkpoints(second["manager"]),
        "naive": finite_checkpoints(naive_mngr),
    }
    print(f"guarded checkpoints (step: all finite): {out['final']}")
    print(f"bad-batch record: {sorted(record.positions)}")
    print(f"naive checkpoints (step: all finite): {out['naive']}")
    return out


if __name__ == "__main__":
    main()
