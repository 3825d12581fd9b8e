"""What a value's type says of its sharding.

Varying manual axes (`shard_map`), and dims sharded over a mesh of explicit
axes (`jax.set_mesh`).
"""

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


def sharded_in_type(x: Any) -> bool:
    """Whether `x`'s type names a sharded dim (a mesh of explicit axes).

    On such a mesh (`jax.set_mesh`) jax refuses to slice or index a sharded
    dim to a size its axes do not divide; elsewhere the type's spec is empty.
    """
    spec = getattr(getattr(jax.typeof(x), "sharding", None), "spec", None)
    return bool(spec) and any(p is not None for p in spec)
