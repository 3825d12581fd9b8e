"""The floor of any separate finite check: one extra read of params and grads.

Usage: python benchmarks/pass_floor.py

Times a jitted SGD step of the ~1M-parameter MLP with and without two fused
`sum(x * 0)` reductions (one over the parameters, one over the gradients): no
conditional, no callback, nothing but the two extra reads. On a memory-bound
step this is what a check that cannot fuse into the model's own loops costs.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from models import MODELS  # noqa: E402


def main():
    init, loss_fn, batch_fn = MODELS["mlp"]
    params = init(jax.random.PRNGKey(0))
    batch = batch_fn(jax.random.PRNGKey(1))

    def sgd(p, b):
        g = jax.grad(loss_fn)(p, b)
        return jax.tree.map(lambda a, gg: a - 1e-3 * gg, p, g)

    def sgd_two_reads(p, b):
        g = jax.grad(loss_fn)(p, b)
        s = sum(jnp.sum(x * 0) for x in jax.tree.leaves((p, g)))
        return jax.tree.map(lambda a, gg: a - 1e-3 * gg, p, g), s

    fns = {"plain": jax.jit(sgd), "two extra reads": jax.jit(sgd_two_reads)}
    for f in fns.values():
        jax.block_until_ready(f(params, batch))
    times = {k: [] for k in fns}
    for _ in range(20):
        for k, f in fns.items():
            t0 = time.perf_counter()
            for _ in range(10):
                out = f(params, batch)
            jax.block_until_ready(out)
            times[k].append((time.perf_counter() - t0) / 10)
    ratios = [a / b for a, b in zip(times["two extra reads"], times["plain"])]
    plain_ms = statistics.median(times["plain"]) * 1e3
    print(
        f"plain {plain_ms:.2f} ms/step; two extra reads: "
        f"{statistics.median(ratios):.3f}x (median of per-round ratios)"
    )


if __name__ == "__main__":
    main()
