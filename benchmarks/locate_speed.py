"""Time `jaxnan.locate` against compiling and running the plain jitted function.

Two benchmarks, both on `jax.value_and_grad` of a hand-written transformer LM
cross-entropy loss:

- ``--mode single`` (the 0.1 benchmark): a 4-layer pre-LN LM (d_model 256,
  4 heads, MLP 1024, vocab 512, batch 8 x 64 tokens), all finite and with a
  log(0) in the loss.
- ``--mode sweep`` (default): the depth sweep of issue 16. The unrolled LM of
  `benchmarks/models.py` (d_model 128, 4 heads, MLP 512, vocab 256, batch
  8 x 64) at 2, 4, 8, 16 and 24 layers. Each depth runs in a child process
  (killed after ``--limit`` seconds; the sweep stops at the first depth that
  exceeds it and says so). In the child, interleaved, warm (one tiny
  throw-away compile first), fresh functions each round: (a) plain
  ``jax.jit`` compile + one run, (b) `jaxnan.locate` of the finite step,
  (c) `jaxnan.locate` with an overflow planted in the middle layer. Ratios
  are medians of per-round ratios. Peak memory: two more child processes
  per depth report the rise of the peak resident set (``ru_maxrss``, host
  memory: on CPU the device buffers and the compiler live there) over the
  resident set after building the inputs, one for plain jit, one for
  locate.

With ``--reuse-jit`` `locate` is given the function the plain timing jitted
(a user's compiled training step), so ``check_compiled`` reuses its program.

Usage:
    python benchmarks/locate_speed.py [--depths 2,4,8,16,24] [--rounds 1]
        [--limit 240] [--no-memory] [--no-event] [--reuse-jit]
    python benchmarks/locate_speed.py --mode single [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # this checkout's jaxnan, not an installed one

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jaxnan  # noqa: E402

D, HEADS, MLP, VOCAB, LAYERS, BATCH, SEQ = 256, 4, 1024, 512, 4, 8, 64


def init(key):
    ks = iter(jax.random.split(key, 8 * LAYERS + 4))
    n = lambda shape, s=0.02: s * jax.random.normal(next(ks), shape)  # noqa: E731
    layers = [
        {
            "ln1": jnp.ones(D),
            "ln2": jnp.ones(D),
            "qkv": n((D, 3 * D)),
            "proj": n((D, D)),
            "up": n((D, MLP)),
            "down": n((MLP, D)),
        }
        for _ in range(LAYERS)
    ]
    return {
        "embed": n((VOCAB, D)),
        "pos": n((SEQ, D)),
        "layers": layers,
        "ln_f": jnp.ones(D),
        "head": n((D, VOCAB)),
    }


def layer_norm(x, g, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return g * (x - mu) / jnp.sqrt(var + eps)


def block(p, x):
    b, t, _ = x.shape
    h = layer_norm(x, p["ln1"])
    q, k, v = jnp.split(h @ p["qkv"], 3, axis=-1)
    split = lambda z: z.reshape(b, t, HEADS, D // HEADS).transpose(0, 2, 1, 3)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(D // HEADS)
    mask = jnp.tril(jnp.ones((t, t), bool))
    a = jax.nn.softmax(jnp.where(mask, s, -1e9), axis=-1)
    o = (a @ v).transpose(0, 2, 1, 3).reshape(b, t, D)
    x = x + o @ p["proj"]
    h = layer_norm(x, p["ln2"])
    return x + jax.nn.gelu(h @ p["up"]) @ p["down"]


def loss(params, tokens):
    x = params["embed"][tokens[:, :-1]] + params["pos"][: SEQ - 1]
    for p in params["layers"]:
        x = block(p, x)
    logits = layer_norm(x, params["ln_f"]) @ params["head"]
    probs = jax.nn.softmax(logits, axis=-1)
    nll = -jnp.log(jnp.take_along_axis(probs, tokens[:, 1:, None], -1))
    return nll.mean()


def time_plain(fn, args, keep=None):
    t0 = time.perf_counter()
    jitted = jax.jit(lambda *a: fn(*a))
    out = jitted(*args)
    jax.block_until_ready(out)
    if keep is not None:
        keep.append(jitted)
    return time.perf_counter() - t0


def time_locate(fn, args, jitted=None):
    """`locate` of a fresh function, or of the user's `jitted` one (reused)."""
    t0 = time.perf_counter()
    d = jaxnan.locate(jitted if jitted is not None else (lambda *a: fn(*a)))(*args)
    return time.perf_counter() - t0, d


def single(rounds):
    params = init(jax.random.PRNGKey(0))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (BATCH, SEQ), 0, VOCAB)
    bad = dict(params, head=params["head"] * 3e4)  # log(0) in the loss
    vg = jax.value_and_grad(loss)
    n_eqns = len(jax.make_jaxpr(vg)(params, tokens).eqns)
    print(f"jaxpr of value_and_grad(loss): {n_eqns} top-level equations")
    for label, p in (("finite", params), ("nonfinite", bad)):
        plain, loc, ratios = [], [], []
        d = None
        for _ in range(rounds):
            tp = time_plain(vg, (p, tokens))
            tl, d = time_locate(vg, (p, tokens))
            plain.append(tp)
            loc.append(tl)
            ratios.append(tl / tp)
        print(
            f"{label:9s}: plain jit compile+run {statistics.median(plain):.2f} s, "
            f"locate {statistics.median(loc):.2f} s, ratio "
            f"{statistics.median(ratios):.2f}x (median of {rounds}); "
            f"found={d.found} primitive={d.primitive} line={d.line} phase={d.phase}"
        )


# -- depth sweep ---------------------------------------------------------


def _lm(layers):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from models import lm_batch, lm_loss, lm_params

    params = lm_params(jax.random.PRNGKey(0), layers=layers, d=128)
    batch = lm_batch(jax.random.PRNGKey(1))
    bad = jax.tree_util.tree_map(lambda x: x, params)
    mid = bad["blocks"][layers // 2]
    mid["ff1"] = mid["ff1"] * 1e37  # the MLP matmul of the middle layer overflows
    return jax.value_and_grad(lm_loss), params, bad, batch


def _warm():
    jax.block_until_ready(jax.jit(lambda x: jnp.sin(x) @ x)(jnp.ones((4, 4))))


def point(layers, rounds, event=True, reuse=False):
    """One depth, in this (child) process: prints one JSON line.

    With `reuse`, `locate` gets the function the plain timing jitted (the
    user's compiled training step), whose compiled program it reuses.
    """
    vg, params, bad, batch = _lm(layers)
    _warm()
    n_eqns = len(jax.make_jaxpr(vg)(params, batch).eqns)
    rows = {"plain": [], "finite": [], "event": []}
    ratios = {"finite": [], "event": []}
    found = None
    for _ in range(rounds):
        keep = [] if reuse else None
        tp = time_plain(vg, (params, batch), keep)
        jitted = keep[0] if keep else None
        tf, d_ok = time_locate(vg, (params, batch), jitted)
        assert not d_ok.found, str(d_ok)
        te = float("nan")
        if event:
            te, d_bad = time_locate(vg, (bad, batch), jitted)
            found = f"{d_bad.primitive} line {d_bad.line} {d_bad.phase}"
        rows["plain"].append(tp)
        rows["finite"].append(tf)
        rows["event"].append(te)
        ratios["finite"].append(tf / tp)
        ratios["event"].append(te / tp)
    med = {k: statistics.median(v) for k, v in rows.items()}
    out = {
        "layers": layers,
        "eqns": n_eqns,
        **{f"{k}_s": round(v, 2) for k, v in med.items()},
        **{f"ratio_{k}": round(statistics.median(v), 2) for k, v in ratios.items()},
        "event": found,
    }
    print("RESULT " + json.dumps(out), flush=True)


def memory(layers, which):
    """Peak resident set rise (MiB) of one plain jit or one locate (child).

    ``which``: "plain", "locate" (finite step) or "event" (the planted
    overflow).
    """
    vg, params, bad, batch = _lm(layers)
    _warm()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if which == "plain":
        time_plain(vg, (params, batch))
    else:
        time_locate(vg, (bad if which == "event" else params, batch))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print("RESULT " + json.dumps({"mib": round((peak - base) / 1024, 1)}), flush=True)


def _child(args, limit):
    cmd = [sys.executable, os.path.abspath(__file__), *args]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        return None
    for line in res.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise RuntimeError(f"child {args} failed:\n{res.stderr[-3000:]}")


def sweep(depths, rounds, limit, mem, event, reuse=False):
    print(
        "| layers | eqns | plain jit compile+run | locate, finite | ratio "
        "| locate, event in layer L/2 | ratio | peak RSS rise plain / locate "
        "| event found |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for layers in depths:
        args = ["--point", str(layers), "--rounds", str(rounds)]
        args += [] if event else ["--no-event"]
        r = _child(args + (["--reuse-jit"] if reuse else []), limit)
        if r is None:
            print(
                f"| {layers} | | stopped: over the {limit:.0f} s limit per depth "
                "| | | | | | |"
            )
            break
        m = ""
        if mem:
            mp = _child(["--memory", str(layers), "plain"], limit)
            ml = _child(["--memory", str(layers), "locate"], limit)
            me = _child(["--memory", str(layers), "event"], limit) if event else None
            if mp and ml:
                ratio = ml["mib"] / max(mp["mib"], 1.0)
                m = f"{mp['mib']:.0f} / {ml['mib']:.0f} MiB ({ratio:.2f}x)"
            if mp and me:
                ratio = me["mib"] / max(mp["mib"], 1.0)
                m += f", event {me['mib']:.0f} MiB ({ratio:.2f}x)"
        print(
            f"| {layers} | {r['eqns']} | {r['plain_s']:.2f} s | {r['finite_s']:.2f} s "
            f"| {r['ratio_finite']:.2f}x | {r['event_s']:.2f} s "
            f"| {r['ratio_event']:.2f}x | {m} | {r['event']} |",
            flush=True,
        )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=("sweep", "single"), default="sweep")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--depths", default="2,4,8,16,24")
    ap.add_argument("--limit", type=float, default=240.0, help="seconds per depth")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--no-event", action="store_true", help="finite step only")
    ap.add_argument(
        "--reuse-jit",
        action="store_true",
        help="locate the function the plain timing jitted (its program reused)",
    )
    ap.add_argument("--point", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--memory", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.point is not None:
        point(a.point, a.rounds, not a.no_event, a.reuse_jit)
    elif a.memory is not None:
        memory(int(a.memory[0]), a.memory[1])
    elif a.mode == "single":
        single(a.rounds)
    else:
        depths = [int(x) for x in a.depths.split(",")]
        sweep(depths, a.rounds, a.limit, not a.no_memory, not a.no_event, a.reuse_jit)


if __name__ == "__main__":
    main()
