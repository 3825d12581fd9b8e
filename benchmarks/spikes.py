"""Loss spikes at a high learning rate: no clipping, fixed clipping, ZClip,
skip-on-spike and AdaGC on a small transformer LM with synthetic data.

    python benchmarks/spikes.py            # ~4 minutes on 2 CPU cores
    python benchmarks/spikes.py --steps 200 --seeds 1   # quick look

Data: sequences from a random sparse Markov chain (each token has 4 likely
successors), so the loss has a known floor; from step 50 on, 2% of the
batches are broken (one token repeated, as from a corrupt shard). A broken
batch pushes Adam hard, and the loss on the *clean* batches that follow
spikes; this is how data-induced spikes look in large runs.
Model: a 2-layer pre-LN transformer (d=64, 4 heads), Adam at a learning rate
high enough to spike (no warm-up). Every variant is Adam with the same
hyperparameters and differs only by the transform in front of it.

Reported per variant (over seeds): final loss (mean over the clean batches of
the last 50 steps, NaN if the run died), spikes (events where the loss on a
clean batch rises more than `--spike-delta` nats above the median of the
previous 20 clean steps; the broken batches themselves are not counted), nonfinite
steps (loss or gradient NaN/Inf), skipped steps (skip_spikes only), and the
step-time ratio to plain Adam (warm, interleaved rounds, median of ratios).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

# run from a checkout: import this tree's jaxnan, not an installed one
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import jaxnan  # noqa: E402

V, T, D, H, L = 64, 32, 64, 4, 2


def init_params(key):
    ks = iter(jax.random.split(key, 4 + 6 * L))

    def w(shape, scale=0.02):
        return scale * jax.random.normal(next(ks), shape, jnp.float32)

    layers = [
        {
            "ln1": jnp.ones(D),
            "qkv": w((D, 3 * D)),
            "o": w((D, D)),
            "ln2": jnp.ones(D),
            "fc1": w((D, 4 * D)),
            "fc2": w((4 * D, D)),
        }
        for _ in range(L)
    ]
    return {
        "embed": w((V, D)),
        "pos": w((T, D)),
        "layers": layers,
        "ln_f": jnp.ones(D),
        "unembed": w((D, V)),
    }


def rms_norm(x, g):
    return g * x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6)


def forward(params, tokens):
    x = params["embed"][tokens] + params["pos"][: tokens.shape[1]]
    mask = jnp.tril(jnp.ones((T, T), bool))
    for lp in params["layers"]:
        h = rms_norm(x, lp["ln1"])
        q, k, v = jnp.split(h @ lp["qkv"], 3, -1)
        q, k, v = (a.reshape(*a.shape[:2], H, D // H) for a in (q, k, v))
        att = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(D // H)
        att = jax.nn.softmax(jnp.where(mask, att, -1e9), -1)
        o = jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(x.shape)
        x = x + o @ lp["o"]
        h = rms_norm(x, lp["ln2"])
        x = x + jax.nn.gelu(h @ lp["fc1"]) @ lp["fc2"]
    return rms_norm(x, params["ln_f"]) @ params["unembed"]


def make_chain(key, sharpness):
    """Transition logits: 4 likely successors per token."""
    k1, k2 = jax.random.split(key)
    succ = jax.random.randint(k1, (V, 4), 0, V)
    logits = jnp.full((V, V), -4.0)
    logits = logits.at[jnp.arange(V)[:, None], succ].set(
        sharpness * jax.random.uniform(k2, (V, 4))
    )
    return logits


def sample_batch(key, chain, batch):
    k0, key = jax.random.split(key)
    first = jax.random.randint(k0, (batch,), 0, V)

    def body(tok, k):
        nxt = jax.random.categorical(k, chain[tok])
        return nxt, nxt

    _, rest = jax.lax.scan(body, first, jax.random.split(key, T))
    return jnp.concatenate([first[:, None], rest.T], 1)  # (batch, T + 1)


def loss_fn(params, seq):
    logits = forward(params, seq[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, seq[:, 1:]).mean()


def variants(lr, b2):
    adam = optax.adam(lr, b2=b2)
    return {
        "none": adam,
        "clip_by_global_norm(1.0)": optax.chain(optax.clip_by_global_norm(1.0), adam),
        "clip_by_global_norm(5.0)": optax.chain(optax.clip_by_global_norm(5.0), adam),
        "zscore_clip": optax.chain(jaxnan.zscore_clip(), adam),
        "skip_spikes": jaxnan.skip_spikes(adam, window=64, threshold=6.0),
        "adagc": optax.chain(jaxnan.adagc(warmup=50), adam),
    }


def make_step(tx):
    @jax.jit
    def step(params, opt_state, seq, poison):
        # poison is 0.0 (x * 1.0 is exact) or NaN: a step whose loss and
        # gradients are NaN, as from an overflow in the forward pass
        loss, grads = jax.value_and_grad(lambda p: loss_fn(p, seq) * (1.0 + poison))(
            params
        )
        gnorm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, opt_state, params, loss=loss)
        return optax.apply_updates(params, updates), opt_state, loss, gnorm

    return step


def count_spikes(losses, delta, lookback=20):
    events, inside = 0, False
    for t in range(lookback, len(losses)):
        ref = np.nanmedian(losses[t - lookback : t])
        up = np.isfinite(losses[t]) and losses[t] > ref + delta
        if up and not inside:
            events += 1
        inside = up
    return events


def train(name, tx, seed, steps, batch, sharpness, bad_rate, nan_at=()):
    key = jax.random.PRNGKey(seed)
    kp, kc, kd = jax.random.split(key, 3)
    params = init_params(kp)
    chain = make_chain(kc, sharpness)
    opt_state = tx.init(params)
    step = make_step(tx)
    keys = jax.random.split(kd, steps)
    data = jax.jit(jax.vmap(lambda k: sample_batch(k, chain, batch)))(keys)
    # bad batches (one token repeated: a broken shard), from step 50 on
    rng = np.random.default_rng(1000 + seed)
    bad = (rng.random(steps) < bad_rate) & (np.arange(steps) >= 50)
    noise = jnp.broadcast_to(
        jax.random.randint(jax.random.PRNGKey(seed + 7), (steps, 1, 1), 0, V),
        data.shape,
    )
    data = jnp.where(jnp.asarray(bad)[:, None, None], noise, data)
    batches = list(data)  # one device array per step, sliced before the loop
    losses, norms = [], []
    zero, nan = jnp.float32(0.0), jnp.float32(jnp.nan)
    for t in range(steps):
        poison = nan if t in nan_at else zero
        params, opt_state, loss, gnorm = step(params, opt_state, batches[t], poison)
        losses.append(loss)
        norms.append(gnorm)
    losses = np.asarray(jnp.stack(losses))
    norms = np.asarray(jnp.stack(norms))
    skipped = 0
    if name == "skip_spikes":
        skipped = int(opt_state.spike_skips_total)
    run = (step, params, opt_state, batches[0], zero)
    return losses, norms, skipped, bad, run


def time_steps(runs, rounds, n):
    """Median per-round ratio of each variant's step time to 'none'."""
    times = {k: [] for k in runs}
    for _ in range(rounds):
        for name, (step, *args) in runs.items():
            out = step(*args)
            jax.block_until_ready(out)
            t0 = time.perf_counter()
            for _ in range(n):
                out = step(*args)
            jax.block_until_ready(out)
            times[name].append((time.perf_counter() - t0) / n)
    base = np.asarray(times["none"])
    return {k: float(np.median(np.asarray(v) / base)) for k, v in times.items()}, {
        k: float(np.median(v)) * 1e3 for k, v in times.items()
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--b2", type=float, default=0.999)
    ap.add_argument("--sharpness", type=float, default=8.0)
    ap.add_argument("--bad-rate", type=float, default=0.02)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--only", nargs="*", help="run only these variants")
    ap.add_argument(
        "--nan-at", type=int, nargs="*", default=[], help="steps with a NaN loss"
    )
    ap.add_argument("--spike-delta", type=float, default=0.25)
    ap.add_argument(
        "--png", default=os.path.join(os.path.dirname(__file__), "spikes.png")
    )
    args = ap.parse_args()

    txs = variants(args.lr, args.b2)
    if args.only:
        txs = {k: v for k, v in txs.items() if k in args.only or k == "none"}
    results = {k: [] for k in txs}
    curves = {}
    timing_runs = {}
    t_start = time.perf_counter()
    for seed in range(args.seeds):
        for name, tx in txs.items():
            losses, norms, skipped, bad, run = train(
                name,
                tx,
                seed,
                args.steps,
                args.batch,
                args.sharpness,
                args.bad_rate,
                set(args.nan_at),
            )
            clean = np.where(bad, np.nan, losses)  # spikes/final on clean batches
            last = clean[-50:][~bad[-50:]]
            final = float(np.mean(last)) if np.isfinite(last).all() else float("nan")
            nonfinite = int(np.sum(~np.isfinite(losses) | ~np.isfinite(norms)))
            med = float(np.nanmedian(np.where(bad, np.nan, norms)))
            results[name].append(
                (final, count_spikes(clean, args.spike_delta), nonfinite, skipped, med)
            )
            if seed == 0:
                curves[name] = clean
                timing_runs[name] = run
    ratios, ms = time_steps(timing_runs, rounds=10, n=20)
    total = time.perf_counter() - t_start

    print(
        f"\n{args.steps} steps, {args.seeds} seeds, Adam lr={args.lr}, batch "
        f"{args.batch}x{T}, NaN loss at steps {args.nan_at}, "
        f"{jax.devices()[0].platform}, "
        f"{total:.0f} s in all\n"
    )
    print(
        "| variant | final loss | spikes | nonfinite steps | skipped steps "
        "| median grad norm | step time (ms) | ratio to none |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, rows in results.items():
        r = np.asarray(rows, float)
        finals = r[:, 0]
        dead = int(np.sum(~np.isfinite(finals)))
        alive = finals[np.isfinite(finals)]
        final = f"{alive.mean():.3f}" if alive.size else "nan"
        if dead:
            final += f" ({dead}/{len(finals)} died)"
        print(
            f"| {name} | {final} | {r[:, 1].sum():.0f} | {r[:, 2].sum():.0f} "
            f"| {r[:, 3].sum():.0f} | {np.median(r[:, 4]):.2f} | {ms[name]:.2f} "
            f"| {ratios[name]:.2f} |"
        )

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install jaxnan[bench])")
        return
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for name, losses in curves.items():
        ax.plot(losses, label=name, lw=0.9)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats)")
    ax.set_yscale("log")
    ax.set_title(
        f"Adam lr={args.lr}, seed 0, clean batches (gaps: broken batches, NaN steps)"
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.png, dpi=110)
    print(f"\nsaved {args.png}")


if __name__ == "__main__":
    main()
