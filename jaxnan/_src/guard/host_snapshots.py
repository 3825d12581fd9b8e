"""Copies of a state in host memory, taken without waiting, put back whole.

A rollback snapshot of a large model cannot live on the device: its state
is most of the device's memory. `to_host` copies each state leaf's shards
that this process holds into host memory and returns at once:

* where the backend has a host memory kind (``pinned_host`` on GPU, TPU and
  CPU), each distinct shard goes to that memory of its own device with one
  `jax.device_put` for the whole state: an asynchronous copy that the
  runtime orders after the step writing the leaf, so the host does not wait
  for the step and the step does not wait for the copy;
* otherwise each distinct shard is read into a numpy array (the copies are
  started together with `copy_to_host_async`, then read: the host waits for
  the step that wrote the state, once per snapshot).

Only this process's addressable shards are copied, each distinct block once
(a leaf replicated over 8 local devices is one host copy, not 8): nothing is
gathered from other processes, and under FSDP each process keeps its own
slice. `to_device` puts a copy back with one `jax.device_put` of every
block to every device that holds it, into the leaf's original sharding and
memory kind, bit for bit.

Examples:
    >>> import jax.numpy as jnp
    >>> from jaxnan._src.guard import host_snapshots
    >>> copy = host_snapshots.to_host([jnp.arange(3.0)])
    >>> host_snapshots.on_device(copy)
    False
    >>> host_snapshots.to_device(copy)[0].tolist()
    [0.0, 1.0, 2.0]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.extend import source_info_util
from jax.sharding import SingleDeviceSharding

source_info_util.register_exclusion(__file__)

HOST_KIND = "pinned_host"
"""The memory kind snapshots go to where a device has it."""


def host_kind(device: Any) -> str | None:
    """`HOST_KIND` when `device` has that memory, else None (numpy copies).

    Examples:
        >>> import jax
        >>> from jaxnan._src.guard import host_snapshots
        >>> host_snapshots.host_kind(jax.devices()[0])
        'pinned_host'
    """
    try:
        kinds = {m.kind for m in device.addressable_memories()}
    except Exception:  # noqa: BLE001 - a backend without memory spaces
        return None
    return HOST_KIND if HOST_KIND in kinds else None


def _key(index: tuple, shape: tuple[int, ...]) -> tuple:
    """A hashable, normalised form of a shard's index (its block of `shape`)."""
    return tuple(s.indices(n) for s, n in zip(index, shape))


@dataclasses.dataclass(frozen=True)
class HostLeaf:
    """One state leaf in host memory: this process's distinct blocks.

    Attributes:
        value: for a leaf that is not a `jax.Array` (a numpy array, a Python
            scalar), its copy; None otherwise.
        shape: the leaf's global shape.
        sharding: the leaf's sharding (with its memory kind) to restore into.
        blocks: ``{block key: host copy}``, one per distinct block this
            process holds (pinned-host `jax.Array`s or numpy arrays).
        placement: ``(device, block key)`` for every addressable device of
            the sharding, in the order the array's shards come.
    """

    value: Any
    shape: tuple[int, ...] = ()
    sharding: Any = None
    blocks: dict = dataclasses.field(default_factory=dict)
    placement: tuple = ()

    @property
    def nbytes(self) -> int:
        """Host bytes this process holds for the leaf."""
        if self.value is not None:
            return int(np.asarray(self.value).nbytes)
        return sum(int(b.nbytes) for b in self.blocks.values())


def to_host(leaves: Sequence[Any]) -> list[HostLeaf]:
    """A host copy of `leaves` (this process's distinct blocks), returned at once.

    Blocks of devices with a `HOST_KIND` memory are copied there by one
    asynchronous `jax.device_put`; others are read into numpy (see the
    module docstring). The copy is independent of `leaves`: donating them
    to the next step leaves it intact.
    """
    out: list[HostLeaf] = []
    moves: list[tuple[dict, tuple, Any]] = []  # (blocks of a leaf, key, shard data)
    for x in leaves:
        if not isinstance(x, jax.Array):
            out.append(HostLeaf(value=np.array(x, copy=True)))
            continue
        blocks: dict = {}
        placement = []
        for shard in x.addressable_shards:
            key = _key(shard.index, tuple(x.shape))
            placement.append((shard.device, key))
            if key not in blocks:
                blocks[key] = None
                moves.append((blocks, key, shard.data))
        out.append(HostLeaf(None, tuple(x.shape), x.sharding, blocks, tuple(placement)))
    pinned = [m for m in moves if host_kind(m[2].device)]
    if pinned:
        targets = [
            SingleDeviceSharding(d.device, memory_kind=HOST_KIND) for _, _, d in pinned
        ]
        copies = jax.device_put([d for _, _, d in pinned], targets, may_alias=False)
        for (blocks, key, _), copy in zip(pinned, copies):
            blocks[key] = copy
    rest = [m for m in moves if not host_kind(m[2].device)]
    for _, _, d in rest:
        d.copy_to_host_async()
    for blocks, key, d in rest:
        blocks[key] = np.array(d, copy=True)
    return out


def to_device(copy: Sequence[HostLeaf]) -> list[Any]:
    """The leaves of `copy` on their devices again: one `jax.device_put`, bit-exact.

    Every block goes to every addressable device that holds it, in the
    leaf's original memory kind; each leaf is then assembled in its original
    sharding (`jax.make_array_from_single_device_arrays`, no copy).
    """
    blocks, targets = [], []
    for leaf in copy:
        if leaf.value is not None:
            continue
        kind = getattr(leaf.sharding, "memory_kind", None)
        for device, key in leaf.placement:
            blocks.append(leaf.blocks[key])
            targets.append(SingleDeviceSharding(device, memory_kind=kind))
    placed = iter(jax.device_put(blocks, targets, may_alias=False)) if blocks else None
    leaves = []
    for leaf in copy:
        if leaf.value is not None:
            leaves.append(np.array(leaf.value, copy=True))
            continue
        arrays = [next(placed) for _ in leaf.placement]
        leaves.append(
            jax.make_array_from_single_device_arrays(leaf.shape, leaf.sharding, arrays)
        )
    return leaves


def on_device(copy: Sequence[HostLeaf]) -> bool:
    """Whether any block of `copy` is a `jax.Array` in a device memory kind.

    False for every copy `to_host` makes: the snapshots hold no device
    buffer.
    """
    for leaf in copy:
        for block in leaf.blocks.values():
            if isinstance(block, jax.Array) and block.sharding.memory_kind not in (
                HOST_KIND,
                "unpinned_host",
            ):
                return True
    return False


def host_bytes(copy: Sequence[HostLeaf]) -> int:
    """Host bytes of `copy` held by this process."""
    return sum(leaf.nbytes for leaf in copy)
