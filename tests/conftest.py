"""Test configuration: 8 forced CPU devices, set before any JAX computation."""

import jax

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_platforms", "cpu")

import functools  # noqa: E402

import pytest  # noqa: E402
from jax.sharding import Mesh  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402


@pytest.fixture(scope="session")
def mesh8():
    """A 1-D mesh over the 8 forced CPU devices, axis name 'd'."""
    return Mesh(jax.devices()[:8], ("d",))


def shard_map_over(mesh, fn, in_specs, out_specs):
    """`jax.shard_map` with replication checks off (used by several tests)."""
    return jax.jit(
        jax.shard_map(
            fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False
        )
    )


__all__ = ["P", "functools", "shard_map_over"]
