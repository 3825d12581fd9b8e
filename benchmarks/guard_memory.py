"""The host memory of `jaxnan.guard`'s bookkeeping over a long run (1e6 steps).

Runs the host half of a guarded loop without compiling a model: each
"step" is one health vector read by `GuardedStep._read` (the per-step
figures, the early-warning history, the snapshot bookkeeping), and every
`--bad-every` steps one incident is recorded (`IncidentLog.add`, as for a
skipped bad step; no diagnosis is attached, so each is a few hundred bytes
where a real one also holds its `Diagnosis`). Python heap bytes are taken
with `tracemalloc` after 1e3, 1e4, 1e5 and 1e6 steps: a bounded guard
stops growing once its ring buffers (`GuardedStep.FIGURES_KEPT`,
`GuardedStep.INCIDENTS_KEPT`) are full.

Run: python benchmarks/guard_memory.py [--steps 1000000] [--bad-every 100]
"""

from __future__ import annotations

import argparse
import time
import tracemalloc

import numpy as np

import jaxnan
from jaxnan._src.guard import incidents, program, step


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=1_000_000)
    parser.add_argument("--bad-every", type=int, default=100)
    args = parser.parse_args()

    guarded = jaxnan.guard(lambda p, o, b: (p, o, b), verbose=False)
    rng = np.random.default_rng(0)
    # Healthy figures that do not grow: loss ~1, gradient norm ~1, ratio 1e-3.
    noise = rng.uniform(0.9, 1.1, size=(4096, 3)).astype(np.float32)
    healths = np.zeros((4096, program.HEALTH_SIZE), np.float32)
    healths[:, program.LOSS] = noise[:, 0]
    healths[:, program.GRAD_NORM] = noise[:, 1]
    healths[:, program.RATIO] = noise[:, 2] * 1e-3
    marks = {10**k for k in range(3, 7)} | {args.steps}
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    start = time.perf_counter()
    print(f"{'steps':>9} {'heap bytes':>12} {'figures':>8} {'incidents':>9}")
    for i in range(1, args.steps + 1):
        pending = step._Pending(i, None, [], healths[i % 4096])
        guarded._read(pending)
        if i % args.bad_every == 0:
            guarded.log.add(
                incidents.Incident(
                    step=i,
                    action=incidents.Action.SKIPPED,
                    cause="input_data",
                    message=f"jaxnan.guard: step {i} went nonfinite (loss nan).",
                    leaf="batch['x']",
                    rows=(6,),
                )
            )
        if i in marks:
            used = tracemalloc.get_traced_memory()[0] - base
            print(
                f"{i:>9} {used:>12,} {len(guarded.figures):>8} "
                f"{len(guarded.incidents):>9}"
            )
    took = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1] - base
    summary = guarded.log.summary(args.steps)
    print(
        f"peak {peak:,} bytes; {took / args.steps * 1e6:.1f} us per step under "
        f"tracemalloc; summary counts {summary['bad_steps']} bad steps"
    )


if __name__ == "__main__":
    main()
