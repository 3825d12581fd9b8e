"""The floor of bit-exactness: XLA's fusion decides the rounding (plain JAX).

Without jaxnan. Adam's first moment, ``0.1 * g + 0.9 * mu``, with `g` the sum
of a batch axis (as a bias gradient is), is computed twice in one jitted
program, once returned alone and once next to ``jnp.isfinite(g).all()`` (what
any check of the gradients adds). On CPU, XLA compiles ``a*b + c*d`` with a
fused multiply-add on one of the two products, and which one depends on the
fusion: alone, the reduction is fused into the update (its sum is also
ordered differently); with the check, it is written out first.
Usage: ``python benchmarks/studies/fusion_rounding.py``.
"""

import jax
import jax.numpy as jnp
import numpy as np

N = 100_000


def moment(x, mu):
    g = x.sum(0).reshape(N, 1, 1)
    return 0.1 * g + 0.9 * mu


def moment_and_check(x, mu):
    g = x.sum(0).reshape(N, 1, 1)
    return 0.1 * g + 0.9 * mu, jnp.isfinite(g).all()


def main():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(4, N)), jnp.float32)
    mu = jnp.asarray(rng.normal(size=(N, 1, 1)), jnp.float32)
    a = np.asarray(jax.jit(moment)(x, mu))
    b = np.asarray(jax.jit(moment_and_check)(x, mu)[0])
    g = np.asarray(x).sum(0, dtype=np.float32).reshape(N, 1, 1)
    mu = np.asarray(mu)
    f64 = np.float64
    fma_g = (g.astype(f64) * f64(np.float32(0.1)) + mu * np.float32(0.9)).astype(
        np.float32
    )
    fma_mu = (mu.astype(f64) * f64(np.float32(0.9)) + g * np.float32(0.1)).astype(
        np.float32
    )
    print(f"device: {jax.devices()[0].device_kind}")
    ulps = np.abs(a.view(np.int32).astype(np.int64) - b.view(np.int32)).max()
    print(f"entries that differ: {(a != b).sum()} of {N}, at most {ulps} ulp")
    for name, r in (("alone", a), ("with the check", b)):
        print(
            f"{name}: equals fma(g, 0.1, 0.9*mu) {np.mean(r == fma_g):.3f}, "
            f"fma(mu, 0.9, 0.1*g) {np.mean(r == fma_mu):.3f}"
        )


if __name__ == "__main__":
    main()
