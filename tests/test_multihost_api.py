"""Transforms, `checked` and `locate` on 2 processes x 2 CPU devices.

The `scenario_*` functions run in lock-step on both processes of one launch
(`tests/multiprocess.py`, the set-up of `tests/test_multihost.py`: a global
batch of 8 rows sharded over the 4 devices on the data axis, process 1
holding rows 4-7 on devices 2048 and 2049). Every NaN is planted in process
1's rows only. Each transform's run is compared across the processes bit for
bit and against the same run on one device of this process (the whole batch,
no sharding).
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxnan
from tests import multiprocess
from tests.test_multihost import BAD_ROW, BAD_STEP, line_of

STEPS = 4


def _mesh():
    return Mesh(np.array(jax.devices()), ("data",))


def loss_fn(params, batch):
    pred = jnp.tanh(batch["x"] @ params["w"]) * params["b"]
    return jnp.mean((pred - batch["y"]) ** 2)


def _local_rows(step: int, *, nan: bool = True) -> dict[str, np.ndarray]:
    proc = jax.process_index()
    rng = np.random.default_rng(10 * step + proc)
    x = rng.normal(size=(4, 3)).astype(np.float32)
    if nan and proc == 1 and step == BAD_STEP:
        x[BAD_ROW - 4, 1] = np.nan
    return {"x": x, "y": np.sin(x.sum(1)).astype(np.float32)}


def _global(local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    data = NamedSharding(_mesh(), P("data"))
    return {
        k: jax.make_array_from_process_local_data(data, v) for k, v in local.items()
    }


def _plain(tree, read):
    """`tree` as JSON values: states as dicts by field, leaves `read` to lists."""
    if hasattr(tree, "_asdict"):
        return {k: _plain(v, read) for k, v in tree._asdict().items()}
    if isinstance(tree, dict):
        return {k: _plain(v, read) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return [_plain(v, read) for v in tree]
    return read(tree).tolist()


def _host(tree):
    """Every leaf read whole on this process (an all-gather of each)."""
    return _plain(
        tree, lambda v: np.asarray(multihost_utils.process_allgather(v, tiled=True))
    )


# (name, transformation, whether the loss is scaled by dynamic_loss_scale)
TRANSFORMS = {
    "skip_nonfinite": lambda: jaxnan.skip_nonfinite(optax.adam(1e-2)),
    "zero_nonfinite": lambda: optax.chain(jaxnan.zero_nonfinite(), optax.sgd(0.1)),
    "clip_by_global_norm": lambda: optax.chain(
        jaxnan.clip_by_global_norm(0.5), optax.sgd(0.1)
    ),
    "skip_spikes": lambda: jaxnan.skip_spikes(optax.sgd(0.1), window=4, min_history=2),
    "zscore_clip": lambda: optax.chain(jaxnan.zscore_clip(warmup=2), optax.sgd(0.1)),
    "adagc": lambda: optax.chain(jaxnan.adagc(warmup=2), optax.sgd(0.1)),
    "dynamic_loss_scale": lambda: jaxnan.dynamic_loss_scale(
        optax.sgd(0.1), init_scale=8.0
    ),
    "monitor": lambda: jaxnan.monitor(optax.sgd(0.1)),
}


def _train_step(tx, scaled: bool):
    def train_step(params, opt_state, batch):
        def loss(p):
            value = loss_fn(p, batch)
            return jaxnan.scale_loss(value, opt_state) if scaled else value

        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params, loss=value)
        return optax.apply_updates(params, updates), opt_state

    return jax.jit(train_step)


def _run(name: str, *, sharded: bool):
    """`STEPS` steps of `name`; each step's params and optimizer state."""
    tx = TRANSFORMS[name]()
    step = _train_step(tx, scaled=name == "dynamic_loss_scale")
    params = {"w": jnp.full((3,), 0.5), "b": jnp.ones(())}
    if sharded:
        params = jax.device_put(params, NamedSharding(_mesh(), P()))
    opt_state = jax.jit(tx.init)(params)
    trace = []
    for i in range(STEPS):
        local = _local_rows(i)
        if sharded:
            batch = _global(local)
        else:  # the whole global batch on one device of this process
            batch = {
                k: np.asarray(multihost_utils.process_allgather(v, tiled=True))
                for k, v in local.items()
            }
        params, opt_state = step(params, opt_state, batch)
        got = {"params": params, "state": opt_state}
        trace.append(_host(got) if sharded else _plain(got, np.asarray))
    return trace


def scenario_transforms():
    return {
        name: {"sharded": _run(name, sharded=True), "one": _run(name, sharded=False)}
        for name in TRANSFORMS
    }


def scenario_monitor_metrics_on_the_host():
    tx = jaxnan.monitor(optax.sgd(0.1))
    step = _train_step(tx, scaled=False)
    params = jax.device_put(
        {"w": jnp.full((3,), 0.5), "b": jnp.ones(())}, NamedSharding(_mesh(), P())
    )
    opt_state = jax.jit(tx.init)(params)
    _, opt_state = step(params, opt_state, _global(_local_rows(BAD_STEP)))
    metrics = jaxnan.monitor_metrics(opt_state, host=True)
    return {k: v for k, v in metrics.items() if k.startswith("grad_nonfinite")}


# Inside `shard_map`, each device updating with its own gradients (no
# pmean): given `axis_name`, the devices still agree on the decision.
MAPPED = {
    "skip_nonfinite": lambda: jaxnan.skip_nonfinite(optax.sgd(0.1), axis_name="data"),
    "skip_spikes": lambda: jaxnan.skip_spikes(
        optax.sgd(0.1), window=4, min_history=2, axis_name="data"
    ),
    "dynamic_loss_scale": lambda: jaxnan.dynamic_loss_scale(
        optax.sgd(0.1), init_scale=8.0, axis_name="data"
    ),
    "zscore_clip": lambda: optax.chain(
        jaxnan.zscore_clip(warmup=2, axis_name="data"), optax.sgd(0.1)
    ),
    "adagc": lambda: optax.chain(
        jaxnan.adagc(warmup=2, axis_name="data"), optax.sgd(0.1)
    ),
    "monitor": lambda: jaxnan.monitor(optax.sgd(0.1), axis_name="data"),
}


def _mapped_run(name: str):
    """Per-device params and state after each step (a leading device axis)."""
    tx = MAPPED[name]()
    scaled = name == "dynamic_loss_scale"
    mesh = _mesh()
    stack = lambda t: jax.tree.map(lambda v: v[None], t)  # noqa: E731

    def body(params, opt_state, batch):
        params, opt_state = jax.tree.map(lambda v: v[0], (params, opt_state))

        def loss(p):
            value = loss_fn(p, batch)  # this device's rows only
            return jaxnan.scale_loss(value, opt_state) if scaled else value

        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params, loss=value)
        return stack((optax.apply_updates(params, updates), opt_state))

    spec = P("data")
    step = jax.jit(
        jax.shard_map(
            body,
            mesh=mesh,
            in_specs=(spec, spec, spec),
            out_specs=spec,
            check_vma=False,
        )
    )
    params = {"w": jnp.full((3,), 0.5), "b": jnp.ones(())}
    params = jax.tree.map(lambda v: jnp.stack([v] * len(jax.devices())), params)
    params = jax.device_put(params, NamedSharding(mesh, spec))
    opt_state = jax.jit(jax.vmap(tx.init))(params)
    trace = []
    gather = lambda v: np.asarray(  # noqa: E731
        multihost_utils.process_allgather(v, tiled=True)
    )
    for i in range(STEPS):
        params, opt_state = step(params, opt_state, _global(_local_rows(i)))
        whole = jax.tree.map(gather, {"params": params, "state": opt_state})
        devices = range(len(jax.devices()))
        trace.append([_plain(whole, lambda a, d=d: a[d]) for d in devices])
    return trace


def scenario_mapped_transforms():
    return {name: _mapped_run(name) for name in MAPPED}


# -- checked ---------------------------------------------------------------


def _params():
    return jax.device_put(
        {"w": jnp.full((3,), 0.5), "b": jnp.ones(())}, NamedSharding(_mesh(), P())
    )


def sqrt_loss(params, batch):
    # d/du sqrt(u) at 0 is +inf: a finite loss, an infinite gradient of b
    return jnp.mean(jnp.sqrt(batch["x"] ** 2 + params["b"] - 1.0))


def log_loss(params, batch):
    return jnp.mean(jnp.log(batch["x"] + 10.0) * params["b"])  # <- log


def scenario_checked_phases():
    records = []
    on = lambda r: records.append([r.phase.value, r.leaves, list(r.examples)])  # noqa: E731
    params = _params()
    # input: a NaN in process 1's rows
    f = jax.jit(jax.value_and_grad(jaxnan.checked(loss_fn, on_nonfinite=on)))
    jax.block_until_ready(f(params, _global(_local_rows(BAD_STEP))))
    # forward: a finite batch whose loss goes -inf (log(0) in process 1's rows)
    rows = _local_rows(0, nan=False)
    if jax.process_index() == 1:
        rows["x"][BAD_ROW - 4, 2] = -10.0
    g = jax.jit(jax.value_and_grad(jaxnan.checked(log_loss, on_nonfinite=on)))
    jax.block_until_ready(g(params, _global(rows)))
    # backward: a finite loss, an infinite gradient (sqrt at 0)
    rows = _local_rows(0, nan=False)
    if jax.process_index() == 1:
        rows["x"][BAD_ROW - 4] = 0.0
    h = jax.jit(jax.grad(jaxnan.checked(sqrt_loss, on_nonfinite=on)))
    jax.block_until_ready(h(params, _global(rows)))
    # healthy: no record
    jax.block_until_ready(f(params, _global(_local_rows(0))))
    return records


def scenario_checked_raise_then_go_on():
    f = jax.jit(jax.value_and_grad(jaxnan.checked(loss_fn)))
    params = _params()
    got = {}
    try:
        with jaxnan.nonfinite_errors():
            jax.block_until_ready(f(params, _global(_local_rows(BAD_STEP))))
    except jaxnan.NonFiniteError as e:
        got["raised"] = [str(e.details["phase"]), e.details["leaves"]]
    # both processes stopped at the same point: the next step runs everywhere
    loss, _ = f(params, _global(_local_rows(0)))
    got["next_loss"] = float(np.asarray(loss))
    return got


def scenario_checked_warns():
    f = jax.jit(jaxnan.checked(loss_fn, on_nonfinite="warn", grads=False))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        jax.block_until_ready(f(_params(), _global(_local_rows(BAD_STEP))))
    return [str(w.message).splitlines()[0] for w in caught]


def scenario_check_vmapped_report():
    """A per-example report, its counts sharded over both processes' rows."""
    f = jax.jit(jax.vmap(jaxnan.check(lambda x: jnp.log(x + 5.0))))
    report, _ = f(_global(_local_rows(BAD_STEP))["x"])
    try:
        report.throw()
    except jaxnan.NonFiniteError as e:
        return [str(e.details["phase"]), e.details["leaves"]]
    return None


# -- locate ----------------------------------------------------------------


def scenario_locate_sharded_jit():
    """A finite batch whose log goes nonfinite in process 1's rows."""

    def step(params, batch):
        return jax.value_and_grad(log_loss)(params, batch)

    rows = _local_rows(0, nan=False)
    if jax.process_index() == 1:
        rows["x"][BAD_ROW - 4, 2] = -11.0
    d = jaxnan.locate(jax.jit(step))(_params(), _global(rows))
    return {
        "primitive": d.primitive,
        "where": d.where,
        "device": d.device,
        "process": d.process,
        "phase": str(d.phase),
        "text": str(d),
    }


def scenario_locate_nan_input():
    d = jaxnan.locate(loss_fn)(_params(), _global(_local_rows(BAD_STEP)))
    return {
        "phase": str(d.phase),
        "elements": {k: [list(e) for e in v] for k, v in d.input_elements.items()},
        "inputs": d.nonfinite_inputs,
        "holder": [d.device, d.process],
        "first_line": str(d).splitlines()[0],
    }


def scenario_locate_float16_per_example():
    """A float16 overflow; outputs (per-example losses) sharded by rows."""

    def losses(params, batch):
        h = batch["x"].astype(jnp.float16) * 3e4  # <- float16 overflow
        return (h * params["b"].astype(jnp.float16)).sum(axis=1)

    rows = _local_rows(0, nan=False)
    if jax.process_index() == 1:
        rows["x"][BAD_ROW - 4, 0] = 5.0
    d = jaxnan.locate(jax.jit(losses))(_params(), _global(rows))
    return {
        "primitive": d.primitive,
        "where": d.where,
        "cause": str(d.cause),
        "device": d.device,
        "process": d.process,
    }


def scenario_locate_shard_map():
    mesh = _mesh()

    def body(x):
        return jnp.log(x - 0.5)  # <- shard_map log

    f = jax.shard_map(body, mesh=mesh, in_specs=P("data"), out_specs=P("data"))
    local = np.ones(4, np.float32)
    if jax.process_index() == 1:
        local[3] = 0.5  # global element 7: device 2049's shard
    x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), local)
    d = jaxnan.locate(f)(x)
    return {
        "primitive": d.primitive,
        "where": d.where,
        "device": d.device,
        "process": d.process,
        "text": str(d),
    }


def scenario_locate_pmap():
    """A pmap over each process's 2 devices, its axis over all 4."""

    def body(x):
        return jnp.log(x) + lax.psum(x, "i")  # <- pmap log

    f = jax.pmap(body, axis_name="i")
    local = np.ones((2, 3), np.float32)
    if jax.process_index() == 1:
        local[1, 2] = 0.0  # global position 3: device 2049
    d = jaxnan.locate(f)(local)
    plain = np.asarray(f(local))  # the pmap itself: psum over 4 devices
    return {
        "primitive": d.primitive,
        "where": d.where,
        "device": d.device,
        "process": d.process,
        "outputs": d.nonfinite_outputs,
        "text": str(d),
        "plain_psum": float(plain[0, 0] - np.log(local[0, 0])),
    }


def scenario_pmap_inside_a_function_is_a_clear_error():
    pmapped = jax.pmap(lambda v: lax.psum(v, "i"), axis_name="i")
    ones = np.ones((2, 3), np.float32)
    # The reproduction the error names: traced (here under jit), the pmap
    # reduces over this process's 2 devices; called, over all 4.
    traced = float(np.asarray(jax.jit(pmapped)(ones))[0, 0])
    called = float(np.asarray(pmapped(ones))[0, 0])
    try:
        jaxnan.locate(lambda x: jnp.log(pmapped(x)))(ones)
    except NotImplementedError as e:
        return {"error": str(e), "traced": traced, "called": called}
    return {"error": None, "traced": traced, "called": called}


def wide_log(x):
    return jnp.log(x + 1.0).sum(axis=1)  # <- wide log


def scenario_locate_gathers_no_operand():
    """A log of an 8 x 512 operand sharded over both processes' devices.

    Every all-gather is recorded: the report needs fixed-size answers only
    (counts, the first position, min/max), never the operand itself.
    """
    mesh = _mesh()
    local = np.ones((4, 512), np.float32)
    if jax.process_index() == 1:
        local[BAD_ROW - 4, 7] = -1.0  # log(0)
        local[BAD_ROW - 4, 300] = -3.0  # log(-2)
    x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), local)
    gathered = []
    real = multihost_utils.process_allgather

    def recording(tree, tiled=False):
        gathered.append(sum(int(np.size(v)) for v in jax.tree.leaves(tree)))
        return real(tree, tiled=tiled)

    multihost_utils.process_allgather = recording
    try:
        d = jaxnan.locate(jax.jit(wide_log))(x)
    finally:
        multihost_utils.process_allgather = real
    # The same step on the whole value, on this process alone (host arrays).
    ref = jaxnan.locate(jax.jit(wide_log))(np.asarray(real(x, tiled=True)))
    keys = ("primitive", "where", "phase", "cause", "fix", "inputs_seen", "created")
    return {
        "largest_gather": max(gathered, default=0),
        "operand_size": int(x.size),
        "got": {k: str(getattr(d, k)) for k in keys},
        "want": {k: str(getattr(ref, k)) for k in keys},
        "holder": [d.device, d.process],
        "text": str(d),
    }


# -- the guard with an injected fault --------------------------------------


def scenario_guard_names_an_injected_fault():
    """`inject_grads` under the guard on both processes: cause `injected`."""
    tx = jaxnan.inject_grads(
        jaxnan.skip_nonfinite(optax.adam(1e-2)), at=BAD_STEP, fault="-inf"
    )

    def train_step(params, opt_state, batch):
        value, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params, loss=value)
        return optax.apply_updates(params, updates), opt_state, value

    step = jaxnan.guard(train_step, verbose=False)
    params = _params()
    opt_state = jax.jit(tx.init)(params)
    for i in range(STEPS):
        batch = _global(_local_rows(i, nan=False))
        params, opt_state, _ = step(params, opt_state, batch)
    step.finish()
    return {
        "incidents": [
            [i.step, i.cause, i.deterministic, [e.text for e in i.evidence]]
            for i in step.incidents
        ],
        "params": _host(params),
        "clock": int(np.asarray(jaxnan.fault_step(opt_state))),
    }


# -- the tests -------------------------------------------------------------

SCENARIOS = [name for name in dict(globals()) if name.startswith("scenario_")]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("multihost_api")
    return multiprocess.launch(__file__, SCENARIOS, out=out, timeout=150)


def _step(trace, i, *keys):
    got = trace[i]
    for k in keys:
        got = got[k]
    return got


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_transform_decides_identically_on_both_processes(results, name):
    runs = [multiprocess.value(results, "scenario_transforms", p)[name] for p in (0, 1)]
    # bit for bit: the same params and state on both processes, every step
    assert runs[0]["sharded"] == runs[1]["sharded"]
    # and the run of one device with the whole batch
    for got, want in zip(runs[0]["sharded"], runs[0]["one"]):
        np.testing.assert_allclose(
            np.concatenate([np.ravel(v) for v in jax.tree.leaves(got)]),
            np.concatenate([np.ravel(v) for v in jax.tree.leaves(want)]),
            rtol=1e-6,
        )


def test_transform_decisions_on_the_bad_step(results):
    runs = {
        k: v["sharded"]
        for k, v in multiprocess.value(results, "scenario_transforms", 0).items()
    }
    before, bad = BAD_STEP - 1, BAD_STEP
    skip = runs["skip_nonfinite"]
    assert _step(skip, bad, "params") == _step(skip, before, "params")
    assert _step(skip, bad, "state")["nonfinite_total"] == 1
    zero = runs["zero_nonfinite"]
    assert _step(zero, bad, "state")[0]["nonfinite_zeroed"] == {"b": 1, "w": 3}
    assert _step(zero, bad, "params") == _step(zero, before, "params")
    clip = runs["clip_by_global_norm"]
    assert _step(clip, bad, "state")[0]["clip_input_finite"] is False
    spikes = runs["skip_spikes"]
    assert _step(spikes, bad, "params") == _step(spikes, before, "params")
    dls = runs["dynamic_loss_scale"]
    assert _step(dls, before, "state")["loss_scale"] == 8.0
    assert _step(dls, bad, "state")["loss_scale"] == 4.0
    assert _step(dls, bad, "params") == _step(dls, before, "params")
    # the spike statistics skip a nonfinite step (the params take the NaN:
    # these two clip; skip_nonfinite is the guard)
    z = runs["zscore_clip"]
    assert _step(z, bad, "state")[0]["zclip_finite_steps"] == 2
    assert (
        _step(z, bad, "state")[0]["zclip_mean"]
        == _step(z, before, "state")[0]["zclip_mean"]
    )
    ada = runs["adagc"]
    assert _step(ada, bad, "state")[0]["adagc_finite_steps"] == 2
    assert (
        _step(ada, bad, "state")[0]["adagc_gamma"]
        == _step(ada, before, "state")[0]["adagc_gamma"]
    )
    mon = runs["monitor"]
    assert _step(mon, bad, "state")["monitor_grad_nonfinite"] == {"b": 1, "w": 3}


def test_checked_reports_every_phase_on_both_processes(results):
    want = [
        ["input", {"batch['x']": [1, 0, 0], "batch['y']": [1, 0, 0]}, [1, 1]],
        ["forward", {"output": [0, 0, 1]}, [1, 1]],
        ["backward", {"params['b']": [0, 1, 0]}, [1, 1]],
    ]
    for proc in (0, 1):
        assert multiprocess.value(results, "scenario_checked_phases", proc) == want


def test_checked_raises_on_both_processes_and_the_run_goes_on(results):
    got = [
        multiprocess.value(results, "scenario_checked_raise_then_go_on", p)
        for p in (0, 1)
    ]
    assert got[0]["raised"] == [
        "input",
        {"batch['x']": [1, 0, 0], "batch['y']": [1, 0, 0]},
    ]
    assert got[0] == got[1]
    assert np.isfinite(got[0]["next_loss"])


def test_checked_warns_once_per_process(results):
    for proc in (0, 1):
        assert multiprocess.value(results, "scenario_checked_warns", proc) == [
            "jaxnan: nonfinite values in the inputs of `loss_fn` [phase input]:"
        ]


def test_locate_names_line_device_and_process_of_a_sharded_jit(results):
    line = line_of("# <- " + "log", __file__)
    for proc in (0, 1):
        got = multiprocess.value(results, "scenario_locate_sharded_jit", proc)
        assert got["primitive"] == "log"
        assert got["where"] == f"{__file__}:{line}"
        assert got["phase"] == "forward"
        # global row 5: process 1's local row 1, on its first device
        assert (got["device"], got["process"]) == (2048, 1)
        assert "on device 2048 (process 1)" in got["text"]
    texts = [
        multiprocess.value(results, "scenario_locate_sharded_jit", p)["text"]
        for p in (0, 1)
    ]
    assert texts[0] == texts[1]


def test_locate_nan_argument_elements_by_global_index(results):
    for proc in (0, 1):
        got = multiprocess.value(results, "scenario_locate_nan_input", proc)
        assert got["phase"] == "input"
        assert got["elements"] == {
            "batch['x']": [[BAD_ROW, 1]],
            "batch['y']": [[BAD_ROW]],
        }
        assert got["inputs"] == {"batch['x']": [1, 0, 0], "batch['y']": [1, 0, 0]}
        # global row 5: on process 1's first device
        assert got["holder"] == [2048, 1]
        assert got["first_line"].endswith("on device 2048 (process 1):")


def test_locate_names_the_device_of_a_shard_map_on_another_process(results):
    line = line_of("# <- " + "shard_map log", __file__)
    for proc in (0, 1):
        got = multiprocess.value(results, "scenario_locate_shard_map", proc)
        assert got["primitive"] == "log"
        assert got["where"] == f"{__file__}:{line}"
        assert (got["device"], got["process"]) == (2049, 1)
        assert "on device 2049 (process 1)" in got["text"]


def test_check_report_batched_over_processes_throws_on_both(results):
    for proc in (0, 1):
        assert multiprocess.value(results, "scenario_check_vmapped_report", proc) == [
            "input",
            {"x": [1, 0, 0]},
        ]


def test_locate_float16_overflow_with_outputs_sharded_over_processes(results):
    line = line_of("# <- " + "float16 overflow", __file__)
    for proc in (0, 1):
        assert multiprocess.value(
            results, "scenario_locate_float16_per_example", proc
        ) == {
            "primitive": "mul",
            "where": f"{__file__}:{line}",
            "cause": "precision",  # finite when re-run in float32
            "device": 2048,
            "process": 1,
        }


def test_locate_of_a_pmap_names_line_device_and_process_on_both(results):
    line = line_of("# <- " + "pmap log", __file__)
    got = [multiprocess.value(results, "scenario_locate_pmap", p) for p in (0, 1)]
    assert got[0] == got[1]
    g = got[0]
    assert g["primitive"] == "log" and g["where"] == f"{__file__}:{line}"
    # global position 3 of the pmapped axis: process 1's second device
    assert (g["device"], g["process"]) == (2049, 1)
    assert "on device 2049 (process 1)" in g["text"]
    # the outputs of the pmap over all 4 devices, as it ran (psum of 4 ones)
    assert g["outputs"] == {"output": [0, 0, 1]}
    assert g["plain_psum"] == 4.0


def test_locate_of_a_pmap_inside_a_function_is_a_clear_error_on_both(results):
    for proc in (0, 1):
        got = multiprocess.value(
            results, "scenario_pmap_inside_a_function_is_a_clear_error", proc
        )
        # the reason, reproduced: traced, the pmap reduces over 2 devices
        assert (got["traced"], got["called"]) == (2.0, 4.0)
        text = got["error"]
        assert text.startswith("jaxnan.locate(`<lambda>`): a `jax.pmap` inside")
        assert "a pmapped lax.psum of ones shows 2, the pmap computes 4" in text
        assert "jaxnan.locate(jax.pmap(f))(x)" in text


def _counters(state):
    """The int32 counters and bool flags of a state (the decisions taken)."""
    return [v for v in jax.tree.leaves(state) if isinstance(v, bool | int)]


@pytest.mark.parametrize("name", list(MAPPED))
def test_mapped_transform_agrees_over_devices_of_both_processes(results, name):
    runs = [
        multiprocess.value(results, "scenario_mapped_transforms", p)[name]
        for p in (0, 1)
    ]
    assert runs[0] == runs[1]
    trace = runs[0]  # per step, per device: {"params", "state"}
    for devices in trace:
        # every device, on both processes, took the same decisions
        decided = [_counters(d["state"]) for d in devices]
        assert decided == [decided[0]] * 4
    # device 0's own rows were finite at the bad step; the NaN was on device
    # 2048 (process 1): a skipping transform skips on every device
    if name in ("skip_nonfinite", "skip_spikes", "dynamic_loss_scale"):
        for before, bad in zip(trace[BAD_STEP - 1], trace[BAD_STEP]):
            assert bad["params"] == before["params"]
        assert trace[BAD_STEP + 1][0]["params"] != trace[BAD_STEP][0]["params"]


def test_monitor_metrics_read_on_the_host_of_both_processes(results):
    for proc in (0, 1):
        assert multiprocess.value(
            results, "scenario_monitor_metrics_on_the_host", proc
        ) == {
            "grad_nonfinite": 4,
            "grad_nonfinite/b": 1,
            "grad_nonfinite/w": 3,
        }


def test_guard_names_an_injected_fault_on_both_processes(results):
    got = [
        multiprocess.value(results, "scenario_guard_names_an_injected_fault", p)
        for p in (0, 1)
    ]
    assert got[0] == got[1]
    planted = "jaxnan.inject_grads planted Fault.NEG_INF (-inf) in the gradients"
    assert got[0]["incidents"] == [
        [BAD_STEP, "injected", True, [f"{planted} at step {BAD_STEP}"]]
    ]
    assert got[0]["clock"] == STEPS


def test_locate_gathers_only_fixed_size_summaries_of_a_sharded_operand(results):
    got = [
        multiprocess.value(results, "scenario_locate_gathers_no_operand", p)
        for p in (0, 1)
    ]
    assert got[0] == got[1]
    for proc in (0, 1):
        g = got[proc]
        # 4096 elements spread over 2 processes; nothing near that moved
        assert g["operand_size"] == 4096 and g["largest_gather"] <= 16
        # the report of the same step on one host, word for word
        assert g["got"] == g["want"]
        assert g["got"]["inputs_seen"] == (
            "log received 0.0 at 1 of 4096 positions; log received values below "
            "0.0 (min -2.0) at 1 of 4096 positions"
        )
        line = line_of("# <- " + "wide log", __file__)
        assert g["got"]["where"] == f"{__file__}:{line}"
        assert g["holder"] == [2048, 1]
