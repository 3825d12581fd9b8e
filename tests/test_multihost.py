"""jaxnan on 2 processes x 2 CPU devices (`jax.distributed`, gloo, localhost).

The `scenario_*` functions run in lock-step on both processes of one launch
(`tests/multiprocess.py`); the tests read what each process returned. The
global batch of 8 rows is sharded over the 4 devices on the data axis:
process 0 holds rows 0-3 (devices 0, 1), process 1 rows 4-7 (devices 2048,
2049). Every NaN below is planted in process 1's rows only.
"""

from __future__ import annotations

import contextlib
import io
import json
import pathlib
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxnan
from tests import multiprocess

BAD_ROW = 5  # global row: process 1's local row 1, on its first device (2048)
BAD_STEP = 2


def line_of(text: str, path: str = __file__) -> int:
    """The number of the one line of `path` holding `text` (a ``# <-`` mark)."""
    [line] = [
        i
        for i, ln in enumerate(pathlib.Path(path).read_text().splitlines(), 1)
        if text in ln
    ]
    return line


def _mesh():
    mesh = Mesh(np.array(jax.devices()), ("data",))
    return NamedSharding(mesh, P("data")), NamedSharding(mesh, P())


def loss_fn(params, batch):
    pred = jnp.tanh(batch["x"] @ params["w"]) * params["b"]
    weight = jnp.log(batch["scale"])  # <- log: a scale <= 0 makes a finite batch bad
    return (((pred - batch["y"]) ** 2) * weight).mean()


def _batch(step: int, *, nan: bool = False, zero_scale: bool = False):
    """Step `step`'s global batch, built from this process's 4 local rows."""

    data, _ = _mesh()
    proc = jax.process_index()
    rng = np.random.default_rng(100 * step + proc)
    x = rng.normal(size=(4, 3)).astype(np.float32)
    scale = np.full(4, np.e, np.float32)
    if proc == 1 and step == BAD_STEP:
        if nan:
            x[BAD_ROW - 4, 0] = np.nan
        if zero_scale:
            scale[BAD_ROW - 4] = -1000.0
    local = {"x": x, "y": np.sin(x.sum(1)), "scale": scale}
    return {
        k: jax.make_array_from_process_local_data(data, v) for k, v in local.items()
    }


def _setup():

    _, rep = _mesh()
    params = jax.device_put({"w": jnp.full((3,), 0.5), "b": jnp.ones(())}, rep)
    tx = jaxnan.skip_nonfinite(optax.adam(1e-2))
    opt_state = jax.jit(tx.init)(params)

    def train_step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params, loss=loss)
        return optax.apply_updates(params, updates), opt_state, loss

    return params, opt_state, train_step


def _host(tree):

    return {
        k: np.asarray(multihost_utils.process_allgather(v, tiled=True)).tolist()
        for k, v in tree.items()
    }


def _guarded_run(steps: int, policy: str, **batch_kw):
    params, opt_state, train_step = _setup()
    log = pathlib.Path(tempfile.mkdtemp()) / "incidents.jsonl"
    step = jaxnan.guard(train_step, policy=policy, snapshot_every=1, log=log)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        for i in range(steps):
            params, opt_state, _ = step(params, opt_state, _batch(i, **batch_kw))
        step.finish()
    records = [json.loads(line) for line in log.read_text().splitlines()]
    return params, step, printed.getvalue(), records


def _plain_run(steps: int, skip: tuple[int, ...]):
    """The same run without jaxnan.guard, the batches of `skip` left out."""

    params, opt_state, train_step = _setup()
    fn = jax.jit(train_step)
    for i in range(steps):
        if i not in skip:
            params, opt_state, _ = fn(params, opt_state, _batch(i))
    return params


def scenario_skip_nan_rows():
    params, step, printed, records = _guarded_run(5, "skip", nan=True)
    [incident] = step.incidents
    return {
        "rows": list(incident.rows),
        "leaf": incident.leaf,
        "cause": incident.cause,
        "printed": printed,
        "records": [(r["step"], r["process"], r["rows"]) for r in records],
        "params": _host(params),
        "expected": _host(_plain_run(5, skip=(BAD_STEP,))),
    }


def scenario_skip_finite_batch():
    """A finite batch (log of a negative scale): replayed per example, located."""
    params, step, printed, _ = _guarded_run(4, "skip", zero_scale=True)
    [incident] = step.incidents
    return {
        "rows": list(incident.rows),
        "leaf": incident.leaf,
        "where": incident.where,
        "primitive": incident.primitive,
        "printed": printed,
    }


def scenario_guard_with_checked_loss():
    """A `checked` loss inside the guarded step: it warns on each process."""
    import warnings  # noqa: PLC0415 - this scenario only

    params, opt_state, _ = _setup()
    tx = jaxnan.skip_nonfinite(optax.adam(1e-2))
    checked_loss = jaxnan.checked(loss_fn, on_nonfinite="warn")

    def train_step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(checked_loss)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params, loss=loss)
        return optax.apply_updates(params, updates), opt_state, loss

    step = jaxnan.guard(jax.jit(train_step), verbose=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(4):
            params, opt_state, _ = step(params, opt_state, _batch(i, zero_scale=True))
        step.finish()
    [incident] = step.incidents
    return {
        "where": incident.where,
        "rows": list(incident.rows),
        "warned": sorted({str(w.message).splitlines()[0] for w in caught}),
        "params": _host(params),
    }


def scenario_raise():
    try:
        _guarded_run(5, "raise", nan=True)
    except jaxnan.NonFiniteError as e:
        return {"raised": type(e).__name__, "step": e.details["incident"].step}
    return {"raised": None}


def scenario_rollback():
    params, step, _, _ = _guarded_run(5, "rollback", nan=True)
    [incident] = step.incidents
    copies = list(step._snapshots.kept().values())
    blocks = [b for c in copies for leaf in c for b in leaf.blocks.values()]
    return {
        "action": incident.action.value,
        "restored": incident.restored_step,
        "params": _host(params),
        "expected": _host(_plain_run(5, skip=(BAD_STEP - 1, BAD_STEP))),
        "sharding": params["w"].sharding == _mesh()[1],
        # host memory, this process's devices, each replicated leaf once
        "kinds": sorted({b.sharding.memory_kind for b in blocks}),
        "devices": sorted({d.process_index for b in blocks for d in b.devices()}),
        "blocks": sorted({len(leaf.blocks) for c in copies for leaf in c}),
    }


def scenario_local_batch():
    params, opt_state, train_step = _setup()
    step = jaxnan.guard(train_step)
    local = {
        "x": np.ones((4, 3), np.float32),
        "y": np.ones(4, np.float32),
        "scale": np.ones(4, np.float32),
    }
    try:
        step(params, opt_state, local)
    except ValueError as e:
        return str(e)
    return None


# -- the tests -------------------------------------------------------------

SCENARIOS = [name for name in dict(globals()) if name.startswith("scenario_")]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("multihost")
    return multiprocess.launch(__file__, SCENARIOS, out=out, timeout=150)


def test_nan_rows_of_one_process_named_by_global_row(results):
    for proc in (0, 1):
        got = multiprocess.value(results, "scenario_skip_nan_rows", proc)
        assert got["rows"] == [BAD_ROW]
        assert got["leaf"] == "batch['x']"
        assert got["cause"] == "input_data"
        # skipped bit for bit: the run without the bad batch
        assert got["params"] == got["expected"]
        # each process logs its own record, saying so
        assert got["records"] == [[BAD_STEP, proc, [BAD_ROW]]]
    first = multiprocess.value(results, "scenario_skip_nan_rows", 0)
    assert (
        f"row {BAD_ROW} of batch['x'] (batch {BAD_STEP}) on process 1, device 2048"
        in first["printed"]
    )
    assert first["printed"].count("went nonfinite") == 1
    assert multiprocess.value(results, "scenario_skip_nan_rows", 1)["printed"] == ""
    assert (
        first["params"]
        == multiprocess.value(results, "scenario_skip_nan_rows", 1)["params"]
    )


def test_finite_batch_replayed_per_example_and_located(results):
    line = line_of("# <- " + "log: a scale")
    for proc in (0, 1):
        got = multiprocess.value(results, "scenario_skip_finite_batch", proc)
        assert got["rows"] == [BAD_ROW]
        assert got["leaf"] == "batch['scale']"
        # located on both processes (the event's values read in lock-step)
        assert got["primitive"] == "log"
        assert got["where"] == f"{__file__}:{line}"
    printed = multiprocess.value(results, "scenario_skip_finite_batch", 0)["printed"]
    assert "row 5 of batch['scale'] (batch 2) on process 1, device 2048" in printed
    assert "on device 2048 (process 1)" in printed
    assert printed.count("went nonfinite") == 1
    assert multiprocess.value(results, "scenario_skip_finite_batch", 1)["printed"] == ""


def test_guard_with_a_checked_loss_on_both_processes(results):
    line = line_of("# <- " + "log: a scale")
    got = [
        multiprocess.value(results, "scenario_guard_with_checked_loss", p)
        for p in (0, 1)
    ]
    for g in got:
        assert g["where"] == f"{__file__}:{line}"
        assert g["rows"] == [BAD_ROW]
        assert g["warned"] == [
            "jaxnan: nonfinite values in the outputs of `loss_fn` (its inputs "
            "were finite) [phase forward]:"
        ]
    assert got[0]["params"] == got[1]["params"]


def test_raise_raises_on_every_process(results):
    for proc in (0, 1):
        assert multiprocess.value(results, "scenario_raise", proc) == {
            "raised": "NonFiniteError",
            "step": BAD_STEP,
        }


def test_rollback_restores_the_same_step_everywhere(results):
    for proc in (0, 1):
        got = multiprocess.value(results, "scenario_rollback", proc)
        assert got["action"] == "rolled_back"
        assert got["restored"] == BAD_STEP - 2
        assert got["params"] == got["expected"]
        assert got["sharding"] is True
        assert (got["kinds"], got["devices"], got["blocks"]) == (
            ["pinned_host"],
            [proc],
            [1],
        )
    assert (
        multiprocess.value(results, "scenario_rollback", 0)["params"]
        == multiprocess.value(results, "scenario_rollback", 1)["params"]
    )


def test_process_local_batch_is_a_clear_error(results):
    for proc in (0, 1):
        text = multiprocess.value(results, "scenario_local_batch", proc)
        assert text is not None
        assert "`batch['scale']` of `train_step` is a numpy array" in text
        assert "jax.make_array_from_process_local_data" in text
