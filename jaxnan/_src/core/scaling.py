"""`ArrayTree` and `scale_where`, the clip-by-factor helper of the spike transforms."""

from __future__ import annotations

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
    """``x * 2**-exponent``, exactly (`jnp.ldexp`; a complex `x` part by part).

    For updates whose norm is beyond their dtype's range: a factor of
    ``2**-128`` is subnormal in float32, and XLA's CPU code flushes it (and
    the reciprocal of a number near float32's max) to zero.
    """
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        return lax.complex(rescale(x.real, exponent), rescale(x.imag, exponent))
    return jnp.ldexp(x, -exponent)


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
    return lax.select(clip & jnp.isfinite(t), (t * first) * second, t)
