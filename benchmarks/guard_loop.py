"""What `jaxnan.guard` costs in a real training loop (asynchronous dispatch).

Three loops over the same donated adamw train step, 200 steps each, run
interleaved in one process (warm, every variant compiled first):

* plain: ``jax.jit(step)`` with ``optax.adamw``;
* skip: the same with ``jaxnan.skip_nonfinite(optax.adamw)`` (loss passed);
* guard: ``jaxnan.guard(step)`` around the skip step (health read one step
  late, history, incident machinery).

Each round times every loop once (200 calls, then one block at the end) and
divides by the plain loop of the same round; the table shows the median of
the per-round ratios. "guard / skip" is the guard's own cost on top of
`skip_nonfinite`. The host-side cost per step is measured on a tiny step
(4 parameters), where a loop is bound by Python dispatch: the guard's extra
microseconds per call over a plain jitted call. The temporary memory of the
compiled programs (`memory_analysis`) shows whether the guard copies the
parameters.

Run: python benchmarks/guard_loop.py [--rounds 7] [--steps 200]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import jax
import jax.numpy as jnp
import optax
from models import MODELS
from overhead import make_step

import jaxnan

LR = 1e-3


def loops(loss_fn):
    plain_tx = optax.adamw(LR)
    skip_tx = jaxnan.skip_nonfinite(optax.adamw(LR))
    plain = jax.jit(make_step(loss_fn, plain_tx, False), donate_argnums=(0, 1))
    skip = jax.jit(make_step(loss_fn, skip_tx, True), donate_argnums=(0, 1))
    guard = jaxnan.guard(make_step(loss_fn, skip_tx, True), verbose=False)
    return {
        "plain": (plain, plain_tx, None),
        "skip": (skip, skip_tx, None),
        "guard": (guard, skip_tx, guard),
    }


def temp_bytes(fn, params, tx, batch):
    compiled = fn.lower(params, tx.init(params), batch).compile()
    mem = compiled.memory_analysis()
    return getattr(mem, "temp_size_in_bytes", 0) if mem else 0


def run_loop(fn, guarded, params, state, batch, steps):
    t0 = time.perf_counter()
    loss = None
    for _ in range(steps):
        params, state, loss = fn(params, state, batch)
    jax.block_until_ready((params, state, loss))
    if guarded is not None:
        guarded.finish()
    return (time.perf_counter() - t0) / steps, params, state


def run_model(name, rounds, steps):
    init, loss_fn, batch_fn = MODELS[name]
    params = init(jax.random.PRNGKey(0))
    batch = batch_fn(jax.random.PRNGKey(1))
    vs = loops(loss_fn)
    carry = {}
    for key, (fn, tx, guarded) in vs.items():
        p = jax.tree.map(jnp.copy, params)
        _, p, s = run_loop(fn, guarded, p, tx.init(p), batch, 3)  # compile, warm
        carry[key] = (p, s)
    temps = {key: temp_bytes(fn, params, tx, batch) for key, (fn, tx, _) in vs.items()}
    ratios = {k: [] for k in vs}
    step_ms = {k: [] for k in vs}
    for _ in range(rounds):
        times = {}
        for key in random.sample(list(vs), len(vs)):
            fn, _, guarded = vs[key]
            p, s = carry[key]
            times[key], p, s = run_loop(fn, guarded, p, s, batch, steps)
            carry[key] = (p, s)
        for key in vs:
            ratios[key].append(times[key] / times["plain"])
            step_ms[key].append(times[key] * 1e3)
    guard_over_skip = [g / s for g, s in zip(ratios["guard"], ratios["skip"])]
    pbytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(params))
    n = sum(x.size for x in jax.tree_util.tree_leaves(params))
    print(f"### {name} ({n / 1e6:.2f}M params, adamw, {steps} steps x {rounds})\n")
    print("| loop | step (median ms) | vs plain | extra temp memory |")
    print("|---|---|---|---|")
    for key in vs:
        extra = (temps[key] - temps["plain"]) / pbytes
        print(
            f"| {key} | {statistics.median(step_ms[key]):.3f} | "
            f"{statistics.median(ratios[key]):.3f}x | {extra:+.2f}x params |"
        )
    print(f"\nguard / skip_nonfinite: {statistics.median(guard_over_skip):.3f}x")
    print(f"per-round guard/skip: {[round(r, 3) for r in guard_over_skip]}\n")


def host_cost(rounds, steps):
    """Microseconds per call on a 4-parameter step: dispatch-bound loops."""
    tx = jaxnan.skip_nonfinite(optax.sgd(0.1))

    def loss_fn(p, b):
        return jnp.mean((b["x"] @ p["w"]) ** 2)

    step = make_step(loss_fn, tx, True)
    plain = jax.jit(step, donate_argnums=(0, 1))
    guard = jaxnan.guard(step, verbose=False)
    params = {"w": jnp.ones(4)}
    batch = {"x": jnp.ones((8, 4))}
    carry = {}
    for key, fn, g in (("plain", plain, None), ("guard", guard, guard)):
        _, p, s = run_loop(
            fn, g, jax.tree.map(jnp.copy, params), tx.init(params), batch, 3
        )
        carry[key] = (p, s)
    diffs, per = [], {"plain": [], "guard": []}
    for _ in range(rounds):
        times = {}
        for key, fn, g in random.sample(
            [("plain", plain, None), ("guard", guard, guard)], 2
        ):
            p, s = carry[key]
            times[key], p, s = run_loop(fn, g, p, s, batch, steps)
            carry[key] = (p, s)
            per[key].append(times[key] * 1e6)
        diffs.append((times["guard"] - times["plain"]) * 1e6)
    print("### host-side cost per step (4-parameter step, dispatch-bound)\n")
    print(
        f"plain jitted call {statistics.median(per['plain']):.0f} us, guarded call "
        f"{statistics.median(per['guard']):.0f} us: the guard adds "
        f"{statistics.median(diffs):.0f} us per step (median of {rounds} rounds)\n"
    )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7, help="interleaved rounds")
    ap.add_argument("--steps", type=int, default=200, help="steps per loop")
    ap.add_argument("--models", default="mlp,transformer", help="comma-separated")
    ap.add_argument("--no-host", action="store_true", help="skip the host-cost loop")
    args = ap.parse_args(argv)
    dev = jax.devices()[0]
    print(f"device: {dev.platform} ({dev.device_kind}), jax {jax.__version__}\n")
    if not args.no_host:
        host_cost(args.rounds, args.steps)
    for name in args.models.split(","):
        run_model(name, args.rounds, args.steps)


if __name__ == "__main__":
    main()
