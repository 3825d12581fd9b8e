"""jaxnan.guard as a drop-in: donation, exceptions, Equinox, odd steps, long runs."""

import collections
import os
import re

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


def _bits(tree):
    return [np.asarray(x).tobytes() for x in jax.tree_util.tree_leaves(tree)]


# -- 1. donation follows the wrapped step ---------------------------------


def test_non_donating_jit_leaves_the_callers_arrays_alive():
    tx = jaxnan.skip_nonfinite(optax.sgd(0.1))
    step = jaxnan.guard(jax.jit(helpers.optax_train_step(tx, _loss)), verbose=False)
    params, opt_state = _init(tx)
    new_params, _, _ = step(params, opt_state, _data(1)[0])
    assert not params["w"].is_deleted()
    assert float(jnp.sum(params["w"])) == 0.0  # still readable
    assert not any(x.is_deleted() for x in jax.tree_util.tree_leaves(opt_state))
    assert not new_params["w"].is_deleted()


def test_unjitted_step_donates_nothing_and_donate_true_overrides():
    tx = jaxnan.skip_nonfinite(optax.sgd(0.1))
    params, opt_state = _init(tx)
    step = jaxnan.guard(helpers.optax_train_step(tx, _loss), verbose=False)
    step(params, opt_state, _data(1)[0])
    assert not params["w"].is_deleted()
    forced = jaxnan.guard(helpers.optax_train_step(tx, _loss), donate=True)
    forced(params, opt_state, _data(1)[0])
    assert params["w"].is_deleted()


def test_donating_jit_donates_and_the_memory_is_reused():
    tx = jaxnan.skip_nonfinite(optax.sgd(0.1))
    jitted = jax.jit(helpers.optax_train_step(tx, _loss), donate_argnums=(0,))
    step = jaxnan.guard(jitted, verbose=False)
    params = {"w": jnp.zeros(3)}
    opt_state = tx.init(params)
    pointer = params["w"].unsafe_buffer_pointer()
    new_params, _, _ = step(params, opt_state, _data(1)[0])
    assert params["w"].is_deleted()
    assert not any(x.is_deleted() for x in jax.tree_util.tree_leaves(opt_state))
    assert new_params["w"].unsafe_buffer_pointer() == pointer
    # donate=False overrides the wrapped jit's donation.
    kept = jaxnan.guard(jitted, donate=False, verbose=False)
    kept(new_params, opt_state, _data(1)[0])
    assert not new_params["w"].is_deleted()


def test_donate_argnames_and_equinox_donate_all_are_followed():
    eqx = pytest.importorskip("equinox")
    tx = jaxnan.skip_nonfinite(optax.sgd(0.1))
    train_step = helpers.optax_train_step(tx, _loss)
    by_name = jax.jit(train_step, donate_argnames=("opt_state",))
    for wrapped, dead in (
        (by_name, ("opt_state",)),
        (eqx.filter_jit(train_step, donate="all"), ("params", "opt_state")),
        (eqx.filter_jit(train_step, donate="all-except-first"), ("opt_state",)),
        (eqx.filter_jit(train_step), ()),
    ):
        params, opt_state = _init(tx)
        jaxnan.guard(wrapped, verbose=False)(params, opt_state, _data(1)[0])
        args = {"params": params, "opt_state": opt_state}
        for name, tree in args.items():
            leaves = jax.tree_util.tree_leaves(tree)
            assert all(x.is_deleted() == (name in dead) for x in leaves), (
                wrapped,
                name,
            )


# -- 2. no state is lost on any exception ----------------------------------


class _Interrupt(KeyboardInterrupt):
    pass


def test_keyboard_interrupt_keeps_the_last_state():
    tx = jaxnan.skip_nonfinite(optax.sgd(0.1))
    jitted = jax.jit(helpers.optax_train_step(tx, _loss), donate_argnums=(0, 1))
    step = jaxnan.guard(jitted, verbose=False)
    params, opt_state = _init(tx)
    batches = _data(4)
    for b in batches[:2]:
        params, opt_state, _ = step(params, opt_state, b)
    reference = jax.jit(helpers.optax_train_step(tx, _loss))
    ref_params, ref_opt = _init(tx)
    for b in batches[:3]:
        ref_params, ref_opt, _ = reference(ref_params, ref_opt, b)

    def interrupt(*_):
        raise _Interrupt

    step._read = interrupt  # Ctrl-C while the host waits for step 1's health
    with pytest.raises(_Interrupt):
        step(params, opt_state, batches[2])
    assert params["w"].is_deleted()  # donated to step 2, as the jit asked
    last_params, last_opt = step.last_state
    assert _bits((last_params, last_opt)) == _bits((ref_params, ref_opt))


def test_keyboard_interrupt_leaves_donated_nnx_objects_holding_the_new_state():
    nnx = pytest.importorskip("flax.nnx")
    tx = jaxnan.skip_nonfinite(optax.sgd(0.1))

    def train_step(model, optimizer, x, y):
        def loss_fn(model):
            return jnp.mean((model(x)[:, 0] - y) ** 2)

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads, loss=loss)
        return loss

    def make():
        model = nnx.Linear(3, 1, rngs=nnx.Rngs(0))
        return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

    batches = _data(3)
    model, optimizer = make()
    step = jaxnan.guard(nnx.jit(train_step, donate_argnums=(0, 1)), verbose=False)
    step(model, optimizer, batches[0]["x"], batches[0]["y"])
    kernel = model.kernel[...]

    def interrupt(*_):
        raise _Interrupt

    step._read = interrupt
    with pytest.raises(_Interrupt):
        step(model, optimizer, batches[1]["x"], batches[1]["y"])
    assert kernel.is_deleted()  # donated to the interrupted step, as asked
    assert step.last_state == (model, optimizer)
    ref_model, ref_opt = make()
    plain = nnx.jit(train_step)
    for b in batches[:2]:
        plain(ref_model, ref_opt, b["x"], b["y"])
    assert _bits(nnx.state((model, optimizer))) == _bits(
        nnx.state((ref_model, ref_opt))
    )


def test_an_exception_in_an_incident_keeps_the_state():
    tx = jaxnan.skip_nonfinite(optax.sgd(0.1))
    jitted = jax.jit(helpers.optax_train_step(tx, _loss), donate_argnums=(0, 1))
    step = jaxnan.guard(jitted, verbose=False)
    params, opt_state = _init(tx)
    batches = _data(4, bad=(1,))
    params, opt_state, _ = step(params, opt_state, batches[0])
    before = _bits((params, opt_state))
    params, opt_state, _ = step(params, opt_state, batches[1])

    def broken(incident):
        raise OSError("disk full")

    step.log.add = broken
    with pytest.raises(OSError, match="disk full"):
        step(params, opt_state, batches[2])
    # The bad step 1 changed nothing: the state to go on from is step 0's.
    last = step.last_state
    leaves = jax.tree_util.tree_leaves(last[0])
    assert _bits(leaves) == before[: len(leaves)]
    assert all(not x.is_deleted() for x in jax.tree_util.tree_leaves(last))


def test_a_bad_log_path_is_rejected_at_construction(tmp_path):
    step = helpers.optax_train_step(jaxnan.skip_nonfinite(optax.sgd(0.1)), _loss)
    missing = tmp_path / "no" / "such" / "dir" / "incidents.jsonl"
    with pytest.raises(ValueError, match=r"log=.*no/such/dir.*does not exist"):
        jaxnan.guard(step, log=missing)
    with pytest.raises(ValueError, match=r"log=.*is a directory"):
        jaxnan.guard(step, log=tmp_path)
    with pytest.raises(TypeError, match=r"log must be a path"):
        jaxnan.guard(step, log=3)
    jaxnan.guard(step, log=tmp_path / "ok.jsonl")
    assert not os.path.exists(tmp_path / "ok.jsonl")  # created at the first incident


# -- 3. Equinox Dropout and BatchNorm ---------------------------------------


def _eqx_model(eqx, key):
    class Model(eqx.Module):
        linear1: eqx.nn.Linear
        norm: eqx.nn.BatchNorm
        dropout: eqx.nn.Dropout
        linear2: eqx.nn.Linear

        def __init__(self, key):
            k1, k2 = jax.random.split(key)
            self.linear1 = eqx.nn.Linear(3, 8, key=k1)
            self.norm = eqx.nn.BatchNorm(8, axis_name="batch", mode="batch")
            self.dropout = eqx.nn.Dropout(0.25)
            self.linear2 = eqx.nn.Linear(8, 1, key=k2)

        def __call__(self, x, state, key):
            x = jax.nn.relu(self.linear1(x))
            x, state = self.norm(x, state)
            x = self.dropout(x, key=key)
            return self.linear2(x)[0], state

    return eqx.nn.make_with_state(Model)(key)


def test_equinox_dropout_and_batchnorm_state_match_the_unguarded_run():
    eqx = pytest.importorskip("equinox")
    tx = jaxnan.skip_nonfinite(optax.adam(1e-2))

    def run(guarded):
        model, state = _eqx_model(eqx, jax.random.key(0))
        opt_state = tx.init(eqx.filter(model, eqx.is_array))

        @eqx.filter_jit
        def train_step(model, state, opt_state, x, y, key):
            def loss_fn(model, state):
                keys = jax.random.split(key, x.shape[0])
                out, state = jax.vmap(
                    model, axis_name="batch", in_axes=(0, None, 0), out_axes=(0, None)
                )(x, state, keys)
                return jnp.mean((out - y) ** 2), state

            (loss, state), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(
                model, state
            )
            params = eqx.filter(model, eqx.is_array)
            updates, opt_state = tx.update(grads, opt_state, params, loss=loss)
            return eqx.apply_updates(model, updates), state, opt_state, loss

        step = jaxnan.guard(train_step, verbose=False) if guarded else train_step
        key = jax.random.key(1)
        for b in _data(3):
            key, sub = jax.random.split(key)
            model, state, opt_state, _ = step(
                model, state, opt_state, b["x"], b["y"], sub
            )
        if guarded:
            assert step.summary()["bad_steps"] == 0
        assert model.dropout.inference is False and model.dropout.p == 0.25
        return eqx.filter(model, eqx.is_array), state, opt_state

    assert _bits(run(True)) == _bits(run(False))


# -- 4. odd steps -----------------------------------------------------------


def test_several_optimizer_steps_per_call_with_scan():
    tx = jaxnan.skip_nonfinite(optax.sgd(0.1))
    one = helpers.optax_train_step(tx, _loss)

    def train_step(params, opt_state, batches):
        def body(carry, batch):
            params, opt_state, loss = one(*carry, batch)
            return (params, opt_state), loss

        (params, opt_state), losses = jax.lax.scan(body, (params, opt_state), batches)
        return params, opt_state, jnp.mean(losses)

    data = _data(8, bad=(5,))
    stacked = [
        jax.tree_util.tree_map(lambda *xs: np.stack(xs), *data[i : i + 2])
        for i in range(0, 8, 2)
    ]
    step = jaxnan.guard(train_step, verbose=False)
    params, opt_state = _init(tx)
    states = []
    for b in stacked:
        params, opt_state, _ = step(params, opt_state, b)
        states.append(_bits(params))
    step.finish()
    (incident,) = step.incidents
    assert incident.step == 2 and incident.cause == "input_data"
    # The bad call (steps 4 and 5) changed nothing at all.
    assert states[2] == states[1]
    plain = jax.jit(train_step)
    ref, ref_opt = _init(tx)
    for b in (stacked[0], stacked[1], stacked[3]):
        ref, ref_opt, _ = plain(ref, ref_opt, b)
    assert _bits(params) == _bits(ref)


def test_the_loss_is_the_first_output_after_the_state():
    tx = jaxnan.skip_nonfinite(optax.sgd(0.1))

    def train_step(params, opt_state, x, y):
        def loss_fn(p):
            return jnp.mean((x @ p["w"] - y) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params, loss=loss)
        acc = jnp.mean(jnp.abs(x @ params["w"] - y) < 1.0)
        return optax.apply_updates(params, updates), opt_state, loss, acc

    step = jaxnan.guard(train_step, verbose=False)
    params, opt_state = _init(tx)
    out = []
    for b in _data(3):
        params, opt_state, loss, acc = step(params, opt_state, b["x"], b["y"])
        out.append((float(loss), float(acc)))
    step.finish()
    losses = [f[1] for f in step.figures]
    assert losses == [pytest.approx(o[0], rel=0, abs=0) for o in out]


def test_a_nonfinite_loss_alone_leaves_the_state_bit_for_bit_unchanged():
    tx = jaxnan.skip_nonfinite(optax.sgd(0.1))

    def train_step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(_loss)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)  # no loss=
        # A finite gradient, a nonfinite reported loss.
        loss = jnp.where(batch["flag"] > 0, jnp.nan, loss)
        return optax.apply_updates(params, updates), opt_state, loss

    data = _data(3)
    for i, b in enumerate(data):
        b["flag"] = np.float32(i == 1)
    step = jaxnan.guard(train_step, verbose=False)
    params, opt_state = _init(tx)
    with pytest.warns(UserWarning, match="without `loss=`"):
        params, opt_state, _ = step(params, opt_state, data[0])
    before = _bits(params) + _bits(opt_state.inner_state)
    params, opt_state, _ = step(params, opt_state, data[1])
    params, opt_state, _ = step(params, opt_state, data[2])
    step.finish()
    (incident,) = step.incidents
    assert incident.step == 1 and "state unchanged" in incident.message
    # The held step 2 output is step 0's state; the replayed step 2 is in
    # `params` now: compare the state right after the bad step instead.
    plain = jax.jit(train_step)
    ref, ref_opt = _init(tx)
    ref, ref_opt, _ = plain(ref, ref_opt, data[0])
    assert _bits(ref) + _bits(ref_opt.inner_state) == before
    ref, ref_opt, _ = plain(ref, ref_opt, data[2])
    assert _bits(params) == _bits(ref)


def test_snapshot_every_one_rolls_back():
    tx = jaxnan.skip_nonfinite(optax.sgd(0.1))
    step = jaxnan.guard(
        helpers.optax_train_step(tx, _loss),
        policy="rollback",
        snapshot_every=1,
        verbose=False,
    )
    params, opt_state = _init(tx)
    for b in _data(6, bad=(4,)):
        params, opt_state, _ = step(params, opt_state, b)
    step.finish()
    (incident,) = step.incidents
    assert incident.action == "rolled_back" and incident.restored_step == 2
    assert (
        "rolled back to the state after step 2; step 3 undone (its batch is "
        "dropped), batch 4 skipped." in incident.message
    )


def test_a_rollback_drops_the_undone_steps_early_warning_figures():
    tx = jaxnan.skip_nonfinite(optax.sgd(0.1))
    step = jaxnan.guard(
        helpers.optax_train_step(tx, _loss),
        policy="rollback",
        snapshot_every=2,
        verbose=False,
    )
    params, opt_state = _init(tx)
    for b in _data(8, bad=(6,)):
        params, opt_state, _ = step(params, opt_state, b)
    step.finish()
    (incident,) = step.incidents
    assert incident.restored_step == 4
    # Kept: steps 0-4 (the state restored is step 4's) and step 7 after it;
    # step 5, undone, is dropped.
    assert list(step.history.steps) == [0, 1, 2, 3, 4, 7]
    assert len(step.history.columns[0]) == 6


def test_a_bad_last_step_under_rollback_has_an_action_line():
    tx = jaxnan.skip_nonfinite(optax.sgd(0.1))
    step = jaxnan.guard(
        helpers.optax_train_step(tx, _loss),
        policy="rollback",
        snapshot_every=2,
        verbose=False,
    )
    params, opt_state = _init(tx)
    for b in _data(6, bad=(5,)):
        params, opt_state, _ = step(params, opt_state, b)
    step.finish()
    (incident,) = step.incidents
    assert incident.action == "rolled_back"
    assert re.search(
        r"\n  action:  rolled back to the state after step 2", incident.message
    )
    assert "step.last_state" in incident.message


def test_batchnorm_statistics_overflowing_make_the_step_bad():
    tx = jaxnan.skip_nonfinite(optax.sgd(0.0))

    def train_step(params, stats, opt_state, batch):
        loss, grads = jax.value_and_grad(_loss)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params, loss=loss)
        # A running variance of huge activations: finite loss and grads.
        var = 0.9 * stats["var"] + 0.1 * jnp.var(batch["x"] * 1e20, axis=0)
        return optax.apply_updates(params, updates), {"var": var}, opt_state, loss

    step = jaxnan.guard(train_step, verbose=False)
    params = {"w": jnp.zeros(3)}
    stats = {"var": jnp.ones(3)}
    opt_state = tx.init(params)
    for b in _data(3):
        params, stats, opt_state, _ = step(params, stats, opt_state, b)
    step.finish()
    assert step.summary()["bad_steps"] == 3
    assert np.array_equal(np.asarray(stats["var"]), np.ones(3, np.float32))


# -- 5. long runs ----------------------------------------------------------


def test_figures_and_incidents_are_bounded():
    tx = jaxnan.skip_nonfinite(optax.sgd(0.1))
    step = jaxnan.guard(helpers.optax_train_step(tx, _loss), verbose=False)
    assert isinstance(step.figures, collections.deque)
    assert step.figures.maxlen == jaxnan.GuardedStep.FIGURES_KEPT
    assert step.log.incidents.maxlen == jaxnan.GuardedStep.INCIDENTS_KEPT


def test_summary_counts_incidents_beyond_the_kept_ones(monkeypatch):
    from jaxnan._src.guard import incidents

    log = incidents.IncidentLog(None, verbose=False, keep=3)
    for i in range(5):
        log.add(
            incidents.Incident(
                step=i, action=incidents.Action.SKIPPED, cause="input_data", message="x"
            )
        )
    assert [i.step for i in log.incidents] == [2, 3, 4]
    s = log.summary(10)
    assert s["bad_steps"] == 5 and s["causes"] == {"input_data": 5}


# -- 6. host-side reading of batches ----------------------------------------


def test_a_loader_reusing_its_numpy_buffer_is_not_nondeterministic():
    tx = jaxnan.skip_nonfinite(optax.sgd(0.1))
    step = jaxnan.guard(helpers.optax_train_step(tx, _loss), verbose=False)
    params, opt_state = _init(tx)
    buffer = {"x": np.zeros((8, 3), np.float32), "y": np.zeros(8, np.float32)}
    for b in _data(4, bad=(1,)):
        buffer["x"][...] = b["x"]
        buffer["y"][...] = b["y"]
        params, opt_state, _ = step(params, opt_state, buffer)
    step.finish()
    (incident,) = step.incidents
    assert incident.deterministic and incident.cause == "input_data"
    assert incident.rows == (2,) and incident.leaf == "batch['x']"


def test_a_bfloat16_batch_names_the_bad_leaf_and_row():
    tx = jaxnan.skip_nonfinite(optax.sgd(0.1))

    def loss_fn(params, batch):
        x = batch["x"].astype(jnp.float32)
        return jnp.mean((x @ params["w"] - batch["y"]) ** 2)

    step = jaxnan.guard(helpers.optax_train_step(tx, loss_fn), verbose=False)
    params, opt_state = _init(tx)
    for b in _data(3, bad=(1,)):
        b = {"x": jnp.asarray(b["x"], jnp.bfloat16), "y": b["y"]}
        params, opt_state, _ = step(params, opt_state, b)
    step.finish()
    (incident,) = step.incidents
    assert incident.cause == "input_data"
    assert incident.leaf == "batch['x']" and incident.rows == (2,)
