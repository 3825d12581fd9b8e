"""`impute`: replace nonfinite entries of a batch by per-feature statistics."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import source_info_util

from jaxnan._src.inspect import vocab

source_info_util.register_exclusion(__file__)

_NAME = "jaxnan.impute"


class ImputeReport(NamedTuple):
    """What `jaxnan.impute` replaced.

    Every field but `total` has the structure of the batch, with None at the
    non-float leaves (left untouched).

    Attributes:
        replaced: int32 per feature (the leaf's shape without `axis`), the
            number of nonfinite entries replaced in that feature.
        per_leaf: int32 scalar per leaf, the entries replaced in the leaf.
        empty_features: int32 scalar per leaf, the features without a single
            finite entry; their fill is 0 (``mean``/``median`` have nothing
            to average), never NaN.
        fill: the per-feature fill values used, in the leaf's dtype; pass them
            as ``stats=`` to impute another batch with the same values.
        total: int32 scalar, entries replaced in the whole batch.
    """

    replaced: Any
    per_leaf: Any
    empty_features: Any
    fill: Any
    total: jax.Array


def _fill_values(x, axis, strategy, fill):
    count = vocab.finite_count(x, axis)
    if strategy is vocab.Strategy.ZERO:
        val = jnp.zeros(count.shape, x.dtype)
    elif strategy is vocab.Strategy.CONSTANT:
        val = jnp.full(count.shape, fill, x.dtype)
    elif strategy is vocab.Strategy.MEAN:
        acc = vocab.acc_dtype(x.dtype)
        total = jnp.sum(jnp.where(jnp.isfinite(x), x, 0), axis=axis, dtype=acc)
        val = (total / jnp.maximum(count, 1).astype(acc)).astype(x.dtype)
    else:
        (val,) = vocab.median_and_quantiles(x, axis, count, (0.5,))
        val = val.astype(x.dtype)
    return jnp.where(count > 0, val, jnp.zeros((), x.dtype)), count


def _validate(batch, strategy, axis, fill, fn_name):
    strategy = vocab.strategy_of(strategy, fn_name=fn_name)
    if strategy is vocab.Strategy.CONSTANT and fill is None:
        raise ValueError(
            f"jaxnan: {fn_name}(strategy='constant') needs fill=<value>, "
            "e.g. fill=-1.0."
        )
    if fill is not None and strategy is not vocab.Strategy.CONSTANT:
        raise ValueError(
            f"jaxnan: {fn_name} got fill={fill!r} with strategy="
            f"{strategy.value!r}; fill is used only with strategy='constant'."
        )
    leaves, treedef, axes = vocab.feature_axes(batch, axis, fn_name=fn_name)
    if fill is not None:
        for i in axes:
            _check_fill(fill, jnp.result_type(leaves[i]), fn_name)
    return strategy, leaves, treedef, axes


def _check_fill(fill: Any, dtype: Any, fn_name: str) -> None:
    """Rejects a `fill` that is not a finite number in `dtype` (NaN, 1e5 in float16)."""
    try:
        value = float(fill)
    except (TypeError, ValueError):
        raise TypeError(
            f"jaxnan: {fn_name} got fill={fill!r}; pass a finite number, e.g. "
            "fill=-1.0."
        ) from None
    with np.errstate(over="ignore"):  # an overflow is the error reported below
        rounded = float(np.asarray(value, dtype=jnp.dtype(dtype)))
    if not math.isfinite(value) or not math.isfinite(rounded):
        raise ValueError(
            f"jaxnan: {fn_name} got fill={fill!r}, which is not a finite "
            f"{jnp.dtype(dtype).name} (its largest finite value is "
            f"{float(jnp.finfo(dtype).max):g}); the fill replaces nonfinite "
            "entries, so pass a finite number within the batch's dtype."
        )


def impute_stats(
    batch: Any,
    *,
    strategy: str | vocab.Strategy = "mean",
    axis: int = 0,
    fill: float | None = None,
) -> Any:
    """Fits the per-feature fill values of `jaxnan.impute` on a batch.

    Freeze a training set's statistics and reuse them on another batch
    (``jaxnan.impute(val_batch, stats=train_stats)``), as a fitted imputer
    does. Statistics ignore NaN, +Inf and -Inf; a feature with no finite
    entry gets 0.

    Args:
        batch: a pytree of arrays; float leaves are fitted, others skipped.
        strategy: ``"zero"``, ``"mean"``, ``"median"`` or ``"constant"``
            (a `jaxnan.Strategy`).
        axis: the example axis of every float leaf.
        fill: the value for ``strategy="constant"``.

    Returns:
        A tree with the batch's structure: per-feature fill values (the leaf's
        shape without `axis`, its dtype) at float leaves, None elsewhere.

    Raises:
        ValueError: for an unknown strategy, `axis` out of range for a float
            leaf, a batch with no float leaf, a missing/unused `fill`, or a
            `fill` that is not finite in a float leaf's dtype (NaN, or 1e5
            for float16).
        TypeError: for a `fill` that is not a number.

    Examples:
        >>> import jax.numpy as jnp, jaxnan
        >>> x = jnp.array([[1.0, jnp.nan], [3.0, 4.0], [jnp.inf, 8.0]])
        >>> jaxnan.impute_stats({"x": x}, strategy="mean")["x"]
        Array([2., 6.], dtype=float32)

    .. versionadded:: 0.1.0
    """
    strategy, leaves, treedef, axes = _validate(
        batch, strategy, axis, fill, "jaxnan.impute_stats"
    )
    out = [None] * len(leaves)
    for i, a in axes.items():
        out[i], _ = _fill_values(jnp.asarray(leaves[i]), a, strategy, fill)
    return jax.tree_util.tree_unflatten(treedef, out)


def impute(
    batch: Any,
    *,
    strategy: str | vocab.Strategy = "zero",
    axis: int = 0,
    fill: float | None = None,
    stats: Any = None,
) -> tuple[Any, ImputeReport]:
    """Replaces NaN, +Inf and -Inf entries by a per-feature statistic.

    For every float leaf, the statistic of each feature (every position of
    the leaf's shape without `axis`) is computed in the graph over the
    finite entries only: ``"mean"`` equals ``numpy.nanmean`` and
    ``"median"`` equals ``numpy.nanmedian`` when the only nonfinite values
    are NaN (they also ignore +Inf and -Inf). Integer, boolean and complex
    leaves are returned unchanged. A feature with no finite entry is filled
    with 0 and counted in `ImputeReport.empty_features` (never NaN).

    Works under `jit`, and under a sharded `jit` the statistics are global
    over the batch (the reductions are the compiler's, not per shard).

    Cost: ``"zero"`` and ``"constant"``: one fused pass (the replacement and
    its counts); ``"mean"``: two (the finite sum and count, then the
    replacement); ``"median"``: a sort along `axis`. Given `stats`, one pass.

    Args:
        batch: a pytree of arrays.
        strategy: ``"zero"``, ``"mean"``, ``"median"`` or ``"constant"``
            (a `jaxnan.Strategy`). Ignored when `stats` is given.
        axis: the example axis of every float leaf (negative counts from the
            end).
        fill: the value for ``strategy="constant"``.
        stats: frozen fill values, from `jaxnan.impute_stats` or a previous
            report's `fill`, applied instead of fitting on this batch.

    Returns:
        ``(clean_batch, report)``: the batch with every nonfinite float entry
        replaced, and an `ImputeReport`.

    Raises:
        ValueError: for an unknown strategy, `axis` out of range for a float
            leaf, a batch with no float leaf, a missing/unused `fill`, a
            `fill` that is not finite in a float leaf's dtype, or `stats` of
            another structure (other keys or order of leaves) or feature
            shape.
        TypeError: for a `fill` that is not a number.

    Examples:
        >>> import jax.numpy as jnp, numpy as np, jaxnan
        >>> x = jnp.array([[1.0, jnp.nan], [jnp.nan, 4.0], [5.0, 8.0]])
        >>> clean, report = jaxnan.impute({"x": x, "y": jnp.arange(3)},
        ...                               strategy="mean")
        >>> np.asarray(clean["x"])
        array([[1., 6.],
               [3., 4.],
               [5., 8.]], dtype=float32)
        >>> report.replaced["x"], int(report.total), report.replaced["y"]
        (Array([1, 1], dtype=int32), 2, None)

    .. versionadded:: 0.1.0
    """
    strategy, leaves, treedef, axes = _validate(
        batch, strategy, axis, fill if stats is None else None, _NAME
    )
    frozen = None
    if stats is not None:
        frozen = vocab.frozen_features(
            stats, leaves, treedef, axes, "stats", fn_name=_NAME
        )
    out = list(leaves)
    replaced: list[Any] = [None] * len(leaves)
    per_leaf: list[Any] = [None] * len(leaves)
    empty: list[Any] = [None] * len(leaves)
    fills: list[Any] = [None] * len(leaves)
    for i, a in axes.items():
        x = jnp.asarray(leaves[i])
        if frozen is not None:
            count = vocab.finite_count(x, a)
            val = jnp.asarray(frozen[i], x.dtype)
        else:
            val, count = _fill_values(x, a, strategy, fill)
        finite = jnp.isfinite(x)
        out[i] = jnp.where(finite, x, jnp.expand_dims(val, a))
        replaced[i] = (x.shape[a] - count).astype(jnp.int32)
        per_leaf[i] = jnp.sum(replaced[i], dtype=jnp.int32)
        empty[i] = jnp.sum(count == 0, dtype=jnp.int32)
        fills[i] = val
    total = sum(per_leaf[i] for i in axes)

    def unflat(xs):
        return jax.tree_util.tree_unflatten(treedef, xs)

    report = ImputeReport(
        unflat(replaced), unflat(per_leaf), unflat(empty), unflat(fills), total
    )
    return unflat(out), report
