"""The device memory a guarded step needs when `skip_nonfinite` gets no `loss=`.

Handed the loss, `skip_nonfinite` skips a step whose loss alone is nonfinite
itself, and the guard selects no parameter back. Without it the guard still
undoes such a step, by a `lax.cond` that keeps the old parameters and
optimizer state beside the new ones on every step. This prints XLA's
temporary buffer bytes (`memory_analysis`) of the compiled guarded step, of
the same step handed the loss, and of the unguarded donated jit, for an MLP
trained with Adam (nothing runs).

Run: python -m benchmarks.guard_no_loss_memory [--width 1024]
"""

from __future__ import annotations

import argparse
import warnings

import jax
import jax.numpy as jnp
import optax

import jaxnan


def _mb(n: int) -> str:
    return f"{n / 2**20:.2f} MB"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--width", type=int, default=1024)
    width = parser.parse_args().width
    tx = jaxnan.skip_nonfinite(optax.adam(1e-3))
    params = {"w1": jnp.ones((width, width)), "w2": jnp.ones((width, 8))}
    opt_state = tx.init(params)
    batch = {"x": jnp.ones((8, width))}
    nbytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(params))
    print(f"parameters: {_mb(nbytes)} (Adam state: 2x that)")

    def loss_fn(p, b):
        return jnp.mean((jnp.tanh(b["x"] @ p["w1"]) @ p["w2"]) ** 2)

    for given in (True, False):

        def train_step(params, opt_state, batch, given=given):
            loss, grads = jax.value_and_grad(loss_fn)(params, batch)
            kw = {"loss": loss} if given else {}
            updates, opt_state = tx.update(grads, opt_state, params, **kw)
            return optax.apply_updates(params, updates), opt_state, loss

        jitted = jax.jit(train_step, donate_argnums=(0, 1))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the no-loss= warning
            guarded = jaxnan.guard(jitted, verbose=False)
            compiled = guarded.lower(params, opt_state, batch).compile()
        plain = jitted.lower(params, opt_state, batch).compile()
        g = compiled.memory_analysis().temp_size_in_bytes
        p = plain.memory_analysis().temp_size_in_bytes
        name = "loss= handed" if given else "no loss=    "
        print(f"{name}: guarded temp {_mb(g)}, unguarded {_mb(p)}, +{_mb(g - p)}")


if __name__ == "__main__":
    main()
