"""Step time of `skip_nonfinite`'s exact variant (``exact=True``) against the default.

The MLP of `benchmarks/models.py` (1.06M parameters, batch 128) and the small
decoder LM, each trained by a donated jitted step ``value_and_grad + update +
apply_updates``: unguarded, ``skip_nonfinite(inner)`` and
``skip_nonfinite(inner, exact=True)``, for ``optax.adamw(1e-3)`` and
``optax.contrib.momo_adam(1e-3)`` (one whose default guard XLA:CPU rounds 1 ulp
apart). Warm (compiled and run before timing), interleaved (the variants take
turns, round after round, so that a change of machine load hits all), the
median per step over the rounds. Also the compiled temporary memory of each
step, as a fraction of the parameter bytes.
Usage: ``python benchmarks/skip_exact.py [--rounds 7] [--steps 30]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import optax

import jaxnan
from benchmarks import models

INNER = {
    "adamw": lambda: optax.adamw(1e-3),
    "momo_adam": lambda: optax.contrib.momo_adam(1e-3),
}


def make_step(loss_fn, tx, value_arg: bool):
    def step(params, state, batch):
        loss, g = jax.value_and_grad(loss_fn)(params, batch)
        extra = {"value": loss} if value_arg else {}
        if isinstance(state, jaxnan.SkipNonfiniteState):
            extra["loss"] = loss
        u, state = tx.update(g, state, params, **extra)
        return optax.apply_updates(params, u), state, loss

    return jax.jit(step, donate_argnums=(0, 1))


def run(model: str, inner_name: str, rounds: int, steps: int) -> None:
    key = jax.random.PRNGKey(0)
    if model == "mlp":
        params, loss_fn, batch = (
            models.mlp_init(key),
            models.mlp_loss,
            models.mlp_batch(key),
        )
    else:
        params, loss_fn, batch = (
            models.lm_params(key),
            models.lm_loss,
            models.lm_batch(key),
        )
    nbytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(params))
    value_arg = inner_name.startswith("momo")
    variants = {
        "plain": INNER[inner_name](),
        "skip": jaxnan.skip_nonfinite(INNER[inner_name]()),
        "skip exact": jaxnan.skip_nonfinite(INNER[inner_name](), exact=True),
    }
    live = {}
    for name, tx in variants.items():
        step = make_step(loss_fn, tx, value_arg)
        p = jax.tree_util.tree_map(jnp.copy, params)
        s = tx.init(p)
        mem = step.lower(p, s, batch).compile().memory_analysis()
        p, s, _ = step(p, s, batch)  # warm
        jax.block_until_ready(p)
        live[name] = [step, p, s, mem.temp_size_in_bytes / nbytes]
    times = {name: [] for name in variants}
    for _ in range(rounds):
        for name in variants:
            step, p, s, _ = live[name]
            t0 = time.perf_counter()
            for _ in range(steps):
                p, s, loss = step(p, s, batch)
            jax.block_until_ready((p, s))
            times[name].append((time.perf_counter() - t0) / steps)
            live[name][1:3] = [p, s]
    base = statistics.median(times["plain"])
    for name in variants:
        med = statistics.median(times[name])
        ratios = [t / b for t, b in zip(times[name], times["plain"])]
        print(
            f"| {model} | {inner_name} | {name} | {med * 1e3:.3f} ms | "
            f"{med / base:.3f}x | {min(ratios):.2f}-{max(ratios):.2f} | "
            f"{live[name][3]:+.3f}x |",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--models", default="mlp,lm")
    args = parser.parse_args()
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}")
    print("| model | inner | variant | step (median) | / plain | per round | temp |")
    print("|---|---|---|---|---|---|---|")
    for model in args.models.split(","):
        for inner_name in INNER:
            run(model, inner_name, args.rounds, args.steps)


if __name__ == "__main__":
    main()
