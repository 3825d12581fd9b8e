"""Data-parallel training with jaxnan's guard, on every local device.

The batch is sharded over a 1-D mesh (`NamedSharding`), the parameters are
replicated, and `jaxnan.skip_nonfinite` decides inside the compiled step:
under sharded `jit` its reduction is global, so every device skips the same
step without any collective of ours. The host reads the guard's counters one
step late (never blocking the step in flight), and the first skipped step is
replayed under `jaxnan.locate`.

Run: python examples/data_parallel_guard.py  (on CPU, set
XLA_FLAGS=--xla_force_host_platform_device_count=8 to get 8 devices).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxnan


def loss_fn(params, batch):
    h = jnp.tanh(batch["x"] @ params["w1"] + params["b1"])
    pred = h @ params["w2"]
    return jnp.mean((pred - batch["y"]) ** 2 / batch["scale"])  # scale may be 0


def main(steps: int = 30, bad_step: int = 12) -> dict:
    devices = jax.devices()
    mesh = Mesh(np.array(devices), ("data",))
    data = NamedSharding(mesh, P("data"))
    replicated = NamedSharding(mesh, P())
    rng = np.random.default_rng(0)
    params = jax.device_put(
        {
            "w1": jnp.asarray(rng.normal(size=(4, 16)) / 2, jnp.float32),
            "b1": jnp.zeros(16),
            "w2": jnp.asarray(rng.normal(size=(16,)) / 4, jnp.float32),
        },
        replicated,
    )
    tx = jaxnan.skip_nonfinite(
        optax.chain(jaxnan.clip_by_global_norm(1.0), optax.adam(1e-2)), give_up_after=3
    )
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params, loss=loss)
        return optax.apply_updates(params, updates), opt_state, loss

    n = 8 * len(devices)
    pending, skipped = None, []
    for i in range(steps):
        x = rng.normal(size=(n, 4)).astype(np.float32)
        scale = np.ones(n, np.float32)
        if i == bad_step:
            scale[n - 1] = 0.0  # one bad example, on the last device only
        batch = jax.device_put({"x": x, "y": np.sin(x.sum(1)), "scale": scale}, data)
        before = params
        params, opt_state, loss = step(params, opt_state, batch)
        if pending is not None:  # the previous step is finished: reading is free
            j, p_before, p_batch, p_state = pending
            if int(p_state.last_nonfinite_step) == j:
                skipped.append((j, p_before, p_batch))
        pending = (i, before, batch, opt_state)
    result = {
        "skipped": [j for j, _, _ in skipped],
        "total": int(opt_state.nonfinite_total),
        "params_finite": bool(jaxnan.all_finite(params)),
    }
    if skipped:
        j, p_before, p_batch = skipped[0]
        result["diagnosis"] = jaxnan.locate(jax.value_and_grad(loss_fn))(
            p_before, p_batch
        )
    return result


if __name__ == "__main__":
    out = main()
    print(f"skipped steps {out['skipped']}, params finite: {out['params_finite']}")
    if "diagnosis" in out:
        print(out["diagnosis"])
