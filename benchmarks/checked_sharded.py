"""`jaxnan.checked` on a batch sharded over 8 CPU devices: the report on every device.

Since the report callback of a sharded check runs on every device of the
mesh (`jaxnan/_src/checks/processes.py`), a raise no longer leaves devices
waiting in a collective. This measures what that costs against the
callback JAX places on the first device only (the previous behaviour, which
hung on a raise): the healthy step (the reporting branch is not taken), the
compile, and a bad step reported to a callable (the branch taken).

    python benchmarks/checked_sharded.py --rounds 15 --steps 20

Interleaved rounds in one process; medians of the per-round ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jaxnan  # noqa: E402
from jaxnan._src.checks import processes  # noqa: E402


def loss_fn(params, batch):
    h = jnp.tanh(batch["x"] @ params["w1"])
    return jnp.mean((h @ params["w2"] - batch["y"]) ** 2)


def _setup():
    mesh = Mesh(np.array(jax.devices()), ("data",))
    rep, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    rng = np.random.default_rng(0)
    params = {
        "w1": rng.normal(size=(256, 512)).astype(np.float32) / 16,
        "w2": rng.normal(size=(512, 1)).astype(np.float32) / 22,
    }
    batch = {
        "x": rng.normal(size=(1024, 256)).astype(np.float32),
        "y": rng.normal(size=(1024, 1)).astype(np.float32),
    }
    bad = {**batch, "x": batch["x"].copy()}
    bad["x"][700, 3] = np.nan  # on the 6th device
    return (
        jax.device_put(params, rep),
        jax.device_put(batch, data),
        jax.device_put(bad, data),
    )


def _variant(spread: bool | None):
    """The step: plain (None), checked on the first device, checked spread."""
    if spread is None:
        return jax.jit(jax.value_and_grad(loss_fn))
    checked = jaxnan.checked(loss_fn, on_nonfinite=lambda r: None)
    step = jax.value_and_grad(checked)
    if spread:
        return jax.jit(step)
    original = processes.mesh_of

    def first_device_only(*args):
        processes.mesh_of = lambda leaves: None
        try:
            return step(*args)
        finally:
            processes.mesh_of = original

    return jax.jit(first_device_only)


def _time(fn, args, steps: int) -> float:
    jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    for _ in range(steps):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / steps


def _compile(spread, args) -> float:
    fn = _variant(spread)
    start = time.perf_counter()
    fn.lower(*args).compile()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=20)
    opts = parser.parse_args()
    params, batch, bad = _setup()
    names = {None: "plain", False: "first device", True: "every device"}
    fns = {k: _variant(k) for k in names}
    ratios: dict[str, list[float]] = {"healthy": [], "bad": [], "compile": []}
    for _ in range(opts.rounds):
        base = _time(fns[False], (params, batch), opts.steps)
        ratios["healthy"].append(_time(fns[True], (params, batch), opts.steps) / base)
        base_bad = _time(fns[False], (params, bad), opts.steps)
        ratios["bad"].append(_time(fns[True], (params, bad), opts.steps) / base_bad)
    for _ in range(max(3, opts.rounds // 5)):
        base = _compile(False, (params, batch))
        ratios["compile"].append(_compile(True, (params, batch)) / base)
    plain = statistics.median(
        _time(fns[None], (params, batch), opts.steps)
        / _time(fns[False], (params, batch), opts.steps)
        for _ in range(opts.rounds)
    )
    for key in (False, True):
        compiled = _variant(key).lower(params, batch).compile()
        mem = compiled.memory_analysis()
        entry = compiled.as_text().split("ENTRY")[1].split("\n}")[0]
        print(
            f"{names[key]}: temp {mem.temp_size_in_bytes} B, entry computation "
            f"{entry.count(chr(10))} instructions, "
            f"{compiled.as_text().count('custom-call')} custom-calls in all"
        )
    print(f"devices: {len(jax.devices())} ({jax.devices()[0].platform})")
    print(f"plain / checked on the first device, healthy step: {plain:.3f}x")
    for key, values in ratios.items():
        print(
            f"every device / first device, {key}: {statistics.median(values):.3f}x "
            f"(min {min(values):.3f}, max {max(values):.3f})"
        )


if __name__ == "__main__":
    main()
