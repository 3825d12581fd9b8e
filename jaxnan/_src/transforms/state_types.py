"""The dtypes a guard's inner state keeps: those the inner update gives it.

Some optimizers change a state leaf's dtype at their first update: optax's
``contrib.dog``, ``dowg`` and ``prodigy`` turn a bfloat16 scalar into a
float32 one in a tree of mixed dtypes, ``momo`` and ``dadapt_adamw`` a real
scalar into a complex one when a parameter is complex, and
``inject_hyperparams`` its real hyperparameters into complex ones. A guard
keeps each state leaf in one dtype, so that its state is a fixed-type
carry (a `lax.scan` over steps, `jaxnan.guard`'s donated program). Kept in
the dtype `init` gave it, such a leaf would be rounded after every step
where optax keeps the wider value, and the next steps would drift.

`settled` widens `init`'s state once, to the dtypes the inner update gives
its leaves (found with `jax.eval_shape`, repeated until they no longer
change): a widening (bfloat16 to float32, real to complex) is exact, so the
state holds the values `init` gave it, and every step after it is a step of
the inner optimizer on its own state, with no rounding by the guard.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.extend import source_info_util

from jaxnan._src.core import dtypes

source_info_util.register_exclusion(__file__)

# Rounds of `jax.eval_shape`: prodigy and dadapt_adamw need two (a float32
# scalar made complex by a leaf the first round made complex).
_ROUNDS = 4


def widened(state: optax.OptState, like: Any) -> optax.OptState:
    """`state` with each leaf cast to the dtype of `like`'s where that is exact.

    A leaf is cast when both dtypes are floating or complex, the shapes
    agree, and `like`'s dtype holds every value of the leaf's
    (``jnp.promote_types(old, new) == new``: bfloat16 to float32, float32 to
    complex64). Every other leaf (a narrowing, an integer, another shape) is
    left as it is; so is the whole state when `like` has another structure.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> s = {"d": jnp.ones((), jnp.bfloat16), "n": jnp.zeros((), jnp.int32)}
        >>> like = {"d": jax.ShapeDtypeStruct((), jnp.float32),
        ...         "n": jax.ShapeDtypeStruct((), jnp.float32)}
        >>> out = widened(s, like)
        >>> out["d"].dtype, out["n"].dtype
        (dtype('float32'), dtype('int32'))
    """
    leaves, treedef = jax.tree_util.tree_flatten(state)
    targets, target_def = jax.tree_util.tree_flatten(like)
    if target_def != treedef:
        return state
    return treedef.unflatten(
        _widened_leaf(x, t) for x, t in zip(leaves, targets, strict=True)
    )


def _widened_leaf(x: Any, target: Any) -> Any:
    old, new = dtypes.leaf_dtype(x), dtypes.leaf_dtype(target)
    if (
        old is None
        or new is None
        or old == new
        or not (dtypes.is_inexact_dtype(old) and dtypes.is_inexact_dtype(new))
        or jnp.shape(x) != jnp.shape(target)
        or jnp.promote_types(old, new) != new
    ):
        return x
    return jnp.asarray(x).astype(new)


def settled(
    inner: optax.GradientTransformationExtraArgs,
    params: optax.Params,
    state: optax.OptState,
) -> optax.OptState:
    """`init`'s `state` in the dtypes `inner`'s update gives it (`widened`).

    The update is traced abstractly (`jax.eval_shape`: nothing runs) on
    gradients shaped like `params`, with no extra argument, or with
    ``value=`` a scalar loss of the default float dtype when it needs one
    (optax's ``contrib.momo``). When it cannot be traced so (another extra
    argument, a mapped axis, gradients of another structure than the
    params), the state is returned as it is:
    the update then rounds each new leaf to the dtype `init` gave it, as
    before, and its first call reports any real error itself.

    Examples:
        >>> import jax.numpy as jnp, optax
        >>> tx = optax.with_extra_args_support(optax.contrib.dog())
        >>> params = {"a": jnp.ones(2), "b": jnp.ones(2, jnp.bfloat16)}
        >>> state = tx.init(params)
        >>> dist = lambda s: optax.tree.get(s, "max_dist").dtype
        >>> dist(state), dist(settled(tx, params, state))
        (dtype(bfloat16), dtype('float32'))
    """
    grads = jax.tree_util.tree_map(
        lambda p: jax.ShapeDtypeStruct(jnp.shape(p), dtypes.leaf_dtype(p)), params
    )
    loss = jax.ShapeDtypeStruct((), jnp.result_type(float))
    for extra in ({}, {"value": loss}):  # the first form the update traces with
        out = _traced(inner, grads, state, params, extra)
        if out is not None:
            break
    for _ in range(_ROUNDS):
        if out is None:
            return state
        new = widened(state, out)
        if _dtypes_of(new) == _dtypes_of(state):
            return new
        state = new
        out = _traced(inner, grads, state, params, extra)
    return state


def _traced(
    inner: Any, grads: Any, state: Any, params: Any, extra: dict[str, Any]
) -> Any:
    """The state avals of ``inner.update(grads, state, params, **extra)``.

    None when it does not trace: a probe, the real call reports any error.
    """

    def update(grads: Any, state: Any, params: Any, extra: dict) -> Any:
        return inner.update(grads, state, params, **extra)

    try:
        return jax.eval_shape(update, grads, state, params, extra)[1]
    except Exception:  # noqa: BLE001 -- a probe: the real call reports it
        return None


def _dtypes_of(tree: Any) -> list[Any]:
    return [dtypes.leaf_dtype(x) for x in jax.tree_util.tree_leaves(tree)]
