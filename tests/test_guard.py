"""jaxnan.guard on a plain optax step: policies, replay, early warning, records."""

import json
import logging
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxnan
from tests import helpers

_data = helpers.regression_batches
_loss = helpers.regression_loss
_init = helpers.regression_init


def _make_step(tx, loss_fn=_loss):
    return helpers.optax_train_step(tx, loss_fn)


def _train(step, tx, batches):
    params, opt_state = _init(tx)
    for b in batches:
        params, opt_state, _ = step(params, opt_state, b)
    return params, opt_state


@pytest.mark.default_compiler
def test_healthy_step_has_no_host_callback_and_matches_plain():
    tx = jaxnan.skip_nonfinite(optax.adam(0.1))
    train_step = _make_step(tx)
    step = jaxnan.guard(train_step)
    params, opt_state = _init(tx)
    batch = _data(1)[0]
    text = step.lower(params, opt_state, batch).as_text()
    assert "callback" not in text

    # The search can fail: a step with a callback of its own shows one.
    def noisy(params, opt_state, batch):
        jax.debug.callback(lambda: None)
        return train_step(params, opt_state, batch)

    assert "callback" in jaxnan.guard(noisy).lower(params, opt_state, batch).as_text()
    batches = _data(5)
    a = _train(step, tx, batches)
    b = _train(jax.jit(train_step), tx, batches)
    chex_equal = jax.tree_util.tree_map(lambda x, y: np.array_equal(x, y), a, b)
    assert all(jax.tree_util.tree_leaves(chex_equal))
    assert step.summary()["bad_steps"] == 0


def test_guard_keeps_no_copy_and_reads_the_gradients_once():
    # The compiled guarded step needs no more temporary memory than the same
    # step with skip_nonfinite alone (measured: a sum of squares for the
    # gradient norm once made XLA write g * g out, +0.5x the parameter bytes),
    # and reads no more bytes: the gradient norm of its history is summed in
    # the reductions that check the gradients (a separate pass read them once
    # more, +1.0x the parameter bytes).
    def mlp_loss(p, b):
        h = jax.nn.relu(b["x"] @ p["w1"] + p["b1"])
        return jnp.mean((h @ p["w2"] - b["y"]) ** 2)

    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    params = {
        "w1": jax.random.normal(k1, (256, 512)) * 0.05,
        "b1": jnp.zeros(512),
        "w2": jax.random.normal(k2, (512, 8)) * 0.05,
    }
    batch = {"x": jnp.ones((64, 256)), "y": jnp.zeros((64, 8))}
    tx = jaxnan.skip_nonfinite(optax.adamw(1e-3))
    step = _make_step(tx, mlp_loss)
    state = tx.init(params)

    def costs(lowered):
        compiled = lowered.compile()
        analysis = compiled.cost_analysis()
        if isinstance(analysis, list):
            analysis = analysis[0]
        temp = compiled.memory_analysis().temp_size_in_bytes
        return temp, analysis["bytes accessed"]

    alone = costs(jax.jit(step, donate_argnums=(0, 1)).lower(params, state, batch))
    guard = jaxnan.guard(step, verbose=False)
    guarded = costs(guard.lower(params, state, batch))
    pbytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(params))
    assert guarded[0] - alone[0] < 0.05 * pbytes, (guarded, alone, pbytes)
    # The guard reads more than the step only on its small leaves (b1, w2:
    # their old values are kept for the update ratio); a second pass over the
    # gradients would add at least the bytes of w1.
    extra_read = guarded[1] - alone[1]
    assert extra_read < 0.25 * params["w1"].nbytes, (guarded, alone)
    # The norm it records is the gradients' global norm.
    _, grads = jax.value_and_grad(mlp_loss)(params, batch)
    guard(params, state, batch)
    guard.finish()
    np.testing.assert_allclose(
        guard.figures[0][2], float(optax.tree.norm(grads)), rtol=1e-5
    )


def test_step_without_loss_for_skip_nonfinite_warns_once_at_the_call():
    tx = jaxnan.skip_nonfinite(optax.adam(0.1))

    def train_step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(_loss)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)  # no loss=
        return optax.apply_updates(params, updates), opt_state, loss

    step = jaxnan.guard(train_step, verbose=False)
    params, opt_state = _init(tx)
    batches = _data(3)
    with pytest.warns(UserWarning, match="without `loss=`") as caught:
        params, opt_state, _ = step(params, opt_state, batches[0])  # the line
    line = _line_of("params, opt_state, _ = step(params, opt_state, batches[0])")
    assert [(w.filename, w.lineno) for w in caught] == [(__file__, line)]
    text = str(caught[0].message)
    assert "tx.update(grads, opt_state, params, loss=loss)" in text
    # What it says is what the guard does: such a step is undone (see
    # test_a_nonfinite_loss_alone_leaves_the_state_bit_for_bit_unchanged),
    # at the price of a copy of the state on every step.
    assert "applied" not in text
    assert "still undone" in text and "copy of the parameters" in text
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for b in batches[1:]:
            params, opt_state, _ = step(params, opt_state, b)  # no second warning
    step.finish()


def _line_of(text):
    with open(__file__) as f:
        return next(
            i for i, ln in enumerate(f, 1) if text in ln and "_line_of" not in ln
        )


def test_host_dispatches_next_step_before_reading_the_previous_one(caplog):
    # The host reads step k-1's health (the one blocking read) only after it
    # has dispatched step k, so the device always has a step queued. Checked
    # by the order of the guard's own debug records, not by timing.
    tx = jaxnan.skip_nonfinite(optax.sgd(0.1))
    step = jaxnan.guard(_make_step(tx, _loss))
    params, opt_state = _init(tx)
    with caplog.at_level(logging.DEBUG, logger="jaxnan.guard"):
        for b in _data(4):
            params, opt_state, _ = step(params, opt_state, b)
        step.finish()
    events = [
        r.getMessage()
        for r in caplog.records
        if r.getMessage().startswith(("dispatched step", "reading health"))
    ]
    assert events == [
        "dispatched step 0",
        "dispatched step 1",
        "reading health of step 0",
        "dispatched step 2",
        "reading health of step 1",
        "dispatched step 3",
        "reading health of step 2",
        "reading health of step 3",
    ]


@pytest.mark.default_compiler
def test_raise_carries_diagnosis_and_the_state_before_the_bad_step():
    tx = jaxnan.skip_nonfinite(optax.adam(0.1))
    step = jaxnan.guard(_make_step(tx), policy="raise")
    batches = _data(5, bad=(3,))
    ref_params, _ = _train(jax.jit(_make_step(tx)), tx, batches[:3])
    params, opt_state = _init(tx)
    with pytest.raises(jaxnan.NonFiniteError, match="row 2 of batch\\['x'\\]") as e:
        for b in batches:
            params, opt_state, _ = step(params, opt_state, b)
    d = e.value.details
    assert d["diagnosis"].cause == "input_data"
    assert d["incident"].action == "raised" and d["incident"].step == 3
    kept_params = d["state"][0]
    assert np.array_equal(kept_params["w"], ref_params["w"])


@pytest.mark.default_compiler
def test_rollback_restores_the_snapshot_exactly(tmp_path):
    tx = jaxnan.skip_nonfinite(optax.adam(0.1))
    log = tmp_path / "incidents.jsonl"
    step = jaxnan.guard(_make_step(tx), policy="rollback", snapshot_every=3, log=log)
    batches = _data(9, bad=(5,))
    got = _train(step, tx, batches)
    summary = step.summary()
    (incident,) = step.incidents
    assert incident.action == "rolled_back" and incident.restored_step == 3
    assert "step 4 undone (its batch is dropped), batch 5 skipped." in incident.message
    assert incident.undone == (4, 5)
    assert summary["rolled_back"] == 1 and summary["causes"] == {"input_data": 1}
    # Equal to a run that saw batches 0-3 and then 6-8 (batch 4 undone, 5 skipped).
    kept = batches[:4] + batches[6:]
    want = _train(jax.jit(_make_step(tx)), tx, kept)
    assert np.array_equal(got[0]["w"], want[0]["w"])
    inner = jax.tree_util.tree_leaves(got[1].inner_state)
    ref = jax.tree_util.tree_leaves(want[1].inner_state)
    assert all(np.array_equal(a, b) for a, b in zip(inner, ref))
    (line,) = log.read_text().splitlines()
    record = json.loads(line)
    assert record["step"] == 5 and record["rows"] == [2]
    assert record["action"] == "rolled_back" and record["cause"] == "input_data"
    assert record["leaf"] == "batch['x']" and record["restored_step"] == 3
    assert record["undone"] == [4, 5]


@pytest.mark.default_compiler
def test_nondeterministic_failure_is_reported_as_such():
    tx = jaxnan.skip_nonfinite(optax.sgd(0.1))
    calls = [0]

    def flaky():  # NaN on its third run only: a "hardware" glitch
        calls[0] += 1
        return np.float32(np.nan if calls[0] == 3 else 0.0)

    def train_step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(_loss)(params, batch)
        loss = loss + jax.pure_callback(flaky, jax.ShapeDtypeStruct((), jnp.float32))
        updates, opt_state = tx.update(grads, opt_state, params, loss=loss)
        return optax.apply_updates(params, updates), opt_state, loss

    step = jaxnan.guard(train_step)
    batches = _data(5)
    got = _train(step, tx, batches)
    (incident,) = step.incidents
    assert incident.step == 2 and incident.cause == "nondeterministic"
    assert not incident.deterministic and incident.action == "skipped"
    assert "nondeterministic" in incident.message
    (cited,) = incident.evidence  # what the verdict rests on
    assert cited.figure == "replay" and cited.rule == "nondeterministic"
    assert step.summary()["nondeterministic"] == 1
    want = _train(jax.jit(_make_step(tx)), tx, batches[:2] + batches[3:])
    assert np.array_equal(got[0]["w"], want[0]["w"])


def test_learning_rate_surge_is_warned_before_the_first_nan():
    surge = 6
    tx = jaxnan.skip_nonfinite(optax.sgd(lambda n: jnp.where(n >= surge, 20.0, 0.05)))
    step = jaxnan.guard(_make_step(tx), max_streak=3)
    params, opt_state = _init(tx)
    with pytest.raises(jaxnan.NonFiniteError, match="gave up"):
        for b in _data(60, size=32):
            params, opt_state, _ = step(params, opt_state, b)
    warning = step.incidents[0]
    first_bad = next(i for i in step.incidents if i.action != "warned")
    assert warning.action == "warned" and warning.cause == "growth"
    assert surge <= warning.step < first_bad.step  # the surge step itself
    assert "its median" in warning.message and "zscore_clip" in warning.message
    assert first_bad.cause == "learning_rate"
    causes = [x.strip() for x in first_bad.message.splitlines() if "cause:" in x]
    assert causes == ["cause:   learning_rate"]  # one cause, the final one
    assert first_bad.diagnosis.cause == "learning_rate"
    assert "why:     " in first_bad.message and "then the NaN" in first_bad.message
    figures = [f for f in step.figures if f[0] < first_bad.step]
    assert all(np.isfinite(f[1]) for f in figures)  # no NaN before the warning


def test_bad_arguments_name_the_argument():
    tx = jaxnan.skip_nonfinite(optax.sgd(0.1))
    with pytest.raises(ValueError, match="policy='skp'"):
        jaxnan.guard(_make_step(tx), policy="skp")
    with pytest.raises(ValueError, match="snapshot_every must be an int >= 1"):
        jaxnan.guard(_make_step(tx), snapshot_every=0)
    with pytest.raises(TypeError, match="window must be an int, got float"):
        jaxnan.guard(_make_step(tx), window=5.0)
    with pytest.raises(ValueError, match=r"growth must be > 1, got 0\.5\. Such as 100"):
        jaxnan.guard(_make_step(tx), growth=0.5)
    with pytest.raises(TypeError, match="growth must be a real number, got str"):
        jaxnan.guard(_make_step(tx), growth="big")
    with pytest.raises(TypeError, match="needs a callable"):
        jaxnan.guard(None)
    # Options without the step, as a decorator factory (like jax.jit's
    # functools.partial idiom), name the missing argument and the fix.
    with pytest.raises(TypeError, match=r"step_fn.*functools\.partial\(jaxnan\.guard"):
        jaxnan.guard(verbose=False)
    # A string is not a bool: "no" would have printed every incident.
    with pytest.raises(TypeError, match="verbose must be True or False, got 'no'"):
        jaxnan.guard(_make_step(tx), verbose="no")
    params, opt_state = _init(tx)
    batch = _data(1)[0]

    def no_loss(params, opt_state, batch):
        params, opt_state, loss = _make_step(tx)(params, opt_state, batch)
        return params, opt_state, {"mse": loss}

    with pytest.raises(ValueError, match="cannot find the loss.*keys \\['mse'\\]"):
        jaxnan.guard(no_loss)(params, opt_state, batch)
    plain = optax.sgd(0.1)
    with pytest.raises(ValueError, match="holds no jaxnan.skip_nonfinite"):
        jaxnan.guard(_make_step(plain))(params, plain.init(params), batch)

    def swapped(params, opt_state, batch):
        params, opt_state, loss = _make_step(tx)(params, opt_state, batch)
        return opt_state, params, loss

    with pytest.raises(
        ValueError, match="outputs of `swapped` do not begin with its state"
    ):
        jaxnan.guard(swapped)(params, opt_state, batch)
    with pytest.raises(TypeError, match="argument `batch`.*batch\\['name'\\]"):
        jaxnan.guard(_make_step(tx))(params, opt_state, {**batch, "name": "b0"})


def test_user_exceptions_are_never_swallowed():
    tx = jaxnan.skip_nonfinite(optax.sgd(0.1))

    def broken(params, opt_state, batch):
        raise KeyError("my bug")

    params, opt_state = _init(tx)
    with pytest.raises(KeyError, match="my bug"):
        jaxnan.guard(broken)(params, opt_state, _data(1)[0])


def test_a_bad_step_soon_after_another_is_diagnosed_again_when_its_cause_differs():
    # Step 3: a NaN row in the batch. Step 5, within the window: a finite
    # batch whose huge row overflows the squared error. The second is not
    # "as at step 3": its inputs are finite, so it is replayed and located.
    tx = jaxnan.skip_nonfinite(optax.sgd(0.01))
    step = jaxnan.guard(_make_step(tx))
    batches = _data(8, bad=(3,))
    batches[4]["x"][5, 1] = np.inf  # step 4: bad input again, another row
    batches[5]["x"][1] = 3e30  # step 5: finite, (x @ w - y) ** 2 overflows
    _train(step, tx, batches)
    three, four, five = step.incidents
    assert (three.step, three.cause, three.rows) == (3, "input_data", (2,))
    # A repeat of the input cause, with this step's own rows and counts.
    assert (four.step, four.cause, four.leaf, four.rows) == (
        4,
        "input_data",
        "batch['x']",
        (5,),
    )
    assert four.diagnosis.nonfinite_inputs == {"batch['x']": (0, 1, 0)}
    assert four.message.endswith(
        "as at step 3, input_data at the same place.\n"
        "  examples: row 5 of batch['x'] (batch 4)\n"
        "  action:  skipped; state unchanged."
    )
    assert five.step == 5 and five.phase == "forward" and five.cause != "input_data"
    assert five.diagnosis.nonfinite_inputs == {}
    assert five.diagnosis.primitive == "integer_pow"
    assert five.rows == (1,)
    assert [i.repeat_of for i in (three, four, five)] == [None, 3, None]


def test_a_poisoned_state_is_located_once_then_repeated():
    # A checkpoint with a NaN weight: every step fails the same way (the
    # batches are finite), so only the first is replayed and located.
    tx = jaxnan.skip_nonfinite(optax.sgd(0.01))
    step = jaxnan.guard(_make_step(tx), max_streak=100)
    params, opt_state = _init(tx)
    params = {"w": params["w"].at[1].set(jnp.nan)}
    for b in _data(4):
        params, opt_state, _ = step(params, opt_state, b)
    step.finish()
    first, *rest = step.incidents
    assert (first.step, first.cause) == (0, "poisoned_state")
    assert first.diagnosis.nonfinite_inputs == {"params['w']": (1, 0, 0)}
    assert [i.step for i in rest] == [1, 2, 3]
    # Each repeat names the located step, not the repeat before it.
    assert all("nonfinite again" in i.message for i in rest)
    assert all("as at step 0," in i.message for i in rest)
    assert [i.repeat_of for i in step.incidents] == [None, 0, 0, 0]
    assert all(i.diagnosis is first.diagnosis for i in rest)  # not replayed
