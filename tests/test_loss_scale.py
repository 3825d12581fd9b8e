"""dynamic_loss_scale against torch GradScaler's documented schedule."""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

import jaxnan
from tests.helpers import P, assert_no_host_callback, shard_map_over


def torch_gradscaler_schedule(finite, *, init, growth, backoff, interval):
    """torch.amp.GradScaler.update, as documented (no min scale in torch).

    Returns the scale after each step and whether the step was skipped.
    """
    scale, tracker, out = init, 0, []
    for ok in finite:
        if not ok:
            scale *= backoff
            tracker = 0
        else:
            tracker += 1
            if tracker == interval:
                scale *= growth
                tracker = 0
        out.append(scale)
    return out


FINITE = [True, True, True, False, True, True, True, True, True, True, False, False]
FINITE += [True] * 7


@pytest.fixture(scope="module")
def schedule_run():
    tx = jaxnan.dynamic_loss_scale(
        optax.adam(1e-2), init_scale=1024.0, growth_interval=3, min_scale=1.0
    )
    params = {"w": jnp.zeros(2)}
    grads = jnp.where(
        jnp.asarray(FINITE)[:, None], jnp.full((len(FINITE), 2), 512.0), jnp.inf
    )

    @jax.jit
    def go(grads):
        def body(state, g):
            u, state = tx.update({"w": g}, state, params)
            return state, (u["w"], state)

        return lax.scan(body, tx.init(params), grads)[1]

    return go(grads)


def test_scale_follows_torch_gradscaler_schedule(schedule_run):
    _, states = schedule_run
    want = torch_gradscaler_schedule(
        FINITE, init=1024.0, growth=2.0, backoff=0.5, interval=3
    )
    np.testing.assert_array_equal(np.asarray(states.loss_scale), want)
    assert int(states.loss_scale_skips[-1]) == FINITE.count(False)


def test_nonfinite_steps_skip_with_bit_exact_inner_state(schedule_run):
    updates, states = schedule_run
    u = np.asarray(updates)
    for t, ok in enumerate(FINITE):
        assert (u[t] == 0).all() != ok
    inner = states.loss_scale_inner_state
    for t in (3, 10, 11):
        chex.assert_trees_all_equal(
            jax.tree_util.tree_map(lambda x, t=t: x[t - 1], inner),
            jax.tree_util.tree_map(lambda x, t=t: x[t], inner),
        )


def test_inner_gets_unscaled_gradients():
    tx = jaxnan.dynamic_loss_scale(optax.sgd(1.0), init_scale=8.0)
    params = {"w": jnp.zeros(2)}
    state = tx.init(params)
    u, state = tx.update({"w": jnp.array([8.0, -4.0])}, state, params)
    chex.assert_trees_all_equal(u, {"w": jnp.array([-1.0, 0.5])})


def test_min_scale_survives_jit():
    tx = jaxnan.dynamic_loss_scale(optax.sgd(1.0), init_scale=64.0, min_scale=4.0)
    params = {"w": jnp.zeros(1)}
    update = jax.jit(tx.update)
    state = tx.init(params)
    for _ in range(6):
        _, state = update({"w": jnp.array([jnp.nan])}, state, params)
    assert float(state.loss_scale) == 4.0
    assert int(state.loss_scale_skips) == 6


def test_float16_train_step_with_scale_loss():
    # d/dw of sum(w * a * b) in float16 with a = b = 1e-4 is 1e-8: below the
    # smallest float16 subnormal, so it underflows to 0 unless the loss is scaled
    tx = jaxnan.dynamic_loss_scale(optax.sgd(1.0), growth_interval=1000)
    params = {"w": jnp.ones(2, jnp.float32)}
    ab = jnp.full((2, 2), 1e-4, jnp.float16)  # an argument: XLA would fold a * b

    def loss16(p, ab):
        return jnp.sum(p["w"].astype(jnp.float16) * ab[0] * ab[1]).astype(jnp.float32)

    @jax.jit
    def step(params, opt_state, ab):
        scaled = lambda p: jaxnan.scale_loss(loss16(p, ab), opt_state)  # noqa: E731
        grads = jax.grad(scaled)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return updates, opt_state

    assert (np.asarray(jax.grad(loss16)(params, ab)["w"]) == 0).all()  # underflow
    state = tx.init(params)
    assert_no_host_callback(step, params, state, ab)
    updates, state = step(params, state, ab)
    np.testing.assert_allclose(np.asarray(updates["w"]), -1e-8, rtol=2e-3)
    assert float(state.loss_scale) == 2.0**15


def test_scale_loss_finds_the_state_in_a_chain_and_errors_otherwise():
    tx = optax.chain(
        jaxnan.monitor(), jaxnan.dynamic_loss_scale(optax.sgd(1.0), init_scale=4.0)
    )
    state = tx.init({"w": jnp.zeros(1)})
    assert float(jaxnan.scale_loss(jnp.float32(2.0), state)) == 8.0
    msg = "jaxnan.scale_loss: expected exactly one DynamicLossScaleState"
    with pytest.raises(ValueError, match=re.escape(msg)):
        jaxnan.scale_loss(1.0, optax.sgd(1.0).init({"w": jnp.zeros(1)}))
    with pytest.raises(
        ValueError, match=re.escape("backoff_factor must be > 0 and < 1")
    ):
        jaxnan.dynamic_loss_scale(optax.sgd(1.0), backoff_factor=2.0)


def test_shard_map_one_device_inf_all_skip_same_scale(mesh8):
    tx = jaxnan.dynamic_loss_scale(optax.sgd(1.0), init_scale=16.0, axis_name="d")
    params = {"w": jnp.zeros(1)}

    def per_device(g):
        u, state = tx.update({"w": g[0]}, tx.init(params), params)
        return u["w"][None], state.loss_scale[None], state.loss_scale_skips[None]

    g = jnp.ones((8, 1)).at[2, 0].set(jnp.inf)
    f = shard_map_over(mesh8, per_device, P("d"), (P("d"), P("d"), P("d")))
    u, scale, skips = f(g)
    assert (np.asarray(u) == 0).all()
    assert (np.asarray(scale) == 8.0).all() and (np.asarray(skips) == 1).all()


def test_pmap_nonfinite_loss_on_one_device_all_skip():
    tx = jaxnan.dynamic_loss_scale(optax.sgd(1.0), init_scale=16.0, axis_name="i")
    params = {"w": jnp.zeros(1)}

    def per_device(loss):
        u, state = tx.update({"w": jnp.ones(1)}, tx.init(params), params, loss=loss)
        return u["w"], state.loss_scale

    losses = jnp.ones(8).at[4].set(jnp.nan)
    u, scale = jax.pmap(per_device, axis_name="i")(losses)
    assert (np.asarray(u) == 0).all() and (np.asarray(scale) == 8.0).all()
    u, scale = jax.pmap(per_device, axis_name="i")(jnp.ones(8))
    np.testing.assert_array_equal(np.asarray(u), -1.0 / 16.0)
    assert (np.asarray(scale) == 16.0).all()


# ------------------------------------------------------------ issue 13


@pytest.mark.parametrize(
    ("kwargs", "err", "msg"),
    [
        ({"init_scale": float("inf")}, ValueError, "init_scale must be finite"),
        ({"min_scale": float("inf")}, ValueError, "min_scale must be finite"),
        ({"min_scale": 0.5}, ValueError, "min_scale must be >= 1"),
        ({"init_scale": 0.5}, ValueError, "init_scale must be >= 1.0"),
        (
            {"init_scale": np.float32(2.0), "min_scale": 4.0},
            ValueError,
            "init_scale must be >= 4.0",
        ),
        (
            {"growth_interval": np.float32(3)},
            TypeError,
            "growth_interval must be an int",
        ),
        (
            {"backoff_factor": jnp.float32(1.0)},
            ValueError,
            "backoff_factor must be > 0 and < 1",
        ),
    ],
)
def test_dynamic_loss_scale_rejects_scales_that_skip_forever(kwargs, err, msg):
    with pytest.raises(err, match=re.escape(msg)):
        jaxnan.dynamic_loss_scale(optax.sgd(1.0), **kwargs)


def test_dynamic_loss_scale_accepts_numpy_hyperparameters():
    tx = jaxnan.dynamic_loss_scale(
        optax.sgd(1.0), init_scale=np.float32(8), growth_interval=np.int64(2)
    )
    assert float(tx.init({"w": jnp.zeros(1)}).loss_scale) == 8.0


def test_dynamic_loss_scale_inner_nonfinite_skips_and_keeps_the_scale():
    # float16 Adam: a gradient of 300 makes nu = g^2 overflow to Inf while the
    # update stays a finite 0: only the outgoing check sees it.
    tx = jaxnan.dynamic_loss_scale(optax.adam(1e-2), init_scale=2.0)
    params = {"w": jnp.ones(2, jnp.float16)}
    s0 = tx.init(params)
    u, s1 = tx.update({"w": jnp.full(2, 600.0, jnp.float16)}, s0, params)
    assert not np.asarray(u["w"]).any()
    chex.assert_trees_all_equal(s1.loss_scale_inner_state, s0.loss_scale_inner_state)
    assert int(s1.loss_scale_skips) == 1 and int(s1.loss_scale_inner_skips) == 1
    assert float(s1.loss_scale) == 2.0
    assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(s1))


@pytest.mark.parametrize("loss", ["0.5", 3, jnp.int32(3), None])
def test_scale_loss_needs_a_floating_loss(loss):
    # A str failed inside jnp.asarray with no word of the argument, and an
    # int loss was multiplied by the scale cast to int.
    state = jaxnan.dynamic_loss_scale(optax.sgd(1.0)).init({"w": jnp.ones(2)})
    with pytest.raises(TypeError, match=r"jaxnan.scale_loss: loss must be a floating"):
        jaxnan.scale_loss(loss, state)
