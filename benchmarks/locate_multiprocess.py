"""`jaxnan.locate` on 2 processes x 2 CPU devices: what moves between hosts.

A step ``jnp.log(x + 1.0).sum(axis=1)`` over a float32 operand of
``--rows`` x ``--cols`` sharded by rows over the 4 devices of 2 processes
(localhost, gloo), two entries of process 1's rows at -1 and -3 (log of 0
and of a negative). Each process records every
``multihost_utils.process_allgather`` that `locate` makes (the elements it
is handed), its wall time (cold: the first `locate` of the process; warm:
the same call again) and the rise of its peak resident set in the first
call (`ru_maxrss`: what the call needed above everything before it).
Process 0 prints one table row per process.

Run (the script starts both processes)::

    PYTHONPATH=$PWD python benchmarks/locate_multiprocess.py --rows 2048 --cols 2048
"""

from __future__ import annotations

import argparse
import os
import pathlib
import resource
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _peak_mib() -> float:
    """The process's peak resident set so far (Linux: ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def scenario_locate() -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.experimental import multihost_utils
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import jaxnan

    rows, cols = (int(v) for v in os.environ["LOCATE_MP_SHAPE"].split("x"))
    mesh = Mesh(np.array(jax.devices()), ("data",))
    local = np.ones((rows // jax.process_count(), cols), np.float32)
    if jax.process_index() == 1:
        local[1, 7] = -1.0
        local[1, cols // 2] = -3.0
    x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), local)

    def step(x):
        return jnp.log(x + 1.0).sum(axis=1)

    gathered: list[int] = []
    real = multihost_utils.process_allgather

    def recording(tree, tiled=False):
        gathered.append(sum(int(np.size(v)) for v in jax.tree.leaves(tree)))
        return real(tree, tiled=tiled)

    multihost_utils.process_allgather = recording
    try:
        times, rises = [], []
        for _ in range(2):
            gathered.clear()
            before = _peak_mib()
            start = time.perf_counter()
            d = jaxnan.locate(jax.jit(step))(x)
            times.append(time.perf_counter() - start)
            rises.append(_peak_mib() - before)
    finally:
        multihost_utils.process_allgather = real
    return {
        "elements": int(x.size),
        "gathers": len(gathered),
        "largest": max(gathered, default=0),
        "total": sum(gathered),
        "cold_s": times[0],
        "warm_s": times[1],
        "rss_rise_mib": rises[0],
        "seen": d.inputs_seen,
        "where": f"device {d.device} (process {d.process})",
    }


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--cols", type=int, default=2048)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from tests import multiprocess

    os.environ["LOCATE_MP_SHAPE"] = f"{args.rows}x{args.cols}"
    out = tempfile.mkdtemp()
    results = multiprocess.launch(__file__, ["scenario_locate"], out=out, timeout=600)
    print(
        "| process | operand elements | all-gathers | largest (elements) "
        "| total (elements) | locate cold (s) | warm (s) | peak RSS rise (MiB) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for p in range(len(results)):
        g = multiprocess.value(results, "scenario_locate", p)
        print(
            f"| {p} | {g['elements']} | {g['gathers']} | {g['largest']} "
            f"| {g['total']} | {g['cold_s']:.2f} | {g['warm_s']:.2f} "
            f"| {g['rss_rise_mib']:.0f} |"
        )
    g = multiprocess.value(results, "scenario_locate", 0)
    print(f"\ninputs seen: {g['seen']}\nheld by: {g['where']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
