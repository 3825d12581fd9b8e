"""Helpers shared by the tests: marker lines in source files, sharding."""

import pathlib

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = [
    "P",
    "marker_line",
    "marker_lines",
    "mesh_of",
    "shard_map_over",
    "sharded",
    "tagged_line",
]


def marker_lines(path, marker: str) -> list[int]:
    """The 1-based numbers of the lines of `path` that contain `marker`."""
    text = pathlib.Path(path).read_text()
    return [i for i, line in enumerate(text.splitlines(), 1) if marker in line]


def marker_line(path, marker: str) -> int:
    """The number of the one line of `path` that contains `marker`."""
    lines = marker_lines(path, marker)
    if len(lines) != 1:
        raise AssertionError(f"{marker!r} is on lines {lines} of {path}, not once")
    return lines[0]


def tagged_line(path, tag: str) -> int:
    """The number of the line of `path` ending with ``# <- tag``."""
    text = pathlib.Path(path).read_text()
    lines = [
        i
        for i, line in enumerate(text.splitlines(), 1)
        if line.rstrip().endswith(f"# <- {tag}")
    ]
    if len(lines) != 1:
        raise AssertionError(f"'# <- {tag}' ends lines {lines} of {path}, not one")
    return lines[0]


def mesh_of(n: int = 8, axis: str = "d") -> Mesh:
    """A 1-D mesh over the first `n` (forced CPU) devices."""
    return Mesh(jax.devices()[:n], (axis,))


def sharded(x, mesh: Mesh, spec=None):
    """`x` placed on `mesh` with `spec` (split along its first axis by default)."""
    spec = P(mesh.axis_names[0]) if spec is None else spec
    return jax.device_put(x, NamedSharding(mesh, spec))


def shard_map_over(mesh, fn, in_specs, out_specs):
    """`jax.shard_map` with replication checks off, jitted."""
    return jax.jit(
        jax.shard_map(
            fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False
        )
    )
