"""What the hang guard costs `skip_nonfinite(optax.contrib.galore(...))`.

galore takes the SVD of each 2-D gradient, which may never return on +-Inf
entries (LAPACK's gesdd); `skip_nonfinite` therefore hands it the gradients
with nonfinite entries set to 0 (`jaxnan/_src/transforms/hazards.py`). This
times a donated jitted step ``value_and_grad + update + apply_updates`` of a
two-layer MLP (256 -> 256 -> 128, batch 64) with galore: unguarded, guarded,
and guarded with that select turned off (the cost of the select alone).
Warm, interleaved rounds, the median per step.
Usage: ``python benchmarks/skip_hang.py [--rounds 7] [--steps 20]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxnan
from jaxnan._src.transforms import hazards


def loss_fn(params, batch):
    h = jnp.tanh(batch["x"] @ params["w1"] + params["b1"])
    return jnp.mean((h @ params["w2"] - batch["y"]) ** 2)


def make(variant: str):
    opt = optax.contrib.galore(1e-3)
    tx = opt if variant == "unguarded" else jaxnan.skip_nonfinite(opt)

    def step(params, state, batch):
        loss, g = jax.value_and_grad(loss_fn)(params, batch)
        extra = {} if variant == "unguarded" else {"loss": loss}
        u, state = tx.update(g, state, params, **extra)
        return optax.apply_updates(params, u), state

    fn = jax.jit(step, donate_argnums=(0, 1))
    return tx, fn


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    params = {
        "w1": jnp.asarray(rng.normal(size=(256, 256)) / 16, jnp.float32),
        "b1": jnp.zeros(256),
        "w2": jnp.asarray(rng.normal(size=(256, 128)) / 16, jnp.float32),
    }
    batch = {
        "x": jnp.asarray(rng.normal(size=(64, 256)), jnp.float32),
        "y": jnp.asarray(rng.normal(size=(64, 128)), jnp.float32),
    }
    runs = {}
    for variant in ("unguarded", "guarded", "guarded, no select"):
        tx, fn = make(variant)
        p = jax.tree_util.tree_map(jnp.copy, params)
        s = tx.init(p)
        no_select = mock.patch.dict(hazards.HANGS_ON_NONFINITE, clear=True)
        with no_select if variant.endswith("no select") else mock.MagicMock():
            p, s = fn(p, s, batch)  # compile (traced under the patch)
        jax.block_until_ready(p)
        runs[variant] = [fn, p, s, []]
    for _ in range(args.rounds):
        for run in runs.values():
            fn, p, s, times = run
            t0 = time.perf_counter()
            for _ in range(args.steps):
                p, s = fn(p, s, batch)
            jax.block_until_ready(p)
            times.append((time.perf_counter() - t0) / args.steps)
            run[1], run[2] = p, s
    base = statistics.median(runs["unguarded"][3])
    for variant, run in runs.items():
        med = statistics.median(run[3])
        print(f"{variant:20s} {med * 1e3:8.3f} ms/step  {med / base:.3f}x")


if __name__ == "__main__":
    main()
