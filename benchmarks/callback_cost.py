"""What an untaken reporting branch costs, by the kind of host callback in it.

Usage: python benchmarks/callback_cost.py [--rounds 30]

The MLP SGD step of `benchmarks/decorators.py`, plain and with a finite check
of the gradients (`jaxnan.all_finite`) in four forms: the bare flag returned
as an output; a `lax.cond` whose untaken branch calls `jax.debug.callback`
(a JAX effect); and one whose untaken branch calls `jax.pure_callback`, its
result tied into the loss with ``loss - r * 0`` (no effect). Interleaved,
warm, median of per-round ratios to the plain step.
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
import numpy as np
from jax import lax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import decorators as models  # noqa: E402

import jaxnan  # noqa: E402


def _host_effect(flag):
    print("nonfinite gradients", flag)


def _host_pure(flag):
    print("nonfinite gradients", flag)
    return np.zeros((), np.float32)


def make_step(kind):
    def step(p, b):
        loss, g = jax.value_and_grad(models.mlp_loss)(p, b)
        new_p = jax.tree.map(lambda a, c: a - 0.01 * c, p, g)
        if kind == "plain":
            return new_p, loss
        ok = jaxnan.all_finite(g)
        if kind == "flag":
            return new_p, loss, ok
        if kind == "debug.callback":
            lax.cond(ok, lambda: None, lambda: jax.debug.callback(_host_effect, ok))
            return new_p, loss
        r = lax.cond(
            ok,
            lambda: jnp.zeros((), jnp.float32),
            lambda: jax.pure_callback(
                _host_pure, jax.ShapeDtypeStruct((), jnp.float32), ok
            ),
        )
        return new_p, loss - r * 0

    return jax.jit(step)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=30)
    args = ap.parse_args(argv)
    params, batch = models.mlp_setup(jax.random.PRNGKey(0))
    kinds = ["plain", "flag", "debug.callback", "pure_callback (tied)"]
    fns = {k: make_step(k) for k in kinds}
    for f in fns.values():
        jax.block_until_ready(f(params, batch))
    times = {k: [] for k in kinds}
    for _ in range(args.rounds):
        for k in random.sample(kinds, len(kinds)):
            f, p = fns[k], params
            t0 = time.perf_counter()
            for _ in range(10):
                p = f(p, batch)[0]
            jax.block_until_ready(p)
            times[k].append((time.perf_counter() - t0) / 10)
    dev = jax.devices()[0]
    print(f"device: {dev.platform} ({dev.device_kind}), jax {jax.__version__}")
    print(f"plain step: {statistics.median(times['plain']) * 1e3:.2f} ms")
    print("| gradient check | step time (median per-round ratio) |")
    print("|---|---|")
    for k in kinds[1:]:
        ratios = [a / b for a, b in zip(times[k], times["plain"])]
        print(f"| {k} | {statistics.median(ratios):.3f}x |")


if __name__ == "__main__":
    main()
