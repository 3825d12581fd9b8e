"""Typed vocabulary and argument checks shared by the data-hygiene functions."""

from __future__ import annotations

import enum
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend import source_info_util

source_info_util.register_exclusion(__file__)


class Strategy(str, enum.Enum):
    """How `jaxnan.impute` fills a nonfinite entry.

    Attributes:
        ZERO: 0 in the leaf's dtype.
        MEAN: the mean of the finite entries of the feature.
        MEDIAN: the median of the finite entries of the feature.
        CONSTANT: the value given as ``fill``.
    """

    ZERO = "zero"
    MEAN = "mean"
    MEDIAN = "median"
    CONSTANT = "constant"


def strategy_of(value: Any, *, fn_name: str) -> Strategy:
    """`value` as a `Strategy`, or a ValueError naming the valid spellings."""
    if isinstance(value, Strategy):
        return value
    try:
        return Strategy(value)
    except ValueError:
        valid = ", ".join(repr(s.value) for s in Strategy)
        raise ValueError(
            f"jaxnan: {fn_name} got strategy={value!r}; use one of {valid} "
            "(or jaxnan.Strategy.MEAN etc.)."
        ) from None


def is_float_leaf(x: Any) -> bool:
    """True for real floating arrays (integer, bool and complex are left alone)."""
    dtype = getattr(x, "dtype", None)
    return dtype is not None and bool(jnp.issubdtype(dtype, jnp.floating))


def _none_leaf(x: Any) -> bool:
    return x is None


def float_paths(
    batch: Any, *, fn_name: str, argname: str = "batch"
) -> tuple[list[Any], Any, list[int], list[str]]:
    """(leaves, treedef, indices of float leaves, their key paths).

    Raises:
        ValueError: when `batch` has no real floating leaf.
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(batch)
    leaves = [x for _, x in flat]
    idx = [i for i, x in enumerate(leaves) if is_float_leaf(x)]
    if not idx:
        kinds = sorted(
            {type(x).__name__ + str(getattr(x, "dtype", "")) for x in leaves}
        )
        raise ValueError(
            f"jaxnan: {fn_name} found no floating-point leaf in {argname} "
            f"(leaves: {kinds or 'none'}). Integer and boolean leaves are never "
            "changed; pass the float features (e.g. batch['x'])."
        )
    paths = [jax.tree_util.keystr(flat[i][0]) or "<root>" for i in idx]
    return leaves, treedef, idx, paths


def norm_axis(x: Any, axis: int, path: str, *, fn_name: str) -> int:
    """`axis` made non-negative for leaf `x`, or a ValueError naming the leaf."""
    if not isinstance(axis, int) or isinstance(axis, bool):
        raise TypeError(
            f"jaxnan: {fn_name} got axis={axis!r}; pass an int, the example axis."
        )
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(
            f"jaxnan: {fn_name} got axis={axis}, out of range for leaf {path} of "
            f"shape {tuple(x.shape)} (ndim {x.ndim}). Pass the example axis of "
            "every float leaf (axis=0 for [batch, features])."
        )
    return axis % x.ndim


def side_tree(stats: Any, treedef: Any, n: int, argname: str, *, fn_name: str):
    """Leaves of a tree matching the batch, with None for non-float leaves."""
    leaves, got = jax.tree_util.tree_flatten(stats, is_leaf=_none_leaf)
    same = len(leaves) == n and jax.tree_util.tree_structure(
        jax.tree_util.tree_unflatten(got, [0] * len(leaves))
    ) == jax.tree_util.tree_structure(jax.tree_util.tree_unflatten(treedef, [0] * n))
    if not same:
        raise ValueError(
            f"jaxnan: {fn_name} got {argname} of another structure than the "
            f"batch ({got} vs {treedef}): its values would be applied to other "
            "leaves. Pass the statistics fitted on a batch of the same "
            "structure."
        )
    return leaves


def feature_axes(
    batch: Any, axis: int, *, fn_name: str
) -> tuple[list[Any], Any, dict[int, int]]:
    """(leaves, treedef, float leaf index -> its example axis, non-negative).

    Raises:
        ValueError: when `batch` has no real floating leaf, or `axis` is out
            of range for one (naming the leaf).
        TypeError: when `axis` is not an int.
    """
    leaves, treedef, idx, paths = float_paths(batch, fn_name=fn_name)
    axes = {
        i: norm_axis(jnp.asarray(leaves[i]), axis, p, fn_name=fn_name)
        for i, p in zip(idx, paths)
    }
    return leaves, treedef, axes


def frozen_features(
    tree: Any,
    leaves: list[Any],
    treedef: Any,
    axes: dict[int, int],
    argname: str,
    *,
    fn_name: str,
) -> list[Any]:
    """The leaves of fitted per-feature values (``stats=``, ``bounds=``).

    Checked against the batch (`leaves`, `treedef` and `axes` from
    `feature_axes`): one leaf per batch leaf, and at each float leaf an
    array of its feature shape (the leaf's shape without its axis).

    Raises:
        ValueError: for another structure or another feature shape.
    """
    frozen = side_tree(tree, treedef, len(leaves), argname, fn_name=fn_name)
    for i, a in axes.items():
        shape = jnp.shape(leaves[i])
        features = shape[:a] + shape[a + 1 :]
        got = None if frozen[i] is None else jnp.shape(frozen[i])
        if got != features:
            raise ValueError(
                f"jaxnan: {fn_name} got {argname} of shape {got} for a leaf whose "
                f"features have shape {features}. Fit the {argname} on a batch of "
                "the same layout with the same axis."
            )
    return frozen


def finite_count(x: jax.Array, axis: int) -> jax.Array:
    """int32 count of finite entries along `axis`."""
    return jnp.sum(jnp.isfinite(x), axis=axis, dtype=jnp.int32)


def acc_dtype(dtype: Any) -> Any:
    """The accumulation dtype: at least float32."""
    return jnp.promote_types(dtype, jnp.float32)


def median_and_quantiles(
    x: jax.Array, axis: int, count: jax.Array, qs: tuple[float, ...]
) -> list[jax.Array]:
    """Per-feature quantiles of the finite entries (numpy's 'linear' method).

    Nonfinite entries are sorted to the end as NaN; a feature without a finite
    entry gives NaN (callers replace it).
    """
    xs = jnp.sort(jnp.where(jnp.isfinite(x), x, jnp.nan), axis=axis).astype(
        acc_dtype(x.dtype)
    )
    last = jnp.maximum(count - 1, 0)
    out = []
    for q in qs:
        pos = last.astype(xs.dtype) * q
        lo = jnp.floor(pos).astype(jnp.int32)
        hi = jnp.minimum(lo + 1, last)
        frac = pos - lo.astype(xs.dtype)
        a = jnp.take_along_axis(xs, jnp.expand_dims(lo, axis), axis=axis)
        b = jnp.take_along_axis(xs, jnp.expand_dims(hi, axis), axis=axis)
        a, b = jnp.squeeze(a, axis), jnp.squeeze(b, axis)
        if q == 0.5:  # numpy's median: the mean of the two middle entries
            val = jnp.where(frac == 0, a, (a + b) * 0.5)
        else:
            val = jnp.where(frac == 0, a, a + (b - a) * frac)
        out.append(jnp.where(count > 0, val, jnp.nan))
    return out
