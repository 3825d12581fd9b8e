"""The dtypes `skip_nonfinite`'s inner state takes at init (`state_types`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxnan
from jaxnan._src.transforms import state_types

MIXED = {"w": jnp.arange(3.0), "b": jnp.asarray([0.5, -1.0], jnp.bfloat16)}


def _dtypes(tree) -> list:
    return [jnp.result_type(x) for x in jax.tree_util.tree_leaves(tree)]


def test_widened_casts_only_exact_widenings():
    state = {
        "up": jnp.asarray(1.5, jnp.bfloat16),
        "complex": jnp.asarray([2.0, -0.0]),
        "down": jnp.asarray(1.0 / 3.0, jnp.float32),
        "count": jnp.zeros((), jnp.int32),
        "shape": jnp.ones(2),
    }
    like = {
        "up": jax.ShapeDtypeStruct((), jnp.float32),
        "complex": jax.ShapeDtypeStruct((2,), jnp.complex64),
        "down": jax.ShapeDtypeStruct((), jnp.bfloat16),
        "count": jax.ShapeDtypeStruct((), jnp.float32),
        "shape": jax.ShapeDtypeStruct((3,), jnp.float64),
    }
    out = state_types.widened(state, like)
    assert out["up"].dtype == jnp.float32 and float(out["up"]) == 1.5
    assert out["complex"].dtype == jnp.complex64
    np.testing.assert_array_equal(np.signbit(out["complex"].real), [False, True])
    assert out["down"] is state["down"]  # a narrowing would round
    assert out["count"] is state["count"]  # not floating
    assert out["shape"] is state["shape"]
    assert state_types.widened(state, [like]) is state  # another structure


@pytest.mark.parametrize("jit", [False, True])
def test_init_takes_the_dtypes_of_the_update(jit):
    """prodigy widens its bfloat16 scalars at its first update, and its
    moments at its second (they are made with those scalars): init's state
    is the fixed point, with init's values, eager and under jit."""
    opt = optax.contrib.prodigy()
    tx = jaxnan.skip_nonfinite(opt)
    init = jax.jit(tx.init) if jit else tx.init
    state = init(MIXED).inner_state
    plain = opt.init(MIXED)
    assert _dtypes(plain) != _dtypes(state)
    _, once = jax.eval_shape(opt.update, MIXED, state, MIXED)
    assert _dtypes(once) == _dtypes(state)  # a fixed point
    for x, p in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(plain)):
        assert np.asarray(x).tobytes() == np.asarray(p.astype(x.dtype)).tobytes()


def test_an_update_that_needs_value_is_probed_with_a_loss():
    """momo's update needs ``value=`` (the loss): traced with a scalar of the
    default float dtype, its state takes the update's dtypes from init on
    (a real scalar made complex by the complex leaf), and the jitted update
    keeps them."""
    plain = optax.contrib.momo().init(MIXED)
    tx = jaxnan.skip_nonfinite(optax.contrib.momo())
    state = tx.init(MIXED)
    assert _dtypes(state.inner_state) != _dtypes(plain)
    g = jax.tree_util.tree_map(jnp.ones_like, MIXED)
    _, new = jax.jit(tx.update)(g, state, MIXED, value=jnp.float32(1.0))
    assert _dtypes(new) == _dtypes(state)
    _, once = jax.eval_shape(
        lambda: optax.contrib.momo().update(
            g, state.inner_state, MIXED, value=jnp.float32(1.0)
        )
    )
    assert _dtypes(once) == _dtypes(state.inner_state)  # a fixed point


def test_the_state_is_a_fixed_type_carry_of_a_scan():
    """dog on a mixed tree, three steps in one `lax.scan`: the carry keeps
    the dtypes init gave it (optax's own dog changes them at its first
    update, and cannot be the carry of a scan on this tree)."""
    opt = optax.contrib.dog()
    tx = jaxnan.skip_nonfinite(opt)
    grads = jax.tree_util.tree_map(lambda p: jnp.stack([p, -p, 2 * p]), MIXED)

    def steps(tx):
        def step(carry, g):
            params, state = carry
            u, state = tx.update(g, state, params)
            return (optax.apply_updates(params, u), state), None

        return step

    state = tx.init(MIXED)
    (_, out), _ = jax.lax.scan(steps(tx), (MIXED, state), grads)
    assert _dtypes(out) == _dtypes(state)
    assert optax.tree.get(state, "max_dist").dtype == jnp.float32
    with pytest.raises(TypeError, match="carry"):
        jax.lax.scan(steps(opt), (MIXED, opt.init(MIXED)), grads)
