"""The floor of any separate finite check: one extra read of params and grads.

Usage: python benchmarks/studies/pass_floor.py [--rounds 30]

Times a jitted SGD step of the ~1M-parameter MLP plain, and with two extra
reads (one over the parameters, one over the gradients) in two forms: a
single-operand `sum(x * 0)` per leaf (NaN exactly when an element is
nonfinite), and `jaxnan.all_finite`, which counts NaN and Inf elements of
each leaf in one variadic int32 reduction. No conditional, no callback,
nothing but the reads. On a memory-bound step this is what a check that
cannot fuse into the model's own loops costs, and how much the form of the
reduction matters on XLA's CPU backend.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from models import MODELS  # noqa: E402

import jaxnan  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=30)
    args = ap.parse_args(argv)
    init, loss_fn, batch_fn = MODELS["mlp"]
    params = init(jax.random.PRNGKey(0))
    batch = batch_fn(jax.random.PRNGKey(1))

    def update(p, g):
        return jax.tree.map(lambda a, gg: a - 1e-3 * gg, p, g)

    def sgd(p, b):
        return update(p, jax.grad(loss_fn)(p, b))

    def sgd_zero_sum(p, b):
        g = jax.grad(loss_fn)(p, b)
        s = sum(jnp.sum(x * 0) for x in jax.tree.leaves((p, g)))
        return update(p, g), jnp.isfinite(s)

    def sgd_counts(p, b):
        g = jax.grad(loss_fn)(p, b)
        return update(p, g), jaxnan.all_finite(p) & jaxnan.all_finite(g)

    fns = {
        "plain": jax.jit(sgd),
        "sum(x * 0) per leaf": jax.jit(sgd_zero_sum),
        "jaxnan.all_finite (variadic int32 counts)": jax.jit(sgd_counts),
    }
    for f in fns.values():
        jax.block_until_ready(f(params, batch))
    times = {k: [] for k in fns}
    for _ in range(args.rounds):
        for k in random.sample(list(fns), len(fns)):
            f = fns[k]
            t0 = time.perf_counter()
            for _ in range(10):
                out = f(params, batch)
            jax.block_until_ready(out)
            times[k].append((time.perf_counter() - t0) / 10)
    plain_ms = statistics.median(times["plain"]) * 1e3
    dev = jax.devices()[0]
    print(f"device: {dev.platform} ({dev.device_kind}), jax {jax.__version__}")
    print(f"plain SGD step: {plain_ms:.2f} ms (median)")
    print("| two extra reads (params + grads) | step time (median per-round ratio) |")
    print("|---|---|")
    for k in list(fns)[1:]:
        ratios = [a / b for a, b in zip(times[k], times["plain"])]
        print(f"| {k} | {statistics.median(ratios):.3f}x |")


if __name__ == "__main__":
    main()
