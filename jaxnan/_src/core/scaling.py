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


def scale_where(t: Any, clip: jax.Array, factor: jax.Array) -> Any:
    """`t * factor` where `clip`, else `t` bit for bit (a select, never 0*NaN).

    Non-floating leaves pass through.
    """
    if not is_checked_leaf(t):
        return t
    t = jnp.asarray(t)
    return lax.select(clip, t * factor.astype(t.dtype), t)
