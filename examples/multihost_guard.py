"""The guard on many processes: one script for a GPU/TPU cluster and one machine.

Every process runs this same script (SPMD). The parameters are replicated
over all devices of all processes, and each step's global batch is sharded
on the data axis: each process loads only its own rows and hands them to
`jax.make_array_from_process_local_data`. At `--bad-step` one row of process
1's rows is NaN (a corrupt record in one host's shard). `jaxnan.guard` takes
the bad/healthy decision inside the compiled step, identical on every
process; the bad step is replayed and its rows found on every process in
lock-step, and process 0 prints one incident naming the global row, the
process and the device that hold it. Every process applies the same policy
and ends with the same parameters, and writes its own JSON-lines log.

Launch
------
One machine, 2 processes x 2 CPU devices (the script starts both)::

    python examples/multihost_guard.py --local 2 --cpu-devices 2

or by hand, one command per process (a free port for the coordinator)::

    python examples/multihost_guard.py --coordinator 127.0.0.1:12355 \\
        --num-processes 2 --process-id 0 --cpu-devices 2 &
    python examples/multihost_guard.py --coordinator 127.0.0.1:12355 \\
        --num-processes 2 --process-id 1 --cpu-devices 2

A cluster: run the script unchanged on every host. With no
``--coordinator``, `jax.distributed.initialize()` reads the cluster's own
environment (SLURM, Open MPI, TPU pods, GKE); the environment variables
``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` may
also name them, as the flags do. For example, on SLURM::

    srun --ntasks-per-node=1 python examples/multihost_guard.py --policy rollback

Options: ``--steps``, ``--bad-step``, ``--policy {skip,rollback,raise}``,
``--log-dir`` (one ``incidents.process<i>.jsonl`` and one
``result.process<i>.json`` per process),
``--skip-from FILE`` (a JSON-lines log of an earlier run: its steps' batches
are left out, the way to resume without the batches that went bad).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import socket
import subprocess
import sys

import jax  # configured in `_initialize`, before any computation
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxnan

ROWS_PER_DEVICE = 4
FEATURES = 6
BAD_PROCESS, BAD_LOCAL_ROW = 1, 1


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--coordinator", default=os.environ.get("JAX_COORDINATOR_ADDRESS"))
    p.add_argument("--num-processes", type=int, default=_env_int("JAX_NUM_PROCESSES"))
    p.add_argument("--process-id", type=int, default=_env_int("JAX_PROCESS_ID"))
    p.add_argument("--cpu-devices", type=int, default=None)
    p.add_argument("--local", type=int, default=None, metavar="N")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--bad-step", type=int, default=6)
    p.add_argument("--policy", default="skip", choices=["skip", "rollback", "raise"])
    p.add_argument("--log-dir", default=".")
    p.add_argument("--skip-from", default=None)
    return p.parse_args(argv)


def _env_int(name):
    value = os.environ.get(name)
    return None if value is None else int(value)


def _launch_local(args, argv) -> int:
    """Starts `args.local` copies of this script on localhost; their exit code."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rest = [a for a in argv if not a.startswith("--local")]
    if args.local is not None and str(args.local) in rest:
        rest.remove(str(args.local))
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                *rest,
                f"--coordinator=127.0.0.1:{port}",
                f"--num-processes={args.local}",
                f"--process-id={i}",
            ]
        )
        for i in range(args.local)
    ]
    codes = [p.wait() for p in procs]
    return max(codes, key=abs)


def _initialize(args) -> None:
    if args.cpu_devices is not None:
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if args.coordinator is not None:
        jax.distributed.initialize(
            coordinator_address=args.coordinator,
            num_processes=args.num_processes,
            process_id=args.process_id,
        )
    else:  # a cluster: SLURM, Open MPI, TPU pods, GKE describe themselves
        jax.distributed.initialize()


def loss_fn(params, batch):
    h = jnp.tanh(batch["x"] @ params["w1"] + params["b1"])
    return jnp.mean((h @ params["w2"] - batch["y"]) ** 2)


def _local_rows(step: int, process: int, devices: int, bad_step: int):
    """This process's rows of batch `step` (its loader, seeded per process)."""
    rng = np.random.default_rng(1000 * step + process)
    x = rng.normal(size=(ROWS_PER_DEVICE * devices, FEATURES)).astype(np.float32)
    y = np.sin(x.sum(1)).astype(np.float32)
    if step == bad_step and process == BAD_PROCESS:
        x[BAD_LOCAL_ROW, 2] = np.nan  # a corrupt record in process 1's shard
    return {"x": x, "y": y}


def bad_steps(path: str | None) -> set[int]:
    """The steps of the incidents in a JSON-lines log of an earlier run."""
    if path is None:
        return set()
    lines = pathlib.Path(path).read_text().splitlines()
    return {json.loads(line)["step"] for line in lines if line.strip()}


def train(args, skip: set[int]) -> dict:
    """Trains on every process in lock-step; what this process saw.

    The batches of `skip` are left out. Each batch position is one guarded
    call from the start of the run, so a log's ``step`` is the batch
    position (when no batch was left out before it).
    """
    mesh = Mesh(np.array(jax.devices()), ("data",))  # every device of every host
    data, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    proc = jax.process_index()
    rng = np.random.default_rng(0)  # the same initial params on every process
    params = jax.device_put(
        {
            "w1": (rng.normal(size=(FEATURES, 32)) / 3).astype(np.float32),
            "b1": np.zeros(32, np.float32),
            "w2": (rng.normal(size=(32,)) / 6).astype(np.float32),
        },
        replicated,
    )
    tx = jaxnan.skip_nonfinite(optax.adam(3e-3))
    opt_state = jax.jit(tx.init)(params)

    @jax.jit
    def train_step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params, loss=loss)
        return optax.apply_updates(params, updates), opt_state, loss

    log = pathlib.Path(args.log_dir) / f"incidents.process{proc}.jsonl"
    if log.exists():
        log.unlink()
    step = jaxnan.guard(train_step, policy=args.policy, snapshot_every=4, log=log)
    local_devices = jax.local_device_count()
    for i in range(args.steps):
        if i in skip:
            continue
        rows = _local_rows(i, proc, local_devices, args.bad_step)
        batch = {
            k: jax.make_array_from_process_local_data(data, v) for k, v in rows.items()
        }
        params, opt_state, loss = step(params, opt_state, batch)
    step.finish()
    summary = step.summary()
    digest = float(sum(np.asarray(jax.device_get(v)).sum() for v in params.values()))
    return {
        "process": proc,
        "processes": jax.process_count(),
        "devices": jax.device_count(),
        "steps": summary["steps"],
        "skipped": summary["skipped"],
        "rolled_back": summary["rolled_back"],
        "incidents": [(x.step, list(x.rows), x.leaf) for x in step.incidents],
        "left_out": sorted(skip),
        "params_sum": digest,
        "log": str(log) if log.exists() else None,
    }


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parse(argv)
    if args.local is not None:
        return _launch_local(args, argv)
    skip = bad_steps(args.skip_from)  # read before any process rewrites its log
    _initialize(args)
    out = train(args, skip)
    # Each process prints one line (process 0 has printed the incidents) and
    # writes it to result.process<i>.json beside its log.
    text = json.dumps(out)
    (pathlib.Path(args.log_dir) / f"result.process{out['process']}.json").write_text(
        text
    )
    print(f"jaxnan multihost result: {text}", flush=True)
    jax.distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
