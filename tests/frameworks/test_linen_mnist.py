"""Flax linen's examples/mnist (CNN, TrainState), tiny and synthetic.

Written as the example writes it; jaxnan changes three lines:
`jaxnan.checked(loss_fn)`, `jaxnan.skip_nonfinite(tx)` and
`jaxnan.flax.apply_gradients(state, grads=grads, loss=loss)` (which needs
`update_model` to be handed the loss).
"""

import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxnan
import jaxnan.flax
from tests import compilers
from tests.helpers import assert_bits_equal_but_counters

nn = pytest.importorskip("flax.linen")
from flax.training import train_state  # noqa: E402


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(features=4, kernel_size=(3, 3))(x)
        x = nn.relu(x)
        x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
        x = nn.Conv(features=8, kernel_size=(3, 3))(x)
        x = nn.relu(x)
        x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))
        x = nn.Dense(features=16)(x)
        x = nn.relu(x)
        x = nn.Dense(features=10)(x)
        return x


def cross_entropy(logits, one_hot):
    return jnp.mean(optax.softmax_cross_entropy(logits=logits, labels=one_hot))


def log_softmax_by_hand(logits, one_hot):  # the planted bug
    return -jnp.mean(jnp.sum(one_hot * jnp.log(jax.nn.softmax(logits)), -1))


BUG_LINE = log_softmax_by_hand.__code__.co_firstlineno + 1


def make(guarded, xent=cross_entropy):
    @jax.jit
    def apply_model(state, images, labels):
        def loss_fn(params):
            logits = state.apply_fn({"params": params}, images)
            one_hot = jax.nn.one_hot(labels, 10)
            loss = xent(logits, one_hot)
            return loss, logits

        fn = jaxnan.checked(loss_fn, on_nonfinite="warn") if guarded else loss_fn
        grad_fn = jax.value_and_grad(fn, has_aux=True)
        (loss, logits), grads = grad_fn(state.params)
        accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
        return grads, loss, accuracy

    @jax.jit
    def update_model(state, grads, loss):
        if guarded:
            return jaxnan.flax.apply_gradients(state, grads=grads, loss=loss)
        return state.apply_gradients(grads=grads)

    return apply_model, update_model


def create_train_state(rng, guarded, learning_rate=0.1, momentum=0.9):
    cnn = CNN()
    # The example's init, compiled as one cheap program (tests/compilers.py).
    params = compilers.cheap_init(cnn.init, rng, jnp.ones([1, 12, 12, 1]))["params"]
    tx = optax.sgd(learning_rate, momentum)
    if guarded:
        tx = jaxnan.skip_nonfinite(tx)
    return train_state.TrainState.create(apply_fn=cnn.apply, params=params, tx=tx)


def batches(n, seed=0):
    rng = np.random.default_rng(seed)
    return [
        (
            jnp.asarray(rng.normal(size=(8, 12, 12, 1)), jnp.float32),
            jnp.asarray(rng.integers(0, 10, size=8), jnp.int32),
        )
        for _ in range(n)
    ]


def train(data, guarded, xent=cross_entropy):
    apply_model, update_model = make(guarded, xent)
    train.apply_model[guarded] = apply_model
    state = create_train_state(jax.random.key(0), guarded)
    losses = []
    for images, labels in data:
        grads, loss, _ = apply_model(state, images, labels)
        state = update_model(state, grads, loss)
        losses.append(loss)
    return state, losses


train.apply_model = {}


@pytest.fixture(scope="module")
def plain():
    """The 20 healthy steps without jaxnan."""
    return train(batches(20), False)


@pytest.fixture(scope="module")
def healthy(plain):
    """The plain run, and the same 20 steps guarded and checked."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        return plain, train(batches(20), True)


@pytest.mark.default_compiler
def test_twenty_healthy_steps_close_and_losses_bit_for_bit(healthy):
    (s0, l0), (s1, l1) = healthy
    np.testing.assert_array_equal(np.asarray(l0), np.asarray(l1))
    assert int(s0.step) == int(s1.step) == 20
    chex.assert_trees_all_close(s0.params, s1.params, rtol=1e-5, atol=1e-7)
    chex.assert_trees_all_close(
        s0.opt_state, s1.opt_state.inner_state, rtol=1e-5, atol=1e-7
    )
    assert int(s1.opt_state.nonfinite_total) == 0


@pytest.mark.default_compiler
def test_checked_gradients_bit_for_bit(healthy):
    (s0, _), _ = healthy
    images, labels = batches(1, seed=7)[0]
    plain = train.apply_model[False](s0, images, labels)
    got = train.apply_model[True](s0, images, labels)
    jax.tree.map(np.testing.assert_array_equal, plain, got)


@pytest.mark.default_compiler
def test_twenty_healthy_steps_bit_for_bit(healthy):
    (s0, _), (s1, _) = healthy
    jax.tree.map(np.testing.assert_array_equal, s0.params, s1.params)
    jax.tree.map(np.testing.assert_array_equal, s0.opt_state, s1.opt_state.inner_state)


def test_log_softmax_outlier_is_skipped_and_located(plain):
    data = batches(3, seed=1)
    images, labels = data[1]
    data[1] = (images.at[0].multiply(1e4), labels)  # an outlier row
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        state, losses = train(data, True, xent=log_softmax_by_hand)
        jax.block_until_ready(losses)
    # The loss is +inf, its gradients NaN: the step is skipped, the guard
    # saw the loss (linen's apply_gradients alone would not hand it over).
    assert not np.isfinite(np.asarray(losses[1]))
    assert int(state.opt_state.nonfinite_total) == 1
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state))
    msgs = [w for w in got if "jaxnan" in str(w.message)]
    assert len(msgs) == 1 and msgs[0].filename == __file__
    assert "[phase forward]" in str(msgs[0].message)

    # locate on the failing step, as checked's message says.
    s_healthy, _ = plain
    apply_model, _ = make(False, log_softmax_by_hand)
    d = jaxnan.locate(apply_model)(s_healthy, *data[1])
    assert (d.primitive, d.line, d.phase) == ("log", BUG_LINE, "forward")
    assert d.cause == "unsafe_op"


def test_mutable_batch_stats_are_returned_unchanged():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train):
            x = nn.Dense(4)(x)
            x = nn.BatchNorm(use_running_average=not train)(x)
            return nn.Dense(2)(x)

    net = Net()
    variables = net.init(jax.random.key(0), jnp.ones((4, 3)), train=False)

    def loss_fn(params, batch_stats, x):
        out, updates = net.apply(
            {"params": params, "batch_stats": batch_stats},
            x,
            train=True,
            mutable=["batch_stats"],
        )
        return jnp.mean(out**2), updates

    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 3)), jnp.float32)
    args = (variables["params"], variables["batch_stats"], x)
    plain = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(*args)
    checked = jax.jit(jax.value_and_grad(jaxnan.checked(loss_fn), has_aux=True))
    got = checked(*args)
    for a, b in zip(jax.tree_util.tree_leaves(plain), jax.tree_util.tree_leaves(got)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(
        np.asarray(got[0][1]["batch_stats"]["BatchNorm_0"]["mean"]), np.zeros(4)
    )


@pytest.mark.default_compiler
def test_guard_on_a_step_returning_the_state_alone():
    """The example's ``train_step(state, batch) -> state`` shape (`jax.grad`,
    ``state.apply_gradients(grads=grads)``, no loss anywhere): the guard
    returns the TrainState alone, warns once that it has no loss, skips the
    NaN batch, and the state ends bit for bit as in a run that never saw it."""
    K, ROW = 2, 5

    @jax.jit
    def train_step(state, batch):
        images, labels = batch

        def loss_fn(params):
            logits = state.apply_fn({"params": params}, images)
            return cross_entropy(logits, jax.nn.one_hot(labels, 10))

        grads = jax.grad(loss_fn)(state.params)
        return state.apply_gradients(grads=grads)

    def run(data, guarded):
        state = create_train_state(jax.random.key(0), True)  # skip_nonfinite
        step = jaxnan.guard(train_step) if guarded else train_step
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for b in data:
                state = step(state, b)
                assert isinstance(state, train_state.TrainState)
        if guarded:
            assert sum("returns no loss" in str(w.message) for w in caught) == 1
            assert step.summary()["skipped"] == 1
            (incident,) = step.incidents
            assert (incident.step, incident.cause) == (K, "input_data")
            assert incident.leaf == "batch[0]" and incident.rows == (ROW,)
        return state

    data = batches(5)
    images, labels = data[K]
    bad = (images.at[ROW, 3, 3, 0].set(jnp.nan), labels)
    new, ref = run(data[:K] + [bad] + data[K:], True), run(data, False)
    assert int(new.step) == int(ref.step) == len(data)
    assert_bits_equal_but_counters(
        (new.params, new.opt_state), (ref.params, ref.opt_state)
    )
