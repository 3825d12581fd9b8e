"""Per-leaf weight and gradient statistics (the single implementation).

`jaxnan.monitor` records the same norm, max-abs and nonfinite count by
calling `norms_maxabs_nonfinite` here.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import source_info_util

from jaxnan._src.core import scaling, tree, validation

source_info_util.register_exclusion(__file__)


def norms_maxabs_nonfinite(leaves: list[jax.Array]) -> tuple[list, list, list]:
    """Per-leaf (L2 norm, max-abs, nonfinite count), NaN-honest, no host sync.

    Two fused reductions per leaf (sum of squares, max-abs); the counts run
    only when the total sum of squares is not finite, inside a scalar
    `lax.cond`. A leaf holding a NaN reports a NaN max-abs (decided by the
    NaN count: the CPU `jnp.max` can drop NaN).
    """
    sqs = [tree.sum_of_squares(x) for x in leaves]
    maxabs = [
        jnp.max(jnp.abs(x)).astype(jnp.float32) if x.size else jnp.float32(0)
        for x in leaves
    ]
    total = sum(sqs) if sqs else jnp.float32(0)

    def none_bad():
        z = jnp.zeros((), jnp.int32)
        return [z for _ in leaves], [z for _ in leaves]

    def count_bad():
        counts = tree.counts_list(leaves, pack=True)
        return [c.nan for c in counts], [c.nan + c.posinf + c.neginf for c in counts]

    nans, bads = lax.cond(jnp.isfinite(total), none_bad, count_bad)
    norms = [jnp.sqrt(s).astype(jnp.float32) for s in sqs]
    maxabs = [jnp.where(n > 0, jnp.nan, m) for n, m in zip(nans, maxabs)]
    return norms, maxabs, bads


def leaf_norm(x: jax.Array) -> jax.Array:
    """float32 L2 norm of one leaf (accumulated in at least float32)."""
    return jnp.sqrt(tree.sum_of_squares(x)).astype(jnp.float32)


def _zero_fraction(x: jax.Array) -> jax.Array:
    if not x.size:
        return jnp.float32(0)
    return (jnp.sum(x == 0, dtype=jnp.int32) / x.size).astype(jnp.float32)


class ParamStats(NamedTuple):
    """Per-leaf statistics of a parameter tree (`jaxnan.param_stats`).

    Every field has the structure of the tree, one scalar per float leaf.

    Attributes:
        norm: float32 L2 norm (NaN or Inf when the leaf holds one).
        max_abs: float32 largest absolute entry (NaN when the leaf holds NaN).
        zero_fraction: float32 fraction of entries exactly 0.
        nonfinite: int32 count of NaN, +Inf and -Inf entries.
    """

    norm: Any
    max_abs: Any
    zero_fraction: Any
    nonfinite: Any


class GradStats(NamedTuple):
    """Per-leaf gradient statistics and flags (`jaxnan.grad_stats`).

    Every field has the structure of the gradients, one scalar per leaf.

    Attributes:
        norm: float32 L2 norm of the gradient leaf.
        max_abs: float32 largest absolute entry (NaN when it holds NaN).
        zero_fraction: float32 fraction of entries exactly 0.
        nonfinite: int32 count of NaN, +Inf and -Inf entries.
        update_ratio: float32 ``|update| / |param|`` (NaN without `updates`
            and `params`; +Inf for a zero parameter with a nonzero update).
        vanishing: bool, the norm is below ``vanishing`` times the
            reference (see `grad_stats`).
        exploding: bool, the norm is above ``exploding`` times the
            reference, or nonfinite.
    """

    norm: Any
    max_abs: Any
    zero_fraction: Any
    nonfinite: Any
    update_ratio: Any
    vanishing: Any
    exploding: Any


def _float_leaves(x: Any, argname: str, fn_name: str):
    validation.validate_updates(x, argname=argname, fn_name=fn_name)
    leaves, treedef = jax.tree_util.tree_flatten(x)
    return [jnp.asarray(v) for v in leaves], treedef


def param_stats(params: scaling.ArrayTree) -> ParamStats:
    """Per-leaf norm, max-abs, fraction of zeros and nonfinite count.

    The same statistics `jaxnan.monitor` records (one implementation), plus
    the fraction of exact zeros (dead or pruned units). Inspect weights
    around the step where training went wrong. Works under `jit`.

    Cost: three fused reductions per leaf; the nonfinite counts run only
    when some leaf is nonfinite.

    Args:
        params: a pytree of float arrays.

    Returns:
        A `ParamStats` whose fields have the structure of `params`.

    Raises:
        ValueError: for None or an empty tree.
        TypeError: for non-float leaves.

    Examples:
        >>> import jax.numpy as jnp, jaxnan
        >>> s = jaxnan.param_stats({"w": jnp.array([3.0, -4.0, 0.0, 0.0])})
        >>> float(s.norm["w"]), float(s.max_abs["w"]), float(s.zero_fraction["w"])
        (5.0, 4.0, 0.5)

    .. versionadded:: 0.1.0
    """
    leaves, treedef = _float_leaves(params, "params", "jaxnan.param_stats")
    norms, maxabs, bads = norms_maxabs_nonfinite(leaves)
    zeros = [_zero_fraction(x) for x in leaves]

    def unflat(xs):
        return jax.tree_util.tree_unflatten(treedef, xs)

    return ParamStats(unflat(norms), unflat(maxabs), unflat(zeros), unflat(bads))


def grad_stats(
    grads: scaling.ArrayTree,
    params: scaling.ArrayTree | None = None,
    updates: scaling.ArrayTree | None = None,
    *,
    vanishing: float = 1e-6,
    exploding: float = 1e3,
) -> GradStats:
    """Per-leaf gradient statistics that flag vanishing and exploding leaves.

    The reference of a leaf is the norm of its parameter when `params` is
    given and that norm is positive, else the median gradient norm over the
    leaves. A leaf is *vanishing* when its gradient norm is below
    ``vanishing * reference`` and *exploding* when it is above
    ``exploding * reference`` or not finite. With `params` and `updates`
    (what the optimizer returned), `update_ratio` is the update norm over
    the parameter norm (about 1e-3 is healthy for Adam-like optimizers).

    Cost: three fused reductions per gradient leaf and one per param and
    update leaf. Works under `jit`.

    Args:
        grads: the gradient pytree.
        params: optional parameters of the same structure.
        updates: optional updates of the same structure (needs `params`).
        vanishing: relative threshold below which a leaf is vanishing.
        exploding: relative threshold above which a leaf is exploding.

    Returns:
        A `GradStats` whose fields have the structure of `grads`.

    Raises:
        ValueError: for an empty tree, trees of different structures or a
            `params`/`updates` leaf of another shape than its gradient
            (naming the leaf and both shapes), `updates` without `params`,
            or thresholds that are not positive.
        TypeError: for non-float leaves.

    Examples:
        >>> import jax.numpy as jnp, jaxnan
        >>> g = {"a": jnp.array([1e-9]), "b": jnp.array([1.0]), "c": jnp.array([2.0])}
        >>> s = jaxnan.grad_stats(g)
        >>> s.vanishing["a"], s.exploding["c"]
        (Array(True, dtype=bool), Array(False, dtype=bool))

    .. versionadded:: 0.1.0
    """
    name = "jaxnan.grad_stats"
    _check_grad_stats_args(name, params, updates, vanishing, exploding)
    leaves, treedef = _float_leaves(grads, "grads", name)
    norms, maxabs, bads = norms_maxabs_nonfinite(leaves)
    zeros = [_zero_fraction(x) for x in leaves]
    finite = jnp.stack([jnp.where(jnp.isfinite(n), n, jnp.nan) for n in norms])
    median = jnp.nanmedian(finite)
    refs = [median] * len(leaves)
    ratios = [jnp.float32(jnp.nan)] * len(leaves)
    if params is not None:
        p_norms = _norms_like(grads, params, "params", treedef, name)
        refs = [jnp.where(p > 0, p, median) for p in p_norms]
        if updates is not None:
            u_norms = _norms_like(grads, updates, "updates", treedef, name)
            ratios = [
                jnp.where(u == 0, 0.0, u / p).astype(jnp.float32)
                for u, p in zip(u_norms, p_norms)
            ]
    van = [n < vanishing * r for n, r in zip(norms, refs)]
    exp = [~jnp.isfinite(n) | (n > exploding * r) for n, r in zip(norms, refs)]

    def unflat(xs):
        return jax.tree_util.tree_unflatten(treedef, xs)

    return GradStats(
        unflat(norms),
        unflat(maxabs),
        unflat(zeros),
        unflat(bads),
        unflat(ratios),
        unflat(van),
        unflat(exp),
    )


def _check_grad_stats_args(
    name: str, params: Any, updates: Any, vanishing: float, exploding: float
) -> None:
    if not (vanishing > 0 and exploding > 0):
        raise ValueError(
            f"jaxnan: {name} got vanishing={vanishing!r}, exploding={exploding!r};"
            " pass positive relative thresholds (e.g. 1e-6 and 1e3)."
        )
    if updates is not None and params is None:
        raise ValueError(
            f"jaxnan: {name} got updates without params; pass both to get "
            "update_ratio = |update| / |param|."
        )


def _norms_like(
    grads: Any, other: Any, argname: str, treedef: Any, fn_name: str
) -> list[jax.Array]:
    """float32 leaf norms of `other`, of the structure and shapes of `grads`."""
    validation.validate_same_structure(
        grads, other, name_a="grads", name_b=argname, fn_name=fn_name
    )
    leaves = treedef.flatten_up_to(other)
    flat = jax.tree_util.tree_flatten_with_path(grads)[0]
    for (path, g), x in zip(flat, leaves):
        if np.shape(g) != np.shape(x):
            at = jax.tree_util.keystr(path)
            raise ValueError(
                f"jaxnan: {fn_name}: {argname}{at} has shape {np.shape(x)}, but "
                f"grads{at} has shape {np.shape(g)}. Pass the {argname} of the "
                "same model: one entry per gradient entry."
            )
    return [leaf_norm(jnp.asarray(x)) for x in leaves]
