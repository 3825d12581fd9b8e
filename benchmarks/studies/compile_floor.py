"""The compile-time floor of an in-graph finite check, next to the guards.

Usage: python benchmarks/studies/compile_floor.py [--reps 7] [--models mlp,transformer]

For the adamw train steps of `benchmarks/overhead.py`, times fresh
``jit(...).lower(...)`` (tracing) and ``.compile()`` (XLA) of: the plain
step; the plain step that also returns ``jaxnan.all_finite(grads)`` (no
conditional, no select: the least any exact check of the gradients adds);
`jaxnan.skip_nonfinite(adamw)` with the loss checked; and
`optax.apply_if_finite(adamw)`. Variants are interleaved, each repetition
builds new function objects (nothing cached), and the table shows medians
and the ratio of lower+compile to the plain step's.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time

import jax
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from models import MODELS  # noqa: E402
from overhead import make_step  # noqa: E402

import jaxnan  # noqa: E402

LR = 1e-3


def variants(loss_fn):
    adamw = optax.adamw(LR)

    def flag_step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = adamw.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        return new_params, opt_state, loss, jaxnan.all_finite(grads)

    skip = jaxnan.skip_nonfinite(optax.adamw(LR))
    aif = optax.apply_if_finite(optax.adamw(LR), 10)
    return {
        "plain adamw": (make_step(loss_fn, optax.adamw(LR)), optax.adamw(LR)),
        "plain + all_finite(grads) as an output": (flag_step, adamw),
        "jaxnan.skip_nonfinite(adamw), loss checked": (
            make_step(loss_fn, skip, pass_loss=True),
            skip,
        ),
        "optax.apply_if_finite(adamw)": (make_step(loss_fn, aif), aif),
    }


def bench(model, reps):
    init, loss_fn, batch_fn = MODELS[model]
    params = init(jax.random.PRNGKey(0))
    batch = batch_fn(jax.random.PRNGKey(1))
    vs = variants(loss_fn)
    lower = {k: [] for k in vs}
    comp = {k: [] for k in vs}
    for r in range(reps + 1):
        for k, (step, tx) in vs.items():
            fresh = functools.wraps(step)(lambda *a, _s=step: _s(*a))
            state = tx.init(params)
            t0 = time.perf_counter()
            lowered = jax.jit(fresh, donate_argnums=(0, 1)).lower(params, state, batch)
            t1 = time.perf_counter()
            lowered.compile()
            t2 = time.perf_counter()
            if r:  # the first repetition warms up the tracing caches
                lower[k].append(t1 - t0)
                comp[k].append(t2 - t1)
    base = statistics.median(lower["plain adamw"]) + statistics.median(
        comp["plain adamw"]
    )
    print(f"\n{model}")
    print("| variant | lower | compile | lower+compile ratio |")
    print("|---|---|---|---|")
    for k in vs:
        lo, co = statistics.median(lower[k]), statistics.median(comp[k])
        ratio = (lo + co) / base
        print(f"| {k} | {lo * 1e3:.0f} ms | {co * 1e3:.0f} ms | {ratio:.2f}x |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--models", default="mlp,transformer")
    args = ap.parse_args(argv)
    dev = jax.devices()[0]
    print(f"device: {dev.platform} ({dev.device_kind}), jax {jax.__version__}")
    for model in args.models.split(","):
        bench(model, args.reps)


if __name__ == "__main__":
    main()
