"""`jaxnan.locate` names the device and process holding the first nonfinite value.

One process, the 8 CPU devices forced by `tests/conftest.py`: a sharded
`jit` (1-D and 2-D meshes), `shard_map` and `pmap`. The report's first line
says ``on device 5 (process 0)``. (Two processes: `tests/test_multihost_api.py`.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxnan


def _first_line(d) -> str:
    return str(d).splitlines()[0]


def test_sharded_jit_names_device_and_process(mesh8):
    # 16 elements over 8 devices: element 11 is on the 6th device (index 5)
    x = jax.device_put(jnp.arange(16.0).at[11].set(-1.0), NamedSharding(mesh8, P("d")))
    d = jaxnan.locate(jax.jit(lambda x: jnp.sum(jnp.log(x + 1.0))))(x)
    device = mesh8.devices.flat[5].id
    assert (d.primitive, d.device, d.process) == ("log", device, 0)
    assert _first_line(d).endswith(f"on device {device} (process 0).")
    assert d.to_dict()["process"] == 0


def test_sharded_jit_on_a_2d_mesh_names_the_first_holder():
    devices = np.array(jax.devices()).reshape(2, 4)
    mesh = Mesh(devices, ("data", "model"))
    x = jnp.ones((4, 8)).at[3, 5].set(0.0)  # rows 2-3: data 1; cols 4-5: model 2
    x = jax.device_put(x, NamedSharding(mesh, P("data", "model")))
    d = jaxnan.locate(jax.jit(lambda x: jnp.log(x) * 2.0))(x)
    assert d.primitive == "log"
    assert (d.device, d.process) == (devices[1, 2].id, 0)
    # replicated over "model": the lowest id among the devices holding it
    y = jax.device_put(x, NamedSharding(mesh, P("data", None)))
    d = jaxnan.locate(jax.jit(lambda x: jnp.log(x) * 2.0))(y)
    assert (d.device, d.process) == (devices[1, 0].id, 0)


def test_replicated_event_names_no_device(mesh8):
    x = jax.device_put(jnp.arange(16.0), NamedSharding(mesh8, P("d")))
    d = jaxnan.locate(jax.jit(lambda x: jnp.log(jnp.sum(x) - 120.0)))(x)
    assert d.primitive == "log"
    assert (d.device, d.process) == (None, None)  # every device holds the sum
    assert "on device" not in str(d)


def test_shard_map_names_device_and_process(mesh8):
    f = jax.shard_map(
        lambda x: jnp.sqrt(x - 1.0), mesh=mesh8, in_specs=P("d"), out_specs=P("d")
    )
    x = jnp.full(16, 2.0).at[7].set(0.5).at[14].set(0.0)  # shards 3 and 7 go bad
    d = jaxnan.locate(f)(x)
    device = mesh8.devices.flat[3].id
    assert (d.primitive, d.device, d.process) == ("sqrt", device, 0)
    assert _first_line(d).endswith(f"on device {device} (process 0).")


def test_partial_manual_shard_map_names_the_position_on_its_manual_axes():
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    f = jax.jit(
        jax.shard_map(
            jnp.log,
            mesh=mesh,
            in_specs=P("data"),
            out_specs=P("data"),
            axis_names={"data"},
        )
    )
    x = jnp.ones((4, 8)).at[3, 5].set(0.0)  # rows 2-3: data position 1
    d = jaxnan.locate(f)(jax.device_put(x, NamedSharding(mesh, P("data", "model"))))
    assert (d.primitive, d.device, d.process) == ("log", 1, None)
    assert _first_line(d).endswith("at position 1 of the shard_map's manual mesh axes.")


def test_pmap_names_device_and_process():
    f = jax.pmap(lambda x: jnp.log(x) + lax.psum(x, "i"), axis_name="i")
    d = jaxnan.locate(f)(jnp.ones((8, 2)).at[6, 0].set(-1.0))
    device = jax.devices()[6].id
    assert (d.primitive, d.device, d.process) == ("log", device, 0)
    assert _first_line(d).endswith(f"on device {device} (process 0).")


def test_unsharded_names_no_device():
    d = jaxnan.locate(lambda x: jnp.log(x))(jnp.zeros(3))
    assert (d.device, d.process) == (None, None)
    assert _first_line(d).endswith("pass of `<lambda>`.")
