"""Why the data-parallel guarded step costs more per device than one device.

Usage: python benchmarks/studies/transposed_check.py [--rounds 40]

Under data parallelism a kernel's gradient leaves the gradient all-reduce in
the layout of the dot that made it, the transpose of the kernel's (in the
8-device MLP step, `f32[512,1024]` for the `(1024, 512)` kernel), so every
loop that pairs it with the row-major moments reads it through a transpose.
On one device XLA folds that transpose into the dot. This times the
outgoing check of one adamw leaf (the moments' and the new parameter's
finiteness, the arithmetic recomputed inside the reduction, as
`skip_nonfinite` does) on a `(1024, 512)` leaf, the gradient given
row-major and given as its transpose, one device, warm, medians.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxnan._src.core import tree


def adamw_check(g, mu, nu, p):
    """The finiteness of what one adamw step makes of `g` (one reduction)."""
    mu2 = 0.9 * mu + 0.1 * g
    nu2 = 0.999 * nu + 0.001 * g * g
    u = -1e-3 * ((mu2 / 0.1) / (jnp.sqrt(nu2 / 0.001) + 1e-8) + 1e-4 * p)
    return tree.finite_flags([[g], [p + u, mu2, nu2]])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=40)
    args = ap.parse_args(argv)
    jax.config.update("jax_platforms", "cpu")
    rng = np.random.default_rng(0)
    mu, nu, p, g = (
        jnp.asarray(rng.random((1024, 512), dtype=np.float32)) for _ in range(4)
    )
    g_t = jnp.asarray(np.ascontiguousarray(np.asarray(g).T))
    cases = {
        "gradient row-major (one device)": (jax.jit(adamw_check), g),
        "gradient read through a transpose (DP)": (
            jax.jit(lambda gt, mu, nu, p: adamw_check(gt.T, mu, nu, p)),
            g_t,
        ),
    }
    for name, (fn, grad) in cases.items():
        compiled = fn.lower(grad, mu, nu, p).compile()
        for _ in range(3):
            jax.block_until_ready(compiled(grad, mu, nu, p))
        times = []
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(grad, mu, nu, p))
            times.append(time.perf_counter() - t0)
        print(f"{name:40s} {statistics.median(times) * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
