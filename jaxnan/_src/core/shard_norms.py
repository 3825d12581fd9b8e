"""Norms of a whole gradient whose leaves are sharded inside `shard_map` (FSDP).

Inside `shard_map` each device holds one block of a sharded leaf, so a norm
taken from the block is the block's, not the tensor's. Given the
`PartitionSpec` of each leaf (the `in_specs` the params were mapped with),
these functions give every device the norm of the whole tensor, and of the
whole tree, with the same overflow-safety and the same nonfinite flag as the
single-device functions of `tree` (`leaf_norms_and_flags`,
`norm_and_finite`).

Each device reduces its blocks to four numbers per leaf (the sum of squares,
that sum over the finite entries, the overflow-safe norm of the finite
entries, and the count of nonfinite entries) and one `lax.all_gather` per
distinct set of mesh axes collects them; every device then combines the same
gathered vector in the same order, so all devices hold bit-identical norms.
The overflow-safe parts are computed only when a block's plain sum is not
finite (a local scalar `lax.cond`, with no collective inside it). When the
sums are exact (small integers, powers of two), the result is bit for bit the
single-device one; otherwise the blocks' partial sums are added in another
order than one reduction over the whole tensor, and the norms differ by a few
ulps (as they do under sharded `jit`, where XLA partitions the reduction).
Under sharded `jit` none of this is needed: reductions there are global.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import source_info_util
from jax.sharding import PartitionSpec

from jaxnan._src.core import dtypes, tree

source_info_util.register_exclusion(__file__)


class GlobalNorms(NamedTuple):
    """Per-leaf norms of the whole (unsharded) tensors, equal on every device.

    Attributes:
        squares: per leaf, the plain sum of squares (+Inf or NaN when an entry
            is nonfinite or the squares overflow).
        norms: per leaf, the L2 norm of the finite entries, overflow-safe.
        finite: per leaf, a bool scalar: every entry finite.
        finite_squares: per leaf, the sum of squares of the finite entries.
    """

    squares: list[jax.Array]
    norms: list[jax.Array]
    finite: list[jax.Array]
    finite_squares: list[jax.Array]


def spec_axes(spec: Any) -> tuple[str, ...]:
    """The mesh axes a `PartitionSpec` splits a leaf over, sorted (None: none)."""
    if spec is None:
        return ()
    names: set[str] = set()
    for entry in spec:
        if entry is None:
            continue
        names.update((entry,) if isinstance(entry, str) else tuple(entry))
    return tuple(sorted(names))


def _is_spec(x: Any) -> bool:
    return x is None or isinstance(x, PartitionSpec)


def _is_axes(x: Any) -> bool:
    return isinstance(x, list)


def agreement_axes(axis_name: Any, axes: list[tuple]) -> Any:
    """`axis_name` joined with every mesh axis in `axes`, or None.

    What a flag that every device must agree on is reduced over.
    """
    names = [] if axis_name is None else [axis_name]
    names += sorted({n for a in axes for n in a} - set(names))
    if not names:
        return None
    return names[0] if len(names) == 1 else tuple(names)


def checked_leaf_axes(specs: Any, updates: Any, *, fn_name: str) -> list[tuple]:
    """The mesh axes of each checked (floating) leaf of `updates`.

    `specs` is a tree prefix of `updates` whose leaves are `PartitionSpec`
    (or None for a replicated subtree), as given to `shard_map`'s `in_specs`.

    Raises:
        ValueError: when `specs` is not a prefix of `updates`, or names a mesh
            axis that is not bound here (outside `shard_map`).
    """
    try:
        per_subtree = jax.tree_util.tree_map(
            lambda s, sub: [spec_axes(s)] * len(jax.tree_util.tree_leaves(sub)),
            specs,
            updates,
            is_leaf=_is_spec,
        )
    except (ValueError, TypeError) as e:
        raise ValueError(
            f"{fn_name}: shard_specs must be a tree prefix of the updates whose "
            "leaves are PartitionSpec (the in_specs the params are mapped "
            f"with), got {specs!r}: {e}"
        ) from None
    axes = [
        a
        for lst in jax.tree_util.tree_leaves(per_subtree, is_leaf=_is_axes)
        for a in lst
    ]
    leaves = jax.tree_util.tree_leaves(updates)
    for names in set(axes):
        for name in names:
            try:
                lax.axis_size(name)
            except NameError:
                raise ValueError(
                    f"{fn_name}: shard_specs names the mesh axis {name!r}, which "
                    "is not bound here. shard_specs is for updates sharded "
                    "inside shard_map; under sharded jit leave it out (the "
                    "norms there are already global)."
                ) from None
    return [a for a, x in zip(axes, leaves) if dtypes.is_checked_leaf(x)]


def _local_parts(leaves: list[jax.Array]) -> list[tuple[jax.Array, ...]]:
    """Per leaf, four numbers of this device's block, in the leaf's acc dtype.

    (sum of squares, sum of the finite squares, overflow-safe norm of the
    finite entries, count of nonfinite entries).
    """
    accs = [tree.acc_dtype([x]) for x in leaves]
    sqs = [tree.sum_of_squares(x).astype(a) for x, a in zip(leaves, accs)]
    ok = jnp.array(True)
    for q in sqs:
        ok = ok & jnp.isfinite(q)

    def fast():
        return [(q, jnp.sqrt(q), jnp.zeros((), a)) for q, a in zip(sqs, accs)]

    def slow():
        out = []
        for x, a in zip(leaves, accs):
            clean = jnp.where(jnp.isfinite(x), x, jnp.zeros_like(x))
            fsq = tree.sum_of_squares(clean).astype(a)
            norm, fin = tree.finite_norm_and_flag([x])
            out.append((fsq, norm.astype(a), jnp.where(fin, 0, 1).astype(a)))
        return out

    rest = lax.cond(ok, fast, slow)
    return [(q, *r) for q, r in zip(sqs, rest)]


def _combine(parts: jax.Array) -> tuple[jax.Array, ...]:
    """(squares, norm, finite, finite squares) of one leaf from its blocks.

    `parts` has one row ``[squares, finite squares, safe norm, bad]`` per
    block (shape [blocks, 4]).
    """
    sq = jnp.sum(parts[:, 0])
    fsq = jnp.sum(parts[:, 1])
    scale = jnp.max(parts[:, 2])
    safe = jnp.where(scale > 0, scale, 1)
    scaled = safe * jnp.sqrt(jnp.sum(jnp.square(parts[:, 2] / safe)))
    slow = jnp.where(jnp.isfinite(fsq), jnp.sqrt(fsq), scaled)
    fast = jnp.isfinite(sq)
    norm = jnp.where(fast, jnp.sqrt(sq), slow)
    finite = fast | (jnp.sum(parts[:, 3]) == 0)
    return sq, norm, finite, jnp.where(fast, sq, fsq)


def global_leaf_norms(leaves: list[jax.Array], axes: list[tuple]) -> GlobalNorms:
    """Each leaf's whole-tensor norm and flag, from this device's blocks.

    `axes[i]` names the mesh axes leaf `i` is split over (empty: the leaf is
    replicated and its block is the whole tensor). One `lax.all_gather` of a
    small vector (four numbers per leaf) per distinct set of axes.
    """
    acc = tree.acc_dtype(leaves) if leaves else jnp.float32
    local = _local_parts(leaves) if leaves else []
    rows: list[Any] = [None] * len(leaves)
    groups: dict[tuple, list[int]] = {}
    for i, a in enumerate(axes):
        groups.setdefault(a, []).append(i)
    for names, idx in groups.items():
        vec = jnp.stack([jnp.stack(local[i]).astype(acc) for i in idx])  # [k, 4]
        if names:
            gathered = lax.all_gather(vec, names if len(names) > 1 else names[0])
            gathered = gathered.reshape(-1, len(idx), 4)
        else:
            gathered = vec[None]
        for j, i in enumerate(idx):
            rows[i] = _combine(gathered[:, j, :])
    out = GlobalNorms([], [], [], [])
    for i, (sq, norm, finite, fsq) in enumerate(rows):
        a = tree.acc_dtype([leaves[i]])
        out.squares.append(sq.astype(a))
        out.norms.append(norm.astype(a))
        out.finite.append(finite)
        out.finite_squares.append(fsq.astype(a))
    return out


def global_norm(
    leaves: list[jax.Array], axes: list[tuple]
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(plain norm, overflow-safe norm, finite) of the whole tree.

    The plain norm is the square root of the summed squares (+Inf when they
    overflow, NaN or Inf with a nonfinite entry), what
    `nonfinite.norm_for_inner` gives without a leading clip; the safe norm
    and the flag are those of `tree.norm_and_finite`.
    """
    acc = tree.acc_dtype(leaves)
    if not leaves:
        zero = jnp.zeros((), acc)
        return zero, zero, jnp.array(True)
    g = global_leaf_norms(leaves, axes)
    sq = sum(q.astype(acc) for q in g.squares)
    fsq = sum(q.astype(acc) for q in g.finite_squares)
    norms = [n.astype(acc) for n in g.norms]
    scale = norms[0]
    for n in norms[1:]:
        scale = jnp.maximum(scale, n)
    safe = jnp.where(scale > 0, scale, 1)
    scaled = safe * jnp.sqrt(sum(jnp.square(n / safe) for n in norms))
    fast = jnp.isfinite(sq)
    slow = jnp.where(jnp.isfinite(fsq), jnp.sqrt(fsq), scaled)
    finite = g.finite[0]
    for f in g.finite[1:]:
        finite = finite & f
    return jnp.sqrt(sq), jnp.where(fast, jnp.sqrt(sq), slow), finite
