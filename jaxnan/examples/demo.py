"""The demo: a training run that goes nonfinite, is kept alive and diagnosed.

A small MLP classifier is trained with a hand-written cross-entropy. Some
batches carry an outlier row (a sensor glitch: features 1000x too large); its
logits are so large that `softmax` rounds a probability to exactly 0 and
`log(0)` gives -inf, so the loss and the gradients become NaN.
`jaxnan.skip_nonfinite` skips those steps inside the compiled step (params and
Adam moments untouched, bit for bit), the host loop notices one step late (no
sync on the current step), and `jaxnan.locate` replays the flagged step to name
the operation that created the first nonfinite value.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxnan


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


def make_batch(rng, w_true, outlier=False, size=32):
    """A batch of a 4-class problem; `outlier` adds one glitched row."""
    x = rng.normal(size=(size, w_true.shape[0])).astype(np.float32)
    y = np.eye(w_true.shape[1], dtype=np.float32)[np.argmax(x @ w_true, axis=1)]
    if outlier:
        x[5] *= 1000.0
    return {"x": jnp.asarray(x), "y": jnp.asarray(y)}


def run(steps: int = 60, bad_steps: tuple[int, ...] = (25, 26, 41)) -> int:
    """Trains, survives the bad batches, and prints the diagnosis."""
    rng = np.random.default_rng(0)
    w_true = rng.normal(size=(16, 4))
    params = init_params(jax.random.PRNGKey(0))
    tx = jaxnan.skip_nonfinite(
        optax.chain(jaxnan.clip_by_global_norm(1.0), optax.adam(3e-3)),
        max_streak=5,
    )
    opt_state = tx.init(params)

    @jax.jit
    def train_step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params, loss=loss)
        return optax.apply_updates(params, updates), opt_state, loss

    print("jaxnan demo: MLP classifier, adam, hand-written cross-entropy")
    print("guard: skip_nonfinite(chain(clip_by_global_norm(1.0), adam(3e-3)))")
    print(f"batches {list(bad_steps)} carry an outlier row (features x1000)\n")
    flagged = []  # (step, params before it, batch), read one step late
    previous = None
    for step in range(steps):
        batch = make_batch(rng, w_true, outlier=step in bad_steps)
        new_params, opt_state, loss = train_step(params, opt_state, batch)
        if previous is not None:  # the previous step is done: reading is free
            p_step, p_params, p_batch, p_loss, p_state = previous
            skipped = int(p_state.last_nonfinite_step) == p_step
            if skipped:
                flagged.append((p_step, p_params, p_batch))
            if p_step % 10 == 0 or skipped:
                tag = "  <- nonfinite: step skipped, state untouched" if skipped else ""
                print(f"step {p_step:3d}  loss {float(p_loss):8.4f}{tag}")
        previous = (step, params, batch, loss, opt_state)
        params = new_params
        if bool(opt_state.gave_up):  # pragma: no cover - not reached in the demo
            print("gave up: too many nonfinite steps in a row")
            break
    final_loss = float(previous[3])
    print(
        f"\nfinished: {steps} steps, {int(opt_state.nonfinite_total)} skipped, "
        f"final loss {final_loss:.4f}, params finite: {bool(jaxnan.all_finite(params))}"
    )
    if flagged:
        step, p_params, p_batch = flagged[0]
        print(f"\nReplaying step {step} under jaxnan.locate:\n")
        diagnosis = jaxnan.locate(jax.value_and_grad(loss_fn))(p_params, p_batch)
        print(diagnosis)
        print("\nAnd jaxnan.lint would have flagged it before the run:\n")
        for finding in jaxnan.lint(loss_fn, p_params, p_batch):
            print(finding)
    return 0
