"""Why a select changes the last bit: XLA:CPU's FMA contraction is per kernel.

Without jaxnan. ``optax.rmsprop(centered=True, momentum=0.9)`` on one 8x4 leaf,
jitted on its own, and the same update with every new state leaf and the
update passed through ``jnp.where(ok, new, old)`` (``ok`` a traced True, so
the values are the same). XLA fuses both into the same kernels, each with a
select at its root in the second program; XLA:CPU compiles kernels with
LLVM's ``AllowFPOpFusion=Fast``, and whether LLVM contracts ``x - a * b``
into one fused multiply-add depends on the kernel's whole instruction mix
(its vectorization, the uses of each product). With
``XLA_FLAGS=--xla_dump_to=DIR`` the object files show it: the plain
kernel has 4 ``vsubps`` where the selected one has 4 ``vfnmadd213ps``.
``lax.optimization_barrier`` does not help: XLA:CPU expands barriers before
fusion. A `lax.cond` branch is compiled as a computation of its own, which
is what ``jaxnan.skip_nonfinite(exact=True)`` uses.
Usage: ``python benchmarks/studies/select_contraction.py``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

STEPS = 200


def main():
    opt = optax.rmsprop(1e-2, centered=True, momentum=0.9)

    def plain(g, s):
        return opt.update(g, s)

    def selected(g, s, ok):
        u, new = opt.update(g, s)
        keep = jax.tree_util.tree_map(lambda n, o: jnp.where(ok, n, o), new, s)
        return jnp.where(ok, u, -0.0), keep

    f, h = jax.jit(plain), jax.jit(selected)
    rng = np.random.default_rng(0)
    s = opt.init(jnp.zeros((8, 4)))
    differ = 0
    for _ in range(STEPS):
        g = jnp.asarray(rng.normal(size=(8, 4)), jnp.float32)
        (u, s_new), (v, _) = f(g, s), h(g, s, True)
        differ += int((np.asarray(u) != np.asarray(v)).sum())
        s = s_new
    print(f"device: {jax.devices()[0].device_kind}")
    print(f"update entries that differ: {differ} of {STEPS * 32}")


if __name__ == "__main__":
    main()
