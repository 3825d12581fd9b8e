"""Old vs new `jaxnan.lint` on the false-positive corpus, interleaved, one process.

Usage (from the repository root)::

    git show a4e70b4:lint > /tmp/old_lint.py
    git show a4e70b4:lint_rules > /tmp/old_lint_rules.py
    sed -i 's/from jaxnan._src.lint_rules import/from old_lint_rules import/' \\
        /tmp/old_lint.py
    python benchmarks/studies/lint_refactor_speed.py /tmp

Prints, per model, the warm median of the per-round ratio new/old of the
process CPU time (rounds alternate which one runs first) and both medians.
"""

import importlib
import os
import statistics
import sys
import time

sys.path.insert(
    0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
)

import jax  # noqa: E402

import jaxnan  # noqa: E402


def _time(fn, args, lint):
    """CPU seconds of this process (less disturbed by a shared machine)."""
    t0 = time.process_time()
    lint(fn, *args)
    return time.process_time() - t0


def main(old_dir: str, rounds: int = 25):
    jax.config.update("jax_platforms", "cpu")
    sys.path.insert(0, old_dir)
    old = importlib.import_module("old_lint")
    print(f"jax {jax.__version__}, {os.cpu_count()} CPUs visible, {rounds} rounds")
    for name in ["transformer_lm", "cnn", "mlp_eqx", "vae"]:
        fn, args = importlib.import_module(f"tests.lint_corpus.{name}").factory()
        for lint in (old.lint, jaxnan.lint):  # warm: tracing caches
            lint(fn, *args)
        t_old, t_new, ratios = [], [], []
        for r in range(rounds):
            pair = (old.lint, jaxnan.lint) if r % 2 else (jaxnan.lint, old.lint)
            times = {lint: _time(fn, args, lint) for lint in pair}
            t_old.append(times[old.lint])
            t_new.append(times[jaxnan.lint])
            ratios.append(times[jaxnan.lint] / times[old.lint])
        print(
            f"{name:15s} new/old {statistics.median(ratios):5.2f}x"
            f"  old {statistics.median(t_old):6.3f} s CPU"
            f"  new {statistics.median(t_new):6.3f} s CPU"
        )


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp")
