"""jaxnan.guard on steps whose state is not the usual pytree of arrays.

* Flax NNX's functional API (``graphdef, state = nnx.split((model,
  optimizer))`` and a `jax.jit` step that merges and re-splits them, as the
  Flax guides write it to avoid `nnx.jit`'s overhead): the optimizer state
  in an ``nnx.State`` is a mapping, no longer a ``SkipNonfiniteState``.
* A step that returns its state after the loss: the guard reads the state
  as the leading outputs, so it says so instead of "no skip_nonfinite".
"""

import jax
import numpy as np
import optax
import pytest

import jaxnan
from tests.helpers import assert_bits_equal_but_counters

K, ROW, STEPS = 2, 5, 5


def _batches():
    rng = np.random.default_rng(0)
    out = [
        {
            "x": rng.normal(size=(8, 4)).astype(np.float32),
            "y": rng.integers(0, 3, 8).astype(np.int32),
        }
        for _ in range(STEPS)
    ]
    bad = {k: v.copy() for k, v in out[K].items()}
    bad["x"][ROW, 0] = np.nan
    return out[:K] + [bad] + out[K:], out


def _cross_entropy(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def test_nnx_functional_split_merge_step_is_guarded():
    nnx = pytest.importorskip("flax.nnx")

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.linear = nnx.Linear(4, 3, rngs=rngs)

        def __call__(self, x):
            return self.linear(x)

    model = Model(nnx.Rngs(0))
    tx = jaxnan.skip_nonfinite(optax.adam(1e-2))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    graphdef, state0 = nnx.split((model, optimizer))

    @jax.jit
    def train_step(state, batch):
        model, optimizer = nnx.merge(graphdef, state)
        loss, grads = nnx.value_and_grad(
            lambda m: _cross_entropy(m(batch["x"]), batch["y"])
        )(model)
        optimizer.update(model, grads, loss=loss)
        return nnx.state((model, optimizer)), loss

    def run(batches, guarded):
        step = jaxnan.guard(train_step, verbose=False) if guarded else train_step
        state = state0
        for b in batches:
            state, _ = step(state, b)
        if guarded:
            assert step.summary()["skipped"] == 1
            (incident,) = step.incidents
            assert (incident.step, incident.cause) == (K, "input_data")
            assert (incident.leaf, incident.rows) == ("batch['x']", (ROW,))
        return state

    with_bad, without = _batches()
    assert_bits_equal_but_counters(run(with_bad, True), run(without, False))


def test_a_step_returning_the_loss_before_the_state_is_told_the_order():
    tx = jaxnan.skip_nonfinite(optax.sgd(0.1))

    def train_step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(
            lambda p: _cross_entropy(batch["x"] @ p, batch["y"])
        )(params)
        updates, opt_state = tx.update(grads, opt_state, params, loss=loss)
        return loss, optax.apply_updates(params, updates), opt_state

    params = np.zeros((4, 3), np.float32)
    step = jaxnan.guard(train_step, verbose=False)
    with pytest.raises(
        ValueError, match=r"outputs of `train_step` do not begin with its state"
    ) as e:
        step(params, tx.init(params), _batches()[1][0])
    assert "(params, opt_state, loss)" in str(e.value)
    assert "holds no" not in str(e.value)  # the optimizer is wrapped


def test_a_step_returning_nothing_reports_the_nonfinite_state_it_wrote():
    # The NNX tutorials' step returns nothing: its outputs are the objects it
    # mutates. A NaN made from a finite batch (log of a negative weight) goes
    # into the metrics; the incident must not say "the outputs are finite".
    nnx = pytest.importorskip("flax.nnx")
    model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(
        model, jaxnan.skip_nonfinite(optax.sgd(0.1)), wrt=nnx.Param
    )
    metrics = nnx.MultiMetric(loss=nnx.metrics.Average("loss"))

    @nnx.jit
    def train_step(model, optimizer, metrics, batch):
        def loss_fn(model):
            ce = _cross_entropy(model(batch["x"]), batch["y"])
            return ce * jax.lax.stop_gradient(jax.numpy.log(batch["w"]).mean())

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        metrics.update(loss=loss)
        optimizer.update(model, grads)

    batches = _batches()[1]
    for i, b in enumerate(batches):
        b["w"] = np.full(8, -1.0 if i == K else 2.0, np.float32)
    step = jaxnan.guard(train_step, verbose=False)
    with pytest.warns(UserWarning, match="returns no loss"):
        for b in batches:
            step(model, optimizer, metrics, b)
    step.finish()
    (incident,) = step.incidents
    assert (incident.step, incident.cause) == (K, "unsafe_op")
    assert "the outputs are finite" not in incident.message
    assert "nonfinite outputs" in incident.message and "metrics" in incident.message


def _static_flag_step(jit):
    tx = jaxnan.skip_nonfinite(optax.sgd(0.1))

    def loss_fn(params, batch, train):
        logits = batch["x"] @ params
        if train:  # Python control flow on a static argument
            logits = logits * 0.5
        return _cross_entropy(logits, batch["y"])

    def train_step(params, opt_state, batch, train):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch, train)
        updates, opt_state = tx.update(grads, opt_state, params, loss=loss)
        return optax.apply_updates(params, updates), opt_state, loss

    return tx, jit(train_step)


@pytest.mark.parametrize("jit", ["static_argnums", "static_argnames", "eqx"])
def test_the_wrapped_jits_static_arguments_stay_static(jit):
    import functools

    if jit == "eqx":
        wrap = pytest.importorskip("equinox").filter_jit  # Python bools: static
    elif jit == "static_argnums":
        wrap = functools.partial(jax.jit, static_argnums=(3,))
    else:
        wrap = functools.partial(jax.jit, static_argnames=("train",))
    tx, jitted = _static_flag_step(wrap)
    with_bad, without = _batches()

    def run(batches, flags, guarded):
        params = np.zeros((4, 3), np.float32)
        opt_state = tx.init(params)
        step = jaxnan.guard(jitted, verbose=False) if guarded else jitted
        for b, flag in zip(batches, flags):
            params, opt_state, _ = step(params, opt_state, b, flag)
        if guarded:
            assert step.summary()["skipped"] == 1
            assert step.incidents[0].step == K
        return params, opt_state

    params = np.zeros((4, 3), np.float32)
    lowered = jaxnan.guard(jitted).lower(params, tx.init(params), without[0], True)
    assert "callback" not in lowered.as_text()  # lowered with the flag static
    flags = [i % 2 == 0 for i in range(len(with_bad))]
    got = run(with_bad, flags, True)
    assert_bits_equal_but_counters(got, run(without, flags[:K] + flags[K + 1 :], False))


def test_policy_raise_on_nnx_hands_back_the_objects_holding_the_state():
    # details["state"] is "the state as it was before the bad step": for NNX
    # the objects themselves (as `last_state`), not None.
    nnx = pytest.importorskip("flax.nnx")
    model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(
        model, jaxnan.skip_nonfinite(optax.sgd(0.1)), wrt=nnx.Param
    )

    @nnx.jit(donate_argnums=(0, 1))
    def train_step(model, optimizer, batch):
        loss, grads = nnx.value_and_grad(
            lambda m: _cross_entropy(m(batch["x"]), batch["y"])
        )(model)
        optimizer.update(model, grads, loss=loss)
        return loss

    with_bad = _batches()[0]
    step = jaxnan.guard(train_step, verbose=False, policy="raise")
    for b in with_bad[: K + 1]:
        step(model, optimizer, b)
    before = np.asarray(model.kernel[...]).copy()  # after step K - 1
    with pytest.raises(jaxnan.NonFiniteError) as e:
        step(model, optimizer, with_bad[K + 1])
    state = e.value.details["state"]
    assert state == (model, optimizer)
    assert np.array_equal(np.asarray(state[0].kernel[...]), before)
