"""Varying manual axes (`shard_map`): reading and setting them on values."""

from __future__ import annotations

from typing import Any

import jax
from jax import lax
from jax.extend import source_info_util

source_info_util.register_exclusion(__file__)


def varying_axes(aval: Any) -> frozenset:
    """The mesh axes a value varies over inside `shard_map` (empty outside)."""
    mat = getattr(aval, "mat", None) or getattr(aval, "manual_axis_type", None)
    if mat is None:
        return frozenset(getattr(aval, "vma", ()) or ())
    return frozenset(getattr(mat, "varying", ()) or ())


def make_varying(x: Any, axes: Any) -> Any:
    """`x`, marked as varying over `axes` inside `shard_map` (a no-op outside)."""
    missing = frozenset(axes) - varying_axes(jax.typeof(x))
    if not missing:
        return x
    return lax.pcast(x, tuple(sorted(missing)), to="varying")
