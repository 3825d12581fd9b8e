"""The guard's underflow health: the fraction of exact zeros in the gradients.

A float16 step whose gradients round to 0 stays finite everywhere; with
``underflow=`` the guard records the zero fraction of every healthy step and
warns when it jumps (marin-community/marin#7279). With a dynamic loss scale
inside `skip_nonfinite`, the figure is the scaled gradients' and the same
batches do not underflow. Off by default: the health vector then holds NaN
and nothing is computed.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxnan
from jaxnan._src.guard import underflow
from jaxnan._src.locate.causes import Cause

STEPS, K = 6, 4


def _batches():
    rng = np.random.default_rng(0)
    out = []
    for k in range(STEPS):
        x = rng.normal(size=(8, 4)).astype(np.float32)
        out.append({"x": x * (1e-4 if k >= K else 1.0), "y": np.zeros((8, 3))})
    return out


def _loss(params, batch):
    h = batch["x"].astype(jnp.float16) @ params["w"].astype(jnp.float16)
    return jnp.mean(jnp.square(h.astype(jnp.float32) - batch["y"]))


def _expected_fraction(params, batch, scale=1.0):
    """The zero fraction computed outside the guard (the same float16 math)."""
    g = jax.grad(lambda p: _loss(p, batch) * scale)(params)
    return float(np.mean(np.asarray(g["w"]) == 0))


def _run(tx, scaled, **options):
    def train_step(params, opt_state, batch):
        def loss_fn(params):
            loss = _loss(params, batch)
            return jaxnan.scale_loss(loss, opt_state) if scaled else loss

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params, loss=loss)
        return optax.apply_updates(params, updates), opt_state, loss

    step = jaxnan.guard(train_step, verbose=False, **options)
    params = {"w": jnp.asarray(np.random.default_rng(1).normal(size=(4, 3)))}
    opt_state = tx.init(params)
    seen = []
    for batch in _batches():
        seen.append(params)
        params, opt_state, _ = step(params, opt_state, batch)
    step.finish()
    return step, seen


def test_a_jump_in_zero_gradients_warns_before_any_nan():
    tx = jaxnan.skip_nonfinite(optax.sgd(1e-3))
    step, seen = _run(tx, scaled=False, underflow=0.5)
    (warning,) = step.incidents
    assert (warning.step, warning.action, warning.cause) == (K, "warned", "underflow")
    figures = list(step.underflow.figures)
    assert [s for s, _ in figures] == list(range(STEPS))
    expected = [_expected_fraction(p, b) for p, b in zip(seen, _batches())]
    assert [f for _, f in figures] == pytest.approx(expected, abs=1e-7)
    assert expected[K] == 1.0 and max(expected[:K]) == 0.0
    assert warning.message == (
        f"jaxnan.guard: warning at step {K}, before any NaN: zero fraction of the "
        f"gradients 1 at step {K}, up from a median of 0 over the {K} steps "
        f"before. {Cause.UNDERFLOW.fix}"
    )
    assert step.summary()["warnings"] == 1 and step.summary()["bad_steps"] == 0


def test_the_loss_scaled_gradients_are_measured_and_do_not_underflow():
    inner = jaxnan.dynamic_loss_scale(optax.sgd(1e-3), init_scale=2.0**15)
    tx = jaxnan.skip_nonfinite(inner)
    step, seen = _run(tx, scaled=True, underflow=0.5)
    assert list(step.incidents) == []
    fractions = [f for _, f in step.underflow.figures]
    assert fractions == [0.0] * STEPS
    # Without the scale the same batch rounds every gradient entry to 0.
    assert _expected_fraction(seen[K], _batches()[K], scale=2.0**15) == 0.0
    assert _expected_fraction(seen[K], _batches()[K]) == 1.0


def test_off_by_default_computes_nothing():
    tx = jaxnan.skip_nonfinite(optax.sgd(1e-3))
    step, _ = _run(tx, scaled=False)
    assert step.underflow is None and list(step.incidents) == []
    params = {"w": jnp.ones((4, 3))}
    batch = _batches()[0]
    text = step.lower(params, tx.init(params), batch).as_text()
    on, _ = _run(tx, scaled=False, underflow=0.5)
    on_text = on.lower(params, tx.init(params), batch).as_text()
    # The zero test (compare with 0.0 of the gradients) only when asked for.
    assert on_text.count("compare") > text.count("compare")


@pytest.mark.parametrize(
    "bad, error",
    [
        (0.0, ValueError),
        (1.0, ValueError),
        (2, ValueError),
        (float("nan"), ValueError),
        (True, TypeError),
        ("0.1", TypeError),
    ],
)
def test_underflow_argument_is_checked(bad, error):
    with pytest.raises(error, match=r"underflow must be .*Pass None \(off\)"):
        jaxnan.guard(lambda p, s, b: (p, s, 0.0), underflow=bad)


def test_nnx_dead_relu_layer_warns():
    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.fc1 = nnx.Linear(4, 16, rngs=rngs)
            self.fc2 = nnx.Linear(16, 3, rngs=rngs)

        def __call__(self, x):
            return self.fc2(nnx.relu(self.fc1(x)))

    model = MLP(nnx.Rngs(0))
    optimizer = nnx.Optimizer(
        model, jaxnan.skip_nonfinite(optax.sgd(1e-2)), wrt=nnx.Param
    )

    def train_step(model, optimizer, x, y):
        def loss_fn(model):
            return jnp.mean(jnp.square(model(x) - y))

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads, loss=loss)
        return loss

    step = jaxnan.guard(train_step, verbose=False, underflow=0.3)
    rng = np.random.default_rng(0)
    for k in range(6):
        x = rng.normal(size=(8, 4)).astype(np.float32)
        # From step 4 on the loader pads every example with zeros: fc1's kernel
        # gradient is exactly 0, nothing is nonfinite.
        step(model, optimizer, x * (k < 4), np.ones((8, 3), np.float32))
    step.finish()
    (warning,) = step.incidents
    assert (warning.step, warning.cause) == (4, "underflow")
    fractions = [f for _, f in step.underflow.figures]
    assert max(fractions[:4]) < 0.1 and min(fractions[4:]) >= 64 / 131


def test_watch_rearms_and_forgets_undone_steps():
    w = underflow.Watch(0.2, window=3)
    said = [w.add(s, f) for s, f in enumerate([0.0, 0.0, 0.5, 0.6, 0.0, 0.0])]
    assert [s is not None for s in said] == [False, False, True, False, False, False]
    w.drop_after(3)
    assert [s for s, _ in w.figures] == [0, 1, 2, 3]


def test_a_large_leaf_is_read_on_its_first_entries():
    big = np.ones(1 << 20, np.float32)
    big[: underflow.SAMPLE // 2] = 0.0  # half of the entries read are 0
    rec = type("Record", (), {"incoming": {"big": jnp.asarray(big), "b": jnp.ones(8)}})
    expected = 0.5 * (1 << 20) / ((1 << 20) + 8)
    assert float(underflow.zero_fraction([rec])) == pytest.approx(expected, rel=1e-6)
    rec.incoming = jnp.array([0.0, 1.0, 0.0, 2.0])
    assert float(underflow.zero_fraction([rec])) == 0.5
    assert np.isnan(float(underflow.zero_fraction([])))


def test_equinox_step_gradient_bracket_and_underflow():
    import equinox as eqx

    class Model(eqx.Module):
        encoder: eqx.nn.Linear
        decoder: eqx.nn.Linear

        def __init__(self, key):
            k1, k2 = jax.random.split(key)
            self.encoder = eqx.nn.Linear(4, 16, key=k1)
            self.decoder = eqx.nn.Linear(16, 3, key=k2)

        def __call__(self, x):
            h = jax.nn.relu(self.encoder(x.astype(jnp.float16)).astype(jnp.float32))
            return self.decoder(jnp.log(h + 1.0))

    model = Model(jax.random.key(0))
    tx = jaxnan.skip_nonfinite(optax.adam(1e-3))
    opt_state = tx.init(eqx.filter(model, eqx.is_array))

    @eqx.filter_jit
    def train_step(model, opt_state, batch):
        def loss_fn(model):
            return jnp.mean(jnp.square(jax.vmap(model)(batch["x"]) - batch["y"]))

        loss, grads = eqx.filter_value_and_grad(loss_fn)(model)
        params = eqx.filter(model, eqx.is_array)
        updates, opt_state = tx.update(grads, opt_state, params, loss=loss)
        return eqx.apply_updates(model, updates), opt_state, loss

    step = jaxnan.guard(train_step, verbose=False, underflow=0.3)
    rng = np.random.default_rng(0)
    for k in range(6):
        x = rng.normal(size=(8, 4)).astype(np.float32)
        # step 2: float16 overflows in the encoder (inf -> a NaN gradient
        # there); steps 4-5: the encoder's input rounds to 0 in float16.
        scale = {2: 1e6, 4: 1e-9, 5: 1e-9}.get(k, 1.0)
        batch = {"x": x * scale, "y": np.ones((8, 3), np.float32)}
        model, opt_state, _ = step(model, opt_state, batch)
    step.finish()
    bad, warning = step.incidents
    assert (bad.step, bad.cause, warning.step, warning.cause) == (
        2,
        "precision",
        4,
        "underflow",
    )
    # The loss itself is NaN: every gradient leaf is, in model order.
    assert bad.gradients == {
        "nonfinite": {
            ".encoder.weight": 64,
            ".encoder.bias": 9,
            ".decoder.weight": 48,
            ".decoder.bias": 3,
        },
        "finite_before": None,
        "finite_after": None,
        "leaves": 4,
    }
    assert "; none finite" in bad.message
