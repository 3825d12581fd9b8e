"""`jaxnan.inject_grads`, `inject_loss`, `inject_rows`: planted faults a loop
must survive, with `skip_nonfinite` alone and under `jaxnan.guard` (skip and
rollback). Each run is compared with the run that never saw the faulty step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxnan
from tests.helpers import (
    assert_no_host_callback,
    optax_train_step,
    regression_batches,
    regression_init,
    regression_loss,
)

FAULTS = list(jaxnan.Fault)


def _train(step, tx, batches):
    params, opt_state = regression_init(tx)
    for b in batches:
        params, opt_state, _ = step(params, opt_state, b)
    return params, opt_state


def _inner_leaves(opt_state):
    return jax.tree_util.tree_leaves(opt_state.inner_state)


def _assert_same_run(got, want):
    np.testing.assert_array_equal(got[0]["w"], want[0]["w"])
    for a, b in zip(_inner_leaves(got[1]), _inner_leaves(want[1])):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("fault", FAULTS)
def test_grads_fault_is_skipped_by_skip_nonfinite(fault):
    base = jaxnan.skip_nonfinite(optax.adam(0.1))
    tx = jaxnan.inject_grads(base, at=(2, 4), fault=fault)
    batches = regression_batches(6)
    got = _train(jax.jit(optax_train_step(tx, regression_loss)), tx, batches)
    assert int(got[1].nonfinite_total) == 2
    assert int(got[1].last_nonfinite_step) == 4
    if fault is jaxnan.Fault.HUGE:  # finite: caught by the outgoing check
        assert int(got[1].inner_nonfinite_total) == 2
    # The other steps are Adam's, bit for bit: a run without batches 2 and 4.
    kept = [b for i, b in enumerate(batches) if i not in (2, 4)]
    want = _train(jax.jit(optax_train_step(base, regression_loss)), base, kept)
    _assert_same_run(got, want)


def test_grads_injection_has_no_host_callback_and_keeps_the_state_type():
    base = jaxnan.skip_nonfinite(optax.sgd(0.1))
    tx = jaxnan.inject_grads(base, at=3)
    params, opt_state = regression_init(tx)
    assert type(opt_state) is jaxnan.SkipNonfiniteState
    batch = regression_batches(1)[0]
    assert_no_host_callback(
        optax_train_step(tx, regression_loss), params, opt_state, batch
    )


def test_grads_fault_under_the_guard_skip_fires_once_and_is_reported():
    base = jaxnan.skip_nonfinite(optax.adam(0.1))
    tx = jaxnan.inject_grads(base, at=3, fault="+inf")
    step = jaxnan.guard(optax_train_step(tx, regression_loss), verbose=False)
    batches = regression_batches(7)
    got = _train(step, tx, batches)
    step.finish()
    (incident,) = step.incidents
    assert incident.step == 3 and incident.action == "skipped"
    # The replay runs the step as it ran (skip_nonfinite's clock at 3): the
    # fault comes back, and the incident says it was planted, what and when.
    assert incident.cause == "injected" and incident.deterministic
    planted = "jaxnan.inject_grads planted Fault.POS_INF (+inf) in the gradients"
    assert f"why:     {planted} at step 3" in incident.message
    assert [e.rule for e in incident.evidence] == ["injected"]
    assert step.summary()["skipped"] == 1
    want = _train(
        jax.jit(optax_train_step(base, regression_loss)),
        base,
        batches[:3] + batches[4:],
    )
    _assert_same_run(got, want)


def test_loss_fault_under_the_guard_skip():
    base = jaxnan.skip_nonfinite(optax.sgd(0.1))
    loss_fn = jaxnan.inject_loss(regression_loss, at=2)

    def train_step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(
            params, batch, fault_step=jaxnan.fault_step(opt_state)
        )
        updates, opt_state = base.update(grads, opt_state, params, loss=loss)
        return optax.apply_updates(params, updates), opt_state, loss

    step = jaxnan.guard(train_step, verbose=False)
    batches = regression_batches(5)
    got = _train(step, base, batches)
    step.finish()
    (incident,) = step.incidents
    assert incident.step == 2 and np.isnan(incident.loss)
    # fault_step=jaxnan.fault_step(opt_state): the guard's clock, so the
    # replay (the step as it ran) plants it again and names it
    assert incident.cause == "injected" and incident.deterministic
    planted = "jaxnan.inject_loss planted Fault.NAN (nan) in the loss at step 2"
    assert f"why:     {planted}" in incident.message
    want = _train(
        jax.jit(optax_train_step(base, regression_loss)),
        base,
        batches[:2] + batches[3:],
    )
    _assert_same_run(got, want)


def test_row_fault_under_the_guard_rollback_names_the_row_and_resumes():
    base = jaxnan.skip_nonfinite(optax.adam(0.1))
    step = jaxnan.guard(
        optax_train_step(base, regression_loss),
        policy="rollback",
        snapshot_every=3,
        verbose=False,
    )
    batches = regression_batches(9)
    planted = list(jaxnan.inject_rows(batches, at=5, rows=(1, 6)))
    got = _train(step, base, planted)
    step.finish()
    (incident,) = step.incidents
    assert incident.action == "rolled_back" and incident.restored_step == 3
    assert incident.rows == (1, 6) and incident.leaf == "batch['x']"
    assert incident.cause == "input_data"
    # The loader's own arrays were not written.
    assert all(np.isfinite(b["x"]).all() for b in batches)
    # The run went on as if it had seen batches 0-3 and then 6-8.
    want = _train(
        jax.jit(optax_train_step(base, regression_loss)),
        base,
        batches[:4] + batches[6:],
    )
    _assert_same_run(got, want)


def test_grads_fault_under_rollback_is_persistent():
    # The clock is restored with the snapshot (the state after step 2), so
    # the fault fires again two calls later: every other call rolls back to
    # the same state, and no batch after 2 is learned from for good.
    base = jaxnan.skip_nonfinite(optax.sgd(0.1))
    tx = jaxnan.inject_grads(base, at=4)
    step = jaxnan.guard(
        optax_train_step(tx, regression_loss),
        policy="rollback",
        snapshot_every=2,
        verbose=False,
    )
    batches = regression_batches(9)
    _train(step, tx, batches)
    step.finish()
    assert [i.step for i in step.incidents] == [4, 6, 8]
    assert [(i.restored_step, i.undone) for i in step.incidents] == [
        (2, (3, 4)),
        (2, (5, 6)),
        (2, (7, 8)),
    ]
    params, opt_state = step.last_state[:2]
    assert int(jaxnan.fault_step(opt_state)) == 3
    want = _train(jax.jit(optax_train_step(base, regression_loss)), base, batches[:3])
    np.testing.assert_array_equal(params["w"], want[0]["w"])


def test_rows_on_device_arrays_and_selected_leaves():
    batch = {"x": jnp.ones((4, 2)), "y": jnp.ones(4), "id": jnp.arange(4)}
    (out,) = jaxnan.inject_rows([batch], at=0, rows=3, fault="-inf", leaves=["y"])
    np.testing.assert_array_equal(out["y"], [1, 1, 1, -np.inf])
    assert out["x"] is batch["x"] and out["id"] is batch["id"]
    (huge,) = jaxnan.inject_rows([batch], at=0, fault=jaxnan.Fault.HUGE)
    assert float(huge["x"][0, 1]) == float(jnp.finfo(jnp.float32).max)


def test_loss_with_aux_and_grad_untouched():
    def loss_fn(w):
        return jnp.sum(w**2), {"n": 3}

    wrapped = jaxnan.inject_loss(loss_fn, at=[0], fault="+inf")
    (value, aux), g = jax.value_and_grad(wrapped, has_aux=True)(
        jnp.ones(2), fault_step=jnp.int32(0)
    )
    assert value == jnp.inf and aux == {"n": 3}
    np.testing.assert_array_equal(g, [2.0, 2.0])


def test_bad_arguments_are_clear_errors():
    tx = jaxnan.inject_grads(optax.sgd(0.1), at=1)
    params = {"w": jnp.zeros(2)}
    with pytest.raises(TypeError, match="holds no jaxnan.SkipNonfiniteState"):
        tx.update(params, tx.init(params), params)
    with pytest.raises(ValueError, match="unknown fault='zero'"):
        jaxnan.inject_grads(optax.sgd(0.1), at=1, fault="zero")
    with pytest.raises(ValueError, match="at must name at least one step"):
        jaxnan.inject_loss(regression_loss, at=())
    with pytest.raises(TypeError, match="fault_step="):
        jaxnan.inject_loss(regression_loss, at=1)(params, {})
    with pytest.raises(ValueError, match="out of range"):
        list(jaxnan.inject_rows([{"x": np.ones((2, 2))}], at=0, rows=5))
    with pytest.raises(ValueError, match="no floating leaf"):
        list(jaxnan.inject_rows([{"i": np.ones(2, int)}], at=0))


@pytest.mark.parametrize("at", ["3", True, [1, "2"], 2.5, None, [1.0]])
def test_steps_must_be_ints(at):
    # at="3" and at=True were taken for step 3 and step 1 (int() of each),
    # at=2.5 failed with "'float' object is not iterable".
    with pytest.raises(TypeError, match=r"jaxnan.inject_grads: at must be"):
        jaxnan.inject_grads(jaxnan.skip_nonfinite(optax.sgd(0.1)), at=at)


def test_rows_and_leaves_are_checked_and_a_0d_step_is_one_step():
    data = [{"xy": np.ones((2, 2), np.float32), "x": np.ones((2, 2), np.float32)}]
    with pytest.raises(TypeError, match=r"jaxnan.inject_rows: rows must be"):
        list(jaxnan.inject_rows(data, at=0, rows="1"))
    # A str is one key, not its characters.
    (out,) = jaxnan.inject_rows(data, at=0, leaves="xy")
    assert np.isnan(out["xy"]).any() and not np.isnan(out["x"]).any()
    tx = jaxnan.inject_grads(jaxnan.skip_nonfinite(optax.sgd(0.1)), at=jnp.int32(0))
    params = {"w": jnp.zeros(2)}
    _, state = tx.update(params, tx.init(params), params)
    assert int(state.nonfinite_total) == 1


def test_fault_step_must_be_an_int():
    loss = jaxnan.inject_loss(regression_loss, at=1)
    with pytest.raises(TypeError, match=r"fault_step must be an int"):
        loss({"w": jnp.zeros(2)}, {}, fault_step="1")


def test_grads_fault_on_the_data_position_is_transient_under_rollback():
    base = jaxnan.skip_nonfinite(optax.sgd(0.1))
    tx = jaxnan.inject_grads(base, at=5)

    def train_step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(regression_loss)(params, batch)
        updates, opt_state = tx.update(
            grads, opt_state, params, loss=loss, fault_step=batch["position"]
        )
        return optax.apply_updates(params, updates), opt_state, loss

    step = jaxnan.guard(train_step, policy="rollback", snapshot_every=3, verbose=False)
    batches = [
        {**b, "position": np.int32(i)} for i, b in enumerate(regression_batches(9))
    ]
    got = _train(step, tx, batches)
    step.finish()
    (incident,) = step.incidents  # fired once: the loop moved past position 5
    assert incident.step == 5 and incident.action == "rolled_back"
    assert incident.restored_step == 3
    want = _train(
        jax.jit(optax_train_step(base, regression_loss)),
        base,
        [{"x": b["x"], "y": b["y"]} for b in batches[:4] + batches[6:]],
    )
    _assert_same_run(got, want)


def test_grads_fault_in_a_flax_nnx_optimizer_under_the_guard_is_named_injected():
    nnx = pytest.importorskip("flax.nnx")
    model = nnx.Linear(3, 1, rngs=nnx.Rngs(0))
    tx = jaxnan.inject_grads(jaxnan.skip_nonfinite(optax.sgd(0.1)), at=2, fault="nan")
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    def loss_fn(model, batch):
        return jnp.mean((model(batch["x"])[:, 0] - batch["y"]) ** 2)

    @nnx.jit
    def train_step(model, optimizer, batch):
        loss, grads = nnx.value_and_grad(loss_fn)(model, batch)
        optimizer.update(model, grads, loss=loss)
        return loss

    step = jaxnan.guard(train_step, verbose=False)
    for b in regression_batches(5):
        step(model, optimizer, b)
    step.finish()
    (incident,) = step.incidents
    assert (incident.step, incident.cause, incident.deterministic) == (
        2,
        "injected",
        True,
    )
    assert "planted Fault.NAN (nan) in the gradients at step 2" in incident.message
    # The clock went on past the fault: the guard put back only its replay's.
    assert int(jaxnan.fault_step(optimizer.opt_state)) == 5
