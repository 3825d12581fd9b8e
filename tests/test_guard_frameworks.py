"""jaxnan.guard on the train steps of plain optax, Flax NNX, Flax linen, Equinox.

Each: a NaN planted in row 6 of batch K is skipped and diagnosed as
`input_data` naming `batch['x']` and row 6, and the final state equals, bit
for bit, a run of the unguarded step that never saw batch K (skip_nonfinite's
own counters aside).
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxnan

K, ROW, STEPS = 3, 6, 6
SKIP_FIELDS = ("nonfinite_total", "last_nonfinite_step", "skip_step")


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


def _leaves(tree):
    out = []
    for path, x in jax.tree_util.tree_leaves_with_path(tree):
        key = jax.tree_util.keystr(path)
        if any(f in key for f in SKIP_FIELDS):
            continue
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        out.append((key, np.asarray(x)))
    return out


def _assert_bit_equal(a, b):
    la, lb = _leaves(a), _leaves(b)
    assert [k for k, _ in la] == [k for k, _ in lb]
    for (key, x), (_, y) in zip(la, lb):
        assert x.dtype == y.dtype and np.array_equal(x, y), key


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
    _assert_bit_equal(run(with_bad, True), run(without, False))


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
    _assert_bit_equal(run(with_bad, True), run(without, False))


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
    _assert_bit_equal(a, b)


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
    _assert_bit_equal(run(with_bad, True), run(without, False))


def _nnx_tutorial_cnn(nnx):
    """The CNN of Flax's NNX MNIST tutorial ("MNIST tutorial", flax.readthedocs.io),
    narrowed to 8x8 images."""
    from functools import partial

    class CNN(nnx.Module):
        def __init__(self, *, rngs: nnx.Rngs):
            self.conv1 = nnx.Conv(1, 8, kernel_size=(3, 3), rngs=rngs)
            self.avg_pool = partial(nnx.avg_pool, window_shape=(2, 2), strides=(2, 2))
            self.linear1 = nnx.Linear(8 * 4 * 4, 32, rngs=rngs)
            self.dropout = nnx.Dropout(rate=0.1, rngs=rngs)
            self.linear2 = nnx.Linear(32, 10, rngs=rngs)

        def __call__(self, x):
            x = self.avg_pool(nnx.relu(self.conv1(x)))
            x = x.reshape(x.shape[0], -1)
            x = self.dropout(nnx.relu(self.linear1(x)))
            return self.linear2(x)

    return CNN


def _images():
    rng = np.random.default_rng(0)
    out = [
        {
            "image": rng.normal(size=(8, 8, 8, 1)).astype(np.float32),
            "label": rng.integers(0, 10, 8).astype(np.int32),
        }
        for _ in range(STEPS)
    ]
    bad = {k: v.copy() for k, v in out[K].items()}
    bad["image"][ROW, 2, 2, 0] = np.nan
    return out[:K] + [bad] + out[K:], out


@pytest.mark.default_compiler
@pytest.mark.parametrize("hand_loss", [False, True])
def test_flax_nnx_mnist_tutorial_step_returning_nothing(hand_loss):
    """The tutorial's ``train_step(model, optimizer, metrics, batch)`` returns
    nothing: its loss goes to an ``nnx.MultiMetric``. The guard judges it
    without a loss (or with the one handed to the optimizer), skips the NaN
    batch, and model, optimizer and metrics end bit for bit as in a run that
    never saw it."""
    nnx = pytest.importorskip("flax.nnx")
    CNN = _nnx_tutorial_cnn(nnx)

    def loss_fn(model, batch):
        logits = model(batch["image"])
        loss = optax.softmax_cross_entropy_with_integer_labels(
            logits=logits, labels=batch["label"]
        ).mean()
        return loss, logits

    @nnx.jit
    def train_step(model, optimizer, metrics, batch):
        grad_fn = nnx.value_and_grad(loss_fn, has_aux=True)
        (loss, logits), grads = grad_fn(model, batch)
        metrics.update(loss=loss, logits=logits, labels=batch["label"])
        if hand_loss:
            optimizer.update(model, grads, loss=loss)
        else:
            optimizer.update(model, grads)

    def run(batches, guarded):
        model = CNN(rngs=nnx.Rngs(0))
        tx = jaxnan.skip_nonfinite(optax.adamw(1e-3, 0.9))
        optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
        metrics = nnx.MultiMetric(
            accuracy=nnx.metrics.Accuracy(), loss=nnx.metrics.Average("loss")
        )
        step = jaxnan.guard(train_step) if guarded else train_step
        first = None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for b in batches:
                assert step(model, optimizer, metrics, b) is None
                if first is None and not guarded:  # the Average of one loss
                    first = float(metrics.compute()["loss"])
        if guarded:
            told = [
                str(w.message) for w in caught if "returns no loss" in str(w.message)
            ]
            assert len(told) == (0 if hand_loss else 1)
            assert step.summary()["skipped"] == 1
            (incident,) = step.incidents
            assert incident.step == K and incident.cause == "input_data"
            assert incident.leaf == "batch['image']" and incident.rows == (ROW,)
            assert incident.action == "skipped"
            figures = [f[1] for f in step.figures]
            if not hand_loss:  # no loss to record
                assert all(np.isnan(figures))
            return nnx.state((model, optimizer, metrics)), metrics.compute(), figures
        return nnx.state((model, optimizer, metrics)), metrics.compute(), first

    with_bad, without = _images()
    (state, computed, figures), (ref, ref_computed, first) = (
        run(with_bad, True),
        run(without, False),
    )
    if hand_loss:  # the loss handed to the optimizer is the step's
        assert figures[0] == first
    _assert_bit_equal(state, ref)
    assert {k: float(v) for k, v in computed.items()} == {
        k: float(v) for k, v in ref_computed.items()
    }


@pytest.mark.default_compiler
def test_flax_linen_mnist_tutorial_step_returning_the_state_alone():
    """Flax linen's MNIST tutorial: ``train_step(state, batch) -> state``, with
    `jax.grad` and ``state.apply_gradients(grads=grads)`` (no loss anywhere).
    The guard returns the TrainState alone, skips the NaN batch, and the
    state ends bit for bit as in a run that never saw it."""
    nn = pytest.importorskip("flax.linen")
    from flax.training import train_state

    class CNN(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Conv(features=8, kernel_size=(3, 3))(x)
            x = nn.relu(x)
            x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
            x = x.reshape((x.shape[0], -1))
            x = nn.relu(nn.Dense(features=32)(x))
            return nn.Dense(features=10)(x)

    @jax.jit
    def train_step(state, batch):
        def loss_fn(params):
            logits = state.apply_fn({"params": params}, batch["image"])
            return optax.softmax_cross_entropy_with_integer_labels(
                logits=logits, labels=batch["label"]
            ).mean()

        grads = jax.grad(loss_fn)(state.params)
        return state.apply_gradients(grads=grads)

    def run(batches, guarded):
        module = CNN()
        params = module.init(jax.random.key(0), jnp.ones([1, 8, 8, 1]))["params"]
        tx = jaxnan.skip_nonfinite(optax.sgd(0.01, 0.9))
        state = train_state.TrainState.create(
            apply_fn=module.apply, params=params, tx=tx
        )
        step = jaxnan.guard(train_step) if guarded else train_step
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for b in batches:
                state = step(state, b)
                assert isinstance(state, train_state.TrainState)
        if guarded:
            assert any("returns no loss" in str(w.message) for w in caught)
            assert step.summary()["skipped"] == 1
            (incident,) = step.incidents
            assert incident.step == K and incident.cause == "input_data"
            assert incident.leaf == "batch['image']" and incident.rows == (ROW,)
        return state

    with_bad, without = _images()
    new, ref = run(with_bad, True), run(without, False)
    assert int(new.step) == int(ref.step) == STEPS
    _assert_bit_equal((new.params, new.opt_state), (ref.params, ref.opt_state))


@pytest.mark.default_compiler
def test_equinox_mnist_tutorial_cnn():
    """Equinox's "Convolutional Neural Network on MNIST" example as written
    (functions among the layers, ``make_step(model, opt_state, x, y)``,
    ``optim.update(grads, opt_state, eqx.filter(model, eqx.is_array))``
    without the loss), images narrowed to 8x8: the NaN image's row is named
    in ``x`` and the run ends bit for bit as one that never saw it."""
    eqx = pytest.importorskip("equinox")

    class CNN(eqx.Module):
        layers: list

        def __init__(self, key):
            key1, key2, key3, key4 = jax.random.split(key, 4)
            self.layers = [
                eqx.nn.Conv2d(1, 3, kernel_size=4, key=key1),
                eqx.nn.MaxPool2d(kernel_size=2),
                jax.nn.relu,
                jnp.ravel,
                eqx.nn.Linear(48, 32, key=key2),
                jax.nn.sigmoid,
                eqx.nn.Linear(32, 16, key=key3),
                jax.nn.relu,
                eqx.nn.Linear(16, 10, key=key4),
                jax.nn.log_softmax,
            ]

        def __call__(self, x):
            for layer in self.layers:
                x = layer(x)
            return x

    def cross_entropy(y, pred_y):
        pred_y = jnp.take_along_axis(pred_y, jnp.expand_dims(y, 1), axis=1)
        return -jnp.mean(pred_y)

    def loss(model, x, y):
        return cross_entropy(y, jax.vmap(model)(x))

    optim = jaxnan.skip_nonfinite(optax.adamw(3e-4))

    @eqx.filter_jit
    def make_step(model, opt_state, x, y):
        loss_value, grads = eqx.filter_value_and_grad(loss)(model, x, y)
        updates, opt_state = optim.update(
            grads, opt_state, eqx.filter(model, eqx.is_array)
        )
        model = eqx.apply_updates(model, updates)
        return model, opt_state, loss_value

    def run(batches, guarded):
        model = CNN(jax.random.PRNGKey(0))
        opt_state = optim.init(eqx.filter(model, eqx.is_array))
        step = jaxnan.guard(make_step) if guarded else make_step
        for b in batches:
            x = np.moveaxis(b["image"], -1, 1)  # NCHW, as the example's loader
            model, opt_state, _ = step(model, opt_state, x, b["label"])
        if guarded:
            assert step.summary()["skipped"] == 1
            (incident,) = step.incidents
            assert incident.step == K and incident.cause == "input_data"
            assert incident.leaf == "x" and incident.rows == (ROW,)
        return eqx.filter((model, opt_state), eqx.is_array)

    with_bad, without = _images()
    _assert_bit_equal(run(with_bad, True), run(without, False))
