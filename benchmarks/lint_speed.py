"""Times `jaxnan.lint` on the real-model corpus, and the CLI on optax's nanolm.

Run from the repository root: ``python benchmarks/lint_speed.py``. Prints, per
model of `tests/lint_corpus/` (safe and planted-bug versions): the first call
(tracing caches cold), the median of 3 later calls with and without
witnesses, the inlined graph's size and the findings. Then the wall time of
the whole command ``python -m jaxnan lint tests/lint_corpus/nanolm.py``
(interpreter start, imports, both factories, lint, witnesses), 3 runs: the CI
figure, target under 10 s on a 2-core CPU.
"""

import importlib
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402

import jaxnan  # noqa: E402
from jaxnan._src.lint import graph as lint_graph  # noqa: E402
from tests.test_lint_corpus import CORPUS  # noqa: E402


def _median(fn, args, n=3, **kw):
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        jaxnan.lint(fn, *args, **kw)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    jax.config.update("jax_platforms", "cpu")
    print(f"jax {jax.__version__}, {os.cpu_count()} CPUs visible")
    print("model                  variant first   warm  warm-no-witness  eqns  found")
    for name in CORPUS:
        mod = importlib.import_module(f"tests.lint_corpus.{name}")
        for variant in ("factory", "buggy_factory"):
            fn, args = getattr(mod, variant)()
            t0 = time.perf_counter()
            findings = jaxnan.lint(fn, *args)
            first = time.perf_counter() - t0
            warm = _median(fn, args)
            bare = _median(fn, args, witness=False)
            g, _ = lint_graph.build(fn, args)
            print(
                f"{name:22s} {variant[:5]:5s} {first:6.2f} s {warm:5.2f} s"
                f" {bare:9.2f} s {len(g.nodes):9d} {len(findings):5d}"
            )
    cmd = [sys.executable, "-m", "jaxnan", "lint", "tests/lint_corpus/nanolm.py"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    walls = []
    for _ in range(3):
        t0 = time.perf_counter()
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        walls.append(time.perf_counter() - t0)
    print(
        f"{' '.join(cmd[1:])}: exit {r.returncode}, wall {min(walls):.2f} / "
        f"{statistics.median(walls):.2f} / {max(walls):.2f} s (min/median/max)"
    )


if __name__ == "__main__":
    main()
