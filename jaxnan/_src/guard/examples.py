"""Which examples of a batch make a step nonfinite (`jaxnan.guard`).

Two ways, cheapest first:

* the batch already holds NaN/Inf: the rows are read on the host
  (``numpy.isfinite`` per row of each batch leaf);
* the batch is finite (an outlier row that overflows, a label out of
  range): the step is replayed on every example alone, under `lax.map`
  (`graph.per_example_body`), and the rows whose own step is bad are named.
  The leaf is the one where those rows stand out most: the largest
  magnitude relative to the batch's median row (a float leaf), or values
  outside the range of the healthy rows (an integer leaf: labels).
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.extend import source_info_util

from jaxnan._src.core import dtypes

source_info_util.register_exclusion(__file__)


def batch_axes(inputs: Sequence[Any]) -> tuple[int, tuple[bool, ...]]:
    """``(batch_size, per-leaf flag)``: leaves whose leading axis is the batch.

    The batch size is the most common leading dimension among the input
    leaves (PRNG keys and scalars excluded); 0 when there is none.
    """
    sizes = []
    for x in inputs:
        if _is_key(x) or np.ndim(x) == 0:
            sizes.append(None)
        else:
            sizes.append(int(np.shape(x)[0]))
    counted = collections.Counter(s for s in sizes if s is not None)
    if not counted:
        return 0, tuple(False for _ in inputs)
    size = counted.most_common(1)[0][0]
    return size, tuple(s == size for s in sizes)


def _is_key(x: Any) -> bool:
    return jax.dtypes.issubdtype(getattr(x, "dtype", np.float32), jax.dtypes.prng_key)


def _host_values(x: Any) -> np.ndarray | None:
    """`x` on the host as a numpy float array, or None when not floating.

    bfloat16 and the float8 types (ml_dtypes) are not numpy inexact types:
    they are read as float32, which holds each of their values exactly.
    """
    values = np.asarray(x)
    if not dtypes.is_inexact_dtype(values.dtype):
        return None
    if not np.issubdtype(values.dtype, np.inexact):
        values = values.astype(np.float32)
    return values


def nonfinite_rows(
    inputs: Sequence[Any], paths: Sequence[str], axes: Sequence[bool]
) -> tuple[str | None, tuple[int, ...]]:
    """The first batch leaf holding NaN/Inf and its rows, read on the host."""
    for x, path, is_batch in zip(inputs, paths, axes):
        values = _host_values(x) if is_batch else None
        if values is None:
            continue
        bad = ~np.isfinite(values.reshape(values.shape[0], -1)).all(axis=1)
        if bad.any():
            return path, tuple(int(i) for i in np.flatnonzero(bad))
    return None, ()


def input_counts(
    inputs: Sequence[Any], paths: Sequence[str]
) -> dict[str, tuple[int, int, int]]:
    """``{path: (nan, +inf, -inf)}`` for the nonfinite input leaves (host)."""
    out = {}
    for x, path in zip(inputs, paths):
        if _is_key(x):
            continue
        values = _host_values(x)
        if values is None or np.isfinite(values).all():
            continue
        nan = int(np.isnan(values).sum())
        pos = int(np.isposinf(values).sum())
        neg = int(np.isneginf(values).sum())
        out[path] = (nan, pos, neg)
    return out


def standout_leaf(
    inputs: Sequence[Any],
    paths: Sequence[str],
    axes: Sequence[bool],
    rows: Sequence[int],
) -> str | None:
    """The batch leaf in which `rows` stand out from the other rows most."""
    if not rows:
        return None
    best, best_score = None, 0.0
    for x, path, is_batch in zip(inputs, paths, axes):
        if not is_batch:
            continue
        floats = _host_values(x)
        values = np.asarray(x) if floats is None else floats
        flat = values.reshape(values.shape[0], -1)
        good = np.setdiff1d(np.arange(flat.shape[0]), rows)
        if flat.size == 0 or good.size == 0:
            continue
        if np.issubdtype(flat.dtype, np.inexact):
            mag = np.abs(flat).max(axis=1)
            ref = float(np.median(mag[good])) or 1e-30
            score = float(mag[list(rows)].max()) / ref
        elif np.issubdtype(flat.dtype, np.integer):
            lo, hi = flat[good].min(), flat[good].max()
            out = (flat[list(rows)] < lo) | (flat[list(rows)] > hi)
            score = 1e6 if out.any() else 0.0
        else:
            continue
        if score > best_score:
            best, best_score = path, score
    return best if best_score >= 10.0 else None


def describe(rows: Sequence[int], leaf: str | None, step: int, size: int = 0) -> str:
    """``"rows 6 and 19 of batch['x'] (batch 41)"``."""
    if not rows:
        return f"no single example of batch {step} is bad on its own"
    if size and len(rows) == size:
        return (
            f"every example of batch {step} is bad on its own: not a data "
            "problem, the model or the optimizer state is"
        )
    if len(rows) == 1:
        which = f"row {rows[0]}"
    else:
        head = ", ".join(str(r) for r in rows[:-1][:7])
        more = f" (+{len(rows) - 8} more)" if len(rows) > 8 else ""
        which = f"rows {head} and {rows[-1]}{more}"
    of = f" of {leaf}" if leaf else ""
    return f"{which}{of} (batch {step})"
