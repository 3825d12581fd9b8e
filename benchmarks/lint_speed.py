"""Times `jaxnan.lint` on the false-positive corpus (the Flax NNX transformer LM first).

Run from the repository root: ``python benchmarks/lint_speed.py``. Prints, per
model, the first call (tracing caches cold) and the median of 5 later calls,
the number of equations in the inlined graph, and the findings (0 expected).
"""

import importlib
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

import jaxnan  # noqa: E402
from jaxnan._src.lint import graph as lint_graph  # noqa: E402


def main():
    jax.config.update("jax_platforms", "cpu")
    print(f"jax {jax.__version__}, {os.cpu_count()} CPUs visible")
    for name in ["transformer_lm", "cnn", "mlp_eqx", "vae"]:
        fn, args = importlib.import_module(f"tests.lint_corpus.{name}").factory()
        t0 = time.perf_counter()
        findings = jaxnan.lint(fn, *args)
        first = time.perf_counter() - t0
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            jaxnan.lint(fn, *args)
            times.append(time.perf_counter() - t0)
        g, _ = lint_graph.build(fn, args)
        warm = statistics.median(times)
        print(
            f"{name:15s} first {first:6.2f} s  warm median {warm:6.2f} s"
            f"  graph {len(g.nodes):5d} eqns  findings {len(findings)}"
        )


if __name__ == "__main__":
    main()
