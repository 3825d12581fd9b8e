"""`ArrayTree` and `scale_where`, the clip-by-factor helper of the spike transforms."""

from __future__ import annotations

import functools
from typing import Any

import chex
import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import source_info_util

from jaxnan._src.core.dtypes import is_checked_leaf

source_info_util.register_exclusion(__file__)

ArrayTree = chex.ArrayTree
"""A pytree whose leaves are arrays (an alias of `chex.ArrayTree`)."""


def rescale(x: jax.Array, exponent: jax.Array) -> jax.Array:
    """``x * 2**-exponent``, as two normal power-of-two factors (exact).

    For updates whose norm is beyond their dtype's range: a factor of
    ``2**-128`` is subnormal in float32, and XLA's CPU code flushes it (and
    the reciprocal of a number near float32's max) to zero; two factors of
    ``2**-64`` are normal. Two multiplies by scalars (an elementwise
    `jnp.ldexp` costs about 6x the step of a clip), which fuse into the
    caller's loop.
    """
    real = jnp.real(jnp.zeros((), x.dtype)).dtype
    if not jnp.issubdtype(real, jnp.floating):
        real = jnp.dtype(jnp.float32)
    half = exponent // 2
    one = jnp.ones((), real)
    first, second = jnp.ldexp(one, -half), jnp.ldexp(one, half - exponent)
    return (x * first.astype(real)) * second.astype(real)


def scale_where(t: Any, clip: jax.Array, num: jax.Array, den: jax.Array) -> Any:
    """`t * (num / den)` where `clip`, else `t` bit for bit (a select, never 0*NaN).

    Non-floating leaves pass through, and so do the nonfinite entries of a
    clipped leaf (an Inf times a factor of 0 would be NaN). A factor below
    the smallest normal number of `t`'s dtype (a norm near float32's max
    clipped to 1: XLA's CPU code flushes such subnormals to zero, which
    would zero the updates instead of clipping them) is applied as two
    normal factors, ``num / sqrt(den)`` and ``1 / sqrt(den)`` (on every
    other step the second is 1).
    """
    if not is_checked_leaf(t):
        return t
    t = jnp.asarray(t)
    factor = num / den
    root = jnp.sqrt(den)
    small = factor < jnp.finfo(t.dtype).tiny
    # Scalars: (factor, 1), or the two halves. ``x * 1`` is exact, so an
    # ordinary step's result is ``t * factor`` bit for bit.
    first = jnp.where(small, num / root, factor).astype(t.dtype)
    second = jnp.where(small, 1 / root, 1).astype(t.dtype)
    scaled = clip & jnp.isfinite(t)
    # The product reads 0 where it is not taken: its derivative with respect
    # to the factor is then 0, not NaN (0 * NaN) from a nonfinite entry.
    safe = jnp.where(scaled, t, jnp.zeros_like(t))
    return lax.select(scaled, (safe * first) * second, t)


def split_norm(
    leaves: list[jax.Array], norm: jax.Array, huge: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """When `huge`, ``(e, r)`` with ``norm == 2**e * r``; else ``(0, 1)``.

    Finite updates whose norm is beyond the range of its dtype (entries near
    float32's max: the norm is +Inf) would all be scaled by
    ``max_norm / Inf = 0``. Then, in a scalar `lax.cond`, `e` is the binary
    exponent of the largest finite magnitude and `r` the norm of the finite
    entries scaled by ``2**-e`` (exact), between 0.5 and the square root of
    their number, so that each entry is scaled as ``(t * 2**-e) / r``. Not
    ``t / m``: XLA:CPU divides by multiplying with the reciprocal, and that
    of a number near float32's max is subnormal, flushed to zero.
    """
    dtype = norm.dtype
    if not leaves:
        return jnp.zeros((), jnp.int32), jnp.ones_like(norm)

    def split() -> tuple[jax.Array, jax.Array]:
        wide = [x.astype(jnp.promote_types(x.dtype, dtype)) for x in leaves]
        mags = [jnp.where(jnp.isfinite(x), jnp.abs(x), 0).astype(dtype) for x in wide]
        m = functools.reduce(jnp.maximum, [jnp.max(a, initial=0) for a in mags])
        e = jnp.frexp(m)[1].astype(jnp.int32)
        sq = sum(jnp.sum(jnp.square(rescale(a, e))) for a in mags)
        return e, jnp.sqrt(sq).astype(dtype)

    return lax.cond(
        huge, split, lambda: (jnp.zeros((), jnp.int32), jnp.ones_like(norm))
    )
