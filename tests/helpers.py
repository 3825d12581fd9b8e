"""Test helpers: checks that can fail, and sharding shortcuts.

`jax.transfer_guard("disallow")` does not stop host callbacks
(`jax.debug.callback`, `pure_callback`, `io_callback`), so a "no host sync"
test built on it passes whatever the program does. `assert_no_host_callback`
looks at the lowered program instead.
"""

from __future__ import annotations

import re

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

# What a host callback lowers to on CPU, GPU and TPU (the custom-call targets
# `xla_python_cpu_callback`, `xla_ffi_python_cpu_callback`,
# `xla_python_gpu_callback`, ... and the `callback` attributes).
_CALLBACK = re.compile(r"callback", re.IGNORECASE)


def host_callbacks(fn, *args, **kwargs) -> list[str]:
    """Lines of the lowered `jax.jit(fn)(*args)` that call back to the host."""
    text = jax.jit(fn).lower(*args, **kwargs).as_text()
    return [ln.strip() for ln in text.splitlines() if _CALLBACK.search(ln)]


def assert_no_host_callback(fn, *args, **kwargs) -> None:
    """Fails when the lowered `jax.jit(fn)(*args)` holds a host callback."""
    found = host_callbacks(fn, *args, **kwargs)
    assert not found, "host callback in the lowered program:\n" + "\n".join(found[:5])


def mesh_1d(n: int = 8, name: str = "d") -> Mesh:
    """A 1-D mesh over the first `n` (forced CPU) devices."""
    return Mesh(jax.devices()[:n], (name,))


def replicate(tree, mesh: Mesh):
    """`tree` with every leaf replicated over `mesh`."""
    return jax.device_put(tree, NamedSharding(mesh, P()))


def shard_leading(tree, mesh: Mesh):
    """`tree` with each leaf whose leading axis divides the mesh size sharded
    along it, the others replicated."""
    n = int(np.prod(mesh.devices.shape))
    axis = mesh.axis_names[0]

    def one(x):
        shape = np.shape(x)
        spec = P(axis) if shape and shape[0] % n == 0 else P()
        return jax.device_put(x, NamedSharding(mesh, spec))

    return jax.tree_util.tree_map(one, tree)


def buffer_pointers(tree) -> list[int]:
    """The device buffer address of every array shard in `tree`."""
    out = []
    for x in jax.tree_util.tree_leaves(tree):
        for shard in x.addressable_shards:
            out.append(shard.data.unsafe_buffer_pointer())
    return out
