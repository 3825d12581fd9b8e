"""Equinox's MNIST CNN example, tiny and synthetic.

Written as the example writes it; jaxnan adds two lines: `jaxnan.checked`
around the loss, `jaxnan.skip_nonfinite` around the optimizer (plus
``loss=loss_value`` in ``optim.update``).
"""

import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxnan
from tests import compilers
from tests.helpers import assert_bits_equal_but_counters

eqx = pytest.importorskip("equinox")


class CNN(eqx.Module):
    layers: list

    def __init__(self, key):
        key1, key2, key3, key4 = jax.random.split(key, 4)
        self.layers = [
            eqx.nn.Conv2d(1, 3, kernel_size=4, key=key1),
            eqx.nn.MaxPool2d(kernel_size=2),  # stores init=-inf
            jax.nn.relu,  # a custom_jvp leaf
            jnp.ravel,
            eqx.nn.Linear(192, 32, key=key2),
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


def loss(model, x, y):
    pred_y = jax.vmap(model)(x)
    return cross_entropy(y, pred_y)


def cross_entropy(y, pred_y):
    pred_y = jnp.take_along_axis(pred_y, jnp.expand_dims(y, 1), axis=1)
    return -jnp.mean(pred_y)


def train(data, guarded, lr=3e-4):
    # The example's init, compiled as one cheap program (tests/compilers.py).
    model = compilers.cheap_init(CNN, jax.random.key(5678), jit=eqx.filter_jit)
    optim = optax.adamw(lr)
    if guarded:
        optim = jaxnan.skip_nonfinite(optim)
    opt_state = optim.init(eqx.filter(model, eqx.is_array))
    loss_fn = jaxnan.checked(loss, on_nonfinite="warn") if guarded else loss

    @eqx.filter_jit
    def make_step(model, opt_state, x, y):
        loss_value, grads = eqx.filter_value_and_grad(loss_fn)(model, x, y)
        extra = {"loss": loss_value} if guarded else {}
        updates, opt_state = optim.update(
            grads, opt_state, eqx.filter(model, eqx.is_array), **extra
        )
        model = eqx.apply_updates(model, updates)
        return model, opt_state, loss_value

    losses = []
    for x, y in data:
        model, opt_state, value = make_step(model, opt_state, x, y)
        losses.append(value)
    return model, opt_state, losses


def batches(n, seed=0):
    rng = np.random.default_rng(seed)
    return [
        (
            jnp.asarray(rng.normal(size=(8, 1, 12, 12)), jnp.float32),
            jnp.asarray(rng.integers(0, 10, size=8), jnp.int32),
        )
        for _ in range(n)
    ]


@pytest.fixture(scope="module")
def plain():
    """The 20 healthy steps without jaxnan."""
    return train(batches(20), False)


@pytest.fixture(scope="module")
def healthy(plain):
    """The plain run, and the same 20 steps guarded and checked."""
    with warnings.catch_warnings():
        # MaxPool2d's -inf init must not fire: any jaxnan warning fails.
        warnings.simplefilter("error", RuntimeWarning)
        return plain, train(batches(20), True)


@pytest.mark.default_compiler
def test_twenty_healthy_steps_close(healthy):
    (m0, s0, l0), (m1, s1, l1) = healthy
    np.testing.assert_allclose(np.asarray(l0), np.asarray(l1), rtol=1e-6)
    a, b = eqx.filter(m0, eqx.is_array), eqx.filter(m1, eqx.is_array)
    chex.assert_trees_all_close(a, b, rtol=1e-5, atol=1e-7)
    # adamw's state, inside the guard's, on the filtered tree (None leaves).
    chex.assert_trees_all_close(s0, s1.inner_state, rtol=1e-5, atol=1e-7)
    assert int(s1.nonfinite_total) == 0


@pytest.mark.default_compiler
def test_checked_gradients_bit_for_bit(healthy):
    (model, _, _), _ = healthy
    x, y = batches(1, seed=7)[0]
    plain = eqx.filter_jit(eqx.filter_value_and_grad(loss))(model, x, y)
    checked = jaxnan.checked(loss)  # MaxPool2d's -inf init: no report
    got = eqx.filter_jit(eqx.filter_value_and_grad(checked))(model, x, y)
    a, b = eqx.filter(plain, eqx.is_array), eqx.filter(got, eqx.is_array)
    jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.mark.xfail(
    strict=True,
    reason="skip_nonfinite alone (no checked) changes how XLA fuses this "
    "model's gradients into adamw: 1 ulp in a moment from the second step "
    "on, 21 of 24 leaves apart by step 20; checked alone is bit for bit "
    "(tests/frameworks/test_bit_exact.py)",
)
@pytest.mark.default_compiler
def test_twenty_healthy_steps_bit_for_bit(healthy):
    (m0, s0, l0), (m1, s1, l1) = healthy
    np.testing.assert_array_equal(np.asarray(l0), np.asarray(l1))
    a, b = eqx.filter(m0, eqx.is_array), eqx.filter(m1, eqx.is_array)
    jax.tree.map(np.testing.assert_array_equal, a, b)
    jax.tree.map(np.testing.assert_array_equal, s0, s1.inner_state)


def test_nan_batch_is_skipped_and_located():
    data = batches(3, seed=1)
    x, y = data[1]
    data[1] = (x.at[3, 0, 5, 5].set(jnp.nan), y)
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        model, opt_state, losses = train(data, True)
        jax.block_until_ready(losses)
    assert int(opt_state.nonfinite_total) == 1
    assert np.isnan(np.asarray(losses[1])) and np.isfinite(np.asarray(losses[2]))
    msgs = [w for w in got if "jaxnan" in str(w.message)]
    assert len(msgs) == 1 and msgs[0].filename == __file__  # once, at our line
    assert "x: 1 nan" in str(msgs[0].message)
    # locate takes the module as it is (functions, custom_jvp and the -inf
    # init are static) and names the input leaf.
    d = jaxnan.locate(eqx.filter_value_and_grad(loss))(model, *data[1])
    assert d.phase == "input" and d.cause == "input_data"
    assert d.nonfinite_inputs == {"x": (1, 0, 0)}


def test_locate_through_the_module_names_the_line(plain):
    model, _, _ = plain

    def bad_loss(model, x, y):
        pred_y = jax.vmap(model)(x)
        return -jnp.mean(jnp.log(pred_y + 1.0))  # log of a log-probability

    line = bad_loss.__code__.co_firstlineno + 2
    x, y = batches(1, seed=3)[0]
    d = jaxnan.locate(eqx.filter_value_and_grad(bad_loss))(model, x, y)
    assert (d.primitive, d.line, d.phase) == ("log", line, "forward")
    assert d.cause == "unsafe_op"


@pytest.mark.default_compiler
def test_guard_on_the_example_step():
    """``make_step(model, opt_state, x, y)`` as the example writes it (the
    optimizer not handed the loss), wrapped in `jaxnan.guard`: the NaN
    image's row is named in ``x``, and model and optimizer state end bit for
    bit as in a run of the same step that never saw the batch."""
    K, ROW = 2, 5
    optim = jaxnan.skip_nonfinite(optax.adamw(3e-4))

    @eqx.filter_jit
    def make_step(model, opt_state, x, y):
        loss_value, grads = eqx.filter_value_and_grad(loss)(model, x, y)
        updates, opt_state = optim.update(
            grads, opt_state, eqx.filter(model, eqx.is_array)
        )
        model = eqx.apply_updates(model, updates)
        return model, opt_state, loss_value

    def run(data, guarded):
        model = compilers.cheap_init(CNN, jax.random.key(5678), jit=eqx.filter_jit)
        opt_state = optim.init(eqx.filter(model, eqx.is_array))
        step = jaxnan.guard(make_step) if guarded else make_step
        for x, y in data:
            model, opt_state, _ = step(model, opt_state, x, y)
        if guarded:
            assert step.summary()["skipped"] == 1
            (incident,) = step.incidents
            assert (incident.step, incident.cause) == (K, "input_data")
            assert incident.leaf == "x" and incident.rows == (ROW,)
        return eqx.filter((model, opt_state), eqx.is_array)

    data = batches(5)
    x, y = data[K]
    bad = (x.at[ROW, 0, 3, 3].set(jnp.nan), y)
    assert_bits_equal_but_counters(
        run(data[:K] + [bad] + data[K:], True), run(data, False)
    )
