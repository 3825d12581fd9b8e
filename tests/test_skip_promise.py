"""The skip promise of `skip_nonfinite`, against an independent reference.

A run of ``skip_nonfinite(opt)`` over a Hypothesis-drawn sequence of healthy
and bad steps equals, bit for bit, a loop that applies `opt` on the healthy
steps and leaves params and state untouched on the bad ones; a skipped step
is the identity under `jax.vjp` too (zero through the gradients, never NaN),
and keeps the signed zeros of real and complex params.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxnan

OPTIMIZERS = {
    "sgd": lambda: optax.sgd(0.1),
    "momentum": lambda: optax.sgd(0.1, momentum=0.9),
    "adam": lambda: optax.adam(1e-2),
    "adamw": lambda: optax.adamw(1e-2),
    "lion": lambda: optax.lion(1e-3),
    "chain_clip_adam": lambda: optax.chain(
        optax.clip_by_global_norm(1.0), optax.adam(1e-2)
    ),
    "adam_schedule": lambda: optax.adam(optax.exponential_decay(1e-2, 2, 0.5)),
    "multisteps": lambda: optax.MultiSteps(optax.adam(1e-2), every_k_schedule=2),
    "inject": lambda: optax.inject_hyperparams(optax.adam)(learning_rate=1e-2),
}


def _bits(tree):
    return [np.asarray(x).tobytes() for x in jax.tree_util.tree_leaves(tree)]


@settings(max_examples=6, deadline=None, derandomize=True)
@given(
    name=st.sampled_from(sorted(OPTIMIZERS)),
    dtype=st.sampled_from(["float32", "bfloat16"]),
    bad=st.lists(st.booleans(), min_size=3, max_size=5),
    seed=st.integers(0, 2**16),
)
def test_skip_equals_the_reference_loop(name, dtype, bad, seed):
    rng = np.random.default_rng(seed)
    params = {"w": jnp.asarray(rng.normal(size=(3,)), dtype)}
    opt = OPTIMIZERS[name]()
    tx = jaxnan.skip_nonfinite(opt)
    guarded = jax.jit(lambda g, s, p: tx.update(g, s, p))
    plain = jax.jit(lambda g, s, p: opt.update(g, s, p))
    p_ref, s_ref = params, opt.init(params)
    p_run, s_run = params, tx.init(params)
    for i, is_bad in enumerate(bad):
        g = rng.normal(size=(3,))
        if is_bad:
            g[i % 3] = np.nan
        g = {"w": jnp.asarray(g, dtype)}
        u, s_run = guarded(g, s_run, p_run)
        p_run = optax.apply_updates(p_run, u)
        if not is_bad:
            u_ref, s_ref = plain(g, s_ref, p_ref)
            p_ref = optax.apply_updates(p_ref, u_ref)
        assert _bits(p_run) == _bits(p_ref), (name, dtype, i)
        assert _bits(s_run.inner_state) == _bits(s_ref), (name, dtype, i)
    assert int(s_run.nonfinite_total) == sum(bad)


@pytest.mark.parametrize(
    "name", ["sgd", "adam", "rmsprop_centered", "multisteps", "inject"]
)
def test_vjp_through_a_skipped_step_is_finite(name):
    opt = {
        "rmsprop_centered": lambda: optax.rmsprop(1e-2, centered=True, momentum=0.9),
        **OPTIMIZERS,
    }[name]()
    tx = jaxnan.skip_nonfinite(opt)
    p = {"w": jnp.array([1.0, -0.5])}
    s = tx.init(p)
    g = {"w": jnp.array([jnp.nan, 1.0])}

    def step(g, s, p):
        u, s2 = tx.update(g, s, p)
        return optax.apply_updates(p, u), s2.inner_state

    out, vjp = jax.vjp(step, g, s, p)

    def ones(x):
        if jnp.issubdtype(x.dtype, jnp.inexact):
            return jnp.ones_like(x)
        return np.zeros(x.shape, jax.dtypes.float0)

    ct_g, ct_s, ct_p = vjp(jax.tree_util.tree_map(ones, out))
    # The skipped step is the identity: zero through the gradients (it was
    # NaN: 0 * NaN in the optimizer's derivative), one through params/state.
    np.testing.assert_array_equal(ct_g["w"], [0.0, 0.0])
    np.testing.assert_array_equal(ct_p["w"], [1.0, 1.0])
    for x in jax.tree_util.tree_leaves(ct_s.inner_state):
        if jnp.issubdtype(x.dtype, jnp.inexact):
            np.testing.assert_array_equal(x, np.ones_like(x))


def test_skipped_step_keeps_signed_zeros_real_and_complex():
    tx = jaxnan.skip_nonfinite(optax.adam(1e-2))
    p = {
        "w": jnp.array([-0.0, 0.0]),
        "c": jnp.array([complex(-0.0, -0.0), complex(0.0, -0.0)], jnp.complex64),
    }
    g = {"w": jnp.array([jnp.nan, 1.0]), "c": jnp.array([1 + 1j, 1j], jnp.complex64)}
    for update in (tx.update, jax.jit(tx.update)):
        u, state = update(g, tx.init(p), p)
        new = optax.apply_updates(p, u)
        assert int(state.nonfinite_total) == 1
        assert _bits(new) == _bits(p)
        c = np.asarray(u["c"])
        assert np.signbit(c.real).all() and np.signbit(c.imag).all()


def _draw(params, i):
    """Healthy gradients of step `i`, shaped as `params`."""
    return jax.tree_util.tree_map(
        lambda x: jax.random.normal(jax.random.PRNGKey(i), x.shape), params
    )


def _healthy_mismatches(inner, params, steps=20):
    """Healthy steps where the guarded fused step's params differ in a bit."""
    guard = jaxnan.skip_nonfinite(inner)

    def fused(tx):
        def step(p, s, g):
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s

        return jax.jit(step)

    guarded, plain = fused(guard), fused(inner)
    state, differ = guard.init(params), 0
    for i in range(steps):
        g = _draw(params, i)
        p_g, s_g = guarded(params, state, g)
        p_p, s_p = plain(params, state.inner_state, g)
        differ += _bits(p_g) != _bits(p_p)
        params, state = p_p, s_g._replace(inner_state=s_p)
    return differ


@pytest.mark.default_compiler
@pytest.mark.xfail(
    strict=True,
    reason="open: a 0-d parameter (a learned temperature) is 1 ulp off on "
    "about 1 healthy step in 10 for sgd momentum, lion, rmsprop, adagrad and "
    "nadam: XLA:CPU fuses the outgoing check's scalar arithmetic into the "
    "step's kernel, where LLVM's FMA contraction then differs",
)
def test_healthy_step_with_a_scalar_parameter_is_bit_exact():
    params = {"temperature": jnp.ones(()), "w": jnp.ones((2, 3))}
    assert _healthy_mismatches(optax.sgd(0.1, momentum=0.9), params) == 0


@pytest.mark.default_compiler
@pytest.mark.xfail(
    strict=True,
    reason="open: without the guard XLA folds two constant factors "
    "((g * -lr) * c into g * (-lr * c)); the guard's select stands between "
    "them, so the step is rounded as written, 1 ulp apart",
)
def test_healthy_step_of_a_chain_scaling_twice_is_bit_exact():
    params = {"w": jnp.ones((2, 3)), "b": jnp.zeros(2)}
    assert (
        _healthy_mismatches(optax.chain(optax.sgd(0.1), optax.scale(0.7)), params) == 0
    )


def _update_mismatches(inner, params, exact, steps=20):
    """Healthy steps where the guarded update, jitted on its own, differs."""
    guard = jaxnan.skip_nonfinite(inner, exact=exact)
    guarded, plain = jax.jit(guard.update), jax.jit(inner.update)
    state, differ = guard.init(params), 0
    for i in range(steps):
        g = _draw(params, i)
        u_g, s_g = guarded(g, state, params)
        u_p, s_p = plain(g, state.inner_state, params)
        differ += (_bits(u_g), _bits(s_g.inner_state)) != (_bits(u_p), _bits(s_p))
        params, state = optax.apply_updates(params, u_p), s_g._replace(inner_state=s_p)
    return differ


@pytest.mark.default_compiler
def test_the_open_cases_updates_are_bit_exact_as_documented():
    # What holds in the two open cases above: a 0-d parameter's updates and
    # state are jax.jit(inner.update)'s under both variants; a chain scaling
    # twice differs on most steps under the default (XLA folds the unguarded
    # constants) and is bit for bit with exact=True.
    scalar = {"temperature": jnp.ones(()), "w": jnp.ones((2, 3))}
    for inner in (optax.sgd(0.1, momentum=0.9), optax.rmsprop(0.1), optax.nadam(0.1)):
        assert _update_mismatches(inner, scalar, exact=False) == 0
        assert _update_mismatches(inner, scalar, exact=True) == 0
    twice = optax.chain(optax.sgd(0.1), optax.scale(0.7))
    params = {"w": jnp.ones((2, 3)), "b": jnp.zeros(2)}
    assert _update_mismatches(twice, params, exact=False) > 10
    assert _update_mismatches(twice, params, exact=True) == 0


@pytest.mark.default_compiler
def test_healthy_step_of_vector_parameters_is_bit_exact():
    # The control of the two open cases above: the same optimizers on
    # parameters of one dimension or more.
    params = {"temperature": jnp.ones((3,)), "w": jnp.ones((2, 3))}
    assert _healthy_mismatches(optax.sgd(0.1, momentum=0.9), params) == 0
    assert _healthy_mismatches(optax.adam(0.1), params) == 0
