"""NaN-safe global-norm clipping: `clip_by_global_norm`, and the norm it shares.

A nonfinite entry is left as it is (it poisons no other entry), the norm is
taken over the finite entries, overflow-safe, and `skip_nonfinite` can hand
the norm it has already computed to a clip that follows it (`KnownNorm`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.extend import source_info_util

from jaxnan._src.core import dtypes, scaling, tree, validation

source_info_util.register_exclusion(__file__)


def as_arrays(updates: optax.Updates) -> optax.Updates:
    """`updates` with Python-number leaves turned into arrays (None kept)."""
    return jax.tree_util.tree_map(
        lambda x: jnp.asarray(x) if isinstance(x, (int, float, complex)) else x,
        updates,
    )


class KnownNorm(NamedTuple):
    """The global norm of one updates tree, computed by a guard, for a clip.

    `skip_nonfinite` and `skip_spikes` pass it as the extra argument
    ``known_norm=`` when their inner transformation begins with
    `jaxnan.clip_by_global_norm`, which then uses it instead of reading the
    updates again, but only when it receives that very updates tree
    (``known.updates is updates``): a clip further down a chain gets other
    updates and computes its own norm. The tree is held, not its `id()`, so
    a freed object can never be mistaken for it.

    Attributes:
        updates: the updates tree the norm was computed on.
        norm: their global norm over the finite entries (`tree.acc_dtype`).
        finite: bool scalar, whether every entry was finite.
    """

    updates: Any
    norm: jax.Array
    finite: jax.Array


class ClipByGlobalNormState(NamedTuple):
    """State of `jaxnan.clip_by_global_norm`.

    Attributes:
        global_norm: float32 scalar (float64 for float64 params), the L2 norm
            of the finite entries of the last updates, before clipping (for
            logging).
        clip_input_finite: bool scalar, whether every entry of the last
            updates was finite. `skip_nonfinite` reads it to avoid a second
            pass over the gradients.
    """

    global_norm: jax.Array
    clip_input_finite: jax.Array


def clip_by_global_norm(
    max_norm: jax.typing.ArrayLike,
) -> optax.GradientTransformationExtraArgs:
    r"""Clips updates by their global norm; a nonfinite entry poisons nothing else.

    On finite float32 and float64 updates this is bit for bit
    `optax.clip_by_global_norm`: when the
    global norm :math:`\|g\|` is at least `max_norm`, every leaf becomes
    :math:`(g / \|g\|) \cdot \text{max\_norm}`. With optax a single NaN or Inf
    makes the norm NaN/Inf and turns every entry of every leaf into NaN (or
    0). Here the norm is taken over the finite entries only, so:

    * finite entries, in every leaf including the one with the bad entry, are
      clipped exactly as if the nonfinite entries were absent;
    * nonfinite entries pass through unchanged (NaN stays NaN, +-Inf stays
      +-Inf), so that a later `skip_nonfinite` or `zero_nonfinite` still sees
      them. Chain `zero_nonfinite()` after it to zero them instead.

    What counts as nonfinite: NaN, +Inf and -Inf (`jnp.isfinite`). The squares
    are summed in float32 (float64 for float64 updates), so float16 gradients
    with a norm above 256 do not overflow as they do in optax, and the
    scaling of a float16 or bfloat16 leaf is done in float32 (a norm above
    65504 does not become Inf). Finite updates whose squares overflow even
    float64 (``[1e200, 1]``) get their norm from the overflow-safe path,
    never NaN: scaled by the largest entry, within a few ulps of the exact
    norm (float32 updates beyond float32's squares: at most 3 ulps from the
    float64 clip in `tests/test_clip_promise.py`). A norm beyond the range
    itself (entries near float32's max) is recorded as +Inf in the state
    (so that a `jaxnan.skip_nonfinite` around the clip skips such a step),
    and the entries are still clipped to `max_norm`, scaled by a power of
    two first (optax scales them by ``max_norm / Inf``, to 0).

    This is not a guard by itself: it never changes a nonfinite entry. Wrap
    the chain in `jaxnan.skip_nonfinite` to keep them out of the params.

    Cost: one fused reduction per leaf (the sum of squares that any global
    norm clipping computes); its finiteness doubles as the nonfinite test. A
    second, overflow-safe pass over the finite entries runs only when that sum
    is not finite (a nonfinite entry, or finite entries whose squares
    overflow), inside a scalar `lax.cond`. Differentiable with `jax.grad`,
    `jax.jvp` and `jax.vmap`, as optax's clip is. No collectives: under sharded
    `jit` the norm is global by construction; inside `shard_map`/`pmap` each
    shard clips by its own norm.

    Args:
        max_norm: the largest global norm the updates may have; a positive,
            finite number (Python, NumPy or a 0-d array, as
            `optax.inject_hyperparams` passes).

    Returns:
        An `optax.GradientTransformationExtraArgs`; its state keeps the
        pre-clip norm of the finite entries and whether all were finite.

    Raises:
        ValueError: when `max_norm` is not positive and finite.
        TypeError: when `max_norm` is not a real scalar.

    Examples:
        >>> import jax.numpy as jnp, jaxnan
        >>> tx = jaxnan.clip_by_global_norm(1.0)
        >>> g = {"a": jnp.array([3.0, jnp.nan]), "b": jnp.array([4.0])}
        >>> state = tx.init(g)
        >>> u, state = tx.update(g, state)
        >>> u["a"], u["b"], float(state.global_norm)
        (Array([0.6, nan], dtype=float32), Array([0.8], dtype=float32), 5.0)

    References:
        Pascanu et al., `On the difficulty of training Recurrent Neural
        Networks <https://arxiv.org/abs/1211.5063>`_, 2012

    .. versionadded:: 0.1.0
    """
    name = "jaxnan.clip_by_global_norm"
    validation.check_number("clip_by_global_norm", "max_norm", max_norm, low=0)

    def init(params: optax.Params) -> ClipByGlobalNormState:
        validation.validate_updates(params, argname="params", fn_name=name)
        acc = tree.acc_dtype(tree.checked_leaves(params))
        return ClipByGlobalNormState(jnp.zeros((), acc), jnp.array(True))

    def update(updates, state, params=None, **extra_args):
        validation.validate_update_call(
            updates, state, ClipByGlobalNormState, params=params, fn_name=name
        )
        del params
        known = extra_args.get("known_norm")
        if isinstance(known, KnownNorm) and known.updates is updates:
            norm, finite = known.norm, known.finite  # a guard's, on these updates
        else:
            updates = as_arrays(updates)
            norm, finite = tree.norm_and_finite(tree.checked_leaves(updates))
        trigger = norm < max_norm
        huge = jnp.isposinf(norm)
        exponent, rest = scaling.split_norm(tree.checked_leaves(updates), norm, huge)

        def clip(t):
            if not dtypes.is_checked_leaf(t):
                return t
            t = jnp.asarray(t)
            acc = jnp.promote_types(t.dtype, norm.dtype)
            limit = jnp.asarray(max_norm, jnp.real(jnp.zeros((), acc)).dtype)
            # In the wider of the leaf's and the norm's dtypes: for float32
            # and float64 leaves exactly optax's expression; a float16 leaf is
            # scaled in float32 (its norm may exceed 65504).
            # The nonfinite entries pass through; the products read 0 there,
            # so that their derivative with respect to the norm is 0, not
            # NaN (0 * NaN).
            fine = jnp.isfinite(t)
            wide = jnp.where(fine, t, jnp.zeros_like(t)).astype(acc)
            scaled = (wide / norm.astype(acc)) * limit.astype(acc)
            rescued = (scaling.rescale(wide, exponent) / rest.astype(acc)) * limit
            scaled = jnp.where(huge, rescued.astype(acc), scaled).astype(t.dtype)
            return lax.select(trigger | ~fine, t, scaled)

        new = jax.tree_util.tree_map(clip, updates)
        return new, ClipByGlobalNormState(norm.astype(state.global_norm.dtype), finite)

    return optax.GradientTransformationExtraArgs(init, update)


# --------------------------------------------------------------------------
# skip_nonfinite
