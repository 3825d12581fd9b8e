"""CPU time of `jaxnan.locate` over the scenario suite, per pass.

For every case of `tests/cases/` (46 small to mid-size functions: 39 of them
100 equations or fewer once flattened), interleaved: `jaxnan.locate` with
`blocks.SMALL_PROGRAM` at 0 (every program cut into blocks and run plain
first, as before this round) and at its value (a small program is one block,
run instrumented at once). JAX's caches are cleared before each call, so
each call compiles what it needs; the persistent compilation cache is off.
Reported: the CPU seconds of the detect passes, the layer statistics, the
compiled run and the whole `locate`, summed over the cases, and whether
every answer (primitive, phase, cause, line) is the same under both.

Usage: python benchmarks/studies/locate_cases.py [--rounds 2] [--small 100]
"""

from __future__ import annotations

import argparse
import collections
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)  # the sharded cases, as in the tests

from locate_accuracy import CASES_DIR, load_case  # noqa: E402

import jaxnan  # noqa: E402
from jaxnan._src.locate import api as locate  # noqa: E402
from jaxnan._src.locate import blocks, replay  # noqa: E402


def time_passes(seconds: dict) -> None:
    """Adds the CPU seconds of locate's passes to ``seconds["now"]``."""
    for owner, name, label in [
        (replay.Run, "detect", "detect"),
        (locate, "_layer_text", "layer statistics"),
        (replay.Run, "compiled_counts", "compiled run"),
    ]:
        fn = getattr(owner, name)

        def timed(*a, fn=fn, label=label, **k):
            start = time.process_time()
            try:
                return fn(*a, **k)
            finally:
                seconds["now"][label] += time.process_time() - start

        setattr(owner, name, timed)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--small", type=int, default=blocks.SMALL_PROGRAM)
    args = ap.parse_args()
    seconds = {0: collections.Counter(), args.small: collections.Counter()}
    seconds["now"] = collections.Counter()  # the warm-up's
    time_passes(seconds)
    jaxnan.locate(lambda x: jax.numpy.log(x))(jax.numpy.zeros(3))  # warm
    answers: dict[int, list] = {0: [], args.small: []}
    for r in range(args.rounds):
        for path in sorted(CASES_DIR.glob("case_*.py")):
            module, _ = load_case(path)
            fn, fn_args = module.make()
            history = getattr(module, "HISTORY", None)
            order = [0, args.small] if r % 2 == 0 else [args.small, 0]
            for small in order:
                blocks.SMALL_PROGRAM = small
                seconds["now"] = seconds[small]
                jax.clear_caches()
                start = time.process_time()
                d = jaxnan.locate(fn, history=history)(*fn_args)
                seconds[small]["locate"] += time.process_time() - start
                if r == 0:
                    answers[small].append(
                        (path.stem, d.primitive, d.phase, d.cause, d.line)
                    )
    n = len(answers[0])
    print(f"{n} cases, {args.rounds} rounds, CPU seconds summed")
    print(f"| pass | SMALL_PROGRAM=0 | SMALL_PROGRAM={args.small} | ratio |")
    print("|---|---|---|---|")
    for label in ("detect", "layer statistics", "compiled run", "locate"):
        a, b = seconds[0][label], seconds[args.small][label]
        print(f"| {label} | {a:.1f} | {b:.1f} | {b / a:.2f}x |")
    same = answers[0] == answers[args.small]
    print(f"every answer the same: {same}")
    if not same:
        for x, y in zip(answers[0], answers[args.small]):
            if x != y:
                print("  ", x, "->", y)


if __name__ == "__main__":
    main()
