"""Which optax optimizers never return on a nonfinite gradient, guarded or not.

`skip_nonfinite` evaluates the inner update on every step, the skipped ones
included, so an optimizer that iterates on its gradients (an SVD, a line
search's `while_loop`, a Newton-Schulz loop) could hang the guard on a step
it skips anyway. This runs every case of `tests/optax_catalogue.py` (every
optimizer and wrapper of optax and optax.contrib) on a float32 tree of
2-D and 1-D leaves, with a NaN, a +Inf and a -Inf in turn at the first and
at a middle entry of each leaf: ``jit(opt.update)`` alone (``plain``) and
``jit(skip_nonfinite(opt).update)`` (``guarded``), each call with a time
limit. A worker process runs the cases in turn; when a call passes the
limit the worker is killed, the case is recorded as a hang, and a new
worker goes on from the next case.

It also lists the cases whose update holds a loop primitive (``while``,
``scan``), which are the ones that could iterate on their input.

Usage: ``python benchmarks/studies/hang_survey.py [--limit 20] [--only NAME]``
(about 6 minutes on a 2-core CPU). Figures: benchmarks/RESULTS.md,
"Hang survey".
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(__file__))))

BAD = {"nan": float("nan"), "posinf": float("inf"), "neginf": float("-inf")}
SHAPES = {"a": (3, 4), "b": (4,), "c": (4, 4), "d": (3,)}


def _worker(names, queue) -> None:
    """Runs each case of `names`, putting ``(name, event, detail)`` on `queue`."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    import jaxnan
    from jaxnan._src.core import primitives
    from tests import optax_catalogue as cat

    cases = {c.name: c for c in cat.cases()}
    loss = jnp.float32(1.0)
    rng = np.random.default_rng(0)
    base = {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in SHAPES.items()}

    def loops(jaxpr) -> set[str]:
        found, todo = set(), [jaxpr]
        while todo:
            for eqn in todo.pop().eqns:
                if eqn.primitive.name in ("while", "scan"):
                    found.add(eqn.primitive.name)
                todo += [s.jaxpr for s in primitives.sub_jaxprs(eqn, strict=False)]
        return found

    for name in names:
        case = cases[name]
        try:
            opt = optax.with_extra_args_support(case.make())
            params = case.wrap(base)

            def plain(g, s, p, opt=opt, case=case):
                return opt.update(g, s, p, **case.extra(p, loss, g))

            tx = jaxnan.skip_nonfinite(opt)

            def guarded(g, s, p, tx=tx, case=case):
                return tx.update(g, s, p, loss=loss, **case.extra(p, loss, g))

            variants = {  # guarded first: a plain hang ends the case
                "guarded": (jax.jit(guarded), tx.init(params)),
                "plain": (jax.jit(plain), opt.init(params)),
            }
            jaxpr = jax.make_jaxpr(plain)(base, opt.init(params), params).jaxpr
            queue.put((name, "loops", ",".join(sorted(loops(jaxpr)))))
        except Exception as e:  # a case optax itself cannot build on this tree
            queue.put((name, "error", f"{type(e).__name__}: {str(e)[:80]}"))
            continue
        for variant, (fn, state) in variants.items():
            for leaf, shape in SHAPES.items():
                n = int(np.prod(shape))
                for where in (0, n // 2):
                    for kind, value in BAD.items():
                        g = dict(base)
                        g[leaf] = base[leaf].reshape(-1).at[where].set(value)
                        g[leaf] = g[leaf].reshape(shape)
                        what = f"{variant} {leaf}[{where}]={kind}"
                        queue.put((name, "start", what))
                        try:
                            jax.block_until_ready(fn(g, state, params))
                        except Exception as e:
                            queue.put((name, "error", f"{what}: {type(e).__name__}"))
        queue.put((name, "done", ""))
    queue.put((None, "finished", ""))


def _survey(names: list[str], limit: float) -> tuple[list, dict, dict]:
    """Runs `names` in workers; ``(hangs, loops, errors)``."""
    ctx = mp.get_context("spawn")
    hangs: list[tuple[str, str]] = []
    errors: dict[str, str] = {}
    with_loops: dict[str, str] = {}
    todo = list(names)
    while todo:
        queue = ctx.Queue()
        proc = ctx.Process(target=_worker, args=(todo, queue), daemon=True)
        proc.start()
        wait, name, detail = 300.0, todo[0], "import and build"
        while True:
            try:
                name, event, detail = queue.get(timeout=wait)
            except Exception:  # no word within the limit: the call hangs
                hangs.append((name, detail))
                proc.kill()
                proc.join()
                todo = todo[todo.index(name) + 1 :]
                break
            wait = limit
            if event == "finished":
                proc.join()
                todo = []
                break
            if event == "loops" and detail:
                with_loops[name] = detail
            elif event == "error":
                errors.setdefault(name, detail)
    return hangs, with_loops, errors


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=float, default=20.0, help="seconds per call")
    ap.add_argument("--only", default=None, help="one case name")
    args = ap.parse_args()
    from tests import optax_catalogue as cat

    names = [args.only] if args.only else sorted(c.name for c in cat.cases())
    t0 = time.perf_counter()
    hangs, with_loops, errors = _survey(names, args.limit)
    print(f"{len(names)} cases, {time.perf_counter() - t0:.0f} s")
    print(f"hangs ({len(hangs)}):")
    for name, detail in hangs:
        print(f"  {name}: {detail}")
    print(f"updates holding a loop ({len(with_loops)}):")
    for name, kinds in sorted(with_loops.items()):
        print(f"  {name}: {kinds}")
    print(f"errors ({len(errors)}):")
    for name, detail in sorted(errors.items()):
        print(f"  {name}: {detail}")


if __name__ == "__main__":
    main()
