"""`jaxnan.checked` on sharded values: a report on every device, every process.

JAX runs a host callback of a program with automatic sharding (a sharded
`jax.jit`) once, on the program's first device. With
``on_nonfinite="raise"`` that device stopped in the middle of the program
while the others waited for it in the next collective: on one process XLA
killed the process after its 40 s rendezvous timeout; under several
processes (`jax.distributed`) the others hung (as jax-ml/jax#11987 does
with `jax_debug_nans`), and only the process owning that device heard of
the nonfinite value at all.

So the report callback of a check on values sharded over a mesh runs
inside a `shard_map` over every device of that mesh, each device calling
it with its position: with ``"raise"`` every device raises at the same
point (none is left inside a collective that another has left);
``"warn"`` and a callable act once per process, on whichever of its
devices calls first (`per_device`). The check's predicate is the in-graph
one, reduced over the whole global value, so every process takes the
reporting branch of the same step, with the same counts.

Inside a `shard_map`/`pmap` body (whose callbacks already run on every
device), or for values on one device, the callback is the plain one.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.extend import source_info_util
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

source_info_util.register_exclusion(__file__)


def mesh_of(leaves: Sequence[Any]) -> Any:
    """The mesh to spread reports over, or None (see the module doc).

    Outside a `shard_map`/`pmap` body: the mesh of the first leaf whose
    (abstract) sharding has a mesh of several devices; else the mesh set by
    `jax.set_mesh`, if it has several devices.
    """
    context = jax.sharding.get_abstract_mesh()
    if context.manual_axes:
        return None
    found = None
    for x in leaves:
        sharding = getattr(x, "sharding", None)  # a concrete array's
        if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1:
            # Its concrete mesh: a shard_map over an abstract one fails to
            # lower where its operands derive from a closed-over constant.
            return sharding.mesh
        try:
            mesh = jax.typeof(x).sharding.mesh
        except (AttributeError, TypeError):
            continue
        if found is None and not mesh.empty and mesh.size > 1:
            found = mesh
    if found is not None:
        return found
    return None if context.empty or context.size < 2 else context


def per_device(host_fn: Callable, raises: bool) -> Callable:
    """`host_fn` taking the device position first, acting once per process.

    A raising policy raises on every device. Otherwise the n-th call from
    each device of this process is the same report (a device runs its
    program's callbacks in order; devices may lag one another), and only
    the first device to make its n-th call calls `host_fn`.
    """
    calls: collections.Counter = collections.Counter()
    done: set[int] = set()
    lock = threading.Lock()

    def host(pos: Any, *args: Any) -> np.ndarray:
        if raises:
            return host_fn(*args)
        with lock:
            calls[int(np.asarray(pos))] += 1
            n = calls[int(np.asarray(pos))]
            first = n not in done
            done.add(n)
        return host_fn(*args) if first else np.zeros((), np.float32)

    host.jaxnan_report = True  # type: ignore[attr-defined] - see host.host_fn
    return host


def report(mesh: Any, host_fn: Callable, raises: bool, tie: bool, *args: Any) -> Any:
    """Calls `host_fn(*args)` on every process (`tie`: a float32 0 token).

    Args:
        mesh: the mesh of the checked values (`mesh_of`).
        host_fn: the report (`host.Reporter.host_fn`).
        raises: whether the policy raises (then every device calls it).
        tie: `jax.pure_callback` returning the token, else
            `jax.debug.callback` (an effect) returning None.
        *args: the small replicated operands (counts, bad, total).
    """
    host = per_device(host_fn, raises)
    axes = tuple(mesh.axis_names)

    def body(*operands: Any) -> Any:
        pos = jax.lax.axis_index(axes)
        if not tie:
            jax.debug.callback(host, pos, *operands)
            return ()
        return jax.pure_callback(
            host,
            jax.ShapeDtypeStruct((), np.float32),
            pos,
            *operands,
            vmap_method="sequential",
        )

    out = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=tuple(P() for _ in args),
        out_specs=P() if tie else (),
        check_vma=False,
    )(*args)
    return out if tie else None
