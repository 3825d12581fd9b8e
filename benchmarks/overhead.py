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
import functools
import os
import random
import re
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import optax
from jax.experimental import checkify

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from models import MODELS  # noqa: E402

import jaxnan  # noqa: E402
from jaxnan._src.transforms import nonfinite

LR = 1e-3


def make_step(loss_fn, tx, pass_loss=False):
    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        extra = {"loss": loss} if pass_loss else {}
        updates, opt_state = tx.update(grads, opt_state, params, **extra)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def skip_without_outgoing_check(inner):
    """`jaxnan.skip_nonfinite` as it was before the outgoing check (0.1).

    The same incoming test (gradients and loss) and the same `lax.cond`, with
    the check of what `inner` produces left out: the "before" of the
    outgoing-check row.
    """
    tx = jaxnan.skip_nonfinite(inner)
    inner = optax.with_extra_args_support(inner)

    def update(updates, state, params=None, **extra):
        finite = jaxnan.all_finite(updates) & jaxnan.all_finite(extra.get("loss", 0.0))
        out, kept, _, _, _ = nonfinite.guarded_update(
            inner,
            finite,
            updates,
            state.inner_state,
            params,
            extra,
            check_outgoing=False,
        )
        return out, state._replace(inner_state=kept)

    return optax.GradientTransformationExtraArgs(tx.init, update)


def variants(loss_fn):
    adamw = lambda: optax.adamw(LR)  # noqa: E731
    v = {
        "plain adamw": (make_step(loss_fn, adamw()), adamw(), None),
        "jaxnan.skip_nonfinite(adamw), loss checked": (
            make_step(loss_fn, jaxnan.skip_nonfinite(adamw()), pass_loss=True),
            jaxnan.skip_nonfinite(adamw()),
            None,
        ),
        "before: skip_nonfinite(adamw) without the outgoing check, loss checked": (
            make_step(loss_fn, skip_without_outgoing_check(adamw()), pass_loss=True),
            skip_without_outgoing_check(adamw()),
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
        "ablation: skip by where-selects, loss checked": (
            make_step(loss_fn, skip_by_select(adamw()), pass_loss=True),
            skip_by_select(adamw()),
            None,
        ),
        "checkify nan_checks": (make_step(loss_fn, adamw()), adamw(), "nan"),
        "checkify float_checks": (make_step(loss_fn, adamw()), adamw(), "float"),
        "jax_debug_nans": (make_step(loss_fn, adamw()), adamw(), "debug_nans"),
    }
    return v


# Variants compared with a baseline other than the plain adamw step.
BASELINE = {
    "jaxnan.skip_nonfinite(adamw), loss checked": (
        "before: skip_nonfinite(adamw) without the outgoing check, loss checked"
    ),
    "jaxnan.skip_nonfinite(jaxnan.clip + adamw), loss checked": (
        "optax.clip_by_global_norm + adamw"
    ),
}


def build(step, kind):
    """The jitted step; params and optimizer state are donated, as in training."""
    if kind == "nan":
        fn = checkify.checkify(step, errors=checkify.nan_checks)
    elif kind == "float":
        fn = checkify.checkify(step, errors=checkify.float_checks)
    else:
        fn = step
    return jax.jit(fn, donate_argnums=(0, 1))


def call(fn, kind, args):
    """One step; returns (params, opt_state) to feed the next one."""
    if kind == "debug_nans":
        with jax.debug_nans(True):
            out = fn(*args)
    else:
        out = fn(*args)
    if kind in ("nan", "float"):
        out = out[1]  # (error, outputs): the error is left on device
    return out[0], out[1]


def skip_by_select(inner):
    """Ablation: skip with where-selects on updates and state (no lax.cond)."""
    inner = optax.with_extra_args_support(inner)

    def update(updates, state, params=None, **extra):
        new_u, new_s = inner.update(updates, state, params, **extra)
        ok = jaxnan.all_finite(updates) & jaxnan.all_finite(extra.get("loss", 0.0))
        new_u = jax.tree.map(lambda u: jnp.where(ok, u, jnp.zeros_like(u)), new_u)
        new_s = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new_s, state)
        return new_u, new_s

    return optax.GradientTransformationExtraArgs(inner.init, update)


def _computations(hlo: str) -> tuple[str, dict[str, list[str]]]:
    """(entry name, {computation name: instruction lines}) of an HLO module."""
    comps, name, entry = {}, None, None
    for ln in hlo.splitlines():
        m = re.match(r"(ENTRY )?%([\w.\-]+) .*\{$", ln)
        if m:
            name = m.group(2)
            comps[name] = []
            if m.group(1):
                entry = name
        elif ln.startswith("}"):
            name = None
        elif name is not None:
            comps[name].append(ln)
    return entry, comps


def count_big_reads(hlo: str, shape: tuple[int, ...]) -> int:
    """Unfused instructions that read an f32 array of `shape` on a healthy step.

    Looks at the entry computation and, recursively, at the branch of each
    conditional that a healthy step takes and at the bodies of loops (not
    inside fusions: a fusion reads its operands once, however many
    instructions it holds).
    """
    target = "f32[" + ",".join(map(str, shape)) + "]"
    entry, comps = _computations(hlo)
    todo, seen, n = [entry], set(), 0
    while todo:
        name = todo.pop()
        if name in seen or name not in comps:
            continue
        seen.add(name)
        lines = comps[name]
        shapes = {}
        for ln in lines:
            m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = (\S+?)(?:\{[^}]*\})? ", ln)
            if m:
                shapes[m.group(1)] = m.group(2)
        for ln in lines:
            for attr in re.findall(
                r"(?:branch_computations|body|condition|true_computation"
                r"|false_computation)=(\{[^}]*\}|%[\w.\-]+)",
                ln,
            ):
                names = [c.strip(" {}%") for c in attr.split(",")]
                # A lax.cond lowers its branches as (false, true); jaxnan and
                # optax.apply_if_finite take the true branch on a healthy step,
                # so only that one is counted (the slow paths never run then).
                todo.append(names[-1])
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


def run_model(name, rounds, steps, compiles, only=()):
    init, loss_fn, batch_fn = MODELS[name]
    params = init(jax.random.PRNGKey(0))
    batch = batch_fn(jax.random.PRNGKey(1))
    big = max(jax.tree_util.tree_leaves(params), key=lambda x: x.size).shape
    vs = variants(loss_fn)
    if only:
        keep = {k for k in vs if k == "plain adamw" or any(o in k for o in only)}
        keep |= {BASELINE[k] for k in keep if k in BASELINE}
        vs = {k: v for k, v in vs.items() if k in keep}
    compile_times, passes, temp = {k: [] for k in vs}, {}, {}
    build(vs["plain adamw"][0], None).lower(
        params, optax.adamw(LR).init(params), batch
    ).compile()  # warm-up: the first compile of a process pays extra
    for c in range(compiles):
        for key in random.sample(list(vs), len(vs)):
            step, tx, kind = vs[key]
            state = tx.init(params)
            t0 = time.perf_counter()
            fresh = functools.wraps(step)(lambda *a, _s=step: _s(*a))  # no cache hit
            if kind == "debug_nans":
                with jax.debug_nans(True):
                    lowered = build(fresh, kind).lower(params, state, batch)
            else:
                lowered = build(fresh, kind).lower(params, state, batch)
            compiled = lowered.compile()
            compile_times[key].append(time.perf_counter() - t0)
            if c == 0:
                passes[key] = count_big_reads(compiled.as_text(), big)
                mem = compiled.memory_analysis()
                temp[key] = getattr(mem, "temp_size_in_bytes", 0) if mem else 0
    fns, carry = {}, {}
    for key, (step, tx, kind) in vs.items():
        fns[key] = build(step, kind)
        p = jax.tree.map(jnp.copy, params)
        carry[key] = call(fns[key], kind, (p, tx.init(p), batch))
        jax.block_until_ready(carry[key])
    ratios = {k: [] for k in vs}
    for _ in range(rounds):
        times = {}
        for key in random.sample(list(vs), len(vs)):
            kind = vs[key][2]
            p, s = carry[key]
            t0 = time.perf_counter()
            for _ in range(steps):
                p, s = call(fns[key], kind, (p, s, batch))
            jax.block_until_ready((p, s))
            times[key] = (time.perf_counter() - t0) / steps
            carry[key] = (p, s)
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
                (temp[key] - temp[base]) / param_bytes(params),
            )
        )
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
    return rows, n_params, statistics.median(compile_times["plain adamw"])


def param_bytes(params):
    return sum(x.nbytes for x in jax.tree_util.tree_leaves(params))


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--compiles", type=int, default=3)
    ap.add_argument("--models", default="mlp,transformer")
    ap.add_argument(
        "--only",
        default="",
        help="comma-separated substrings: run only the variants naming one "
        "(plus the plain step and their baselines)",
    )
    args = ap.parse_args(argv)
    dev = jax.devices()[0]
    print(f"device: {dev.platform} ({dev.device_kind}), jax {jax.__version__}\n")
    for name in args.models.split(","):
        only = [o for o in args.only.split(",") if o]
        rows, n, c0 = run_model(name, args.rounds, args.steps, args.compiles, only)
        print(f"### {name} ({n / 1e6:.2f}M params, adamw), plain compile {c0:.2f}s\n")
        print(
            "| variant | baseline | step time | compile time "
            "| extra passes over the largest gradient | extra temp memory |"
        )
        print("|---|---|---|---|---|---|")
        for key, base, r, c, p, m in rows:
            print(
                f"| {key} | {base} | {r:.3f}x | {c:.2f}x | {p:+d} | {m:+.2f}x params |"
            )
        print()


if __name__ == "__main__":
    main()
