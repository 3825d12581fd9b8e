"""Primitives that never return on nonfinite input, and how guards avoid them.

A guard (`guarded_update`) evaluates the inner optimizer's equations on every
step, the ones it skips included, and selects the result. An optimizer whose
update iterates on its gradients until they converge can then hang on a step
that is skipped anyway: ``optax.contrib.galore`` takes the SVD of each 2-D
gradient, and LAPACK's gesdd (what `jnp.linalg.svd` calls on the CPU) never
returns on some matrices mixing +-Inf with finite entries (Reference-LAPACK
lapack#1409, numpy/numpy#32591). When the inner update's jaxpr holds such a
primitive, the guard hands the inner optimizer `finite_or_zero` gradients:
on a healthy step they are the gradients bit for bit; on a skipped step,
whose result is dropped, the optimizer sees finite input and returns.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.extend import source_info_util

from jaxnan._src.core import dtypes, primitives

source_info_util.register_exclusion(__file__)

# name -> what was seen, on the CPU (jax 0.10.2, float32 and float64, each
# entry of a 3x4 / 4x4 normal matrix set to +Inf, -Inf and NaN in turn, 6 s
# per call): `svd` (gesdd, computing U and V) never returned on +Inf in the
# first entry. `eig`, `eigh`, `qr`, `lu`, `cholesky`, `schur` and `svd` with
# ``compute_uv=False`` returned on all of them, and are not listed. Every
# optimizer and wrapper of optax and optax.contrib was run unguarded on NaN
# and +-Inf gradient entries (`benchmarks/studies/hang_survey.py`): only
# galore and scale_by_galore (this SVD) hung; the updates that loop (lbfgs's
# line search, muon's Newton-Schulz iterations) returned.
HANGS_ON_NONFINITE: dict[str, str] = {
    "svd": "LAPACK gesdd does not return (Reference-LAPACK lapack#1409)",
}


def hangs_on_nonfinite(jaxpr: Any) -> tuple[str, ...]:
    """The primitives of `jaxpr` (nested bodies included) in `HANGS_ON_NONFINITE`.

    Args:
        jaxpr: an open `jax.extend.core.Jaxpr`.

    Returns:
        Their names, sorted, each once; empty when there is none.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from jaxnan._src.transforms import hazards
        >>> hazards.hangs_on_nonfinite(
        ...     jax.make_jaxpr(lambda x: jnp.linalg.svd(x)[1])(jnp.eye(2)).jaxpr)
        ('svd',)
        >>> hazards.hangs_on_nonfinite(jax.make_jaxpr(jnp.sin)(1.0).jaxpr)
        ()
    """
    found: set[str] = set()
    todo = [jaxpr]
    while todo:
        for eqn in todo.pop().eqns:
            if eqn.primitive.name in HANGS_ON_NONFINITE:
                found.add(eqn.primitive.name)
            todo += [sub.jaxpr for sub in primitives.sub_jaxprs(eqn, strict=False)]
    return tuple(sorted(found))


def finite_or_zero(tree: Any) -> Any:
    """`tree` with each nonfinite entry of its floating leaves set to 0.

    Finite entries are kept bit for bit (``-0.0`` included); a complex entry
    with a nonfinite part becomes 0. Other leaves pass through.

    Examples:
        >>> import jax.numpy as jnp
        >>> from jaxnan._src.transforms import hazards
        >>> hazards.finite_or_zero({"g": jnp.array([1.0, jnp.inf, jnp.nan])})["g"]
        Array([1., 0., 0.], dtype=float32)
    """

    def leaf(x):
        if not dtypes.is_checked_leaf(x):
            return x
        x = jnp.asarray(x)
        return jnp.where(jnp.isfinite(x), x, jnp.zeros_like(x))

    return jax.tree_util.tree_map(leaf, tree)
