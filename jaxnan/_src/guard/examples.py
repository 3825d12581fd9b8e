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
from jaxnan._src.guard import multihost

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


def _is_float(x: Any) -> bool:
    return dtypes.is_inexact_dtype(x.dtype) and not _is_key(x)


def nonfinite_rows(
    inputs: Sequence[Any], paths: Sequence[str], axes: Sequence[bool]
) -> tuple[str | None, tuple[int, ...]]:
    """The first batch leaf holding NaN/Inf and its GLOBAL rows.

    Each process reads its own shards (`multihost.local_blocks`); one
    fixed-size per-row flag per leaf is merged over processes.
    """
    size, _ = batch_axes(inputs)
    leaves = [(x, p) for x, p, b in zip(inputs, paths, axes) if b and _is_float(x)]
    if not leaves:
        return None, ()
    local = np.zeros((len(leaves), size), np.float32)
    for k, (x, _) in enumerate(leaves):
        for start, block in multihost.local_blocks(x):
            flat = block.reshape(block.shape[0], -1)
            bad = ~np.isfinite(flat).all(axis=1)
            local[k, start : start + len(bad)] = np.maximum(
                local[k, start : start + len(bad)], bad
            )
    merged = multihost.gather_max(local)
    for k, (_, path) in enumerate(leaves):
        if merged[k].any():
            return path, tuple(int(i) for i in np.flatnonzero(merged[k]))
    return None, ()


def input_counts(
    inputs: Sequence[Any], paths: Sequence[str]
) -> dict[str, tuple[int, int, int]]:
    """``{path: (nan, +inf, -inf)}`` for the nonfinite input leaves.

    Counted over every process's shards (first replica only) and summed.
    """
    leaves = [(x, p) for x, p in zip(inputs, paths) if _is_float(x)]
    local = np.zeros((len(leaves), 3), np.int32)
    for k, (x, _) in enumerate(leaves):
        for _, values in multihost.local_blocks(x):
            local[k] += (
                int(np.isnan(values).sum()),
                int(np.isposinf(values).sum()),
                int(np.isneginf(values).sum()),
            )
    total = multihost.gather_sum(local) if leaves else local
    return {
        path: tuple(int(c) for c in total[k])
        for k, (_, path) in enumerate(leaves)
        if total[k].any()
    }


def _row_summary(inputs: Sequence[Any], axes: Sequence[bool], size: int):
    """``(3, leaves, size)``: per-row max magnitude, -min and max, merged."""
    local = np.full((3, len(inputs), size), -np.inf, np.float32)
    for k, (x, is_batch) in enumerate(zip(inputs, axes)):
        if not is_batch or _is_key(x):
            continue
        for start, block in multihost.local_blocks(x):
            flat = block.reshape(block.shape[0], -1)
            if flat.size == 0:
                continue
            rows = slice(start, start + flat.shape[0])
            if np.issubdtype(flat.dtype, np.inexact):
                local[0, k, rows] = np.abs(flat).max(axis=1)
            elif np.issubdtype(flat.dtype, np.integer):
                local[1, k, rows] = -flat.min(axis=1)
                local[2, k, rows] = flat.max(axis=1)
    return multihost.gather_max(local)


def standout_leaf(
    inputs: Sequence[Any],
    paths: Sequence[str],
    axes: Sequence[bool],
    rows: Sequence[int],
) -> str | None:
    """The batch leaf in which `rows` stand out from the other rows most.

    Read from a per-row summary of every process's shards (`_row_summary`).
    """
    size, _ = batch_axes(inputs)
    if not rows or size == 0:
        return None
    summary = _row_summary(inputs, axes, size)
    good = np.setdiff1d(np.arange(size), rows)
    picked = list(rows)
    best, best_score = None, 0.0
    for k, (x, path, is_batch) in enumerate(zip(inputs, paths, axes)):
        if not is_batch or good.size == 0 or _is_key(x):
            continue
        dtype = np.dtype(x.dtype)
        if np.issubdtype(dtype, np.inexact):
            mag = summary[0, k]
            ref = float(np.median(mag[good])) or 1e-30
            score = float(mag[picked].max()) / ref
        elif np.issubdtype(dtype, np.integer):
            lo, hi = -summary[1, k, good].max(), summary[2, k, good].max()
            out = (-summary[1, k, picked] < lo) | (summary[2, k, picked] > hi)
            score = 1e6 if out.any() else 0.0
        else:
            continue
        if score > best_score:
            best, best_score = path, score
    return best if best_score >= 10.0 else None


def where_rows(owners: Sequence[tuple[int, int]]) -> str:
    """``" on process 1, device 3"``: who holds the bad rows (empty if unknown).

    Examples:
        >>> where_rows([(1, 2048), (1, 2049)])
        ' on process 1, devices 2048 and 2049'
        >>> where_rows([])
        ''
    """
    known = sorted({o for o in owners if o[0] >= 0})
    if not known:
        return ""
    parts = []
    for proc in sorted({p for p, _ in known}):
        devices = [str(d) for p, d in known if p == proc]
        noun = "device" if len(devices) == 1 else "devices"
        listed = (
            devices[0]
            if len(devices) == 1
            else (f"{', '.join(devices[:-1])} and {devices[-1]}")
        )
        parts.append(f"process {proc}, {noun} {listed}")
    return " on " + "; ".join(parts)


def describe(
    rows: Sequence[int],
    leaf: str | None,
    step: int,
    size: int = 0,
    owners: Sequence[tuple[int, int]] = (),
) -> str:
    """``"rows 6 and 19 of batch['x'] (batch 41)"``, and who holds them."""
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
    return f"{which}{of} (batch {step}){where_rows(owners)}"
