"""What the guard's underflow health costs: ``guard(step, underflow=0.1)`` vs off.

The zero fraction of the gradients is one more fused reduction over them per
step, inside the compiled step. Two measurements on the donated adamw step of
the shared models (`models.py`), each variant compiled and warmed first, the
variants interleaved in random order in every round, ratio on / off per
round, median over the rounds:

* program: the guard's compiled program called directly (host loop left
  out), the in-graph cost alone; also the bytes each program accesses
  (XLA's cost analysis, deterministic);
* loop: the whole guarded loop (health read one step late, history).

Run: python benchmarks/underflow_cost.py [--rounds 7] [--steps 100]
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
JUMP = 0.1


def _accessed(lowered) -> float:
    cost = lowered.compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return cost["bytes accessed"]


def _program(guard, params, tx, batch):
    """``run(state, n) -> (seconds per step, state)`` on the compiled program."""
    p = jax.tree.map(jnp.copy, params)
    entry, state, inputs = guard._flatten((p, tx.init(p), batch))  # noqa: SLF001
    health = guard._zeros  # noqa: SLF001

    def run(state, n):
        t0 = time.perf_counter()
        for _ in range(n):
            state, _, h = entry.compiled(health, state, inputs)
        jax.block_until_ready((state, h))
        return (time.perf_counter() - t0) / n, state

    return run, state


def _loop(guard, params, tx, batch):
    """``run(carry, n) -> (seconds per step, carry)`` on the guarded loop."""

    def run(carry, n):
        p, s = carry
        t0 = time.perf_counter()
        for _ in range(n):
            p, s, loss = guard(p, s, batch)
        jax.block_until_ready((p, s, loss))
        guard.finish()
        return (time.perf_counter() - t0) / n, (p, s)

    p = jax.tree.map(jnp.copy, params)
    return run, (p, tx.init(p))


def _interleaved(runs: dict, rounds: int, steps: int) -> list[float]:
    """Per-round ratio on / off (each variant warmed with 3 steps first)."""
    carry = {}
    for key, (run, start) in runs.items():
        _, carry[key] = run(start, 3)
    ratios = []
    for _ in range(rounds):
        times = {}
        for key in random.sample(list(runs), len(runs)):
            times[key], carry[key] = runs[key][0](carry[key], steps)
        ratios.append(times["on"] / times["off"])
    return ratios


def run_model(name: str, rounds: int, steps: int) -> None:
    init, loss_fn, batch_fn = MODELS[name]
    params = init(jax.random.PRNGKey(0))
    batch = batch_fn(jax.random.PRNGKey(1))
    tx = jaxnan.skip_nonfinite(optax.adamw(LR))
    step = make_step(loss_fn, tx, True)
    guards = {
        "off": jaxnan.guard(step, verbose=False),
        "on": jaxnan.guard(step, verbose=False, underflow=JUMP),
    }
    nbytes = {
        k: _accessed(g.lower(params, tx.init(params), batch)) for k, g in guards.items()
    }
    program = _interleaved(
        {k: _program(g, params, tx, batch) for k, g in guards.items()}, rounds, steps
    )
    loop = _interleaved(
        {k: _loop(g, params, tx, batch) for k, g in guards.items()}, rounds, steps
    )
    n = sum(x.size for x in jax.tree_util.tree_leaves(params))
    print(
        f"| {name} ({n / 1e6:.2f}M params) | {statistics.median(program):.3f}x "
        f"({', '.join(f'{r:.3f}' for r in program)}) | "
        f"{statistics.median(loop):.3f}x ({', '.join(f'{r:.3f}' for r in loop)}) | "
        f"{nbytes['on'] / nbytes['off']:.4f}x |"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    args = parser.parse_args()
    print(
        f"underflow={JUMP} vs off, {args.steps} steps x {args.rounds} rounds, "
        "median of per-round ratios\n"
    )
    print(
        "| model | program on/off (per round) | loop on/off (per round) | "
        "bytes accessed on/off |"
    )
    print("|---|---|---|---|")
    for name in args.models:
        run_model(name, args.rounds, args.steps)


if __name__ == "__main__":
    main()
