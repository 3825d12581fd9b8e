"""Fused reductions over pytrees: finiteness flags, nonfinite counts, norms.

Finiteness is derived from counts, never from `max`/`min` (the CPU backend's
max can skip NaN) and never from `jnp.isfinite(x).all()` (which writes a
boolean array and reduces it in a second pass on CPU). Each leaf is read once
by one variadic `lax.reduce` that sums several int32 indicators at a time
(NaN, and Inf or +Inf and -Inf): XLA compiles it into one vectorized loop.
Measured on CPU (`benchmarks/studies/pass_floor.py`), this pass costs about half of
what a single-operand reduction such as `sum(x * 0)` costs, because XLA routes
single-operand reductions to a slower library or two-stage path. Leaves of
one shape share a reduction, and reporting branches pack small leaves, to
save kernels (each costs compile time and a launch). Integer and boolean
leaves are skipped on purpose: they cannot hold a nonfinite value.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import source_info_util

from jaxnan._src.core import dtypes

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
    return [x for x in jax.tree_util.tree_leaves(tree) if dtypes.is_checked_leaf(x)]


def paths_and_leaves(tree: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """`(prefix + keystr(path), leaf)` for every leaf of `tree`."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [(prefix + jax.tree_util.keystr(p), x) for p, x in flat]


def _sum_indicators(
    masks: tuple[jax.Array, ...], axis: int | None = None
) -> tuple[jax.Array, ...]:
    """int32 number of True entries of each mask, in one variadic reduction.

    Over every axis, or over `axis` only. The masks have one shape and are
    read in the same loop. With two or more operands XLA's CPU backend emits
    a single vectorized loop fusion; a single-operand integer sum would
    materialize the mask first.
    """
    return _summed(tuple(m.astype(jnp.int32) for m in masks), axis)


def _summed(operands: tuple[jax.Array, ...], axis: int | None = None) -> tuple:
    """The sum of each operand (one shape, any dtypes), one variadic reduction."""

    def add(a, b):
        return tuple(u + v for u, v in zip(a, b))

    ndim = operands[0].ndim
    dims = tuple(range(ndim)) if axis is None else (axis % ndim,)
    zeros = tuple(jnp.zeros((), x.dtype) for x in operands)
    return tuple(lax.reduce(operands, zeros, add, dims))


def _abs_squared(x: jax.Array, acc: Any) -> jax.Array:
    """|x|^2 elementwise in dtype `acc` (complex: re^2 + im^2)."""
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        re, im = jnp.real(x).astype(acc), jnp.imag(x).astype(acc)
        return re * re + im * im
    x = x.astype(acc)
    return x * x


# Leaves of one shape share one variadic reduction (one loop, one kernel), up
# to this many per reduction; a stack of identical layers is checked by a few
# kernels instead of one per leaf. Leaves of different shapes are not merged:
# a shared loop waits for its last operand, while separate ones overlap with
# the rest of the backward pass (measured on the MLP step: merging the two
# large kernels, or concatenating the biases, cost 3-4% more step time).
_GROUP = 8
# In reporting branches, which never run on a healthy step but are compiled,
# leaves of at most this many elements (biases, norm scales, a loss) are
# zero-padded to a power-of-two width and stacked, so that all the small
# leaves of a model are counted by a few kernels: less compile time.
_SMALL = 1 << 12
# At most this many elements in one stack.
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


def _shape_groups(leaves: list, idx: list[int], size: int = _GROUP) -> list[list[int]]:
    """`idx` grouped by the shape of their leaf, at most `size` per group."""
    by_shape: dict[tuple, list[int]] = {}
    for i in idx:
        by_shape.setdefault(tuple(jnp.shape(leaves[i])), []).append(i)
    return [
        run[k : k + size] for run in by_shape.values() for k in range(0, len(run), size)
    ]


def _small_packs(leaves: list, by_width: bool) -> tuple[list[int], list[list[int]]]:
    """(indices left to `_shape_groups`, packs of small leaves to merge).

    A pack holds small leaves of one dtype, and with `by_width` of sizes that
    round up to the same power of two (to be zero-padded to it and stacked),
    at most `_PACK` elements in all; a leaf alone in its pack stays out.
    """
    rest: list[int] = []
    buckets: dict[tuple, list[int]] = {}
    for i, x in enumerate(leaves):
        n = _size(x)
        if 0 < n <= _SMALL:
            width = 1 << (n - 1).bit_length() if by_width else _SMALL
            buckets.setdefault((jnp.result_type(x), width), []).append(i)
        else:
            rest.append(i)
    packs = []
    for (_, width), idx in buckets.items():
        step = _PACK // width
        for k in range(0, len(idx), step):
            run = idx[k : k + step]
            if len(run) > 1:
                packs.append(run)
            else:
                rest += run
    return sorted(rest), packs


def _grouped_counts(leaves: list, pack: bool = False) -> list[NonfiniteCounts]:
    """Exact NaN, +Inf, -Inf counts of every floating leaf, in list order.

    With `pack`, small leaves are zero-padded and stacked into (n, width)
    arrays whose rows are counted by one reduction over the last axis (the
    padding zeros count nothing).
    """
    out: list[Any] = [_zero_counts() for _ in leaves]
    everything = list(range(len(leaves)))
    rest, packs = _small_packs(leaves, by_width=True) if pack else (everything, [])
    for group in _shape_groups(leaves, rest):
        masks = [m for i in group for m in _kind_masks(leaves[i], split_inf=True)]
        sums = _sum_indicators(tuple(masks))
        for j, i in enumerate(group):
            out[i] = NonfiniteCounts(*sums[3 * j : 3 * j + 3])
    for run in packs:
        for i, counts in zip(run, _pack_counts([leaves[i] for i in run])):
            out[i] = counts
    return out


def _pack_counts(small: list) -> list[NonfiniteCounts]:
    """Exact counts of small leaves, counted as the rows of one array.

    The leaves are zero-padded to a power-of-two width and stacked into an
    (n, width) array; one reduction over its last axis counts every row.
    """
    width = max(_size(x) for x in small)
    width = 1 << (width - 1).bit_length()
    rows = jnp.stack([jnp.pad(_flat(x), (0, width - _size(x))) for x in small])
    nan, pos, neg = _sum_indicators(_kind_masks(rows, split_inf=True), axis=-1)
    return [
        NonfiniteCounts(nan[..., j], pos[..., j], neg[..., j])
        for j in range(len(small))
    ]


def _grouped_finite(leaves: list, pack: bool = False) -> jax.Array:
    """Bool scalar: every element of every floating leaf is finite.

    With `pack`, small leaves of one dtype are concatenated and read by one
    reduction (for trees whose leaves are all available at once, such as
    function arguments: a pack waits for its last leaf).
    """
    everything = list(range(len(leaves)))
    rest, packs = _small_packs(leaves, by_width=False) if pack else (everything, [])
    groups = [[jnp.concatenate([_flat(leaves[i]) for i in run])] for run in packs]
    groups += [[leaves[i] for i in g] for g in _shape_groups(leaves, rest)]
    ok = jnp.array(True)
    for group in groups:
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
    NaN and infinite elements (two int32 sums in one loop; leaves of the same
    shape share that loop, up to 8 at a time). Complex leaves are checked on
    both parts. Integer and boolean leaves are ignored on purpose: they
    cannot be nonfinite. A tree without floating leaves is finite.

    Args:
        tree: a pytree of arrays.

    Returns:
        A bool scalar array.

    Raises:
        Nothing: leaves that cannot be nonfinite (integers,
        booleans, and any non-array Python object, a str included) are
        ignored, as above, so it accepts any pytree.

    Examples:
        >>> import jax.numpy as jnp, jaxnan
        >>> jaxnan.all_finite({"w": jnp.ones(3), "step": jnp.int32(4)})
        Array(True, dtype=bool)
        >>> jaxnan.all_finite({"w": jnp.array([1.0, jnp.inf])})
        Array(False, dtype=bool)
    """
    return _grouped_finite(checked_leaves(tree))


def all_finite_packed(tree: Any) -> jax.Array:
    """`all_finite`, with the small leaves concatenated into one reduction.

    For trees whose leaves are all ready at once (function arguments): fewer
    kernels. Gradients are better checked leaf by leaf (`all_finite`), as
    each check then overlaps with the rest of the backward pass.
    """
    return _grouped_finite(checked_leaves(tree), pack=True)


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

    Raises:
        Nothing: leaves that cannot be nonfinite (integers,
        booleans, and any non-array Python object) get zero counts, so it
        accepts any pytree.

    Examples:
        >>> import jax.numpy as jnp, jaxnan
        >>> c = jaxnan.nonfinite_counts({"w": jnp.array([jnp.nan, jnp.inf, 1.0])})
        >>> int(c["w"].nan), int(c["w"].posinf), int(c["w"].neginf)
        (1, 1, 0)
    """
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return jax.tree_util.tree_unflatten(treedef, counts_list(leaves))


def counts_list(leaves: list, *, pack: bool = False) -> list[NonfiniteCounts]:
    """Counts of every leaf (zeros for the unchecked ones).

    Each leaf is read once; leaves of one shape share a reduction. With
    `pack` (for reporting branches, compiled but run only when something is
    nonfinite), small leaves are also zero-padded and stacked, one reduction
    per stack: fewer kernels to compile.
    """
    idx = [i for i, x in enumerate(leaves) if dtypes.is_checked_leaf(x)]
    counts = _grouped_counts([leaves[i] for i in idx], pack)
    out = [_zero_counts() for _ in leaves]
    for i, c in zip(idx, counts):
        out[i] = c
    return out


def counts_matrix(tree: Any, *, pack: bool = False) -> jax.Array:
    """int32[num_leaves, 3]: NaN, +Inf, -Inf counts of every leaf of `tree`.

    Non-floating leaves have a row of zeros. Used by `Report`. `pack`: as in
    `counts_list`.
    """
    leaves = jax.tree_util.tree_leaves(tree)
    counts = [c for row in counts_list(leaves, pack=pack) for c in row]
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


def squares_and_finite(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum of |x|^2 in at least float32, whether every entry is finite).

    One variadic reduction (the squares, and an OR of "not finite"): one
    loop reads `x` once. A single-operand sum of squares is lowered by XLA's
    CPU backend to a kernel that first writes ``x * x`` out in full (one
    extra buffer the size of `x`: +0.50x the parameter bytes of temporary
    memory on the guarded MLP step). Measured on that step, side by side:
    this form costs the same as `skip_nonfinite` alone, where a second float
    operand (``sum(x * 0) == 0``) was 1.2x slower.
    """
    x = jnp.asarray(x)
    acc = jnp.promote_types(jnp.real(x).dtype, jnp.float32)
    sq, bad = _abs_squared(x, acc), ~jnp.isfinite(x)
    zero = jnp.zeros((), acc)

    def add(a, b):
        return a[0] + b[0], a[1] | b[1]

    dims = tuple(range(jnp.ndim(x)))
    total, any_bad = lax.reduce((sq, bad), (zero, jnp.array(False)), add, dims)
    return total, ~any_bad


def _scaled_sum_of_squares(x: jax.Array) -> tuple[jax.Array, ...]:
    """(scale, ssq, bad) of one array, in one variadic reduction.

    `scale` is the largest finite magnitude, ``scale * sqrt(ssq)`` the L2 norm
    of the finite elements (nonfinite ones count as 0), computed without
    squaring anything larger than 1 (so it cannot overflow when the norm is
    representable), and `bad` the int32 number of nonfinite elements. The
    pairs (scale, ssq) combine as in LAPACK's scaled sum of squares: the
    larger scale wins and the other sum is rescaled by the squared ratio.
    """
    x = jnp.asarray(x)
    acc = jnp.promote_types(jnp.real(x).dtype, jnp.float32)
    fin = jnp.isfinite(x)
    mag = jnp.where(fin, jnp.abs(x), 0).astype(acc)
    ones = (mag > 0).astype(acc)

    def combine(a, b):
        (s1, q1, c1), (s2, q2, c2) = a, b
        s = jnp.maximum(s1, s2)
        d = jnp.where(s > 0, s, 1)
        r1, r2 = s1 / d, s2 / d
        return s, q1 * (r1 * r1) + q2 * (r2 * r2), c1 + c2

    zero = jnp.zeros((), acc)
    return tuple(
        lax.reduce(
            (mag, ones, (~fin).astype(jnp.int32)),
            (zero, zero, jnp.zeros((), jnp.int32)),
            combine,
            tuple(range(x.ndim)),
        )
    )


def acc_dtype(leaves: list[Any]) -> Any:
    """The dtype norms of `leaves` are accumulated and returned in.

    float32, or wider when a leaf is wider (float64, complex128): a float64
    norm of 1e200 must not pass through float32.
    """
    dtype = np.dtype(np.float32)
    for x in leaves:
        real = jnp.real(jnp.zeros((), dtypes.leaf_dtype(x))).dtype
        dtype = jnp.promote_types(dtype, real)
    return np.dtype(dtype)


@jax.custom_jvp
def finite_norm_and_flag(leaves: list[jax.Array]) -> tuple[jax.Array, jax.Array]:
    """(L2 norm of the finite elements, whether every element is finite).

    Robust to overflow; the slow path of `norm_and_finite`. Nonfinite
    elements count as 0. When the plain sum of squares of the finite elements
    is finite, the norm is exactly its square root (so it equals the one-pass
    norm of the same tree with those elements zeroed); otherwise it is the
    scaled sum of squares, whose terms are all at most 1. Two reductions per
    leaf (the plain sum, and one variadic reduction for the scaled sum, the
    largest magnitude and the nonfinite count): this branch is compiled into
    every step that clips, though it runs only when the fast sum is not
    finite, so it is kept small. The norm has dtype `acc_dtype(leaves)`.

    Differentiable (`jax.grad`, `jax.jvp`): the derivative of the norm is
    that of the L2 norm of the finite elements (a variadic `lax.reduce` has
    no derivative rule of its own).
    """
    acc = acc_dtype(leaves)
    if not leaves:
        return jnp.zeros((), acc), jnp.array(True)
    plain = sum(
        sum_of_squares(jnp.where(jnp.isfinite(x), x, jnp.zeros_like(x))) for x in leaves
    ).astype(acc)
    parts = [_scaled_sum_of_squares(x) for x in leaves]
    scale = parts[0][0].astype(acc)
    for s, _, _ in parts[1:]:
        scale = jnp.maximum(scale, s.astype(acc))
    safe = jnp.where(scale > 0, scale, 1)
    ssq = sum((q.astype(acc) * jnp.square(s.astype(acc) / safe)) for s, q, _ in parts)
    scaled = safe * jnp.sqrt(ssq)
    finite = jnp.array(True)
    for _, _, bad in parts:
        finite = finite & (bad == 0)
    norm = jnp.where(jnp.isfinite(plain), jnp.sqrt(plain), scaled)
    return norm.astype(acc), finite


@finite_norm_and_flag.defjvp
def _finite_norm_and_flag_jvp(primals, tangents):
    (leaves,), (dots,) = primals, tangents
    norm, finite = finite_norm_and_flag(leaves)
    safe = jnp.where(norm > 0, norm, 1)
    dot = jnp.zeros((), norm.dtype)
    for x, t in zip(leaves, dots):
        x = jnp.asarray(x)
        ok = jnp.isfinite(x)
        # d||x|| = <x, dx> / ||x||, over the finite entries only.
        xs = jnp.where(ok, x, jnp.zeros_like(x)) / safe.astype(x.dtype)
        t = jnp.where(ok, jnp.asarray(t), jnp.zeros_like(x))
        dot = dot + jnp.sum(jnp.real(jnp.conj(xs) * t)).astype(norm.dtype)
    dot = jnp.where(norm > 0, dot, jnp.zeros_like(dot))
    return (norm, finite), (dot, np.zeros((), jax.dtypes.float0))


def norm_and_finite(leaves: list[jax.Array]) -> tuple[jax.Array, jax.Array]:
    """(L2 norm of the finite entries, whether every entry is finite).

    The norm has dtype `acc_dtype(leaves)` (float32, or float64 for float64
    leaves). Fast path: one fused sum of squares per leaf, exactly the sum
    `optax.tree.norm` takes for float32 and float64 leaves; its finiteness
    doubles as the nonfinite test. The overflow-safe slow path
    (`finite_norm_and_flag`: the norm of the finite entries and an exact
    flag) runs in a scalar `lax.cond` only when that sum is not finite.
    Differentiable, as `optax.tree.norm` is.
    """
    acc = acc_dtype(leaves)
    if not leaves:
        return jnp.zeros((), acc), jnp.array(True)
    sq = sum(sum_of_squares(x) for x in leaves)
    return jax.lax.cond(
        jnp.isfinite(sq),
        lambda: (jnp.sqrt(sq).astype(acc), jnp.array(True)),
        lambda: finite_norm_and_flag(leaves),
    )


def leaf_norms_and_flags(
    leaves: list[jax.Array],
) -> tuple[list[jax.Array], list[jax.Array]]:
    """Per leaf: (L2 norm of its finite entries, whether it is all finite).

    Overflow-safe (a leaf such as ``[1e20, 0]`` in float32 has norm 1e20, not
    Inf): one fused sum of squares per leaf, and the slow path of
    `finite_norm_and_flag`, leaf by leaf, inside one scalar `lax.cond` that
    runs only when some sum is not finite. Each norm has the leaf's
    `acc_dtype`.
    """
    if not leaves:
        return [], []
    accs = [acc_dtype([x]) for x in leaves]
    sqs = [sum_of_squares(x).astype(a) for x, a in zip(leaves, accs)]
    total_ok = jnp.array(True)
    for q in sqs:
        total_ok = total_ok & jnp.isfinite(q)

    def fast():
        return [jnp.sqrt(q) for q in sqs], [jnp.array(True) for _ in sqs]

    def slow():
        pairs = [finite_norm_and_flag([x]) for x in leaves]
        return [n for n, _ in pairs], [f for _, f in pairs]

    return jax.lax.cond(total_ok, fast, slow)


def finite_flags(sets: list[list[Any]]) -> list[jax.Array]:
    """For each list of leaves, a bool scalar: all its floating leaves finite.

    Leaves of one shape, whichever list they belong to, are read in one
    variadic reduction that keeps one count per list: a guard's incoming
    check (the gradients) and outgoing check (what the optimizer made of
    them, which XLA computes inside the same loop from the same inputs) cost
    one loop per shape, not one per list.
    """
    return finite_flags_and_squares(sets, None)[0]


def finite_flags_and_squares(
    sets: list[list[Any]], squares_of: int | None, *, stacked: bool = False
) -> tuple[list[jax.Array], jax.Array]:
    """`finite_flags`, and the float32 sum of squares of ``sets[squares_of]``.

    The squares join the same variadic reductions as the counts (one float32
    operand beside the int32 ones), so the norm of the gradients costs no
    extra pass over them: on the guarded MLP step a separate
    `squares_and_finite` per gradient read each of them once more (+5% of
    the bytes the step accesses). A nonfinite entry makes the sum nonfinite.
    With `squares_of=None` the sum is 0.

    `stacked=True` (leaves split over devices under sharded `jit`): each
    group's operands are summed two at a time by single-operand reductions
    (`split_sums`), which XLA's SPMD partitioner turns into one all-reduce
    of a few scalars (it splits a variadic reduction into an all-gather of
    the per-device partials per operand). On one device that form reads the
    inputs once per pair of operands (`benchmarks/RESULTS.md` has the
    bytes), hence only for the leaves that are split (`split_leaves`).
    """
    pairs = [
        (k, x) for k, xs in enumerate(sets) for x in xs if dtypes.is_checked_leaf(x)
    ]
    flat = [x for _, x in pairs]
    ok = [jnp.array(True) for _ in sets]
    total = jnp.zeros((), jnp.float32)
    for group in _shape_groups(flat, list(range(len(flat))), size=2 * _GROUP):
        leaves_of = _by_owner([pairs[i] for i in group])
        squared = leaves_of.get(squares_of, []) if squares_of is not None else []
        flags, sq = _group_flags(list(leaves_of.values()), squared, stacked)
        for k, flag in zip(leaves_of, flags):
            ok[k] = ok[k] & flag
        total = total + sq
    return ok, total


def _by_owner(pairs: list[tuple[int, Any]]) -> dict[int, list]:
    """``(owner, leaf)`` pairs as owner -> its leaves, owners in order."""
    leaves_of: dict[int, list] = {}
    for k, x in pairs:
        leaves_of.setdefault(k, []).append(x)
    return dict(sorted(leaves_of.items()))


def _or_kind_masks(leaves: list) -> tuple[jax.Array, jax.Array]:
    """The NaN masks and the Inf masks of leaves of one shape, or-ed."""
    nan, inf = _kind_masks(leaves[0], split_inf=False)
    for x in leaves[1:]:
        n, f = _kind_masks(x, split_inf=False)
        nan, inf = nan | n, inf | f
    return nan, inf


def _group_flags(
    leaves_of: list[list], squared: list = (), stacked: bool = False
) -> tuple[list, jax.Array]:
    """Per owner, whether all its leaves (one shape for all) are finite.

    One variadic reduction: with one owner its NaN and Inf masks are two
    operands (XLA's fast path), else each owner's or-ed mask is one. Also
    returns the float32 sum of squares of the `squared` leaves, one more
    operand of the same reduction (0 when there are none).
    """
    if len(leaves_of) == 1:
        masks = _or_kind_masks(leaves_of[0])
    else:
        masks = []
        for leaves in leaves_of:
            nan, inf = _or_kind_masks(leaves)
            masks.append(nan | inf)
    if stacked:
        counts, sq = _stacked_sums(tuple(masks), squared)
    elif squared:
        counts, sq = _sum_indicators_and_squares(tuple(masks), squared)
    else:
        counts, sq = _sum_indicators(tuple(masks)), jnp.zeros((), jnp.float32)
    if len(leaves_of) == 1:
        return [(counts[0] == 0) & (counts[1] == 0)], sq
    return [n == 0 for n in counts], sq


def _sum_indicators_and_squares(
    masks: tuple[jax.Array, ...], leaves: list
) -> tuple[tuple[jax.Array, ...], jax.Array]:
    """`_sum_indicators` of `masks` and the float32 sum of |x|^2 of `leaves`.

    One variadic reduction; the leaves have the masks' shape.
    """
    sq = functools.reduce(
        jnp.add, [_abs_squared(jnp.asarray(x), jnp.float32) for x in leaves]
    )
    *counts, total = _summed((*(m.astype(jnp.int32) for m in masks), sq))
    return tuple(counts), total


def _stacked_sums(
    masks: tuple[jax.Array, ...], leaves: list
) -> tuple[tuple[jax.Array, ...], jax.Array]:
    """`_sum_indicators_and_squares` as single-operand reductions (`split_sums`).

    A count is only compared with 0, which a float32 sum of 0s and 1s gets
    right whatever its size.
    """
    rows = [m.astype(jnp.float32) for m in masks]
    if leaves:
        rows.append(
            functools.reduce(
                jnp.add, [_abs_squared(jnp.asarray(x), jnp.float32) for x in leaves]
            )
        )
    sums = split_sums(rows)
    sq = sums[len(masks)] if leaves else jnp.zeros((), jnp.float32)
    return tuple(sums[: len(masks)]), sq


def split_sums(rows: list[jax.Array]) -> list[jax.Array]:
    """The float32 sum of each of `rows` (one shape): for leaves split over devices.

    Summed two at a time as the real and imaginary parts of a complex64
    array (the sum of a complex is the float32 sum of each part), each pair
    by one single-operand reduction, which XLA fuses with the arithmetic
    that makes it (nothing written out) and its SPMD partitioner makes one
    all-reduce. Complex64 because XLA's all-reduce combiner merges only
    all-reduces of one element type: in float32 the checks' sums were merged
    with the step's own gradient all-reduces, whose group the combiner
    closes at the first one that depends on another (a check depends on its
    gradient's all-reduce), and the step's one tuple all-reduce came out in
    three. As complex64 the checks' sums, which do not depend on one another,
    make one all-reduce of their own.
    """
    out = []
    for k in range(0, len(rows), 2):
        re = jnp.asarray(rows[k], jnp.float32)
        im = (
            jnp.asarray(rows[k + 1], jnp.float32)
            if k + 1 < len(rows)
            else jnp.zeros_like(re)
        )
        total = jnp.sum(lax.complex(re, im))
        out += [jnp.real(total), jnp.imag(total)]
    return out[: len(rows)]
