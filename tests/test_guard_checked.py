"""`jaxnan.checked` inside a `jaxnan.guard`ed step, as the README's tool table
says: the default ``on_nonfinite="raise"`` ends the run at the first bad step;
``"warn"`` lets the guard skip it."""

import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxnan


def _run(on_nonfinite):
    tx = jaxnan.skip_nonfinite(optax.adam(1e-2))
    checked = (
        jaxnan.checked
        if on_nonfinite is None
        else jaxnan.checked(on_nonfinite=on_nonfinite)
    )

    @checked
    def loss_fn(p, batch):
        return jnp.mean((batch["x"] @ p["w"] - batch["y"]) ** 2)

    @jax.jit
    def train_step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params, loss=loss)
        return optax.apply_updates(params, updates), opt_state, loss

    step = jaxnan.guard(train_step, verbose=False)
    params = {"w": jnp.zeros(3)}
    opt_state = tx.init(params)
    rng = np.random.default_rng(0)
    for i in range(6):
        x = rng.normal(size=(8, 3)).astype(np.float32)
        if i == 3:
            x[6, 1] = np.nan
        params, opt_state, _ = step(params, opt_state, {"x": x, "y": x.sum(1)})
    return step.summary()


def test_checked_default_raise_ends_a_guarded_run():
    # The runtime wraps the callback's error; it carries checked's message.
    msg = "nonfinite values in the inputs of `loss_fn` [phase input]"
    with pytest.raises(Exception, match=re.escape(msg)):
        _run(None)


def test_checked_warn_lets_the_guard_skip_the_step():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = _run("warn")
    assert summary["skipped"] == 1 and summary["causes"] == {"input_data": 1}
    assert any("batch['x']" in str(w.message) for w in caught)
