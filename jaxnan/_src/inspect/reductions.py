"""The in-graph reductions of `activation_stats`: per intermediate, per layer.

An intermediate adds one fused reduction (its largest finite |x| and its
nonfinite count); a layer's output adds its mean, standard deviation and
fraction of zeros. Inside a `scan` body the same reductions are computed per
iteration and leave the loop stacked (`Reduced`), so that one pass gives the
statistics of every iteration (`inspect.scan_layers`).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import source_info_util

source_info_util.register_exclusion(__file__)


def _max_add(a: tuple, b: tuple) -> tuple:
    return jnp.maximum(a[0], b[0]), a[1] + b[1]


def maxabs_and_nonfinite(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(largest finite |x| as float32, int32 count of NaN/Inf) in one pass.

    One variadic reduction: two separate ones cost 2.6x a forward pass on
    the benchmark LM, this one 1.1x (`benchmarks/inspect_cost.py`).

    Examples:
        >>> import jax.numpy as jnp
        >>> from jaxnan._src.inspect import reductions
        >>> m, bad = reductions.maxabs_and_nonfinite(jnp.array([-3.0, jnp.nan]))
        >>> float(m), int(bad)
        (3.0, 1)
    """
    finite = jnp.isfinite(x)
    mag = jnp.where(finite, jnp.abs(x), 0).astype(jnp.float32)
    bad = (~finite).astype(jnp.int32)
    init = (np.float32(0), np.int32(0))
    return lax.reduce((mag, bad), init, _max_add, tuple(range(x.ndim)))


def output_moments(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(mean, std, zero fraction) of `x` as float32, over its finite entries.

    The mean and std are NaN when `x` has no finite entry (no mean to give,
    not a mean of 0); the zero fraction counts exact zeros over every entry.

    Examples:
        >>> import jax.numpy as jnp
        >>> from jaxnan._src.inspect import reductions
        >>> x = jnp.array([0.0, 2.0, jnp.inf])
        >>> [float(v) for v in reductions.output_moments(x)]
        [1.0, 1.0, 0.3333333432674408]
    """
    finite = jnp.isfinite(x)
    acc = jnp.promote_types(x.dtype, jnp.float32)
    count = jnp.sum(finite, dtype=jnp.int32)
    n = jnp.maximum(count, 1).astype(acc)
    xf = jnp.where(finite, x, 0).astype(acc)
    mean = jnp.sum(xf) / n
    dev = jnp.where(finite, xf - mean, 0)
    std = jnp.sqrt(jnp.sum(dev * dev) / n)
    mean = jnp.where(count > 0, mean, jnp.nan)
    std = jnp.where(count > 0, std, jnp.nan)
    zeros = jnp.sum(x == 0, dtype=jnp.int32) / x.size
    f32 = jnp.float32
    return mean.astype(f32), std.astype(f32), zeros.astype(f32)


class Top(NamedTuple):
    """The range of one intermediate's dtype (static).

    Attributes:
        top: the dtype's largest finite value.
        top32: the same, capped at float32's (the magnitudes are float32).
        dtype: the dtype's name.
    """

    top: float
    top32: float
    dtype: str


def top_of(x: jax.Array) -> Top:
    """The `Top` of an array's dtype."""
    top = float(jnp.finfo(x.dtype).max)
    return Top(top, float(np.float32(min(top, np.finfo(np.float32).max))), str(x.dtype))


class Reduced(NamedTuple):
    """The reductions of one equation's floating outputs (a pytree of arrays).

    Computed inside a `scan` body, each field gains the loop's leading axis.

    Attributes:
        max_abs: per floating output, its largest finite |x| (float32).
        nonfinite: per floating output, its NaN/Inf count (int32).
        moments: `output_moments` of the first floating output; None when
            the equation is not the last of its layer.
    """

    max_abs: tuple[jax.Array, ...]
    nonfinite: tuple[jax.Array, ...]
    moments: tuple[jax.Array, jax.Array, jax.Array] | None


def reduce_outputs(floats: list[jax.Array], moments: bool = True) -> Reduced:
    """The `Reduced` of an equation's nonempty floating outputs.

    Args:
        floats: the outputs.
        moments: whether to compute the moments (only the last equation of a
            layer needs them); None in their place otherwise. XLA does not
            drop the unused ones from a loop body: computing all of them cost
            1.8x a forward pass on `benchmarks/inspect_scan_cost.py`, only
            the needed ones 1.3x.
    """
    pairs = [maxabs_and_nonfinite(x) for x in floats]
    return Reduced(
        tuple(m for m, _ in pairs),
        tuple(b for _, b in pairs),
        output_moments(floats[0]) if moments else None,
    )


class Accumulator:
    """Host-side accumulator of one layer during tracing.

    Each floating output adds one fused reduction (its largest finite |x| and
    its nonfinite count); they are combined once per layer in `extremes`, the
    magnitudes grouped by their dtype's largest value, so that the measuring
    program grows by one reduction per intermediate and not by a chain of
    scalar operations as well.

    Attributes:
        phase: ``"forward"`` or ``"backward"``.
        dtype: the narrowest floating dtype among the layer's intermediates.
        equations: how many equations were added.
    """

    def __init__(self, phase: str):
        self.phase = phase
        # The largest finite value of a dtype, capped at float32's -> the
        # largest finite |x| of each intermediate of that dtype.
        self.max_abs: dict[float, list[jax.Array]] = {}
        self.nonfinite: list[jax.Array] = []
        self.dtype_max = np.inf
        self.dtype = "float32"
        self.last: jax.Array | None = None
        self.last_moments: tuple | None = None
        self.equations = 0

    def _add_one(self, top: Top, m: jax.Array, bad: jax.Array) -> None:
        self.max_abs.setdefault(top.top32, []).append(m)
        self.nonfinite.append(bad)
        if top.top < self.dtype_max:
            self.dtype_max, self.dtype = top.top, top.dtype

    def add(self, floats: list[jax.Array]) -> None:
        """Adds one equation's floating outputs (one fused reduction each)."""
        for x in floats:
            self._add_one(top_of(x), *maxabs_and_nonfinite(x))
        self.last, self.last_moments = floats[0], None
        self.equations += 1

    def add_reduced(self, tops: tuple[Top, ...], red: Reduced, i: int) -> None:
        """Adds iteration `i` of an equation reduced inside a `scan` body."""
        for top, m, bad in zip(tops, red.max_abs, red.nonfinite):
            self._add_one(top, m[i], bad[i])
        moments = red.moments  # None before the layer's last equation
        self.last = None
        self.last_moments = None if moments is None else tuple(v[i] for v in moments)
        self.equations += 1

    def moments(self) -> tuple[jax.Array, jax.Array, jax.Array]:
        """`output_moments` of the layer's output (its last value)."""
        if self.last_moments is not None:
            return self.last_moments
        return output_moments(self.last)

    def extremes(self) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        """(max |x|, range used, headroom, nonfinite count) of the layer.

        The headroom of an intermediate is ``log2(top) - log2(m)`` for its
        dtype's top; it decreases with m, so the smallest over a dtype is the
        one of its largest m, exactly (rounding is monotonic), and likewise
        the range used, ``2 ** -headroom``.
        """
        rooms, peaks = [], []
        for top32, ms in self.max_abs.items():
            m = jnp.max(jnp.stack(ms))
            peaks.append(m)
            rooms.append(jnp.log2(np.float32(top32)) - jnp.log2(m))  # +inf at 0
        room = functools.reduce(jnp.minimum, rooms)
        # Not m / top32: XLA turns it into m * (1 / top32), a float32 denormal
        # that the CPU backend flushes to 0 (4e37 read as "0% of the float32
        # range").
        used = jnp.exp2(-room)
        max_abs = functools.reduce(jnp.maximum, peaks)
        bad = jnp.sum(jnp.stack(self.nonfinite), dtype=jnp.int32)
        return max_abs, used, room, bad
