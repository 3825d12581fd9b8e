"""Property-based check of the promise of the guards (hypothesis).

No nonfinite value ever reaches the params or the optimizer state through
`jaxnan.skip_nonfinite`, whatever its source: NaN, +Inf or -Inf gradients at
any position, a NaN loss, or finite gradients that the optimizer's own
arithmetic turns nonfinite (a float16/bfloat16 second moment that overflows).
Each example runs a short sequence of steps through the guarded, jitted train
step and, side by side, a reference loop: the plain optimizer, whose result is
kept only when the gradients, the loss, the new params and the new state are
all finite. The two must take the same decisions and hold the same params and
state, bit for bit, at every step.

The four configurations cover every optimizer, dtype (float16, bfloat16,
float32, float64), guard (`skip_nonfinite(inner)` and with a leading
`jaxnan.clip_by_global_norm`) and layout (one device, donated, sharded across
8 devices and donated) at least once, without compiling the full product:
hypothesis draws the bad values and their positions, and every compiled step
is shared between the examples of a configuration (about 25 s of CPU time on
a 2-core machine).
"""

from __future__ import annotations

import contextlib
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxnan
from tests.helpers import mesh_of, replicate, shard_leading

OPTIMIZERS = {
    "adam": lambda: optax.adam(1e-2),
    "adamw": lambda: optax.adamw(1e-2, weight_decay=0.1),
    "sgd_momentum": lambda: optax.sgd(0.1, momentum=0.9),
}
GUARDED_INNER = {
    "skip": lambda inner: inner,
    "skip_clip": lambda inner: optax.chain(jaxnan.clip_by_global_norm(1.0), inner),
}
# (optimizer, dtype, guard, layout): each level of each factor at least once.
CONFIGS = [
    ("adam", "float16", "skip", "donated"),
    ("adamw", "bfloat16", "skip_clip", "sharded_donated"),
    ("sgd_momentum", "float32", "skip_clip", "one_device"),
    ("adam", "float64", "skip", "sharded_donated"),
]
KINDS = ["clean", "nan", "posinf", "neginf", "huge", "loss_nan"]
SHAPES = {"w": (8, 4), "b": (4,)}
STEPS = 4


def _x64(dtype):
    return jax.enable_x64(True) if dtype == "float64" else contextlib.nullcontext()


@functools.cache
def _compiled(opt, dtype, guard, layout):
    """(guarded step, reference step), jitted once per configuration."""
    inner = GUARDED_INNER[guard](OPTIMIZERS[opt]())
    tx = jaxnan.skip_nonfinite(inner)

    def guarded(params, state, g, loss):
        u, state = tx.update(g, state, params, loss=loss)
        return optax.apply_updates(params, u), state

    def reference(params, state, g):
        u, state = inner.update(g, state, params)
        return optax.apply_updates(params, u), state

    donate = (0, 1) if layout != "one_device" else ()
    return tx, inner, jax.jit(guarded, donate_argnums=donate), jax.jit(reference)


def _params(dtype):
    return {
        "w": jnp.linspace(-1.0, 1.0, 32).reshape(SHAPES["w"]).astype(dtype),
        "b": jnp.full(SHAPES["b"], 0.5, dtype),
    }


def _grads(dtype, step, event):
    kind, leaf, index = event
    rng = np.random.default_rng(step)
    g = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
    flat = g[leaf].reshape(-1)
    i = index % flat.size
    values = {
        "nan": np.nan,
        "posinf": np.inf,
        "neginf": -np.inf,
        "huge": float(jnp.finfo(dtype).max) / 2,
    }
    if kind in values:
        flat[i] = values[kind]
    g = {k: v.astype(jnp.dtype(dtype)) for k, v in g.items()}
    loss = np.float32(np.nan if kind == "loss_nan" else 1.0)
    return g, loss


def _finite(tree):
    """On the host (NumPy), so that no eager JAX op is compiled per example."""
    return all(
        np.isfinite(np.asarray(x).astype(np.float64)).all()
        for x in jax.tree.leaves(tree)
        if jnp.issubdtype(np.asarray(x).dtype, jnp.inexact)
    )


def _host(tree):
    return jax.tree.map(np.asarray, tree)


EVENT = st.tuples(
    st.sampled_from(KINDS), st.sampled_from(list(SHAPES)), st.integers(0, 31)
)


@pytest.mark.parametrize("config", CONFIGS, ids=["-".join(c) for c in CONFIGS])
@settings(max_examples=4, deadline=None)
@given(events=st.lists(EVENT, min_size=STEPS, max_size=STEPS))
@pytest.mark.default_compiler
def test_no_nonfinite_value_reaches_params_or_state(config, events):
    opt, dtype, guard, layout = config
    with _x64(dtype):
        tx, inner, guarded, reference = _compiled(*config)
        params = _params(dtype)
        mesh = mesh_of(8) if layout == "sharded_donated" else None
        if mesh is not None:
            params = shard_leading(params, mesh)
        state = tx.init(params)
        if mesh is not None:
            state = replicate(state, mesh)
        ref_params, ref_state = _host(params), _host(inner.init(params))
        skipped = 0
        for step, event in enumerate(events):
            g, loss = _grads(dtype, step, event)
            g_in = g if mesh is None else shard_leading(g, mesh)
            params, state = guarded(params, state, g_in, loss)
            # The promise, whatever the event.
            assert _finite(params) and _finite(state), (config, event)
            # The reference loop: the plain optimizer on the same layout (so
            # that the reductions are split the same way), kept only when all
            # is finite.
            ref_in = (ref_params, ref_state, g)
            if mesh is not None:
                ref_in = (
                    shard_leading(ref_params, mesh),
                    replicate(ref_state, mesh),
                    g_in,
                )
            cand_params, cand_state = _host(reference(*ref_in))
            ok = _finite((g, loss, cand_params, cand_state))
            if ok:
                ref_params, ref_state = cand_params, cand_state
            else:
                skipped += 1
            assert int(state.nonfinite_total) == skipped, (config, event)
            # XLA fuses `optax.apply_updates` into the plain optimizer's loop
            # but not across the guard's conditional, so a param may round
            # apart by an ulp (also before the outgoing check; see RESULTS).
            tol = 2 * float(jnp.finfo(dtype).eps)
            chex.assert_trees_all_close(_host(params), ref_params, rtol=tol, atol=tol)
            if guard == "skip":
                # The optimizer state is the plain one, bit for bit.
                chex.assert_trees_all_equal(_host(state.inner_state), ref_state)
            else:
                # A leading clip's norm is computed by the guard, in another
                # fusion than the plain chain's: it may round apart by an ulp.
                chex.assert_trees_all_close(
                    _host(state.inner_state), ref_state, rtol=2 * tol, atol=2 * tol
                )
