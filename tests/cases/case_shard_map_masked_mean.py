"""Data-parallel loss with shard_map over 8 devices: each device averages the
token losses of its own shard as sum(loss * mask) / sum(mask). The batch is
padded, and every example that lands on device 5 is padding, so that device
computes 0/0 and the global loss is NaN.

Reported: https://github.com/allenai/OLMo-core/pull/452 ("possible to hit a
nan loss if all of the instances that land on one device are masked"); also
https://github.com/NVIDIA-NeMo/Automodel/issues/3796.
"""

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

EXPECT = {
    "primitive": "div",
    "phase": "forward",
    "cause": "unsafe_op",
    "device": 5,
    "seen": "div received a zero denominator: 0/0 at 1 of 1 position",
}


def make():
    mesh = Mesh(jax.devices()[:8], ("data",))

    def device_loss(w, x, y, mask):
        pred = x @ w
        tok = jnp.sum((pred - y) ** 2, axis=-1)
        return (jnp.sum(tok * mask) / jnp.sum(mask))[None]  # <- creates

    sharded = jax.shard_map(
        device_loss,
        mesh=mesh,
        in_specs=(P(), P("data"), P("data"), P("data")),
        out_specs=P("data"),
    )

    def loss(w, x, y, mask):
        return jnp.mean(sharded(w, x, y, mask))

    k1, k2 = jax.random.split(jax.random.key(0))
    w = jax.random.normal(k1, (4, 2))
    x = jax.random.normal(k2, (32, 4))
    mask = jnp.ones(32).at[20:24].set(0.0)  # device 5 holds rows 20-23: padding
    y = jnp.zeros((32, 2))
    return loss, (w, x, y, mask)
