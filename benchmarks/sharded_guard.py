"""`jaxnan.guard` on sharded steps: 8 devices of one process, and 2 processes.

Three loops over the same donated adamw train step of the MLP
(`models.mlp_init`, 1M parameters), the global batch sharded on the data
axis, run interleaved in one process (or in lock-step on every process),
warm (every variant compiled and run first):

* plain: ``jax.jit(step)`` with ``optax.adamw``;
* skip: the same with ``jaxnan.skip_nonfinite(optax.adamw)`` (loss passed);
* guard: ``jaxnan.guard(step)`` around the skip step;
* for FSDP also both with ``skip_nonfinite(..., sharded_params=True)``;
* for DP also skip without its outgoing check (`overhead.py`), to tell
  the outgoing check's cost from the rest.

Two layouts: DP (parameters replicated) and FSDP (each kernel and bias
sharded over the mesh on its largest axis the mesh divides). Each round
times every loop once (`--steps` calls, one block at the end) in a random
order (the same on every process) and divides by the plain loop of the
round; the table shows the median of the per-round ratios, and the CPU
time of the process per step (all devices; on a shared machine a steadier
measure of the work than the wall clock). Also the per-device flops,
transcendentals and bytes accessed (`compile().cost_analysis()`) and the
collectives of each variant's optimized program (`compile().as_text()`).

Run, 8 CPU devices in one process::

    python benchmarks/sharded_guard.py --devices 8

2 processes x 2 CPU devices on localhost (the script starts both; process 0
prints)::

    python benchmarks/sharded_guard.py --processes 2 --devices 2
"""

from __future__ import annotations

import argparse
import collections
import random
import re
import socket
import statistics
import subprocess
import sys
import time

import jax

OP = re.compile(
    r"\b(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)(-start)?\("
)


def collective_counts(text: str) -> dict[str, int]:
    """How many of each collective an optimized HLO module holds."""
    counts = collections.Counter()
    for line in text.splitlines():
        m = OP.search(line)
        if m:
            counts[m.group(1)] += 1
    return dict(sorted(counts.items()))


def _parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=8, help="CPU devices per process")
    ap.add_argument("--processes", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--layouts", default="dp,fsdp")
    ap.add_argument("--coordinator", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--process-id", type=int, default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def _launch(args, argv) -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                *argv,
                f"--coordinator=127.0.0.1:{port}",
                f"--process-id={i}",
            ]
        )
        for i in range(args.processes)
    ]
    return max((p.wait() for p in procs), key=abs)


def _specs(params, mesh, layout):
    from jax.sharding import NamedSharding  # noqa: PLC0415
    from jax.sharding import PartitionSpec as P  # noqa: PLC0415

    n = mesh.devices.size

    def one(x):
        if layout == "dp":
            return NamedSharding(mesh, P())
        axes = sorted(range(x.ndim), key=lambda a: -x.shape[a])
        for a in axes:
            if x.shape[a] % n == 0:
                spec = [None] * x.ndim
                spec[a] = "data"
                return NamedSharding(mesh, P(*spec))
        return NamedSharding(mesh, P())

    return jax.tree.map(one, params)


def run_layout(layout, rounds, steps):
    import jax.numpy as jnp  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415
    import optax  # noqa: PLC0415
    from jax.sharding import Mesh, NamedSharding  # noqa: PLC0415
    from jax.sharding import PartitionSpec as P  # noqa: PLC0415
    from models import mlp_init, mlp_loss  # noqa: PLC0415
    from overhead import make_step, skip_without_outgoing_check  # noqa: PLC0415

    import jaxnan  # noqa: PLC0415

    mesh = Mesh(np.array(jax.devices()), ("data",))
    shardings = _specs(jax.eval_shape(mlp_init, jax.random.PRNGKey(0)), mesh, layout)
    params = jax.jit(mlp_init, out_shardings=shardings)(jax.random.PRNGKey(0))
    rows = 32 * jax.device_count()
    rng = np.random.default_rng(jax.process_index())
    local = rows // jax.process_count()
    data = NamedSharding(mesh, P("data"))
    batch = {
        "x": jax.make_array_from_process_local_data(
            data, rng.normal(size=(local, 512)).astype(np.float32)
        ),
        "y": jax.make_array_from_process_local_data(
            data, rng.integers(0, 10, size=(local,)).astype(np.int32)
        ),
    }
    plain_tx = optax.adamw(1e-3)
    skip_tx = jaxnan.skip_nonfinite(optax.adamw(1e-3))
    plain = jax.jit(make_step(mlp_loss, plain_tx, False), donate_argnums=(0, 1))
    skip = jax.jit(make_step(mlp_loss, skip_tx, True), donate_argnums=(0, 1))
    guard = jaxnan.guard(make_step(mlp_loss, skip_tx, True), verbose=False)
    vs = {
        "plain": (plain, plain_tx, None),
        "skip": (skip, skip_tx, None),
        "guard": (guard, skip_tx, guard),
    }
    if layout == "dp":  # what the outgoing check costs
        bare_tx = skip_without_outgoing_check(optax.adamw(1e-3))
        vs["skip, no outgoing check"] = (
            jax.jit(make_step(mlp_loss, bare_tx, True), donate_argnums=(0, 1)),
            bare_tx,
            None,
        )
    if layout == "fsdp":  # every leaf in the form that partitions
        sharded_tx = jaxnan.skip_nonfinite(optax.adamw(1e-3), sharded_params=True)
        step = make_step(mlp_loss, sharded_tx, True)
        vs["skip sharded_params"] = (
            jax.jit(step, donate_argnums=(0, 1)),
            sharded_tx,
            None,
        )
        g = jaxnan.guard(step, verbose=False)
        vs["guard sharded_params"] = (g, sharded_tx, g)
    copy = jax.jit(lambda t: jax.tree.map(jnp.copy, t), out_shardings=shardings)
    counts = {}
    for k, (fn, tx, _) in vs.items():
        compiled = fn.lower(params, tx.init(params), batch).compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        counts[k] = (collective_counts(compiled.as_text()), cost)
    cpu = {k: [] for k in vs}  # process CPU ms per step, by loop

    def loop(key, p, s, n):
        fn, _, g = vs[key]
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(n):
            p, s, loss = fn(p, s, batch)
        jax.block_until_ready((p, s, loss))
        if g is not None:
            g.finish()
        cpu[key].append((time.process_time() - c0) / n * 1e3)
        return time.perf_counter() - t0, p, s

    carry = {}
    for key, (_, tx, _) in vs.items():
        p = copy(params)
        _, p, s = loop(key, p, jax.jit(tx.init)(p), 3)  # compile
        _, p, s = loop(key, p, s, steps)  # warm: the guard's first round is slow
        carry[key] = (p, s)
    for times in cpu.values():  # the warm-up rounds do not count
        times.clear()
    order = random.Random(0)  # the same order on every process (lock-step)
    ratios = {k: [] for k in vs}
    ms = {k: [] for k in vs}
    for _ in range(rounds):
        times = {}
        for key in order.sample(list(vs), len(vs)):
            times[key], *carry[key] = loop(key, *carry[key], steps)
        for key in vs:
            ratios[key].append(times[key] / times["plain"])
            ms[key].append(times[key] / steps * 1e3)
    return counts, ratios, ms, cpu


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parse(argv)
    if args.processes > 1 and args.coordinator is None:
        return _launch(args, argv)
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", args.devices)
    if args.coordinator is not None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=args.coordinator,
            num_processes=args.processes,
            process_id=args.process_id,
        )
    show = jax.process_index() == 0
    if show:
        print(
            f"{jax.process_count()} process(es) x {jax.local_device_count()} CPU "
            f"devices, jax {jax.__version__}; MLP 1M params, adamw, "
            f"{args.steps} steps x {args.rounds} rounds\n"
        )
        print(
            "| layout | loop | step (median ms) | vs plain | CPU ms/step "
            "| MFLOP | transc. (M) | MB accessed | collectives |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
    for layout in args.layouts.split(","):
        counts, ratios, ms, cpu = run_layout(layout, args.rounds, args.steps)
        for key in ratios:
            ops, cost = counts[key]
            c = statistics.median(cpu[key])
            c_plain = statistics.median(cpu["plain"])
            if show:
                print(
                    f"| {layout} | {key} | {statistics.median(ms[key]):.2f} | "
                    f"{statistics.median(ratios[key]):.3f}x | {c:.1f} "
                    f"({c / c_plain:.2f}x) | {cost.get('flops', 0) / 1e6:.1f} | "
                    f"{cost.get('transcendentals', 0) / 1e6:.2f} | "
                    f"{cost.get('bytes accessed', 0) / 1e6:.1f} | {ops} |"
                )
        if show:
            per = [round(r, 3) for r in ratios["guard"]]
            print(f"|  | guard per round | | {per} | |", flush=True)
    if args.coordinator is not None:
        jax.distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
