"""Flax NNX MNIST tutorial (CNN, BatchNorm, Dropout), tiny and synthetic.

Written as the tutorial writes it; jaxnan adds three lines: `@jaxnan.checked`
on the loss, `jaxnan.skip_nonfinite` around the optimizer, `loss=loss` in
`optimizer.update`.
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
from tests.helpers import assert_bits_equal_but_counters

nnx = pytest.importorskip("flax.nnx")


class CNN(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, 4, kernel_size=(3, 3), rngs=rngs)
        self.bn1 = nnx.BatchNorm(4, rngs=rngs)
        self.dropout1 = nnx.Dropout(rate=0.025, rngs=rngs)
        self.avg_pool = lambda x: nnx.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
        self.linear1 = nnx.Linear(4 * 4 * 4, 16, rngs=rngs)
        self.dropout2 = nnx.Dropout(rate=0.025, rngs=rngs)
        self.linear2 = nnx.Linear(16, 10, rngs=rngs)

    def __call__(self, x):
        x = self.avg_pool(nnx.relu(self.bn1(self.dropout1(self.conv1(x)))))
        x = x.reshape(x.shape[0], -1)
        x = self.dropout2(nnx.relu(self.linear1(x)))
        return self.linear2(x)


def loss_fn(model, batch):
    logits = model(batch["image"])
    loss = optax.softmax_cross_entropy_with_integer_labels(
        logits=logits, labels=batch["label"]
    ).mean()
    return loss, logits


LOSS_LINE = loss_fn.__code__.co_firstlineno + 2  # logits = model(...)


def make_step(loss, guarded):
    @nnx.jit
    def train_step(model, optimizer, batch):
        grad_fn = nnx.value_and_grad(loss, has_aux=True)
        (value, logits), grads = grad_fn(model, batch)
        if guarded:
            optimizer.update(model, grads, loss=value)
        else:
            optimizer.update(model, grads)
        return value

    return train_step


def batches(n, seed=0):
    rng = np.random.default_rng(seed)
    return [
        {
            "image": jnp.asarray(rng.normal(size=(8, 8, 8, 1)), jnp.float32),
            "label": jnp.asarray(rng.integers(0, 10, size=8), jnp.int32),
        }
        for _ in range(n)
    ]


def run(guarded, data, lr=5e-3, check=None):
    check = guarded if check is None else check
    model = CNN(rngs=nnx.Rngs(0))
    tx = optax.adamw(lr, 0.9)
    if guarded:
        tx = jaxnan.skip_nonfinite(tx)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    loss = jaxnan.checked(loss_fn, on_nonfinite="warn") if check else loss_fn
    step = make_step(loss, guarded)
    losses = [step(model, optimizer, b) for b in data]
    return model, optimizer, losses


def assert_same_state(m0, m1):
    s0, s1 = nnx.state(m0), nnx.state(m1)
    assert jax.tree_util.tree_structure(s0) == jax.tree_util.tree_structure(s1)
    for a, b in zip(jax.tree_util.tree_leaves(s0), jax.tree_util.tree_leaves(s1)):
        if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.fixture(scope="module")
def plain():
    """The 20 healthy steps without jaxnan."""
    return run(False, batches(20))


@pytest.fixture(scope="module")
def healthy(plain):
    """The plain run, the same 20 steps checked, and checked and guarded."""
    data = batches(20)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        return plain, run(False, data, check=True), run(True, data)


@pytest.mark.default_compiler
def test_checked_keeps_every_state_update_bit_for_bit(healthy):
    (m0, o0, l0), (m1, o1, l1), _ = healthy
    # Every loss of the 20 steps is bit for bit: each step saw the same
    # params, BatchNorm statistics and Dropout masks as the plain run.
    np.testing.assert_array_equal(np.asarray(l0), np.asarray(l1))
    assert int(m1.dropout1.rngs.count[...]) == 20  # the RNG advanced
    assert int(m0.dropout1.rngs.count[...]) == 20
    assert not np.array_equal(np.asarray(m1.bn1.mean[...]), np.zeros(4))
    chex.assert_trees_all_equal(
        jaxnan.flax.opt_state(o0), jaxnan.flax.opt_state(o1), strict=True
    )


@pytest.mark.default_compiler
def test_checked_final_state_bit_for_bit(healthy):
    (m0, _, _), (m1, _, _), _ = healthy
    assert_same_state(m0, m1)


@pytest.mark.default_compiler
def test_guarded_optimizer_state_is_readable(healthy):
    (m0, o0, l0), _, (m2, o2, l2) = healthy
    state = jaxnan.flax.opt_state(o2)
    assert int(state.nonfinite_total) == 0 and not bool(state.gave_up)
    assert int(m2.dropout1.rngs.count[...]) == int(m0.dropout1.rngs.count[...])
    np.testing.assert_allclose(np.asarray(l0), np.asarray(l2), rtol=1e-5)


@pytest.mark.default_compiler
def test_guarded_twenty_steps_bit_for_bit(healthy):
    (m0, o0, l0), _, (m2, o2, l2) = healthy
    np.testing.assert_array_equal(np.asarray(l0), np.asarray(l2))
    assert_same_state(m0, m2)


def test_nan_batch_is_skipped_and_located():
    data = batches(3, seed=1)
    data[1]["image"] = data[1]["image"].at[2, 3, 3, 0].set(jnp.nan)
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        model, optimizer, losses = run(True, data)
        jax.block_until_ready(losses)
    state = jaxnan.flax.opt_state(optimizer)
    assert int(state.nonfinite_total) == 1  # the bad step was skipped
    assert all(
        bool(jnp.all(jnp.isfinite(x)))
        for x in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param))
    )
    msgs = [str(w.message) for w in got if "jaxnan" in str(w.message)]
    assert {w.filename for w in got if "jaxnan" in str(w.message)} == {__file__}
    # One warning for the bad batch (not one per phase)...
    assert "[phase input]:\n  batch['image']: 1 nan" in msgs[0]
    # ...and one for the next step: skip_nonfinite guards the parameters and
    # the optimizer state, but the skipped step's BatchNorm running
    # statistics were updated from the NaN batch (as without jaxnan), and
    # `checked` reports them as nonfinite inputs of the next step.
    assert len(msgs) == 2
    assert "model.bn1.mean.value: 4 nan" in msgs[1]
    assert bool(jnp.all(jnp.isnan(model.bn1.mean[...])))
    # locate sees through nnx.value_and_grad (its wrapper hides the argument
    # names). The model given is the one after the run: its statistics were
    # poisoned by the bad batch, so they are nonfinite inputs too.
    d = jaxnan.locate(nnx.value_and_grad(loss_fn, has_aux=True))(model, data[1])
    assert d.phase == "input" and d.cause == "input_data"
    assert d.nonfinite_inputs == {
        "args[0].bn1.mean.value": (4, 0, 0),
        "args[0].bn1.var.value": (4, 0, 0),
        "args[1]['image']": (1, 0, 0),
    }


def test_locate_sees_through_checked_and_nnx_jit(plain):
    model, _, _ = plain
    batch = batches(1, seed=2)[0]
    batch["image"] = batch["image"].at[0].set(1e30)  # an outlier row

    def bad_loss(model, batch):
        logits = model(batch["image"])
        probs = jax.nn.softmax(logits)
        return -jnp.mean(jnp.log(probs)[jnp.arange(8), batch["label"]])

    # The outlier row overflows first in BatchNorm's variance (x**2), at the
    # line of CNN.__call__ that calls bn1, before log(softmax) sees it.
    line = CNN.__call__.__code__.co_firstlineno + 1
    checked = jaxnan.checked(bad_loss, on_nonfinite="warn")

    @nnx.jit
    def step(model, batch):
        return nnx.value_and_grad(checked)(model, batch)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        d = jaxnan.locate(step)(model, batch)
    assert (d.primitive, d.line, d.phase) == ("square", line, "forward")
    assert d.cause == "overflow", d


class MaskedScores(nnx.Module):
    """Causal scores with the mask stored in the model, as -inf entries."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.linear = nnx.Linear(4, 4, rngs=rngs)
        self.mask = nnx.Variable(jnp.triu(jnp.full((4, 4), -jnp.inf), k=1))

    def __call__(self, x):
        scores = self.linear(x) @ x.T + self.mask[...]
        return jax.nn.softmax(scores, axis=-1)


def masked_loss(model, x):
    return jnp.mean(model(x) ** 2)


def test_stored_inf_mask_is_a_constant_but_nan_and_inf_params_report():
    model = MaskedScores(rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 4)), jnp.float32)
    step = nnx.jit(nnx.value_and_grad(jaxnan.checked(masked_loss, on_nonfinite="warn")))

    def messages():
        with warnings.catch_warnings(record=True) as got:
            warnings.simplefilter("always")
            jax.block_until_ready(step(model, x))
        return [str(w.message) for w in got if "jaxnan" in str(w.message)]

    # A healthy model that stores intentional -inf constants: no report.
    assert messages() == []
    mask = model.mask[...]
    model.mask[...] = mask.at[3, 0].set(jnp.nan)  # a NaN anywhere reports
    (msg,) = messages()
    assert "model.mask.value: 1 nan" in msg
    model.mask[...] = mask
    kernel = model.linear.kernel[...]
    model.linear.kernel[...] = kernel.at[0, 0].set(-jnp.inf)  # Inf in a Param
    (msg,) = messages()
    assert "model.linear.kernel.value: 1 -inf" in msg


K, ROW = 2, 5  # the bad batch and its NaN row in the guard tests below


def with_nan_image(data):
    """`data` with batch K, a copy whose image ROW holds one NaN, put before it."""
    bad = dict(data[K])
    bad["image"] = bad["image"].at[ROW, 2, 2, 0].set(jnp.nan)
    return data[:K] + [bad] + data[K:]


@pytest.mark.default_compiler
@pytest.mark.parametrize("hand_loss", [False, True])
def test_guard_on_the_tutorial_step_returning_nothing(hand_loss):
    """The tutorial's ``train_step(model, optimizer, metrics, batch)`` returns
    nothing; its loss goes to an ``nnx.MultiMetric``. Guarded as written (the
    loss handed to the optimizer or not), it skips the NaN batch, and model
    (BatchNorm statistics and Dropout RNG counts included), optimizer and
    metrics end bit for bit as in a run that never saw the batch."""

    @nnx.jit
    def train_step(model, optimizer, metrics, batch):
        grad_fn = nnx.value_and_grad(loss_fn, has_aux=True)
        (loss, logits), grads = grad_fn(model, batch)
        metrics.update(loss=loss, logits=logits, labels=batch["label"])
        if hand_loss:
            optimizer.update(model, grads, loss=loss)
        else:
            optimizer.update(model, grads)

    def run(data, guarded):
        model = CNN(rngs=nnx.Rngs(0))
        tx = jaxnan.skip_nonfinite(optax.adamw(5e-3, 0.9))
        optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
        metrics = nnx.MultiMetric(
            accuracy=nnx.metrics.Accuracy(), loss=nnx.metrics.Average("loss")
        )
        step = jaxnan.guard(train_step) if guarded else train_step
        first = None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for b in data:
                assert step(model, optimizer, metrics, b) is None
                if first is None:  # the Average of one loss is that loss
                    first = float(metrics.compute()["loss"])
        if guarded:
            told = [w for w in caught if "returns no loss" in str(w.message)]
            assert len(told) == (0 if hand_loss else 1)
            assert step.summary()["skipped"] == 1
            (incident,) = step.incidents
            assert (incident.step, incident.cause) == (K, "input_data")
            assert incident.leaf == "batch['image']" and incident.rows == (ROW,)
            loss_figures = [f[1] for f in step.figures]
            if hand_loss:  # the loss handed to the optimizer is the step's
                assert loss_figures[0] == first
                assert np.isnan(incident.loss)
                assert incident.message.startswith(
                    f"jaxnan.guard: step {K} went nonfinite (loss nan)."
                )
            else:  # none to record, and the report says so
                assert all(np.isnan(loss_figures))
                assert incident.loss is None
                assert incident.message.startswith(
                    f"jaxnan.guard: step {K} went nonfinite (the step returns no loss)."
                )
        computed = {k: float(v) for k, v in metrics.compute().items()}
        return nnx.state((model, optimizer, metrics)), computed

    (state, computed), (ref, ref_computed) = (
        run(with_nan_image(batches(5)), True),
        run(batches(5), False),
    )
    assert computed == ref_computed
    assert_bits_equal_but_counters(state, ref)
