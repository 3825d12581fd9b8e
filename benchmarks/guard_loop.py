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

With ``--graph-only`` the guard's compiled program is called directly,
interleaved with the skip step (`graph_cost`): the guard's in-graph cost
with its host loop left out, and the bytes each program accesses.

Run: python benchmarks/guard_loop.py [--rounds 7] [--steps 200] [--graph-only]
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


def graph_cost(name, rounds, steps):
    """The guard's compiled program against skip_nonfinite's, host left out.

    The guard's program is called directly (its host loop, history reading
    and incident machinery skipped), asynchronously, interleaved with the
    jitted skip step: what the guard adds inside the graph. Also the bytes
    each program accesses (XLA's cost analysis, deterministic).
    """
    init, loss_fn, batch_fn = MODELS[name]
    params = init(jax.random.PRNGKey(0))
    batch = batch_fn(jax.random.PRNGKey(1))
    tx = jaxnan.skip_nonfinite(optax.adamw(LR))
    skip = jax.jit(make_step(loss_fn, tx, True), donate_argnums=(0, 1))
    guard = jaxnan.guard(make_step(loss_fn, tx, True), verbose=False)

    def accessed(lowered):
        cost = lowered.compile().cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        return cost["bytes accessed"]

    bytes_skip = accessed(skip.lower(params, tx.init(params), batch))
    bytes_guard = accessed(guard.lower(params, tx.init(params), batch))
    p = jax.tree.map(jnp.copy, params)
    entry, state, inputs = guard._flatten((p, tx.init(p), batch))  # noqa: SLF001
    health = guard._zeros  # noqa: SLF001  (the health vector of no bad step)

    def run_guard(state, n):
        t0 = time.perf_counter()
        for _ in range(n):
            state, _, h = entry.compiled(health, state, inputs)
        jax.block_until_ready((state, h))
        return (time.perf_counter() - t0) / n, state

    def run_skip(carry, n):
        p, s = carry
        t0 = time.perf_counter()
        for _ in range(n):
            p, s, _ = skip(p, s, batch)
        jax.block_until_ready((p, s))
        return (time.perf_counter() - t0) / n, (p, s)

    _, state = run_guard(state, 3)
    p = jax.tree.map(jnp.copy, params)
    _, carry = run_skip((p, tx.init(p)), 3)
    ratios = []
    for _ in range(rounds):
        times = {}
        for key in random.sample(["guard", "skip"], 2):
            if key == "guard":
                times[key], state = run_guard(state, steps)
            else:
                times[key], carry = run_skip(carry, steps)
        ratios.append(times["guard"] / times["skip"])
    title = f"### {name}: the guard's program alone vs skip_nonfinite"
    print(f"{title} ({steps} steps x {rounds})\n")
    print(
        f"in-graph guard / skip: {statistics.median(ratios):.3f}x "
        f"(per round {[round(r, 3) for r in ratios]}); bytes accessed "
        f"{bytes_guard / 1e6:.2f} MB vs {bytes_skip / 1e6:.2f} MB "
        f"({bytes_guard / bytes_skip:.4f}x)\n"
    )


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
    ap.add_argument(
        "--graph-only",
        action="store_true",
        help="only the guard's compiled program vs skip_nonfinite (no host loop)",
    )
    args = ap.parse_args(argv)
    dev = jax.devices()[0]
    print(f"device: {dev.platform} ({dev.device_kind}), jax {jax.__version__}\n")
    if args.graph_only:
        for name in args.models.split(","):
            graph_cost(name, args.rounds, args.steps)
        return
    if not args.no_host:
        host_cost(args.rounds, args.steps)
    for name in args.models.split(","):
        run_model(name, args.rounds, args.steps)


if __name__ == "__main__":
    main()
