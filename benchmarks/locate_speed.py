"""Time `jaxnan.locate` against compiling and running the plain jitted function.

Model: a 4-layer pre-LN transformer LM (d_model 256, 4 heads, MLP 1024,
vocab 512, batch 8 x 64 tokens), `jax.value_and_grad` of its cross-entropy
loss written by hand (log of softmax, so a too-confident head underflows to
log(0) = -inf). Each round, interleaved, times (a) a fresh `jax.jit` of the
function: compile + one run, and (b) a fresh `jaxnan.locate` of it: trace,
compile and run the instrumented program (+ the capture program when an
event is found). Compile caches are fresh per round (new function objects).

Usage: python benchmarks/locate_speed.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxnan

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


def time_plain(fn, args):
    t0 = time.perf_counter()
    out = jax.jit(lambda *a: fn(*a))(*args)
    jax.block_until_ready(out)
    return time.perf_counter() - t0


def time_locate(fn, args):
    t0 = time.perf_counter()
    d = jaxnan.locate(lambda *a: fn(*a))(*args)
    return time.perf_counter() - t0, d


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    params = init(jax.random.PRNGKey(0))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (BATCH, SEQ), 0, VOCAB)
    bad = dict(params, head=params["head"] * 3e4)  # log(0) in the loss
    vg = jax.value_and_grad(loss)
    n_eqns = len(jax.make_jaxpr(vg)(params, tokens).eqns)
    print(f"jaxpr of value_and_grad(loss): {n_eqns} top-level equations")
    for label, p in (("finite", params), ("nonfinite", bad)):
        plain, loc, ratios = [], [], []
        d = None
        for _ in range(a.rounds):
            tp = time_plain(vg, (p, tokens))
            tl, d = time_locate(vg, (p, tokens))
            plain.append(tp)
            loc.append(tl)
            ratios.append(tl / tp)
        print(
            f"{label:9s}: plain jit compile+run {statistics.median(plain):.2f} s, "
            f"locate {statistics.median(loc):.2f} s, ratio "
            f"{statistics.median(ratios):.2f}x (median of {a.rounds}); "
            f"found={d.found} primitive={d.primitive} line={d.line} phase={d.phase}"
        )


if __name__ == "__main__":
    main()
