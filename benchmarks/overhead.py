"""Step-time, compile-time and memory-pass overhead of the guard transforms.

Usage: python benchmarks/overhead.py [--rounds 30] [--steps 5] [--models mlp]

Every variant is the same jitted train step (value_and_grad + adamw +
apply_updates) with one guard added. Variants run interleaved in one process:
each round times `--steps` warm steps of every variant (in a shuffled order) and
divides by the plain step's time in that round; the table shows the median of
those per-round ratios. Compile time is the median over `--compiles` fresh
lower+compile of each variant, as a ratio to the plain step. "extra passes"
counts, in the optimized HLO, the top-level operations that read an array of
the largest parameter's shape, minus the plain step's count: each such
operation is one more pass over that gradient (or parameter) memory.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import statistics
import sys
import time

import jax
import optax
from jax.experimental import checkify

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from models import MODELS  # noqa: E402

import jaxnan  # noqa: E402

LR = 1e-3


def make_step(loss_fn, tx, pass_loss=False):
    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        extra = {"loss": loss} if pass_loss else {}
        updates, opt_state = tx.update(grads, opt_state, params, **extra)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def variants(loss_fn):
    adamw = lambda: optax.adamw(LR)  # noqa: E731
    v = {
        "plain adamw": (make_step(loss_fn, adamw()), adamw(), None),
        "jaxnan.skip_nonfinite(adamw), loss checked": (
            make_step(loss_fn, jaxnan.skip_nonfinite(adamw()), pass_loss=True),
            jaxnan.skip_nonfinite(adamw()),
            None,
        ),
        "jaxnan.zero_nonfinite + adamw": (
            make_step(loss_fn, optax.chain(jaxnan.zero_nonfinite(), adamw())),
            optax.chain(jaxnan.zero_nonfinite(), adamw()),
            None,
        ),
        "optax.apply_if_finite(adamw)": (
            make_step(loss_fn, optax.apply_if_finite(adamw(), 10)),
            optax.apply_if_finite(adamw(), 10),
            None,
        ),
        "optax.zero_nans + adamw": (
            make_step(loss_fn, optax.chain(optax.zero_nans(), adamw())),
            optax.chain(optax.zero_nans(), adamw()),
            None,
        ),
        "optax.clip_by_global_norm + adamw": (
            make_step(loss_fn, optax.chain(optax.clip_by_global_norm(1.0), adamw())),
            optax.chain(optax.clip_by_global_norm(1.0), adamw()),
            None,
        ),
        "jaxnan.skip_nonfinite(jaxnan.clip + adamw), loss checked": (
            make_step(
                loss_fn,
                jaxnan.skip_nonfinite(
                    optax.chain(jaxnan.clip_by_global_norm(1.0), adamw())
                ),
                pass_loss=True,
            ),
            jaxnan.skip_nonfinite(
                optax.chain(jaxnan.clip_by_global_norm(1.0), adamw())
            ),
            None,
        ),
        "checkify nan_checks": (make_step(loss_fn, adamw()), adamw(), "nan"),
        "checkify float_checks": (make_step(loss_fn, adamw()), adamw(), "float"),
        "jax_debug_nans": (make_step(loss_fn, adamw()), adamw(), "debug_nans"),
    }
    return v


# Variants compared with a baseline other than the plain adamw step.
BASELINE = {
    "jaxnan.skip_nonfinite(jaxnan.clip + adamw), loss checked": (
        "optax.clip_by_global_norm + adamw"
    ),
}


def build(step, kind):
    if kind == "nan":
        return jax.jit(checkify.checkify(step, errors=checkify.nan_checks))
    if kind == "float":
        return jax.jit(checkify.checkify(step, errors=checkify.float_checks))
    return jax.jit(step)


def call(fn, kind, args):
    if kind == "debug_nans":
        with jax.debug_nans(True):
            return fn(*args)
    return fn(*args)


def count_big_reads(hlo: str, shape: tuple[int, ...]) -> int:
    """Top-level ENTRY instructions that read an array of `shape` (f32)."""
    target = "f32[" + ",".join(map(str, shape)) + "]"
    entry = hlo[hlo.index("\nENTRY") :].split("\n}\n")[0].splitlines()[1:]
    shapes = {}
    for ln in entry:
        m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = (\S+?)(?:\{[^}]*\})? ", ln)
        if m:
            shapes[m.group(1)] = m.group(2)
    n = 0
    for ln in entry:
        m = re.match(r"\s*(?:ROOT )?%[\w.\-]+ = \S+ (\w[\w\-]*)\((.*?)\)", ln)
        if not m or m.group(1) in (
            "parameter",
            "tuple",
            "get-tuple-element",
            "bitcast",
        ):
            continue
        ops = re.findall(r"%([\w.\-]+)", m.group(2))
        if any(shapes.get(o) == target for o in ops):
            n += 1
    return n


def run_model(name, rounds, steps, compiles):
    init, loss_fn, batch_fn = MODELS[name]
    params = init(jax.random.PRNGKey(0))
    batch = batch_fn(jax.random.PRNGKey(1))
    big = max(jax.tree_util.tree_leaves(params), key=lambda x: x.size).shape
    vs = variants(loss_fn)
    fns, states, compile_times, passes = {}, {}, {k: [] for k in vs}, {}
    jax.jit(vs["plain adamw"][0]).lower(
        params, optax.adamw(LR).init(params), batch
    ).compile()
    for c in range(compiles):
        for key in random.sample(list(vs), len(vs)):
            step, tx, kind = vs[key]
            state = tx.init(params)
            t0 = time.perf_counter()
            if kind == "debug_nans":
                with jax.debug_nans(True):
                    lowered = jax.jit(step).lower(params, state, batch)
            else:
                lowered = build(step, kind).lower(params, state, batch)
            compiled = lowered.compile()
            compile_times[key].append(time.perf_counter() - t0)
            if c == 0:
                passes[key] = count_big_reads(compiled.as_text(), big)
    for key, (step, tx, kind) in vs.items():
        fns[key] = build(step, kind)
        states[key] = tx.init(params)
        jax.block_until_ready(call(fns[key], kind, (params, states[key], batch)))
    ratios = {k: [] for k in vs}
    for _ in range(rounds):
        times = {}
        for key in random.sample(list(vs), len(vs)):
            kind = vs[key][2]
            args = (params, states[key], batch)
            jax.block_until_ready(call(fns[key], kind, args))
            t0 = time.perf_counter()
            for _ in range(steps):
                out = call(fns[key], kind, args)
            jax.block_until_ready(out)
            times[key] = (time.perf_counter() - t0) / steps
        for key in vs:
            ratios[key].append(times[key] / times["plain adamw"])
    rows = []
    for key in vs:
        base = BASELINE.get(key, "plain adamw")
        per_round = [a / b for a, b in zip(ratios[key], ratios[base])]
        ctimes = [a / b for a, b in zip(compile_times[key], compile_times[base])]
        rows.append(
            (
                key,
                base,
                statistics.median(per_round),
                statistics.median(ctimes),
                passes[key] - passes[base],
            )
        )
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
    return rows, n_params, statistics.median(compile_times["plain adamw"])


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--compiles", type=int, default=3)
    ap.add_argument("--models", default="mlp,transformer")
    args = ap.parse_args(argv)
    dev = jax.devices()[0]
    print(f"device: {dev.platform} ({dev.device_kind}), jax {jax.__version__}\n")
    for name in args.models.split(","):
        rows, n, c0 = run_model(name, args.rounds, args.steps, args.compiles)
        print(f"### {name} ({n / 1e6:.2f}M params, adamw), plain compile {c0:.2f}s\n")
        print(
            "| variant | baseline | step time | compile time "
            "| extra passes over the largest gradient |"
        )
        print("|---|---|---|---|---|")
        for key, base, r, c, p in rows:
            print(f"| {key} | {base} | {r:.3f}x | {c:.2f}x | {p:+d} |")
        print()


if __name__ == "__main__":
    main()
