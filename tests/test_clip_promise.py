"""`jaxnan.clip_by_global_norm` against `optax.clip_by_global_norm`, every dtype.

Hypothesis draws trees of finite updates, from tiny to huge (norms beyond
float16's and float32's range included) and the clipping threshold. The
documented semantics, bit for bit:

* float32 and float64, when optax's norm is finite: optax's result;
* float16 and bfloat16: optax's result on the updates in float32, cast back
  (the squares are summed and the leaves scaled in float32, so that a norm
  above 65504 does not make Inf as optax's float16 arithmetic does);
* updates whose squares overflow float32 (optax's norm is +Inf and its
  result zero or NaN): the clip of the same updates in float64, cast back,
  within 4 float32 ulps for float32 leaves (3 measured: the overflow-safe
  norm is computed in float32, scaled by the largest entry, not correctly
  rounded) and equal once rounded to a bfloat16 or float16 leaf. This
  regime is an accuracy statement, not bit-exactness: optax has no finite
  answer to be compared with.

Nothing nonfinite is ever made from finite updates.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxnan

pytestmark = pytest.mark.default_compiler

DTYPES = ("float32", "bfloat16", "float16", "float64")


def _jaxnan_clip(g, max_norm):
    tx = jaxnan.clip_by_global_norm(max_norm)
    return jax.jit(lambda g: tx.update(g, tx.init(g))[0])(g)


def _optax_clip(g, max_norm):
    tx = optax.clip_by_global_norm(max_norm)
    return jax.jit(lambda g: tx.update(g, tx.init(g))[0])(g)


def _bits(tree):
    return [np.asarray(x).tobytes() for x in jax.tree_util.tree_leaves(tree)]


def _x64(dtype):
    return jax.enable_x64(True) if dtype == "float64" else contextlib.nullcontext()


@settings(max_examples=12, deadline=None, derandomize=True)
@given(
    dtype=st.sampled_from(DTYPES),
    log_scale=st.floats(-20, 40),
    max_norm=st.sampled_from([1e-3, 1.0, 7.5, 1e4]),
    seed=st.integers(0, 2**16),
)
def test_clip_by_global_norm_against_optax(dtype, log_scale, max_norm, seed):
    rng = np.random.default_rng(seed)
    info = jnp.finfo(jnp.dtype(dtype))
    scale = min(10.0**log_scale, float(info.max) / 8)
    raw = {"a": rng.normal(size=(3, 4)) * scale, "b": rng.normal(size=(5,)) * scale}
    with _x64(dtype):
        g = {k: jnp.asarray(v, dtype) for k, v in raw.items()}
        out = _jaxnan_clip(g, max_norm)
        assert all(bool(jnp.isfinite(x).all()) for x in jax.tree_util.tree_leaves(out))
        if dtype in ("float16", "bfloat16"):
            up = {k: v.astype(jnp.float32) for k, v in g.items()}
            if np.isfinite(float(optax.global_norm(up))):
                ref = jax.tree_util.tree_map(
                    lambda r, x: r.astype(x.dtype), _optax_clip(up, max_norm), g
                )
                assert _bits(out) == _bits(ref)
                return
        else:
            ref = _optax_clip(g, max_norm)
            if np.isfinite(float(optax.global_norm(g))):
                assert _bits(out) == _bits(ref)
                return
        if dtype == "float64":
            return  # squares beyond float64: not drawn (scale <= max / 8)
    # float32 squares overflow: optax's norm is +Inf; the float64 clip, cast back.
    ref = _float64_clip(g, max_norm)
    for x, r in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(ref)):
        x = np.asarray(x).astype(np.float32)
        ulps = np.abs(x.view(np.int32).astype(np.int64) - r.view(np.int32)).max()
        limit = 4 if dtype == "float32" else 1  # float32 ulps; one of the leaf's
        if dtype != "float32":
            r16 = r.astype(np.asarray(out["a"]).dtype).astype(np.float32)
            ulps = 0 if np.array_equal(x, r16) else ulps
        assert ulps <= limit, (dtype, log_scale, ulps)


def _float64_clip(g, max_norm):
    """optax's clip of `g` computed in float64, as float32 numpy arrays."""
    with jax.enable_x64(True):
        wide = {k: jnp.asarray(np.asarray(v), jnp.float64) for k, v in g.items()}
        return jax.tree_util.tree_map(
            lambda r: np.asarray(r).astype(np.float32), _optax_clip(wide, max_norm)
        )


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("max_norm", [1.0, 1e30])
def test_norm_beyond_the_float32_range_still_clips(dtype, max_norm):
    # Finite entries near float32's max: the global norm (about 1.4 * max)
    # is beyond float32's range. Before, it was +Inf and every entry was
    # scaled by max_norm / Inf = 0: a silent zero update, as in optax.
    big = float(jnp.finfo(jnp.dtype(dtype)).max)
    raw = {"a": np.array([0.9, -0.8, 1e-30]) * big, "b": np.array([0.7]) * big}
    g = {k: jnp.asarray(v, dtype) for k, v in raw.items()}
    out = _jaxnan_clip(g, max_norm)
    ref = _float64_clip(g, max_norm)
    for x, r in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(ref)):
        x = np.asarray(x).astype(np.float32)
        if dtype == "bfloat16":  # equal once rounded to the leaf's dtype
            np.testing.assert_array_equal(x, r.astype(jnp.bfloat16).astype(np.float32))
        else:
            ulps = np.abs(x.view(np.int32).astype(np.int64) - r.view(np.int32)).max()
            assert ulps <= 4, ulps
