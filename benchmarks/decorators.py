"""Step and compile time of `jaxnan.checked` against the plain loss.

Run from the repository root:

    python benchmarks/decorators.py [--rounds 30] [--steps 10]

For an MLP (~1M parameters) and a small transformer LM, it times a jitted
training step (``jax.value_and_grad(loss)`` and an SGD update, each step
taking the previous params) with the plain loss and with
``jaxnan.checked(loss)`` (inputs, outputs and gradients checked), interleaved
in one process, warm: each round times `steps` calls of each (the order
alternates between rounds) and the figure is the median of the per-round
ratios. Compile time is the median ratio of `lower(...).compile()` times of
fresh functions.

It also compares bits: the value and gradients of ``jax.value_and_grad`` (what
`checked` promises to keep exactly), and the SGD step's new parameters. The
latter can differ in the last bit even between two plain steps: XLA fuses the
update into the gradient's last kernels and may accumulate in another order
depending on what else the program outputs, so the fused step is compared
to the plain step that also returns its gradients (the same fusion
boundaries as a checked step).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxnan

# --------------------------------------------------------------------------
# Models.


def mlp_init(key, sizes=(256, 1024, 512, 256, 10)):
    params = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        k = jax.random.fold_in(key, i)
        params.append(
            {"w": jax.random.normal(k, (a, b)) / np.sqrt(a), "b": jnp.zeros(b)}
        )
    return params


def mlp_loss(params, batch):
    h = batch["x"]
    for layer in params[:-1]:
        h = jax.nn.relu(h @ layer["w"] + layer["b"])
    logits = h @ params[-1]["w"] + params[-1]["b"]
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, batch["y"][:, None], axis=1))


def mlp_setup(key):
    params = mlp_init(key)
    kx, ky = jax.random.split(jax.random.fold_in(key, 99))
    batch = {
        "x": jax.random.normal(kx, (128, 256)),
        "y": jax.random.randint(ky, (128,), 0, 10),
    }
    return params, batch


def tf_init(key, vocab=256, d=128, layers=2, ff=512, seq=64):
    ks = iter(jax.random.split(key, 4 + 6 * layers))

    def dense(a, b):
        return jax.random.normal(next(ks), (a, b)) / np.sqrt(a)

    params = {
        "embed": jax.random.normal(next(ks), (vocab, d)) * 0.02,
        "pos": jax.random.normal(next(ks), (seq, d)) * 0.02,
        "layers": [],
        "out": dense(d, vocab),
    }
    for _ in range(layers):
        params["layers"].append(
            {
                "qkv": dense(d, 3 * d),
                "proj": dense(d, d),
                "ff1": dense(d, ff),
                "ff2": dense(ff, d),
                "ln1": jnp.ones(d),
                "ln2": jnp.ones(d),
            }
        )
    return params


def _ln(x, g):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) * jax.lax.rsqrt(var + 1e-5) * g


def tf_loss(params, batch, heads=4):
    tokens = batch["tokens"]
    b, t = tokens.shape
    x = params["embed"][tokens] + params["pos"][:t]
    d = x.shape[-1]
    mask = jnp.tril(jnp.ones((t, t), bool))
    for layer in params["layers"]:
        h = _ln(x, layer["ln1"])
        q, k, v = jnp.split(h @ layer["qkv"], 3, axis=-1)
        q, k, v = (a.reshape(b, t, heads, d // heads) for a in (q, k, v))
        att = jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(d // heads)
        att = jax.nn.softmax(jnp.where(mask, att, -1e9), axis=-1)
        y = jnp.einsum("bhts,bshd->bthd", att, v).reshape(b, t, d)
        x = x + y @ layer["proj"]
        x = x + jax.nn.gelu(_ln(x, layer["ln2"]) @ layer["ff1"]) @ layer["ff2"]
    logits = x @ params["out"]
    logp = jax.nn.log_softmax(logits[:, :-1])
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))


def tf_setup(key):
    params = tf_init(key)
    tokens = jax.random.randint(jax.random.fold_in(key, 7), (8, 64), 0, 256)
    return params, {"tokens": tokens}


def n_params(tree):
    return sum(x.size for x in jax.tree_util.tree_leaves(tree))


# --------------------------------------------------------------------------
# Timing.


def sgd_step(loss, return_grads=False):
    """One training step: value_and_grad of `loss` and an SGD update."""

    def step(params, batch):
        value, grads = jax.value_and_grad(loss)(params, batch)
        new = jax.tree_util.tree_map(lambda p, g: p - 1e-3 * g, params, grads)
        return (new, value, grads) if return_grads else (new, value)

    return jax.jit(step)


def same_bits(a, b):
    return all(
        bool((x == y).all())
        for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))
    )


def time_steps(fn, args, steps):
    # Each step consumes the previous params, as in a training loop (steps
    # that do not depend on each other could overlap on a multi-core CPU).
    params, batch = args
    t0 = time.perf_counter()
    for _ in range(steps):
        params, _ = fn(params, batch)
    jax.block_until_ready(params)
    return (time.perf_counter() - t0) / steps


def bench(name, loss, setup, rounds, steps, compile_reps):
    params, batch = jax.device_put(setup(jax.random.PRNGKey(0)))
    plain = sgd_step(loss)
    checked = sgd_step(jaxnan.checked(loss))
    vg = jax.jit(jax.value_and_grad(loss))(params, batch)
    vg_checked = jax.jit(jax.value_and_grad(jaxnan.checked(loss)))(params, batch)
    with_grads = sgd_step(loss, return_grads=True)(params, batch)
    bits = {
        "value_and_grad": same_bits(vg, vg_checked),
        "step": same_bits(with_grads[:2], checked(params, batch)),
        "plain step vs itself returning grads": same_bits(
            with_grads[:2], plain(params, batch)
        ),
    }
    for _ in range(3):  # warm
        time_steps(plain, (params, batch), steps)
        time_steps(checked, (params, batch), steps)
    ratios, tp, tc = [], [], []
    for r in range(rounds):
        if r % 2:
            c = time_steps(checked, (params, batch), steps)
            p = time_steps(plain, (params, batch), steps)
        else:
            p = time_steps(plain, (params, batch), steps)
            c = time_steps(checked, (params, batch), steps)
        ratios.append(c / p)
        tp.append(p)
        tc.append(c)
    cratios, cp, cc = [], [], []
    for r in range(compile_reps):
        # Fresh function objects, so that nothing is cached.
        fp = sgd_step(lambda p, b: loss(p, b))
        fc = sgd_step(jaxnan.checked(lambda p, b: loss(p, b)))
        order = [(fp, cp), (fc, cc)] if r % 2 == 0 else [(fc, cc), (fp, cp)]
        for f, acc in order:
            t0 = time.perf_counter()
            f.lower(params, batch).compile()
            acc.append(time.perf_counter() - t0)
        cratios.append(cc[-1] / cp[-1])
    return {
        "model": name,
        "params": n_params(params),
        "plain_ms": 1e3 * statistics.median(tp),
        "checked_ms": 1e3 * statistics.median(tc),
        "step_ratio": statistics.median(ratios),
        "step_ratio_q": (
            float(np.quantile(ratios, 0.25)),
            float(np.quantile(ratios, 0.75)),
        ),
        "compile_plain_s": statistics.median(cp),
        "compile_checked_s": statistics.median(cc),
        "compile_ratio": statistics.median(cratios),
        "bits": bits,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--compile-reps", type=int, default=5)
    args = parser.parse_args()
    print(
        f"jax {jax.__version__}, {jax.devices()[0].device_kind}, rounds={args.rounds}"
    )
    for name, loss, setup in (
        ("MLP", mlp_loss, mlp_setup),
        ("transformer LM", tf_loss, tf_setup),
    ):
        r = bench(name, loss, setup, args.rounds, args.steps, args.compile_reps)
        print(
            f"{r['model']:15s} {r['params']:>9,d} params | step plain "
            f"{r['plain_ms']:.2f} ms, checked {r['checked_ms']:.2f} ms, "
            f"ratio {r['step_ratio']:.3f} (IQR {r['step_ratio_q'][0]:.3f}-"
            f"{r['step_ratio_q'][1]:.3f}) | compile {r['compile_plain_s']:.2f} s vs "
            f"{r['compile_checked_s']:.2f} s, ratio {r['compile_ratio']:.2f}"
        )
        print(
            "  same bits: "
            + ", ".join(f"{k}: {'yes' if v else 'no'}" for k, v in r["bits"].items())
        )


if __name__ == "__main__":
    main()
