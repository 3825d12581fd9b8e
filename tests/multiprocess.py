"""Runs test scenarios on several `jax.distributed` processes on localhost.

The pattern of jax's own multi-process tests (`jax/_src/test_multiprocess.py`):
the test starts N copies of this module as subprocesses with a free port,
each initialises `jax.distributed` on CPU with gloo collectives and
`devices` host devices, passes a barrier, runs the named scenario functions
of a module in order (the same on every process: lock-step), passes a
barrier again and writes what each scenario returned (or raised) to a JSON
file. One launch runs many scenarios, because each launch costs seconds of
start-up. A hang (a collective only some processes entered) is killed at
`timeout` and fails with every process's log.

    results = multiprocess.launch("tests/test_multihost.py", ["scenario_a"])
    results[1]["scenario_a"]  # {"value": ...} or {"error": ..., "traceback": ...}

Run as a worker: ``python -m tests.multiprocess PORT PROCESS COUNT OUT FILE NAME...``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import pathlib
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Sequence
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port free on localhost now (the coordinator's)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass
class Failed(AssertionError):
    """The processes did not all finish: exit codes and logs."""

    message: str

    def __str__(self) -> str:
        return self.message


def _logs(out: pathlib.Path, count: int) -> str:
    parts = []
    for i in range(count):
        log = out / f"process{i}.log"
        text = log.read_text(errors="replace") if log.exists() else "(no log)"
        lines = [ln for ln in text.splitlines() if not ln.startswith("[Gloo]")]
        parts.append(
            f"--- process {i} log (last 60 lines) ---\n" + "\n".join(lines[-60:])
        )
    return "\n".join(parts)


def launch(
    module: str | os.PathLike,
    names: Sequence[str],
    *,
    processes: int = 2,
    devices: int = 2,
    timeout: float = 120.0,
    out: str | os.PathLike,
) -> list[dict[str, Any]]:
    """Runs scenarios `names` of `module` on `processes` processes.

    Returns:
        One dict per process: ``{name: {"value": ...}}`` for a scenario that
        returned (a JSON-able value), ``{name: {"error": repr, "traceback":
        text}}`` for one that raised.

    Raises:
        Failed: a process exited non-zero or ran past `timeout` (all are
            killed); the message holds every process's log.
    """
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = dict(os.environ)
    flags = env.get("XLA_FLAGS", "").split()
    flags = [f for f in flags if "xla_force_host_platform_device_count" not in f]
    env["XLA_FLAGS"] = " ".join(
        [*flags, f"--xla_force_host_platform_device_count={devices}"]
    )
    env["JAX_PLATFORMS"] = "cpu"
    env.pop("JAX_NUM_CPU_DEVICES", None)
    procs = []
    for i in range(processes):
        log = open(out / f"process{i}.log", "w")  # noqa: SIM115 - closed below
        cmd = [
            sys.executable,
            "-m",
            "tests.multiprocess",
            str(port),
            str(i),
            str(processes),
            str(out),
            os.fspath(module),
            *names,
        ]
        procs.append(
            (
                subprocess.Popen(
                    cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
                ),
                log,
            )
        )
    deadline = time.monotonic() + timeout
    codes: list[int | None] = [None] * processes
    while time.monotonic() < deadline and None in codes:
        codes = [p.poll() for p, _ in procs]
        if any(c not in (None, 0) for c in codes):
            time.sleep(2.0)  # let the others fail or finish, then stop them
            break
        time.sleep(0.05)
    codes = [p.poll() for p, _ in procs]
    for p, log in procs:
        if p.poll() is None:
            p.kill()
        p.wait()
        log.close()
    if codes != [0] * processes:
        why = "timed out" if None in codes else "failed"
        raise Failed(
            f"{processes} processes {why} (exit codes {codes}):\n"
            + _logs(out, processes)
        )
    return [
        json.loads((out / f"process{i}.json").read_text()) for i in range(processes)
    ]


def value(results: list[dict[str, Any]], name: str, process: int) -> Any:
    """What scenario `name` returned on `process`; a failure shows its traceback."""
    got = results[process][name]
    assert "value" in got, got.get("traceback")
    return got["value"]


def _worker(argv: Sequence[str]) -> None:
    port, index, count, out, module, *names = argv
    import jax  # noqa: PLC0415 - after the environment is set

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=int(count),
        process_id=int(index),
        initialization_timeout=60,
    )
    from jax.experimental import multihost_utils  # noqa: PLC0415

    multihost_utils.sync_global_devices("start")
    spec = importlib.util.spec_from_file_location("scenarios", ROOT / module)
    scenarios = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scenarios)
    results: dict[str, Any] = {}
    for name in names:
        print(f"== {name}", flush=True)
        try:
            results[name] = {"value": getattr(scenarios, name)()}
        except Exception as e:  # noqa: BLE001 - reported to the test
            results[name] = {"error": repr(e), "traceback": traceback.format_exc()}
            print(results[name]["traceback"], flush=True)
    multihost_utils.sync_global_devices("end")
    path = pathlib.Path(out) / f"process{index}.json"
    path.write_text(json.dumps(results, default=str))
    print("== done", flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    _worker(sys.argv[1:])
