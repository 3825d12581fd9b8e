"""Fused reductions over pytrees: finiteness flags, nonfinite counts, norms.

Finiteness is derived from counts, never from `max`/`min` (the CPU backend's
max can skip NaN) and never from `jnp.isfinite(x).all()` (which writes a
boolean array and reduces it in a second pass on CPU). Each leaf is read once
by one variadic `lax.reduce` that sums several int32 indicators at a time
(NaN, and Inf or +Inf and -Inf): XLA compiles it into one vectorized loop.
Measured on CPU (`benchmarks/pass_floor.py`), this pass costs about half of
what a single-operand reduction such as `sum(x * 0)` costs, because XLA routes
single-operand reductions to a slower library or two-stage path. Leaves
share reductions to save kernels (each costs compile time and a launch):
large leaves of one size are read by one loop, small ones are packed. Integer
and boolean leaves are skipped on purpose: they cannot hold a nonfinite value.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import source_info_util

from jaxnan._src import base

source_info_util.register_exclusion(__file__)


class NonfiniteCounts(NamedTuple):
    """How many elements of one array are NaN, +Inf and -Inf.

    Complex elements are counted once: as NaN when either part is NaN, else as
    +Inf (-Inf) when either part is +Inf (-Inf).

    Attributes:
        nan: int32, number of NaN elements.
        posinf: int32, number of +Inf elements.
        neginf: int32, number of -Inf elements.
    """

    nan: jax.Array
    posinf: jax.Array
    neginf: jax.Array


def _zero_counts() -> NonfiniteCounts:
    z = jnp.zeros((), jnp.int32)
    return NonfiniteCounts(z, z, z)


def checked_leaves(tree: Any) -> list[Any]:
    """The floating and complex leaves of `tree`, in flattening order."""
    return [x for x in jax.tree_util.tree_leaves(tree) if base.is_checked_leaf(x)]


def paths_and_leaves(tree: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """`(prefix + keystr(path), leaf)` for every leaf of `tree`."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [(prefix + jax.tree_util.keystr(p), x) for p, x in flat]


def _sum_indicators(
    masks: tuple[jax.Array, ...], axis: int | None = None
) -> tuple[jax.Array, ...]:
    """int32 number of True entries of each mask, in one variadic reduction.

    Over every axis, or over `axis` only. The masks have one shape and are
    read in the same loop. With two or more
    operands XLA's CPU backend emits a single vectorized loop fusion; a
    single-operand integer sum would materialize the mask first.
    """
    ints = tuple(m.astype(jnp.int32) for m in masks)
    zero = jnp.zeros((), jnp.int32)

    def add(a, b):
        return tuple(u + v for u, v in zip(a, b))

    ndim = ints[0].ndim
    dims = tuple(range(ndim)) if axis is None else (axis % ndim,)
    return tuple(lax.reduce(ints, (zero,) * len(ints), add, dims))


# Leaves of one size share one variadic reduction (one loop, one kernel), up
# to this many per reduction; a stack of identical layers is checked by a few
# kernels instead of one per leaf. A leaf is flattened first (a free bitcast),
# so a (512, 1024) and a (1024, 512) kernel share a loop.
_GROUP = 8
# Leaves of at most this many elements (biases, norm scales, the loss) are
# packed: concatenated (finiteness) or zero-padded and stacked (counts), so
# that all the small leaves of a model cost one or a few kernels together.
_SMALL = 1 << 12
# At most this many elements in one pack.
_PACK = 1 << 16


def _kind_masks(x: jax.Array, split_inf: bool) -> tuple[jax.Array, ...]:
    """Bool masks (NaN, +-Inf) or (NaN, +Inf, -Inf) of one array.

    Complex elements are NaN when either part is NaN, else +Inf (-Inf) when
    either part is +Inf (-Inf): each nonfinite element is in exactly one mask.
    """
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        re, im = jnp.real(x), jnp.imag(x)
        nan = jnp.isnan(re) | jnp.isnan(im)
        if not split_inf:
            return nan, ~nan & (jnp.isinf(re) | jnp.isinf(im))
        pos = ~nan & ((re == jnp.inf) | (im == jnp.inf))
        neg = ~nan & ~pos & ((re == -jnp.inf) | (im == -jnp.inf))
        return nan, pos, neg
    if not split_inf:
        return jnp.isnan(x), jnp.isinf(x)
    return jnp.isnan(x), x == jnp.inf, x == -jnp.inf


def _flat(x: Any) -> jax.Array:
    """`x` as a 1-D array (a bitcast in XLA's default row-major layout)."""
    return jnp.reshape(jnp.asarray(x), (-1,))


def _size(x: Any) -> int:
    return int(np.prod(jnp.shape(x), dtype=np.int64))


def _split_small(leaves: list) -> tuple[dict, dict]:
    """Indices of `leaves` by size (large leaves) and by dtype (small ones).

    Empty leaves are left out: they hold nothing to check.
    """
    large: dict[int, list[int]] = {}
    small: dict[Any, list[int]] = {}
    for i, x in enumerate(leaves):
        n = _size(x)
        if n == 0:
            continue
        if n > _SMALL:
            large.setdefault(n, []).append(i)
        else:
            small.setdefault(jnp.result_type(x), []).append(i)
    return large, small


def _chunks(idx: list[int], sizes: list[int], limit: int) -> list[list[int]]:
    """`idx` cut into consecutive runs whose `sizes` add up to at most `limit`."""
    out: list[list[int]] = []
    run: list[int] = []
    total = 0
    for i, n in zip(idx, sizes):
        if run and total + n > limit:
            out.append(run)
            run, total = [], 0
        run.append(i)
        total += n
    if run:
        out.append(run)
    return out


def _finite_groups(leaves: list) -> list[list[jax.Array]]:
    """1-D arrays holding every element of `leaves`, in groups of one length.

    Each group is read by one reduction: large leaves of one size together
    (at most `_GROUP`), small leaves of one dtype concatenated into packs.
    """
    large, small = _split_small(leaves)
    groups = [
        [_flat(leaves[i]) for i in idx[k : k + _GROUP]]
        for idx in large.values()
        for k in range(0, len(idx), _GROUP)
    ]
    for idx in small.values():
        for run in _chunks(idx, [_size(leaves[i]) for i in idx], _PACK):
            parts = [_flat(leaves[i]) for i in run]
            groups.append([jnp.concatenate(parts) if len(parts) > 1 else parts[0]])
    return groups


def _grouped_counts(leaves: list) -> list[NonfiniteCounts]:
    """Exact NaN, +Inf, -Inf counts of every floating leaf, in list order."""
    out: list[Any] = [_zero_counts() for _ in leaves]
    large, small = _split_small(leaves)
    for idx in large.values():
        for k in range(0, len(idx), _GROUP):
            group = idx[k : k + _GROUP]
            masks = [m for i in group for m in _kind_masks(_flat(leaves[i]), True)]
            sums = _sum_indicators(tuple(masks))
            for j, i in enumerate(group):
                out[i] = NonfiniteCounts(*sums[3 * j : 3 * j + 3])
    for idx in small.values():
        # Small leaves of one dtype and a similar size (padded with zeros to
        # the next power of two) are stacked into one (n, width) array whose
        # rows are counted by one reduction over the last axis.
        by_width: dict[int, list[int]] = {}
        for i in idx:
            width = 1 << max(_size(leaves[i]) - 1, 0).bit_length()
            by_width.setdefault(width, []).append(i)
        for width, same in by_width.items():
            for run in _chunks(same, [width] * len(same), _PACK):
                if len(run) == 1:
                    sums = _sum_indicators(_kind_masks(leaves[run[0]], True))
                    out[run[0]] = NonfiniteCounts(*sums)
                    continue
                rows = jnp.stack(
                    [
                        jnp.pad(_flat(leaves[i]), (0, width - _size(leaves[i])))
                        for i in run
                    ]
                )
                nan, pos, neg = _sum_indicators(_kind_masks(rows, True), axis=-1)
                for j, i in enumerate(run):
                    out[i] = NonfiniteCounts(nan[..., j], pos[..., j], neg[..., j])
    return out


def _grouped_finite(leaves: list) -> jax.Array:
    """Bool scalar: every element of every floating leaf is finite."""
    ok = jnp.array(True)
    for group in _finite_groups(leaves):
        # The masks of a group are or-ed elementwise (in the same loop), so
        # each reduction has two operands whatever the group size.
        nan, inf = _kind_masks(group[0], split_inf=False)
        for x in group[1:]:
            n, f = _kind_masks(x, split_inf=False)
            nan, inf = nan | n, inf | f
        n_nan, n_inf = _sum_indicators((nan, inf))
        ok = ok & (n_nan == 0) & (n_inf == 0)
    return ok


def leaf_nonfinite_count(x: jax.Array) -> jax.Array:
    """int32 number of NaN, +Inf and -Inf elements of one floating array."""
    n, i = _sum_indicators(_kind_masks(x, split_inf=False))
    return n + i


def all_finite(tree: Any) -> jax.Array:
    """Returns a bool scalar: True when no leaf of `tree` holds NaN or +-Inf.

    Safe under `jit`, `vmap`, `grad` and `lax.scan`, and it never talks to the
    host. Each floating leaf is read once, by one fused reduction that counts
    NaN and infinite elements (two int32 sums in one loop). Large leaves of
    the same size share that loop, up to 8 at a time; small leaves (at most
    4096 elements: biases, norm scales, a loss) are concatenated, so that all
    of them cost one kernel per dtype. Complex leaves are checked on both
    parts. Integer and boolean leaves are ignored
    on purpose: they cannot be nonfinite. A tree without floating leaves is
    finite.

    Args:
        tree: a pytree of arrays.

    Returns:
        A bool scalar array.

    Examples:
        >>> import jax.numpy as jnp, jaxnan
        >>> jaxnan.all_finite({"w": jnp.ones(3), "step": jnp.int32(4)})
        Array(True, dtype=bool)
        >>> jaxnan.all_finite({"w": jnp.array([1.0, jnp.inf])})
        Array(False, dtype=bool)
    """
    return _grouped_finite(checked_leaves(tree))


def nonfinite_counts(tree: Any) -> Any:
    """Counts NaN, +Inf and -Inf per leaf.

    Safe under `jit`, `vmap`, `grad` and `lax.scan`, with no host sync.
    Integer and boolean leaves are ignored on purpose and get zero counts.
    Complex elements are counted once (NaN when either part is NaN).

    Args:
        tree: a pytree of arrays.

    Returns:
        A pytree of the same structure whose leaves are `NonfiniteCounts`
        (three int32 scalars).

    Examples:
        >>> import jax.numpy as jnp, jaxnan
        >>> c = jaxnan.nonfinite_counts({"w": jnp.array([jnp.nan, jnp.inf, 1.0])})
        >>> int(c["w"].nan), int(c["w"].posinf), int(c["w"].neginf)
        (1, 1, 0)
    """
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return jax.tree_util.tree_unflatten(treedef, counts_list(leaves))


def counts_list(leaves: list) -> list[NonfiniteCounts]:
    """Counts of every leaf (zeros for the unchecked ones).

    Each leaf is read once; leaves of one size share a reduction, small
    leaves are packed (zero-padded and stacked, one reduction per pack).
    """
    idx = [i for i, x in enumerate(leaves) if base.is_checked_leaf(x)]
    counts = _grouped_counts([leaves[i] for i in idx])
    out = [_zero_counts() for _ in leaves]
    for i, c in zip(idx, counts):
        out[i] = c
    return out


def counts_matrix(tree: Any) -> jax.Array:
    """int32[num_leaves, 3]: NaN, +Inf, -Inf counts of every leaf of `tree`.

    Non-floating leaves have a row of zeros. Used by `Report`.
    """
    counts = [c for row in counts_list(jax.tree_util.tree_leaves(tree)) for c in row]
    if not counts:
        return jnp.zeros((0, 3), jnp.int32)
    # One stack of all the scalars: one small kernel, not one per leaf.
    return jnp.stack(counts).reshape(-1, 3)


def sum_of_squares(x: jax.Array) -> jax.Array:
    """Sum of |x|^2 accumulated in at least float32, in one pass."""
    x = jnp.asarray(x)
    acc = jnp.promote_types(jnp.real(x).dtype, jnp.float32)
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        re, im = jnp.real(x).astype(acc), jnp.imag(x).astype(acc)
        return jnp.sum(re * re + im * im)
    x = x.astype(acc)
    return jnp.sum(x * x)


def finite_global_norm(leaves: list[jax.Array]) -> jax.Array:
    """L2 norm of the finite elements of `leaves`, robust to overflow.

    Nonfinite elements count as 0. When the plain sum of squares of the
    finite elements is finite, the result is exactly its square root (so it
    equals the one-pass norm of the same tree with those elements zeroed);
    otherwise the norm is computed relative to the largest finite magnitude,
    so finite values whose squares overflow still give a finite norm when the
    norm itself is representable. This is the slow path; callers reach it
    only when the fast one-pass norm is not finite.
    """
    if not leaves:
        return jnp.zeros((), jnp.float32)
    clean = [jnp.where(jnp.isfinite(x), x, jnp.zeros_like(x)) for x in leaves]
    plain = sum(sum_of_squares(c) for c in clean)
    mags = [jnp.abs(c).astype(jnp.float32) for c in clean]
    scale = jnp.max(jnp.stack([jnp.max(m) if m.size else jnp.float32(0) for m in mags]))
    safe = jnp.where(scale > 0, scale, 1.0)
    scaled = safe * jnp.sqrt(sum(jnp.sum(jnp.square(m / safe)) for m in mags))
    return jnp.where(jnp.isfinite(plain), jnp.sqrt(plain), scaled).astype(jnp.float32)


def norm_and_finite(
    leaves: list[jax.Array], sq: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """(float32 L2 norm of the finite entries, whether every entry is finite).

    Fast path: one fused sum of squares per leaf (or `sq`, when the caller has
    it already); its finiteness doubles as the nonfinite test. The
    overflow-safe slow path (`finite_global_norm` and an exact `all_finite`)
    runs in a scalar `lax.cond` only when that sum is not finite.
    """
    if not leaves:
        return jnp.zeros((), jnp.float32), jnp.array(True)
    if sq is None:
        sq = sum(sum_of_squares(x) for x in leaves)
    return jax.lax.cond(
        jnp.isfinite(sq),
        lambda: (jnp.sqrt(sq).astype(jnp.float32), jnp.array(True)),
        lambda: (finite_global_norm(leaves), all_finite(leaves)),
    )
