"""Underflow health of `jaxnan.guard`: the fraction of exact zeros in the gradients.

Silent underflow breaks a low-precision run without any NaN: gradients (or
the loss-scaled cotangents of a float16/float8 run) round to exactly 0 and
the finiteness checks stay quiet, as in marin-community/marin#7279. With
``jaxnan.guard(step, underflow=0.1)`` the compiled step also computes the
fraction of exact zeros in the gradients `jaxnan.skip_nonfinite` receives
(one reduction per leaf, on the first 4096 entries of a larger one; with
`jaxnan.dynamic_loss_scale` inside `skip_nonfinite`, these are the scaled
gradients), read with the health vector; `Watch` keeps it for every healthy
step and warns once when it rises by `jump` or more above its median over the
last `window` steps.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend import source_info_util

from jaxnan._src.core import dtypes
from jaxnan._src.guard import incidents

source_info_util.register_exclusion(__file__)

FIGURES_KEPT = 10_000
"""Steps whose zero fraction `Watch.figures` keeps."""


SAMPLE = 4096
"""Entries of a leaf read for its zero fraction: its first `SAMPLE` (all of
a smaller leaf). A contiguous prefix is the one sample XLA reads without
touching the rest: evenly spaced slices made it materialize the gradients
(1.8x the bytes accessed on the MLP step), a strided one read 1.05x."""


def _leaf_fraction(g: jax.Array) -> jax.Array:
    """The fraction of exact zeros of one leaf (of its first `SAMPLE` entries)."""
    flat = jnp.ravel(g)[:SAMPLE]
    return jnp.sum(flat == 0, dtype=jnp.float32) / jnp.float32(flat.size)


def zero_fraction(records: Sequence[Any]) -> jax.Array:
    """Exact zeros over all entries of the gradients the records received.

    Each leaf's fraction is weighted by its size; a leaf larger than
    `SAMPLE` entries is read on its first `SAMPLE` (its first rows: an
    estimate, for a figure whose jumps matter, at a fixed read per leaf
    instead of one more pass over the gradients). NaN when no record holds
    gradients (the figure is then not computed).
    """
    parts, size = [], 0
    for r in records:
        for g in jax.tree_util.tree_leaves(getattr(r, "incoming", None)):
            if dtypes.is_inexact_dtype(g.dtype) and g.size:
                parts.append(_leaf_fraction(g) * jnp.float32(g.size))
                size += g.size
    if not parts:
        return jnp.full((), jnp.nan, jnp.float32)
    return sum(parts) / jnp.float32(size)


class Watch:
    """The zero fraction of each healthy step, and the jump test on it.

    Args:
        jump: the rise above the window median that warns (0.1: ten points
            of the gradient entries became exactly 0).
        window: the healthy steps the median is taken over.

    Examples:
        >>> w = Watch(0.1, window=4)
        >>> said = [w.add(s, f) for s, f in enumerate([0.01, 0.02, 0.01, 0.3])]
        >>> said[:3], said[3][:45]
        ([None, None, None], 'zero fraction of the gradients 0.3 at step 3,')
        >>> list(w.figures)[-1]
        (3, 0.3)
    """

    def __init__(self, jump: float, window: int):
        self.jump = jump
        self.window = window
        self.figures: collections.deque[tuple[int, float]] = collections.deque(
            maxlen=FIGURES_KEPT
        )
        self._recent: collections.deque[float] = collections.deque(maxlen=window)
        self._warned_at: int | None = None

    def add(self, step: int, fraction: float) -> str | None:
        """Records a healthy step's fraction; the warning text on a jump, once."""
        self.figures.append((step, fraction))
        earlier = sorted(self._recent)
        self._recent.append(fraction)
        if len(earlier) < 2 or fraction != fraction:
            return None
        median = earlier[len(earlier) // 2]
        if fraction - median < self.jump:
            if self._warned_at is not None and step - self._warned_at > self.window:
                self._warned_at = None  # the episode is over
            return None
        if self._warned_at is not None:
            return None
        self._warned_at = step
        return (
            f"zero fraction of the gradients {fraction:.3g} at step {step}, up from "
            f"a median of {median:.3g} over the {len(earlier)} steps before"
        )

    def observe(self, step: int, fraction: float, log: incidents.IncidentLog) -> None:
        """`add`, and on a jump the warning incident (``underflow``) to `log`."""
        said = self.add(step, fraction)
        if said is None:
            return
        cause = incidents.Cause.UNDERFLOW
        log.add(incidents.warning(step, cause, said, cause.fix))

    def drop_after(self, step: int) -> None:
        """Forgets the steps after `step` (a rollback undid them)."""
        while self.figures and self.figures[-1][0] > step:
            self.figures.pop()
        self._recent.clear()
        self._recent.extend(f for _, f in list(self.figures)[-self.window :])
        if self._warned_at is not None and self._warned_at > step:
            self._warned_at = None
