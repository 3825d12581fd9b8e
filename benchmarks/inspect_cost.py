"""Cost of jaxnan's inspect functions (shared 2-core CPU: noisy, read ratios).

1. `activation_stats` on the small transformer LM vs one plain forward pass
   (`lm_logits`), both jitted and warm, interleaved, medians (compile
   excluded). Target: <= 2x.
2. `impute` on a 1M-element float32 batch: passes over the batch counted in
   the optimized HLO (entry instructions reading the 1M-element parameter),
   and time vs one pass (`where(isfinite(x), x, 0)`). Target: <= 3 passes.

Run: python benchmarks/inspect_cost.py [--png benchmarks/inspect_stats.png]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]  # models, this checkout's jaxnan
import models  # noqa: E402

import jaxnan  # noqa: E402


def _time(fn, *args, reps):
    jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t0


def interleaved(fns, args, rounds, reps=1):
    times = {k: [] for k in fns}
    for f in fns.values():
        jax.block_until_ready(f(*args))  # compile + warm
    for _ in range(rounds):
        for k, f in fns.items():
            t0 = time.perf_counter()
            for _ in range(reps):
                out = f(*args)
            jax.block_until_ready(out)
            times[k].append((time.perf_counter() - t0) / reps)
    return {k: statistics.median(v) for k, v in times.items()}


def passes(fn, x):
    """Entry-computation instructions of the optimized HLO that read `x`."""
    hlo = jax.jit(fn).lower(x).compile().as_text()
    entry = hlo[hlo.index("ENTRY") :]
    param = re.search(r"(%?\S+) = f32\[1024,1024\]\{[^}]*\} parameter\(0\)", entry)
    name = param.group(1)
    body = entry.split("\n")
    readers = [
        line.strip()
        for line in body
        if "parameter(0)" not in line and re.search(re.escape(name) + r"[,)\s]", line)
    ]
    return len(readers), readers


def lm_section(rounds):
    key = jax.random.key(0)
    params = models.lm_params(key)
    tokens = models.lm_batch(key)["tokens"][:, :-1]
    forward = jax.jit(models.lm_logits)
    stats = jax.jit(jaxnan.activation_stats(models.lm_logits))
    t = interleaved(
        {"forward": forward, "activation_stats": stats}, (params, tokens), rounds
    )
    n_layers = len(stats(params, tokens))
    ratio = t["activation_stats"] / t["forward"]
    print(
        f"LM forward {t['forward'] * 1e3:.2f} ms, activation_stats "
        f"{t['activation_stats'] * 1e3:.2f} ms -> {ratio:.2f}x ({n_layers} layers)"
    )
    return params, tokens


def impute_section(rounds):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1024, 1024)).astype(np.float32)
    x[rng.random(x.shape) < 0.01] = np.nan
    x = jnp.asarray(x)
    one_pass = lambda x: jnp.where(jnp.isfinite(x), x, 0)  # noqa: E731
    fns = {"one pass": one_pass}
    for s in ("zero", "mean", "median"):
        fns[f"impute {s}"] = lambda x, s=s: jaxnan.impute(x, strategy=s)
    stats = jaxnan.impute_stats(x, strategy="mean")
    fns["impute stats="] = lambda x: jaxnan.impute(x, stats=stats)
    jitted = {k: jax.jit(f) for k, f in fns.items()}
    t = interleaved(jitted, (x,), rounds, reps=3)
    for k, f in fns.items():
        n, _ = passes(f, x)
        print(
            f"{k:14s} {t[k] * 1e3:7.2f} ms  {t[k] / t['one pass']:5.2f}x one pass, "
            f"{n} HLO pass(es) over the 1M-element batch"
        )


def f16_mlp(params, x):
    for i, w in enumerate(params):
        with jax.named_scope(f"layer_{i}"):
            x = x @ w
            x = jax.nn.relu(x) if i < len(params) - 1 else x
    return x


def png(path):
    """A float16 MLP whose weights grow with depth: layer 4 nears overflow."""
    keys = jax.random.split(jax.random.key(0), 6)
    gains = [1.0, 2.0, 4.0, 8.0, 500.0, 0.001]
    params = [
        (jax.random.normal(k, (256, 256)) * g / 16).astype(jnp.float16)
        for k, g in zip(keys, gains)
    ]
    x = jax.random.normal(jax.random.key(1), (64, 256)).astype(jnp.float16)
    stats = jaxnan.activation_stats(f16_mlp)(params, x)
    for name, s in stats.items():
        print(f"  {name}: {s}")
    jaxnan.plot_stats(stats, path, title="float16 MLP, weights growing with depth")
    print("wrote", path)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--png", default=None)
    a = ap.parse_args()
    print(jax.devices()[0].platform, jax.__version__)
    lm_section(a.rounds)
    impute_section(a.rounds)
    if a.png:
        png(a.png)
