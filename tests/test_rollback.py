"""Rollback that fits a large model and works the way large runs do it.

Host-memory snapshots (no device buffer held, restored bit-exact in the
original sharding), rollback N steps back, a skip window, a rollback
budget, the bad-batch record a resumed run reads, and ``step.last_good``.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxnan
from jaxnan._src.guard import host_snapshots
from tests import helpers

_data = helpers.regression_batches
_init = helpers.regression_init


def _step(tx):
    return helpers.optax_train_step(tx, helpers.regression_loss)


def _run(step, tx, batches, params=None, opt_state=None):
    if params is None:
        params, opt_state = _init(tx)
    for b in batches:
        params, opt_state, _ = step(params, opt_state, b)
    return params, opt_state


def _leaves(tree):
    def host(x):
        if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
            return np.asarray(jax.random.key_data(x))
        return np.asarray(x)

    return [host(x) for x in jax.tree_util.tree_leaves(tree)]


def _equal(a, b):
    la, lb = _leaves(a), _leaves(b)
    return len(la) == len(lb) and all(
        x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(la, lb)
    )


def _plain(tx, batches):
    return _run(jax.jit(_step(tx)), tx, batches)


# -- host snapshots --------------------------------------------------------


def _sharded_setup(mesh):
    tx = jaxnan.skip_nonfinite(optax.adam(0.05))
    params = {"w": jnp.zeros((8, 3)), "b": jnp.zeros(3)}
    params = {
        "w": helpers.sharded(params["w"], mesh),  # FSDP-like: rows over devices
        "b": helpers.replicate(params["b"], mesh),
    }
    opt_state = jax.jit(tx.init)(params)

    def loss_fn(p, batch):
        return jnp.mean((batch["x"] @ p["w"] + p["b"] - batch["y"]) ** 2)

    def batches(n, bad=()):
        rng = np.random.default_rng(1)
        out = []
        for i in range(n):
            x = rng.normal(size=(16, 8)).astype(np.float32)
            if i in bad:
                x[3, 2] = np.nan
            y = np.stack([x.sum(1), x[:, 0], -x[:, 1]], 1).astype(np.float32)
            out.append(helpers.shard_leading({"x": x, "y": y}, mesh))
        return out

    return tx, params, opt_state, helpers.optax_train_step(tx, loss_fn), batches


def test_sharded_rollback_restores_the_host_snapshot_bit_exact(mesh8):
    tx, params, opt_state, train_step, batches = _sharded_setup(mesh8)
    shardings = jax.tree.map(lambda x: x.sharding, (params, opt_state))
    step = jaxnan.guard(
        jax.jit(train_step, donate_argnums=(0, 1)),
        policy="rollback",
        snapshot_every=3,
        verbose=False,
    )
    data = batches(9, bad=(5,))
    p, o = params, opt_state
    for i, b in enumerate(data):
        p, o, _ = step(p, o, b)
        if i == 5:  # step 4 read: the snapshot after step 3 is the good one
            store = step._snapshots.kept()
            assert sorted(store) == [3]
            copy = store[3]
            assert not host_snapshots.on_device(copy)
            blocks = [blk for leaf in copy for blk in leaf.blocks.values()]
            assert blocks and all(
                isinstance(blk, jax.Array) and blk.sharding.memory_kind == "pinned_host"
                for blk in blocks
            )
            # per-process distinct blocks: 8 row blocks of w, 1 copy of b
            w_leaf = next(leaf for leaf in copy if leaf.shape == (8, 3))
            b_leaf = next(leaf for leaf in copy if leaf.shape == (3,))
            assert (len(w_leaf.blocks), len(b_leaf.blocks)) == (8, 1)
    (incident,) = step.incidents
    assert incident.action == "rolled_back" and incident.restored_step == 3
    # bit-exact the run that saw batches 0-3, then 6-8; same shardings
    _, params2, opt2, _, _ = _sharded_setup(mesh8)
    want = _run(jax.jit(train_step), tx, data[:4] + data[6:], params2, opt2)
    assert _equal((p, o), want)
    # the shardings of the step's own outputs (w split by rows, b replicated)
    assert jax.tree.map(lambda x: x.sharding, (p, o)) == jax.tree.map(
        lambda x: x.sharding, want
    )
    assert p["w"].sharding == shardings[0]["w"] and p["b"].sharding == shardings[0]["b"]


def test_host_copy_round_trip_keeps_values_dtypes_and_shardings(mesh8):
    leaves = [
        helpers.sharded(jnp.arange(32.0).reshape(8, 4), mesh8),
        helpers.replicate(jnp.array([1, 2, 3], jnp.int32), mesh8),
        jnp.array(2.5, jnp.bfloat16),
        jax.random.key(7),
        np.array([4.0, 5.0], np.float32),
    ]
    copy = host_snapshots.to_host(leaves)
    jax.jit(lambda x: x * 2, donate_argnums=0)(leaves[0])  # donation: copy intact
    back = host_snapshots.to_device(copy)
    assert np.array_equal(back[0], np.arange(32.0).reshape(8, 4))
    assert back[0].sharding == helpers.sharded(jnp.zeros((8, 4)), mesh8).sharding
    assert back[1].sharding == leaves[1].sharding and back[1].tolist() == [1, 2, 3]
    assert back[2].dtype == jnp.bfloat16 and float(back[2]) == 2.5
    assert np.array_equal(jax.random.key_data(back[3]), jax.random.key_data(leaves[3]))
    assert isinstance(back[4], np.ndarray) and back[4].tolist() == [4.0, 5.0]
    assert host_snapshots.host_bytes(copy) == 32 * 4 + 3 * 4 + 2 + 8 + 8


def test_without_a_host_memory_kind_snapshots_are_numpy(monkeypatch, mesh8):
    monkeypatch.setattr(host_snapshots, "host_kind", lambda device: None)
    x = helpers.sharded(jnp.arange(16.0), mesh8)
    copy = host_snapshots.to_host([x])
    assert all(isinstance(b, np.ndarray) for b in copy[0].blocks.values())
    (back,) = host_snapshots.to_device(copy)
    assert back.sharding == x.sharding and np.array_equal(back, np.arange(16.0))
    tx = jaxnan.skip_nonfinite(optax.adam(0.1))
    step = jaxnan.guard(_step(tx), policy="rollback", snapshot_every=3, verbose=False)
    batches = _data(9, bad=(5,))
    got = _run(step, tx, batches)
    assert step.incidents[0].restored_step == 3
    assert _equal(got, _plain(tx, batches[:4] + batches[6:]))


# -- N steps back, skip window, the record ---------------------------------


def test_rollback_steps_back_and_skip_window_with_record(tmp_path):
    tx = jaxnan.skip_nonfinite(optax.adam(0.1))
    path = tmp_path / "bad_batches.jsonl"
    step = jaxnan.guard(
        _step(tx),
        policy="rollback",
        snapshot_every=2,
        steps_back=4,
        skip_batches=3,
        bad_batches=path,
        verbose=False,
    )
    batches = _data(16, bad=(9,))
    got = _run(step, tx, batches)
    (incident,) = step.incidents
    # newest good snapshot at least 4 steps before step 9: after step 4
    assert incident.restored_step == 4 and incident.undone == (5, 6, 7, 8, 9)
    assert "rolled back to the state after step 4; steps 5-8 undone" in (
        incident.message
    )
    summary = step.summary()
    assert summary["rolled_back"] == 1 and summary["batches_skipped"] == 3
    # bounded: the newest good snapshot (14) and the one at least 4 steps
    # before the next step (12); 6 and 8 were undone, 10 taken on a held step
    assert sorted(step._snapshots.kept()) == [12, 14]
    # trained on 0-4, then 13-15: 5-8 undone, 9 bad, 10-12 the skip window
    assert _equal(got, _plain(tx, batches[:5] + batches[13:]))
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[0] == {
        "step": 9,
        "position": 9,
        "reason": "nonfinite",
        "cause": "input_data",
        "rows": [2],
    }
    assert [(d["position"], d["reason"]) for d in lines[1:]] == [
        (5, "undone"),
        (6, "undone"),
        (7, "undone"),
        (8, "undone"),
        (10, "window"),
        (11, "window"),
        (12, "window"),
    ]
    record = jaxnan.BadBatches.load(path)
    assert record.positions == frozenset(range(5, 13))
    assert record.should_skip(12) and not record.should_skip(13)

    # A resumed run given the record skips those batches itself (from scratch
    # here: it must train on exactly the batches the first run kept).
    again = jaxnan.guard(_step(tx), bad_batches=path, verbose=False)
    healthy = _data(16)
    resumed = _run(again, tx, healthy)
    assert again.summary()["batches_skipped"] == 8
    assert _equal(resumed, _plain(tx, healthy[:5] + healthy[13:]))
    assert len(jaxnan.BadBatches.load(path)) == 8  # nothing new written


def test_the_loop_skips_itself_and_sets_the_position(tmp_path):
    tx = jaxnan.skip_nonfinite(optax.sgd(0.1))
    path = tmp_path / "bad.jsonl"
    record = jaxnan.BadBatches(path=path)
    record.add(jaxnan.BadBatch(3, 103, jaxnan.SkippedAs.NONFINITE, "input_data", (2,)))
    skips = jaxnan.BadBatches.load(path)
    step = jaxnan.guard(_step(tx), bad_batches=path, start_step=100, verbose=False)
    batches = _data(8, bad=(6,))
    params, opt_state = _init(tx)
    fed = []
    for position in range(100, 108):
        if skips.should_skip(position):  # never loaded, never computed
            continue
        step.position = position
        fed.append(position)
        params, opt_state, _ = step(params, opt_state, batches[position - 100])
    step.finish()
    assert fed == [100, 101, 102, 104, 105, 106, 107]
    (incident,) = step.incidents
    assert incident.step == 105  # global steps from start_step: the 6th call
    new = jaxnan.BadBatches.load(path).records[-1]
    assert (new.step, new.position, new.reason, new.rows) == (
        105,
        106,
        jaxnan.SkippedAs.NONFINITE,
        (2,),
    )
    assert step.summary()["batches_skipped"] == 0


def test_steps_back_before_any_old_enough_snapshot_takes_the_oldest():
    tx = jaxnan.skip_nonfinite(optax.adam(0.1))
    step = jaxnan.guard(
        _step(tx), policy="rollback", snapshot_every=2, steps_back=50, verbose=False
    )
    batches = _data(12, bad=(9,))
    got = _run(step, tx, batches)
    (incident,) = step.incidents
    assert incident.restored_step == 0
    assert (
        "rolled back to the state after step 0 (the oldest snapshot kept: none "
        "50 steps back yet); steps 1-8 undone" in incident.message
    )
    assert _equal(got, _plain(tx, batches[:1] + batches[10:]))


# -- the budget ------------------------------------------------------------


def test_rollback_budget_raises_with_the_last_good_state():
    tx = jaxnan.skip_nonfinite(optax.adam(0.1))
    step = jaxnan.guard(
        _step(tx), policy="rollback", snapshot_every=2, max_rollbacks=1, verbose=False
    )
    batches = _data(12, bad=(5, 9))
    params, opt_state = _init(tx)
    with pytest.raises(jaxnan.NonFiniteError) as e:
        for b in batches:
            params, opt_state, _ = step(params, opt_state, b)
    message = str(e.value)
    assert message.startswith(
        "jaxnan.guard: gave up after 1 rollbacks (max_rollbacks=1); "
        "details['state'] is the last good state, after step 6."
    )
    d = e.value.details
    assert d["incident"].step == 9 and d["incident"].action == "raised"
    assert d["incident"].restored_step == 6
    # the first rollback went back to step 2 (3-4 undone, 5 bad); the good
    # snapshot after step 6 has trained on batches 0-2 and 6
    want = _plain(tx, batches[:3] + batches[6:7])
    assert _equal(d["state"], want)
    assert _equal(step.last_state, want)
    assert step.summary()["rolled_back"] == 1 and step.summary()["raised"] == 1


# -- last_good -------------------------------------------------------------


def test_last_good_is_the_newest_verified_state():
    tx = jaxnan.skip_nonfinite(optax.sgd(0.1))
    step = jaxnan.guard(_step(tx), verbose=False)
    assert step.last_good is None
    batches = _data(6, bad=(3,))
    params, opt_state = _init(tx)
    for i, b in enumerate(batches[:3]):
        params, opt_state, _ = step(params, opt_state, b)
        s, state = step.last_good
        assert s == i and _equal(state, (params, opt_state))
    params, opt_state, _ = step(params, opt_state, batches[3])  # bad, unread yet
    s, state = step.last_good
    assert s == 3 and _equal(state[0], _plain(tx, batches[:3])[0])
    params, opt_state, _ = step(params, opt_state, batches[4])
    assert step.last_good[0] == 4


def test_last_good_is_none_until_a_step_is_healthy():
    tx = jaxnan.skip_nonfinite(optax.sgd(0.1))
    step = jaxnan.guard(_step(tx), verbose=False)
    params, opt_state = _init(tx)
    for b in _data(2, bad=(0, 1)):
        params, opt_state, _ = step(params, opt_state, b)
    assert step.last_good is None
    params, opt_state, _ = step(params, opt_state, _data(1)[0])
    assert step.last_good[0] == 2


# -- bad options -----------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, text",
    [
        ({"steps_back": 100}, ValueError, "steps_back=100 applies to rollbacks"),
        ({"skip_batches": 5}, ValueError, "policy='rollback'"),
        (
            {"policy": "rollback", "skip_batches": -1},
            ValueError,
            "skip_batches must be an int >= 0, got -1",
        ),
        (
            {"policy": "rollback", "max_rollbacks": 0},
            ValueError,
            "max_rollbacks must be an int >= 1, got 0. Or None: no limit.",
        ),
        ({"start_step": 1.5}, TypeError, "start_step must be an int, got float"),
        ({"steps_back": "3"}, TypeError, "steps_back must be an int, got str"),
        ({"bad_batches": 3}, TypeError, "bad_batches must be a path"),
        ({"bad_batches": "/no/such/dir/b.jsonl"}, ValueError, "has no folder"),
    ],
)
def test_bad_options_name_the_argument(kwargs, error, text):
    tx = jaxnan.skip_nonfinite(optax.sgd(0.1))
    with pytest.raises(error, match=text.replace("(", r"\(").replace(".", r"\.")):
        jaxnan.guard(_step(tx), **kwargs)


def test_bad_record_and_position_are_clear_errors(tmp_path):
    path = tmp_path / "b.jsonl"
    path.write_text('{"step": 1, "position": 1, "reason": "nonfinite"}\n{oops\n')
    with pytest.raises(ValueError, match=r"b\.jsonl:2 is not a bad-batch record"):
        jaxnan.BadBatches.load(path)
    tx = jaxnan.skip_nonfinite(optax.sgd(0.1))
    with pytest.raises(ValueError, match=r"b\.jsonl:2"):
        jaxnan.guard(_step(tx), bad_batches=path)
    step = jaxnan.guard(_step(tx))
    with pytest.raises(ValueError, match="position must be an int >= 0, got -1"):
        step.position = -1
    with pytest.raises(TypeError, match="position must be an int, got float"):
        step.position = 2.0


# -- Flax NNX --------------------------------------------------------------


def test_nnx_rollback_restores_variables_and_rng_state_bit_exact():
    nnx = pytest.importorskip("flax.nnx")

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.linear = nnx.Linear(3, 4, rngs=rngs)
            self.bn = nnx.BatchNorm(4, rngs=rngs)
            self.dropout = nnx.Dropout(0.2, rngs=rngs)
            self.out = nnx.Linear(4, 1, rngs=rngs)

        def __call__(self, x):
            return self.out(self.dropout(nnx.relu(self.bn(self.linear(x)))))[:, 0]

    def loss_fn(model, batch):
        return jnp.mean((model(batch["x"]) - batch["y"]) ** 2)

    @nnx.jit
    def train_step(model, optimizer, batch):
        loss, grads = nnx.value_and_grad(loss_fn)(model, batch)
        optimizer.update(model, grads, loss=loss)
        return loss

    def make():
        model = Model(nnx.Rngs(0, dropout=1))
        tx = jaxnan.skip_nonfinite(optax.adam(1e-2))
        return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

    batches = _data(9, bad=(5,))
    model, optimizer = make()
    step = jaxnan.guard(train_step, policy="rollback", snapshot_every=3, verbose=False)
    for b in batches:
        step(model, optimizer, b)
    step.finish()
    assert step.incidents[0].restored_step == 3
    ref_model, ref_opt = make()
    for b in batches[:4] + batches[6:]:
        train_step(ref_model, ref_opt, b)
    assert _equal(nnx.state((model, optimizer)), nnx.state((ref_model, ref_opt)))
    s, objects = step.last_good
    assert s == 8 and objects[0] is model
