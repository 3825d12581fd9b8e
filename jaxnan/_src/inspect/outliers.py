"""`clip_outliers`: clip each feature to a z-score or quantile range."""

from __future__ import annotations

import math
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.extend import source_info_util

from jaxnan._src.inspect import vocab

source_info_util.register_exclusion(__file__)

_NAME = "jaxnan.clip_outliers"


class ClipReport(NamedTuple):
    """What `jaxnan.clip_outliers` clipped.

    Every field but `total` has the structure of the batch, with None at the
    non-float leaves (left untouched).

    Attributes:
        clipped: int32 per feature (the leaf's shape without `axis`), the
            entries moved to a bound (+Inf and -Inf included).
        low: per-feature lower bounds (-Inf for a feature with no finite
            entry, which is then left unchanged).
        high: per-feature upper bounds (+Inf likewise).
        total: int32 scalar, entries clipped in the whole batch.
    """

    clipped: Any
    low: Any
    high: Any
    total: jax.Array


def _bounds(x, axis, z, quantiles):
    count = vocab.finite_count(x, axis)
    acc = vocab.acc_dtype(x.dtype)
    if quantiles is not None:
        lo, hi = vocab.median_and_quantiles(x, axis, count, quantiles)
    else:
        finite = jnp.isfinite(x)
        n = jnp.maximum(count, 1).astype(acc)
        xf = jnp.where(finite, x, 0).astype(acc)
        # Scaled down by a power of two near the largest finite |x| (exact),
        # so that the sums of values near the dtype's max cannot overflow to
        # Inf and make NaN bounds (Inf - Inf). Never scaled up, and never by
        # more than 2**(maxexp - 2): 1 / scale stays a normal number, which
        # the CPU does not flush to zero.
        peak = jnp.max(jnp.abs(xf), axis=axis, keepdims=True)
        _, exponent = jnp.frexp(peak)  # peak = m * 2**exponent, 0.5 <= m < 1
        shift = jnp.clip(exponent - 1, 0, jnp.finfo(acc).maxexp - 2)
        scale = jnp.ldexp(jnp.ones_like(peak), shift)
        xs = xf / scale
        mean = jnp.sum(xs, axis=axis) / n
        dev = jnp.where(finite, xs - jnp.expand_dims(mean, axis), 0)
        std = jnp.sqrt(jnp.sum(dev * dev, axis=axis) / n)
        scale = jnp.squeeze(scale, axis)
        lo = mean * scale - (z * std) * scale
        hi = mean * scale + (z * std) * scale
    empty = count == 0
    lo = jnp.where(empty, -jnp.inf, lo).astype(x.dtype)
    hi = jnp.where(empty, jnp.inf, hi).astype(x.dtype)
    return lo, hi


def _check_rule(z, quantiles):
    if quantiles is not None:
        if z is not None:
            raise ValueError(
                f"jaxnan: {_NAME} got both z={z!r} and quantiles={quantiles!r}; "
                "pass one of them."
            )
        try:
            lo, hi = (float(q) for q in quantiles)
        except (TypeError, ValueError):
            lo = hi = -1.0
        if not 0.0 <= lo < hi <= 1.0:
            raise ValueError(
                f"jaxnan: {_NAME} got quantiles={quantiles!r}; pass a pair "
                "(low, high) with 0 <= low < high <= 1, e.g. (0.001, 0.999)."
            )
        return None, (lo, hi)
    z = 6.0 if z is None else z
    if (
        isinstance(z, bool)
        or not isinstance(z, numbers.Real)
        or not math.isfinite(float(z))
        or not z > 0
    ):
        raise ValueError(
            f"jaxnan: {_NAME} got z={z!r}; pass a positive number of standard "
            "deviations, e.g. z=6.0."
        )
    return float(z), None


def clip_outliers(
    batch: Any,
    *,
    z: float | None = None,
    quantiles: tuple[float, float] | None = None,
    axis: int = 0,
    bounds: tuple[Any, Any] | None = None,
) -> tuple[Any, ClipReport]:
    """Clips every feature of the float leaves to a range fitted on the batch.

    With `z` (default 6.0) the range is ``mean ± z * std`` of the finite
    entries of each feature; with ``quantiles=(low, high)`` it runs from the
    `low` to the `high` quantile of the finite entries (numpy's "linear"
    interpolation). +Inf and -Inf are clipped to the bounds; NaN stays NaN
    (impute it with `jaxnan.impute`). Integer, boolean and complex leaves are
    returned unchanged. Under a sharded `jit` the statistics are global.

    Cost: z-score: three passes (sum, centred sum of squares, clip);
    quantiles: a sort along `axis` and a pass; given `bounds`: one pass.

    Args:
        batch: a pytree of arrays.
        z: the number of standard deviations (default 6.0).
        quantiles: ``(low, high)`` quantiles in [0, 1], instead of `z`.
        axis: the example axis of every float leaf.
        bounds: frozen ``(low, high)`` trees (a previous report's `low` and
            `high`), applied instead of fitting on this batch.

    Returns:
        ``(clipped_batch, report)`` with a `ClipReport`.

    Raises:
        ValueError: for both `z` and `quantiles`, a bad value of either (`z`
            must be a positive finite real number: a Python or NumPy float or
            int, not a bool),
            `axis` out of range, a batch with no float leaf or `bounds` of
            another structure.

    Examples:
        >>> import jax.numpy as jnp, jaxnan
        >>> x = jnp.array([[0.0], [1.0], [2.0], [3.0], [100.0]])
        >>> clipped, report = jaxnan.clip_outliers(x, quantiles=(0.0, 0.75))
        >>> clipped[:, 0], int(report.total)
        (Array([0., 1., 2., 3., 3.], dtype=float32), 1)

    .. versionadded:: 0.1.0
    """
    z, quantiles = _check_rule(z, quantiles)
    leaves, treedef, axes = vocab.feature_axes(batch, axis, fn_name=_NAME)
    n = len(leaves)
    if bounds is not None:
        if not isinstance(bounds, tuple) or len(bounds) != 2:
            raise ValueError(
                f"jaxnan: {_NAME} got bounds={bounds!r}; pass (report.low, "
                "report.high) from a previous call."
            )
        frozen_lo, frozen_hi = (
            vocab.frozen_features(b, leaves, treedef, axes, "bounds", fn_name=_NAME)
            for b in bounds
        )
    out = list(leaves)
    clipped: list[Any] = [None] * n
    lows: list[Any] = [None] * n
    highs: list[Any] = [None] * n
    for i, a in axes.items():
        x = jnp.asarray(leaves[i])
        if bounds is not None:
            lo = jnp.asarray(frozen_lo[i], x.dtype)
            hi = jnp.asarray(frozen_hi[i], x.dtype)
        else:
            lo, hi = _bounds(x, a, z, quantiles)
        lo_b, hi_b = jnp.expand_dims(lo, a), jnp.expand_dims(hi, a)
        out[i] = jnp.clip(x, lo_b, hi_b)
        clipped[i] = jnp.sum((x < lo_b) | (x > hi_b), axis=a, dtype=jnp.int32)
        lows[i], highs[i] = lo, hi
    total = sum(jnp.sum(clipped[i], dtype=jnp.int32) for i in axes)

    def unflat(xs):
        return jax.tree_util.tree_unflatten(treedef, xs)

    report = ClipReport(unflat(clipped), unflat(lows), unflat(highs), total)
    return unflat(out), report
