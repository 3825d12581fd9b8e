"""What an untaken reporting branch costs, by the kind of host callback in it.

Usage: python benchmarks/studies/callback_cost.py [--rounds 30]

The SGD steps of `benchmarks/decorators.py` (MLP and transformer), plain and
with a finite check of the gradients (`jaxnan.all_finite`) in four forms: the
bare flag returned as an output; a `lax.cond` whose untaken branch calls
`jax.debug.callback` (a JAX effect); and one whose untaken branch calls
`jax.pure_callback`, its result tied into the loss with ``loss - r * 0`` (no
effect). Two more rows check only the scalar loss, so that no memory pass is
involved: a `lax.cond` whose untaken branch computes a number on the device,
and the same with a `jax.pure_callback` in that branch. Their difference is
what the mere presence of a host callback in the executable costs per step
(it never runs). Interleaved, warm, median of per-round ratios to the plain
step, and the median per-step difference in microseconds.
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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import decorators as models  # noqa: E402

import jaxnan  # noqa: E402


def _host_effect(flag):
    print("nonfinite gradients", flag)


def _host_pure(flag):
    print("nonfinite gradients", flag)
    return np.zeros((), np.float32)


def _untaken(ok, operand, callback):
    """A float32 0 from a `lax.cond` whose other branch is never taken."""

    def report(x):
        if callback:
            return jax.pure_callback(
                _host_pure, jax.ShapeDtypeStruct((), jnp.float32), x
            )
        return x * 0 + 1

    return lax.cond(ok, lambda x: jnp.zeros((), jnp.float32), report, operand)


MODELS = {
    "mlp": (models.mlp_setup, models.mlp_loss),
    "transformer": (models.tf_setup, models.tf_loss),
}


def make_step(kind, loss_fn):
    def step(p, b):
        loss, g = jax.value_and_grad(loss_fn)(p, b)
        new_p = jax.tree.map(lambda a, c: a - 0.01 * c, p, g)
        if kind == "plain":
            return new_p, loss
        if kind.startswith("loss"):
            ok = jnp.isfinite(loss)
            return new_p, loss - _untaken(ok, loss, "pure_callback" in kind) * 0
        ok = jaxnan.all_finite(g)
        if kind == "flag":
            return new_p, loss, ok
        if kind == "debug.callback":
            lax.cond(ok, lambda: None, lambda: jax.debug.callback(_host_effect, ok))
            return new_p, loss
        return new_p, loss - _untaken(ok, ok, callback=True) * 0

    return jax.jit(step)


KINDS = [
    "plain",
    "flag",
    "debug.callback",
    "pure_callback (tied)",
    "loss only: cond, device branch",
    "loss only: cond, pure_callback branch",
]


def bench(model, rounds):
    setup, loss_fn = MODELS[model]
    params, batch = setup(jax.random.PRNGKey(0))
    fns = {k: make_step(k, loss_fn) for k in KINDS}
    for f in fns.values():
        jax.block_until_ready(f(params, batch))
    times = {k: [] for k in KINDS}
    for _ in range(rounds):
        for k in random.sample(KINDS, len(KINDS)):
            f, p = fns[k], params
            t0 = time.perf_counter()
            for _ in range(10):
                p = f(p, batch)[0]
            jax.block_until_ready(p)
            times[k].append((time.perf_counter() - t0) / 10)
    print(f"\n{model}: plain step {statistics.median(times['plain']) * 1e3:.2f} ms")
    print("| check | step time (median per-round ratio) | per step |")
    print("|---|---|---|")
    for k in KINDS[1:]:
        ratios = [a / b for a, b in zip(times[k], times["plain"])]
        extra = [1e6 * (a - b) for a, b in zip(times[k], times["plain"])]
        print(
            f"| {k} | {statistics.median(ratios):.3f}x | "
            f"{statistics.median(extra):+.0f} us |"
        )


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--models", default="mlp,transformer")
    args = ap.parse_args(argv)
    dev = jax.devices()[0]
    print(f"device: {dev.platform} ({dev.device_kind}), jax {jax.__version__}")
    for model in args.models.split(","):
        bench(model, args.rounds)


if __name__ == "__main__":
    main()
