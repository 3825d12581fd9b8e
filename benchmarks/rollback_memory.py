"""Rollback snapshots in host memory: device memory and time they cost.

The guard's rollback snapshots are host copies (`guard/host_snapshots.py`:
``pinned_host`` memory where the backend has it, this process's distinct
shards, one asynchronous `jax.device_put`). Measured on the benchmarks' MLP
(~1M parameters, adamw, donated state) with ``policy="skip"`` (no
snapshots) against ``policy="rollback"``:

* device memory: the compiled guarded step's `memory_analysis` (argument,
  output, temporary bytes) for each policy, and the bytes of the live
  device buffers after a warm loop (`jax.live_arrays`, each buffer counted
  once, device memory kinds only), with the host bytes the snapshot store
  holds beside it;
* time: loops of `--steps` calls with a snapshot every 100 steps against
  the same loops without, interleaved, warm, one block at the end of each
  loop; the median of the per-round ratios, in wall time and in this
  process's CPU time (less moved by other jobs on a shared machine). The
  snapshot's own cost is timed directly too (`to_host` dispatch, then until
  its copy is done), as a share of 100 step times.

Run: python benchmarks/rollback_memory.py [--rounds 31] [--steps 100]
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import time

import jax
import optax
from models import mlp_batch, mlp_init, mlp_loss
from overhead import make_step

import jaxnan
from jaxnan._src.guard import host_snapshots

EVERY = 100


def device_bytes() -> int:
    """Bytes of the live device buffers (each buffer once; host kinds left out)."""
    seen = {}
    for a in jax.live_arrays():
        if a.is_deleted():
            continue
        for s in a.addressable_shards:
            kind = s.data.sharding.memory_kind
            if kind in ("pinned_host", "unpinned_host"):
                continue
            seen[(s.device.id, s.data.unsafe_buffer_pointer())] = s.data.nbytes
    return sum(seen.values())


def guarded(policy: str):
    tx = jaxnan.skip_nonfinite(optax.adamw(1e-3))
    fn = jax.jit(make_step(mlp_loss, tx, True), donate_argnums=(0, 1))
    step = jaxnan.guard(fn, policy=policy, snapshot_every=EVERY, verbose=False)
    params = mlp_init(jax.random.key(0))
    return step, params, jax.jit(tx.init)(params)


def run(step, params, opt_state, batch, steps: int):
    """``((wall s, process CPU s), params, opt_state)`` of `steps` calls."""
    t, c = time.perf_counter(), time.process_time()
    for _ in range(steps):
        params, opt_state, loss = step(params, opt_state, batch)
    jax.block_until_ready((params, opt_state, loss))
    return (time.perf_counter() - t, time.process_time() - c), params, opt_state


def memory(batch, steps: int) -> None:
    print("## device memory (MLP, adamw, donated state)")
    rows = {}
    for policy in ("skip", "rollback"):
        step, params, opt_state = guarded(policy)
        lowered = step.lower(params, opt_state, batch)
        m = lowered.compile().memory_analysis()
        _, params, opt_state = run(step, params, opt_state, batch, steps)
        step.finish()
        gc.collect()
        store = step._snapshots.kept()
        held = sum(host_snapshots.host_bytes(c) for c in store.values())
        on_device = any(host_snapshots.on_device(c) for c in store.values())
        rows[policy] = (
            m.argument_size_in_bytes,
            m.output_size_in_bytes,
            m.temp_size_in_bytes,
            device_bytes(),
            held,
            len(store),
            on_device,
        )
        del step, params, opt_state, store
    print(
        "| policy | argument B | output B | temp B | live device B | "
        "host B in snapshots | snapshots | a device buffer in the store |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for policy, r in rows.items():
        print(f"| {policy} | " + " | ".join(str(x) for x in r) + " |")
    state = sum(x.nbytes for x in jax.tree_util.tree_leaves(guarded("skip")[1:]))
    print(f"state bytes (params + opt_state): {state}")


def timing(batch, rounds: int, steps: int) -> None:
    print(f"\n## time: snapshot every {EVERY} steps ({steps}-call loops)")
    variants = {p: guarded(p) for p in ("skip", "rollback")}
    for name, (step, params, opt_state) in variants.items():  # warm
        _, params, opt_state = run(step, params, opt_state, batch, EVERY + 2)
        variants[name] = (step, params, opt_state)
    times = {name: [] for name in variants}
    ratios: dict[str, list[float]] = {"wall": [], "CPU": []}
    for _ in range(rounds):
        order = list(variants)
        random.shuffle(order)
        got = {}
        for name in order:
            step, params, opt_state = variants[name]
            got[name], params, opt_state = run(step, params, opt_state, batch, steps)
            variants[name] = (step, params, opt_state)
            times[name].append(got[name][0] / steps)
        for i, clock in enumerate(ratios):
            ratios[clock].append(got["rollback"][i] / got["skip"][i])
    for name, ts in times.items():
        print(f"{name}: median step {statistics.median(ts) * 1e3:.3f} ms (wall)")
    for clock, rs in ratios.items():
        q = statistics.quantiles(rs, n=4)
        print(
            f"rollback / skip, {clock} time: median {statistics.median(rs):.4f} "
            f"(quartiles {q[0]:.3f}-{q[2]:.3f}, {len(rs)} rounds)"
        )
    # The snapshot alone: dispatch, then until its copy is in host memory.
    step, params, opt_state = variants["skip"]
    leaves = jax.tree_util.tree_leaves((params, opt_state))
    costs, dispatch = [], []
    for _ in range(rounds):
        jax.block_until_ready(leaves)
        t = time.perf_counter()
        copy = host_snapshots.to_host(leaves)
        dispatch.append(time.perf_counter() - t)
        jax.block_until_ready([b for c in copy for b in c.blocks.values()])
        costs.append(time.perf_counter() - t)
    step_time = statistics.median(times["skip"])
    snap = statistics.median(costs)
    print(
        f"one snapshot: {snap * 1e3:.3f} ms to host memory "
        f"({statistics.median(dispatch) * 1e3:.3f} ms on the host to dispatch); "
        f"per {EVERY} steps: {snap / (EVERY * step_time) * 100:.2f}% of step time"
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=31)
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args(argv)
    batch = mlp_batch(jax.random.key(1))
    platform = jax.devices()[0].platform
    print(f"jax {jax.__version__}, {platform}, {jax.device_count()} devices")
    memory(batch, 2 * EVERY + 5)
    timing(batch, args.rounds, args.steps)


if __name__ == "__main__":
    main()
