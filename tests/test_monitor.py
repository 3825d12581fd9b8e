"""monitor and monitor_metrics: exact per-leaf values, NaN never dropped."""

import math
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxnan
from tests.helpers import P, assert_no_host_callback, shard_map_over


@pytest.fixture(scope="module")
def jit_update():
    tx = jaxnan.monitor()
    return tx, jax.jit(tx.update)


def test_passes_updates_through_and_records_exact_stats(jit_update):
    tx, update = jit_update
    params = {"a": jnp.zeros(2), "b": {"c": jnp.zeros((2, 2))}}
    g = {
        "a": jnp.array([3.0, -4.0]),
        "b": {"c": jnp.array([[1.0, -jnp.inf], [2.0, 0.0]])},
    }
    u, state = update(g, tx.init(params))
    chex.assert_trees_all_equal(u, g)
    assert float(state.monitor_grad_norm["a"]) == 5.0
    assert float(state.monitor_grad_max_abs["a"]) == 4.0
    assert int(state.monitor_grad_nonfinite["a"]) == 0
    assert float(state.monitor_grad_norm["b"]["c"]) == math.inf
    assert float(state.monitor_grad_max_abs["b"]["c"]) == math.inf
    assert int(state.monitor_grad_nonfinite["b"]["c"]) == 1


def test_nan_in_a_large_leaf_is_reported_under_jit(jit_update):
    # jnp.max drops NaN on CPU for >= 4096 float32 elements; monitor must not
    tx, update = jit_update
    big = jnp.ones(1 << 13).at[5].set(jnp.nan).at[7].set(jnp.nan)
    _, state = update({"w": big}, tx.init({"w": big}))
    assert math.isnan(float(state.monitor_grad_max_abs["w"]))
    assert math.isnan(float(state.monitor_grad_norm["w"]))
    assert int(state.monitor_grad_nonfinite["w"]) == 2


def test_wrapping_inner_records_update_norms_and_no_host_sync():
    tx = jaxnan.monitor(optax.sgd(0.5))
    params = {"w": jnp.zeros(2)}
    update = jax.jit(tx.update)
    state = tx.init(params)
    g = {"w": jnp.array([6.0, 8.0])}
    assert_no_host_callback(tx.update, g, state, params)
    u, state = update(g, state, params)
    chex.assert_trees_all_equal(u, {"w": jnp.array([-3.0, -4.0])})
    assert float(state.monitor_grad_norm["w"]) == 10.0
    assert float(state.monitor_update_norm["w"]) == 5.0


def test_monitor_metrics_flat_dict():
    tx = optax.chain(jaxnan.monitor(), optax.sgd(0.1))
    params = {"enc": {"w": jnp.zeros(2)}, "b": jnp.zeros(1)}
    state = tx.init(params)
    g = {"enc": {"w": jnp.array([3.0, jnp.nan])}, "b": jnp.array([4.0])}
    _, state = tx.update(g, state)
    m = jaxnan.monitor_metrics(state, prefix="opt/")
    assert set(m) == {
        f"opt/{k}{p}"
        for k in ("grad_norm", "grad_max_abs", "grad_nonfinite", "update_norm")
        for p in ("", "/b", "/enc/w")
    }
    assert float(m["opt/grad_norm/b"]) == 4.0
    assert int(m["opt/grad_nonfinite"]) == 1
    assert math.isnan(float(m["opt/grad_max_abs"]))
    assert all(v.shape == () for v in m.values())
    msg = "jaxnan.monitor_metrics: expected exactly one MonitorState"
    with pytest.raises(ValueError, match=re.escape(msg)):
        jaxnan.monitor_metrics(optax.sgd(1.0).init(params))


def test_monitor_metrics_for_a_logger_are_python_numbers():
    tx = optax.chain(jaxnan.monitor(), optax.sgd(0.1))
    params = {"w": jnp.zeros(2)}
    _, state = tx.update({"w": jnp.array([3.0, 4.0])}, tx.init(params))
    m = jaxnan.monitor_metrics(state, host=True)
    assert m == {
        "grad_norm": 5.0,
        "grad_norm/w": 5.0,
        "grad_max_abs": 4.0,
        "grad_max_abs/w": 4.0,
        "grad_nonfinite": 0,
        "grad_nonfinite/w": 0,
        "update_norm": 5.0,  # its own output: monitor comes first in the chain
        "update_norm/w": 5.0,
    }
    assert {type(v) for v in m.values()} == {float, int}
    assert type(m["grad_nonfinite"]) is int


def test_shard_map_counts_summed_norms_maxed(mesh8):
    tx = jaxnan.monitor(axis_name="d")
    params = {"w": jnp.zeros(2)}

    def per_device(g):
        _, s = tx.update({"w": g[0]}, tx.init(params))
        return jax.tree_util.tree_map(lambda x: x[None], s)

    g = jnp.ones((8, 2)).at[3, 1].set(5.0).at[6, 0].set(jnp.nan).at[7, 0].set(jnp.inf)
    s = shard_map_over(mesh8, per_device, P("d"), P("d"))(g)
    assert (np.asarray(s.monitor_grad_nonfinite["w"]) == 2).all()
    assert np.isnan(np.asarray(s.monitor_grad_max_abs["w"])).all()
    assert np.isnan(np.asarray(s.monitor_grad_norm["w"])).all()
    g = jnp.ones((8, 2)).at[3, 1].set(5.0).at[7, 0].set(jnp.inf)
    s = shard_map_over(mesh8, per_device, P("d"), P("d"))(g)
    assert (np.asarray(s.monitor_grad_nonfinite["w"]) == 1).all()
    assert (np.asarray(s.monitor_grad_max_abs["w"]) == np.inf).all()
    g = jnp.ones((8, 2)).at[3, 1].set(5.0)
    s = shard_map_over(mesh8, per_device, P("d"), P("d"))(g)
    assert (np.asarray(s.monitor_grad_max_abs["w"]) == 5.0).all()
    np.testing.assert_allclose(np.asarray(s.monitor_grad_norm["w"]), math.sqrt(26.0))


# ------------------------------------------------------------ issue 12/13


def test_monitor_inside_dynamic_loss_scale_sees_the_overflow_step():
    tx = jaxnan.dynamic_loss_scale(jaxnan.monitor(optax.adamw(1e-3)), init_scale=4.0)
    params = {"w": jnp.ones(2)}
    s0 = tx.init(params)
    u, s1 = jax.jit(tx.update)({"w": jnp.array([8.0, jnp.inf])}, s0, params)
    mon = s1.loss_scale_inner_state
    assert int(mon.monitor_grad_nonfinite["w"]) == 1  # the overflow is recorded
    assert float(mon.monitor_grad_max_abs["w"]) == float("inf")
    chex.assert_trees_all_equal(
        mon.monitor_inner_state, s0.loss_scale_inner_state.monitor_inner_state
    )
    assert int(s1.loss_scale_skips) == 1 and not np.asarray(u["w"]).any()
    m = jaxnan.monitor_metrics(s1)
    assert int(m["grad_nonfinite"]) == 1


@pytest.mark.parametrize("order", ["monitor_first_in_chain", "monitor_wraps"])
def test_monitor_inside_skip_nonfinite_sees_the_skipped_step(order):
    if order == "monitor_first_in_chain":
        inner = optax.chain(jaxnan.monitor(), optax.adamw(1e-3))
    else:
        inner = jaxnan.monitor(optax.adamw(1e-3))
    tx = jaxnan.skip_nonfinite(inner)
    params = {"w": jnp.ones(2)}
    s = tx.init(params)
    _, s = tx.update({"w": jnp.array([3.0, 4.0])}, s, params)
    before = s
    _, s = tx.update({"w": jnp.array([jnp.nan, 4.0])}, s, params)
    m = jaxnan.monitor_metrics(s)
    assert int(m["grad_nonfinite"]) == 1 and math.isnan(float(m["grad_max_abs"]))
    assert int(s.nonfinite_total) == 1
    # the optimizer state inside is untouched by the skipped step
    if order == "monitor_first_in_chain":
        chex.assert_trees_all_equal(s.inner_state[1], before.inner_state[1])
    else:
        chex.assert_trees_all_equal(
            s.inner_state.monitor_inner_state, before.inner_state.monitor_inner_state
        )


def test_monitor_outside_the_guard_sees_every_step_too():
    tx = optax.chain(jaxnan.monitor(), jaxnan.skip_nonfinite(optax.adamw(1e-3)))
    params = {"w": jnp.ones(2)}
    s = tx.init(params)
    _, s = tx.update({"w": jnp.array([jnp.inf, 4.0])}, s, params)
    assert int(jaxnan.monitor_metrics(s)["grad_nonfinite"]) == 1
