"""`jaxnan.checked` on values sharded over 4 devices of one process.

JAX runs a sharded program's host callback on its first device only: a
raise there stopped that device while the others waited for it in the next
all-reduce, and XLA killed the process after 40 s (its rendezvous
timeout). The report now runs on every device of the mesh. The scenarios
run in a subprocess (`tests/multiprocess.py`, one process, 4 CPU devices)
so that such a hang fails the test at its timeout instead of killing the
test run.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxnan
from tests import multiprocess


def _sharded(values):
    mesh = Mesh(np.array(jax.devices()), ("d",))
    return jax.device_put(jnp.asarray(values), NamedSharding(mesh, P("d")))


def loss(x):
    return jnp.sum(jnp.log(x))


def scenario_raise_in_jit_then_go_on():
    step = jax.jit(jax.value_and_grad(jaxnan.checked(loss)))
    got = {}
    try:
        with jaxnan.nonfinite_errors():
            jax.block_until_ready(step(_sharded(np.arange(8.0))))  # log(0)
    except jaxnan.NonFiniteError as e:
        got["raised"] = [str(e.details["phase"]), e.details["leaves"]]
    value, grad = step(_sharded(np.ones(8)))
    got["next"] = [float(value), np.asarray(grad).tolist()]
    return got


def scenario_raise_eagerly():
    got = []
    for grads in (True, False):
        try:
            jaxnan.checked(loss, grads=grads)(_sharded(np.arange(8.0)))
            got.append(None)
        except jaxnan.NonFiniteError as e:
            got.append(str(e.details["phase"]))
    return got


def scenario_warn_and_record_once():
    records = []
    on = jaxnan.checked(loss, on_nonfinite=lambda r: records.append(r.leaves))
    jax.block_until_ready(jax.jit(jax.grad(on))(_sharded(np.arange(8.0))))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn = jax.jit(jaxnan.checked(loss, on_nonfinite="warn", grads=False))
        jax.block_until_ready(warn(_sharded(np.arange(8.0))))
    return {"records": records, "warnings": len(caught)}


def scenario_raise_on_a_2d_mesh():
    mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "model"))
    x = jax.device_put(
        jnp.ones((4, 4)).at[3, 2].set(0.0), NamedSharding(mesh, P("data", "model"))
    )
    step = jax.jit(jax.grad(jaxnan.checked(loss)))
    try:
        with jaxnan.nonfinite_errors():
            jax.block_until_ready(step(x))
    except jaxnan.NonFiniteError as e:
        return [str(e.details["phase"]), e.details["leaves"]]
    return None


def scenario_closed_over_sharded_constant_under_remat():
    """A sharded array closed over, not passed: the step still compiles."""
    x = _sharded(np.arange(1.0, 9.0))
    records = []
    loss_w = jaxnan.checked(
        lambda w, x: jnp.sum(jnp.log(x - w)), on_nonfinite=records.append
    )
    step = jax.jit(jax.grad(jax.checkpoint(lambda w: loss_w(w, x))))
    healthy = float(step(0.0))
    jax.block_until_ready(step(1.0))  # log(1 - 1)
    return {"healthy": healthy, "phases": [str(r.phase) for r in records]}


SCENARIOS = [name for name in dict(globals()) if name.startswith("scenario_")]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("checked_sharded")
    [got] = multiprocess.launch(
        __file__, SCENARIOS, processes=1, devices=4, out=out, timeout=60
    )
    return got


def _value(results, name):
    assert "value" in results[name], results[name].get("traceback")
    return results[name]["value"]


def test_raise_in_a_sharded_jit_does_not_hang_and_the_next_step_runs(results):
    assert _value(results, "scenario_raise_in_jit_then_go_on") == {
        "raised": ["forward", {"output": [0, 0, 1]}],
        "next": [0.0, [1.0] * 8],
    }


def test_eager_call_on_sharded_values_raises(results):
    assert _value(results, "scenario_raise_eagerly") == ["forward", "forward"]


def test_one_record_and_one_warning_not_one_per_device(results):
    assert _value(results, "scenario_warn_and_record_once") == {
        "records": [{"output": [0, 0, 1]}],
        "warnings": 1,
    }


def test_raise_on_a_2d_mesh(results):
    assert _value(results, "scenario_raise_on_a_2d_mesh") == [
        "forward",
        {"output": [0, 0, 1]},
    ]


def test_a_closed_over_sharded_constant_under_remat(results):
    got = _value(results, "scenario_closed_over_sharded_constant_under_remat")
    assert got["healthy"] == pytest.approx(-float(np.sum(1.0 / np.arange(1.0, 9.0))))
    assert got["phases"] == ["forward"]
