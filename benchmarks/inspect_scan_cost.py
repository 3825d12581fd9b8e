"""Cost of `activation_stats` on a scan over layers (shared 2-core CPU: noisy).

A stack of L tanh-MLP layers (d 256, batch 64) run by `lax.scan` over stacked
parameters, and the same layers unrolled by a Python loop. For each: the run
of ``jax.jit(activation_stats(net))`` against ``jax.jit(net)`` (warm,
interleaved, medians, compile excluded), its compile time, and the layers
reported (one per iteration for the scan). The nested cases run the scanned
stack inside a `lax.scan` over M microbatches (the batch split M ways, the
parameters closed over): its forward pass, and gradient accumulation (the
body calls ``jax.value_and_grad`` of the stack's loss), each against the
same function jitted without jaxnan, and the accumulation with its
microbatch loop unrolled by Python (what the loop itself costs).

Run: python benchmarks/inspect_scan_cost.py [--layers 8] [--rounds 15]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]  # this checkout's jaxnan
from inspect_cost import interleaved  # noqa: E402

import jaxnan  # noqa: E402

D, B = 256, 64


def _layer(h, p):
    with jax.named_scope("mlp"):
        u = jnp.tanh(h @ p["w1"] + p["b1"])
        return h + u @ p["w2"]


def scanned(params, x):
    h, _ = lax.scan(lambda h, p: (_layer(h, p), None), x, params)
    return h


def unrolled(params, x):
    n = params["w1"].shape[0]
    for i in range(n):
        x = _layer(x, jax.tree_util.tree_map(lambda a, i=i: a[i], params))
    return x


M = 4  # microbatches of the nested cases


def _microbatches(x):
    return x.reshape(M, x.shape[0] // M, *x.shape[1:])


def value_and_grad(params, x):
    return jax.value_and_grad(lambda p: jnp.mean(scanned(p, x)))(params)


def nested_forward(params, x):
    def micro(acc, xb):
        return acc + jnp.mean(scanned(params, xb)), None

    return lax.scan(micro, jnp.float32(0), _microbatches(x))[0]


def nested_accumulation(params, x):
    def micro(acc, xb):
        loss, g = jax.value_and_grad(lambda p: jnp.mean(scanned(p, xb)))(params)
        return jax.tree_util.tree_map(jnp.add, acc, g), loss

    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    g, losses = lax.scan(micro, zeros, _microbatches(x))
    return losses.mean(), g


def unrolled_accumulation(params, x):
    acc = jax.tree_util.tree_map(jnp.zeros_like, params)
    losses = []
    for xb in _microbatches(x):  # the microbatch loop unrolled by Python
        loss, g = jax.value_and_grad(lambda p, xb=xb: jnp.mean(scanned(p, xb)))(params)
        acc = jax.tree_util.tree_map(jnp.add, acc, g)
        losses.append(loss)
    return jnp.mean(jnp.stack(losses)), acc


def _params(n):
    rng = np.random.default_rng(0)
    s = 1 / np.sqrt(D)
    return {
        "w1": jnp.asarray(rng.normal(size=(n, D, D)) * s, jnp.float32),
        "b1": jnp.zeros((n, D), jnp.float32),
        "w2": jnp.asarray(rng.normal(size=(n, D, D)) * s, jnp.float32),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    params = _params(args.layers)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(B, D)), jnp.float32)
    cases = (
        ("lax.scan", scanned),
        ("unrolled", unrolled),
        ("lax.scan, value_and_grad, whole batch", value_and_grad),
        (f"lax.scan in a scan over {M} microbatches (forward)", nested_forward),
        (
            f"lax.scan in a scan over {M} microbatches (value_and_grad)",
            nested_accumulation,
        ),
        (f"the {M} microbatches unrolled (value_and_grad)", unrolled_accumulation),
    )
    for name, net in cases:
        stats_fn = jax.jit(jaxnan.activation_stats(net))
        t0 = time.perf_counter()
        stats = jax.block_until_ready(stats_fn(params, x))
        compile_s = time.perf_counter() - t0
        med = interleaved(
            {"plain": jax.jit(net), "stats": stats_fn}, (params, x), args.rounds
        )
        print(
            f"{name}: {len(stats)} layers, run {med['stats'] / med['plain']:.2f}x "
            f"the plain function ({med['plain'] * 1e3:.2f} ms), first call "
            f"(trace + compile + run) {compile_s:.2f} s"
        )


if __name__ == "__main__":
    main()
