"""Step time of `zscore_clip` and `adagc` chained before Adam, this tree vs another.

    python benchmarks/spike_scaling_cost.py                 # this checkout
    python benchmarks/spike_scaling_cost.py --tree ../main  # another checkout

The clip of both transforms is one select per leaf (`core/scaling.py`); it now
also keeps nonfinite entries and splits a subnormal factor in two, a few more
elementwise operations in the select. This prints XLA's cost analysis of
the compiled step (bytes accessed, flops: deterministic) and times the jitted step
``chain(T, adam)`` + ``optax.apply_updates`` on an MLP-sized tree (4 leaves,
1.1M float32 parameters) on a clipped step and on an unclipped one: median of
200 warm steps.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

parser = argparse.ArgumentParser()
parser.add_argument("--tree", default=os.path.dirname(os.path.dirname(__file__)))
parser.add_argument("--steps", type=int, default=200)
args = parser.parse_args()
sys.path.insert(0, os.path.abspath(args.tree))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import jaxnan  # noqa: E402

SHAPES = {"w1": (784, 1024), "b1": (1024,), "w2": (1024, 256), "b2": (256,)}


def _time(tx, grads, params):
    opt = optax.chain(tx, optax.adam(1e-3))

    @jax.jit
    def step(g, s, p):
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    state = opt.init(params)
    cost = step.lower(grads[0], state, params).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    p = params
    for _ in range(30):  # past warm-up: every transform is in its main regime
        p, state = step(grads[0], state, p)
    times = {"bytes": cost.get("bytes accessed", 0.0), "flops": cost.get("flops", 0.0)}
    for name, g in (("unclipped", grads[0]), ("clipped", grads[1])):
        ts = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            out = step(g, state, p)
            jax.block_until_ready(out)
            ts.append(time.perf_counter() - t0)
        times[name] = 1e3 * float(np.median(ts))
    return times


rng = np.random.default_rng(0)
params = {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in SHAPES.items()}
healthy = {
    k: jnp.asarray(0.01 * rng.normal(size=s), jnp.float32) for k, s in SHAPES.items()
}
spike = jax.tree_util.tree_map(lambda x: 1e3 * x, healthy)
for name, tx in (
    ("zscore_clip", jaxnan.zscore_clip(warmup=5)),
    ("adagc", jaxnan.adagc(warmup=5)),
):
    t = _time(tx, (healthy, spike), params)
    print(
        f"{name}: unclipped {t['unclipped']:.3f} ms, clipped {t['clipped']:.3f} ms, "
        f"bytes accessed {t['bytes'] / 1e6:.2f} MB, flops {t['flops'] / 1e6:.2f} M"
    )
