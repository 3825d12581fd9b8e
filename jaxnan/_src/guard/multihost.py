"""The guard under multi-process `jax.distributed`: local reads, global answers.

Under several processes a global `jax.Array` cannot be read whole on any
one host. The guard reads only each process's addressable shards (the
first replica of each), places them by their global index (`shard.index`),
and merges the per-process results with one fixed-size all-gather that
every process enters at the same point: the bad/healthy decision is the
in-graph one, identical on every process, so every process takes the same
branch and makes the same calls in the same order (lock-step), and nothing
waits on a collective that only one process entered.

With one process every function here is a plain host read: no collective.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np
from jax.extend import source_info_util

from jaxnan._src.core import dtypes, hosts

source_info_util.register_exclusion(__file__)


def process_count() -> int:
    """The number of processes of the run (1 without `jax.distributed`)."""
    return jax.process_count()


def process_index() -> int:
    """This process's index (0 without `jax.distributed`)."""
    return jax.process_index()


def _gather(local: np.ndarray) -> np.ndarray:
    """``(processes, *local.shape)``: every process's `local`, stacked."""
    if process_count() == 1:
        return local[None]
    from jax.experimental import multihost_utils  # noqa: PLC0415 - rarely used

    return np.asarray(multihost_utils.process_allgather(local, tiled=False))


def gather_max(local: np.ndarray) -> np.ndarray:
    """The elementwise maximum of `local` over processes (a fixed-size summary).

    Every process must call it at the same point with the same shape.

    Examples:
        >>> import numpy as np
        >>> from jaxnan._src.guard import multihost
        >>> multihost.gather_max(np.array([1.0, -np.inf])).tolist()
        [1.0, -inf]
    """
    return _gather(np.asarray(local, np.float32)).max(axis=0)


def gather_sum(local: np.ndarray) -> np.ndarray:
    """The elementwise sum of int32 `local` over processes (see `gather_max`)."""
    return _gather(np.asarray(local, np.int32)).sum(axis=0)


def host_value(x: Any) -> np.ndarray:
    """The whole value of `x` on this host: a plain read, or an all-gather.

    An array spanning several processes is gathered (every process must call
    this at the same point); keep it to small arrays (a per-row flag).
    """
    return hosts.read(x)


def local_blocks(x: Any) -> Iterator[tuple[int, np.ndarray]]:
    """``(first global row, rows)`` of each block of `x` this process holds.

    For a `jax.Array`: its addressable shards, first replica only (a row held
    by several devices is read once over the whole run); anything else is one
    block from row 0.
    """
    if not isinstance(x, jax.Array):
        yield 0, _host(x)
        return
    for shard in x.addressable_shards:
        if shard.replica_id != 0:
            continue
        index = shard.index[0] if shard.index else slice(None)
        yield index.start or 0, _host(shard.data)


def _host(x: Any) -> np.ndarray:
    """`x` as a numpy array, bfloat16 and float8 read as float32.

    They are not numpy inexact types; float32 holds each of their values
    exactly.
    """
    values = np.asarray(x)
    if dtypes.is_inexact_dtype(values.dtype) and not np.issubdtype(
        values.dtype, np.inexact
    ):
        values = values.astype(np.float32)
    return values


def row_owners(x: Any, rows: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """``(process, device id)`` holding each of `rows` of batch leaf `x`.

    Read from the sharding (known to every process): no communication.
    Empty for a host array or a single-device one (nothing to name).
    """
    sharding = getattr(x, "sharding", None)
    if sharding is None or len(sharding.device_set) < 2 or not rows:
        return ()
    size = x.shape[0]
    holder: dict[int, Any] = {}
    placed = sorted(
        sharding.devices_indices_map(x.shape).items(), key=lambda kv: kv[0].id
    )
    for device, index in placed:
        part = index[0] if index else slice(None)
        for r in range(*part.indices(size)):
            holder.setdefault(r, device)
    return tuple(
        (holder[r].process_index, holder[r].id) if r in holder else (-1, -1)
        for r in rows
    )


def owners_of(
    inputs: Sequence[Any], axes: Sequence[bool], rows: Sequence[int]
) -> tuple[tuple[int, int], ...]:
    """`row_owners` of `rows` in the first sharded batch leaf of `inputs`."""
    for x, is_batch in zip(inputs, axes):
        if (
            is_batch
            and len(getattr(getattr(x, "sharding", None), "device_set", ())) > 1
        ):
            return row_owners(x, rows)
    return ()


def check_global(leaves: Sequence[Any], paths: Sequence[str], name: str) -> None:
    """Raises when, under several processes, a leaf is local to one process.

    A numpy array or a `jax.Array` on one process's devices only would be
    taken by the compiled step as the same value on every process: each
    process's local rows silently treated as the whole global batch.

    Raises:
        ValueError: naming the leaf and the fix, when `process_count() > 1`.
    """
    if process_count() == 1:
        return
    for x, path in zip(leaves, paths):
        if np.ndim(x) == 0:
            continue
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            continue
        kind = (
            "a numpy array"
            if not isinstance(x, jax.Array)
            else (f"a jax.Array on process {process_index()}'s devices only")
        )
        raise ValueError(
            f"jaxnan.guard: `{path}` of `{name}` is {kind} (shape "
            f"{tuple(np.shape(x))}), but this run has {process_count()} "
            "processes (jax.distributed) and the step takes global arrays: "
            "each process's local value would be taken as the whole array. "
            "Build it with jax.make_array_from_process_local_data(sharding, "
            "local_rows) (a batch) or jax.device_put(value, "
            "NamedSharding(mesh, P())) (a replicated value)."
        )
