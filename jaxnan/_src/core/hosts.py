"""Host reads of global arrays under multi-process `jax.distributed`.

Under several processes a `jax.Array` can span devices this process cannot
address, and ``np.asarray`` on it raises. The functions here read such an
array either whole (`read`: one all-gather, every process gets the value)
or as a fixed-size summary of each process's addressable shards
(`first_nonfinite`). Each one that communicates does so in a collective
that EVERY process must enter at the same point, in the same order: the
callers (`jaxnan.locate`, the guard) run the same passes on every process
(lock-step), and decide whether to communicate from the sharding alone,
which every process knows, never from the values.

With one process nothing here communicates.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import numpy as np
from jax.extend import source_info_util

source_info_util.register_exclusion(__file__)


def is_global(x: Any) -> bool:
    """Whether `x` is an array this process cannot read alone.

    True for a `jax.Array` spanning non-addressable devices that is not
    fully replicated (a fully replicated one is read from a local copy).
    """
    return (
        isinstance(x, jax.Array)
        and not x.is_fully_addressable
        and not x.is_fully_replicated
    )


def read(x: Any) -> np.ndarray:
    """The whole value of `x` on this host: a plain read, or one all-gather.

    An array spanning several processes (`is_global`) is gathered to every
    process (`multihost_utils.process_allgather`); every process must call
    this for the same arrays in the same order.

    Examples:
        >>> import jax.numpy as jnp
        >>> from jaxnan._src.core import hosts
        >>> hosts.read(jnp.arange(3.0)).tolist()
        [0.0, 1.0, 2.0]
    """
    if is_global(x):
        from jax.experimental import multihost_utils  # noqa: PLC0415 - rare

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def process_of(device_id: int | None) -> int | None:
    """The index of the process owning device `device_id` (None if unknown).

    Examples:
        >>> import jax
        >>> from jaxnan._src.core import hosts
        >>> hosts.process_of(jax.devices()[0].id)
        0
        >>> hosts.process_of(None) is None
        True
    """
    if device_id is None:
        return None
    device = _devices().get(int(device_id))
    return None if device is None else int(device.process_index)


@functools.cache
def _devices() -> dict[int, Any]:
    return {d.id: d for d in jax.devices()}


def _local_first(x: Any, k: int) -> np.ndarray:
    """``(k, 1 + ndim)``: up to `k` first nonfinite indices of this process.

    Each row is ``(found, *global index)``; rows of nothing found are 0.
    Read from the addressable shards (first replica only), placed by their
    global index (`shard.index`).
    """
    ndim = np.ndim(x)
    found: list[tuple[int, ...]] = []
    shards = (
        [(s.index, s.data) for s in x.addressable_shards if s.replica_id == 0]
        if isinstance(x, jax.Array)
        else [((), x)]
    )
    for index, data in shards:
        values = np.asarray(data)
        if values.dtype.kind not in "fc":
            values = values.astype(np.float32)  # bfloat16, float8
        offset = [
            (sl.start or 0) if isinstance(sl, slice) else 0
            for sl in (index or (slice(None),) * ndim)
        ]
        for idx in np.argwhere(~np.isfinite(values))[:k]:
            found.append(tuple(int(i) + o for i, o in zip(idx, offset)))
    out = np.zeros((k, 1 + ndim), np.int64)
    for row, idx in enumerate(sorted(found)[:k]):
        out[row] = (1, *idx)
    return out


def first_nonfinite(x: Any, k: int = 3) -> list[tuple[int, ...]]:
    """The first `k` indices (in row-major order) of the nonfinite elements of `x`.

    Each process reads only its own shards; under several processes their
    fixed-size summaries (`k` indices each) are merged by one all-gather
    that every process enters (when `x` spans processes), so the whole
    array is never copied to one host.

    Examples:
        >>> import jax.numpy as jnp
        >>> from jaxnan._src.core import hosts
        >>> hosts.first_nonfinite(jnp.array([[1.0, jnp.nan], [jnp.inf, 0.0]]))
        [(0, 1), (1, 0)]
    """
    local = _local_first(x, k)
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils  # noqa: PLC0415 - rare

        every = np.asarray(multihost_utils.process_allgather(local, tiled=False))
        local = every.reshape(-1, local.shape[1])
    hits = sorted({tuple(int(i) for i in row[1:]) for row in local if row[0]})
    return hits[:k]
