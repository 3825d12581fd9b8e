"""jaxnan.guard on the train steps of plain optax, Flax NNX, Flax linen, Equinox.

Each: a NaN planted in row 6 of batch K is skipped and diagnosed as
`input_data` naming `batch['x']` and row 6, and the final state equals, bit
for bit, a run of the unguarded step that never saw batch K (skip_nonfinite's
own counters aside).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxnan
from tests.helpers import assert_bits_equal_but_counters

K, ROW, STEPS = 3, 6, 6


def _batches(n_in=4, n_out=3, size=16):
    rng = np.random.default_rng(0)
    out = []
    for _ in range(STEPS):
        out.append(
            {
                "x": rng.normal(size=(size, n_in)).astype(np.float32),
                "y": rng.integers(0, n_out, size).astype(np.int32),
            }
        )
    bad = {k: v.copy() for k, v in out[K].items()}
    bad["x"][ROW, 1] = np.nan
    with_bad = out[:K] + [bad] + out[K:]
    return with_bad, out


def _check_incident(step):
    (incident,) = step.incidents
    assert incident.step == K
    assert incident.cause == "input_data"
    assert incident.leaf == "batch['x']" and incident.rows == (ROW,)
    assert incident.action == "skipped" and incident.phase == "input"
    assert incident.diagnosis.nonfinite_inputs == {"batch['x']": (1, 0, 0)}
    assert f"row {ROW} of batch['x'] (batch {K})" in incident.message


def _cross_entropy(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


@pytest.mark.default_compiler
def test_plain_optax():
    tx = jaxnan.skip_nonfinite(optax.adam(1e-2))

    def loss_fn(params, batch):
        h = jnp.tanh(batch["x"] @ params["w1"])
        return _cross_entropy(h @ params["w2"], batch["y"])

    @jax.jit
    def train_step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params, loss=loss)
        return optax.apply_updates(params, updates), opt_state, {"loss": loss}

    def run(batches, guarded):
        k1, k2 = jax.random.split(jax.random.key(0))
        params = {
            "w1": jax.random.normal(k1, (4, 16)),
            "w2": jax.random.normal(k2, (16, 3)),
        }
        opt_state = tx.init(params)
        step = jaxnan.guard(train_step) if guarded else train_step
        for b in batches:
            params, opt_state, _ = step(params, opt_state, b)
        if guarded:
            assert step.summary()["skipped"] == 1
            _check_incident(step)
        return params, opt_state

    with_bad, without = _batches()
    assert_bits_equal_but_counters(run(with_bad, True), run(without, False))


@pytest.mark.default_compiler
def test_flax_nnx_batchnorm_dropout():
    nnx = pytest.importorskip("flax.nnx")

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.linear1 = nnx.Linear(4, 16, rngs=rngs)
            self.bn = nnx.BatchNorm(16, rngs=rngs)
            self.dropout = nnx.Dropout(0.2, rngs=rngs)
            self.linear2 = nnx.Linear(16, 3, rngs=rngs)

        def __call__(self, x):
            x = jax.nn.relu(self.bn(self.linear1(x)))
            return self.linear2(self.dropout(x))

    def loss_fn(model, batch):
        return _cross_entropy(model(batch["x"]), batch["y"])

    @nnx.jit
    def train_step(model, optimizer, batch):
        loss, grads = nnx.value_and_grad(loss_fn)(model, batch)
        optimizer.update(model, grads, loss=loss)
        return loss

    def run(batches, guarded):
        model = Model(nnx.Rngs(0, dropout=1))
        tx = jaxnan.skip_nonfinite(optax.adam(1e-2))
        optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
        step = jaxnan.guard(train_step) if guarded else train_step
        for i, b in enumerate(batches):
            step(model, optimizer, b)
            if guarded and i == K + 1:  # the bad step has been read by now
                stats = (model.bn.mean[...], model.bn.var[...])
                assert all(bool(jnp.all(jnp.isfinite(s))) for s in stats)
        if guarded:
            assert step.summary()["skipped"] == 1
            _check_incident(step)
        return nnx.state((model, optimizer))

    with_bad, without = _batches()
    assert_bits_equal_but_counters(run(with_bad, True), run(without, False))


@pytest.mark.default_compiler
def test_flax_linen_train_state_with_batch_stats():
    nn = pytest.importorskip("flax.linen")
    from flax.training import train_state

    import jaxnan.flax

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x, train):
            x = nn.Dense(16)(x)
            x = nn.BatchNorm(use_running_average=not train)(x)
            return nn.Dense(3)(nn.relu(x))

    class TrainState(train_state.TrainState):
        batch_stats: dict

    model = Model()

    @jax.jit
    def train_step(state, batch):
        def loss_fn(params):
            logits, updates = model.apply(
                {"params": params, "batch_stats": state.batch_stats},
                batch["x"],
                train=True,
                mutable=["batch_stats"],
            )
            return _cross_entropy(logits, batch["y"]), updates

        (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        state = jaxnan.flax.apply_gradients(state, grads=grads, loss=loss)
        state = state.replace(batch_stats=updates["batch_stats"])
        return state, {"loss": loss}

    def run(batches, guarded):
        variables = model.init(jax.random.key(0), jnp.ones((1, 4)), train=False)
        state = TrainState.create(
            apply_fn=model.apply,
            params=variables["params"],
            batch_stats=variables["batch_stats"],
            tx=jaxnan.skip_nonfinite(optax.adam(1e-2)),
        )
        step = jaxnan.guard(train_step) if guarded else train_step
        for b in batches:
            state, _ = step(state, b)
        if guarded:
            assert step.summary()["skipped"] == 1
            _check_incident(step)
        return state

    with_bad, without = _batches()
    a, b = run(with_bad, True), run(without, False)
    assert int(a.step) == int(b.step) == STEPS  # the step counter was restored
    assert_bits_equal_but_counters(a, b)


@pytest.mark.default_compiler
def test_equinox_filter_jit():
    eqx = pytest.importorskip("equinox")

    class Model(eqx.Module):
        # A jax.Array field beside the layers (functions as fields: below).
        layers: list
        scale: jax.Array

        def __init__(self, key):
            k1, k2 = jax.random.split(key)
            self.layers = [eqx.nn.Linear(4, 16, key=k1), eqx.nn.Linear(16, 3, key=k2)]
            self.scale = jnp.ones(16)

        def __call__(self, x):
            return self.layers[1](jax.nn.relu(self.layers[0](x)) * self.scale)

    def run(batches, guarded):
        model = Model(jax.random.key(0))
        tx = jaxnan.skip_nonfinite(optax.adam(1e-2))
        opt_state = tx.init(eqx.filter(model, eqx.is_array))

        @eqx.filter_jit
        def train_step(model, opt_state, batch):
            def loss_fn(model):
                return _cross_entropy(jax.vmap(model)(batch["x"]), batch["y"])

            loss, grads = eqx.filter_value_and_grad(loss_fn)(model)
            params = eqx.filter(model, eqx.is_array)
            updates, opt_state = tx.update(grads, opt_state, params, loss=loss)
            return eqx.apply_updates(model, updates), opt_state, loss

        step = jaxnan.guard(train_step) if guarded else train_step
        for b in batches:
            model, opt_state, _ = step(model, opt_state, b)
        if guarded:
            assert step.summary()["skipped"] == 1
            _check_incident(step)
        return eqx.filter(model, eqx.is_array), opt_state

    with_bad, without = _batches()
    assert_bits_equal_but_counters(run(with_bad, True), run(without, False))
