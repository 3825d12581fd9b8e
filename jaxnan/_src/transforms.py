"""NaN-safe optax gradient transformations: zero, skip and clip.

All decisions are taken inside the compiled graph, with no host sync: zeroing
and clipping by `where`-selects (never a multiply by a 0/1 mask, since
0 * NaN = NaN), skipping by one `lax.cond` around the inner optimizer (see
`guarded_update` for why a conditional and not selects on the state).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.extend import source_info_util

from jaxnan._src import base, tree

source_info_util.register_exclusion(__file__)


# Trace-time tap through which `jaxnan.guard` talks to the `skip_nonfinite`
# updates traced inside its step (None outside a guard). Unset,
# `skip_nonfinite` compiles exactly as before.
class UpdateTap(NamedTuple):
    """What `jaxnan.guard` hands to, and collects from, `skip_nonfinite`.

    Attributes:
        hold: traced bool scalar: when true, skip the update without
            counting it as nonfinite (the guard holds this step).
        records: ``(norm, params, updates)`` appended by each update: the
            global norm of the incoming updates, its `params` argument (None
            if absent) and the updates it returns.
    """

    hold: Any
    records: list


_UPDATE_TAP: contextvars.ContextVar[UpdateTap | None] = contextvars.ContextVar(
    "jaxnan_update_tap", default=None
)


@contextlib.contextmanager
def collect_updates(hold: Any) -> Iterator[list]:
    """Inside the block, `skip_nonfinite` updates report to the guard.

    Each update computes its finiteness from the float32 sum of squares (one
    pass, as with a leading clip), appends ``(norm, params, updates)`` to the
    yielded list, and skips the inner update when `hold` is true, leaving its
    nonfinite counters as they are.
    """
    tap = UpdateTap(hold, [])
    token = _UPDATE_TAP.set(tap)
    try:
        yield tap.records
    finally:
        _UPDATE_TAP.reset(token)


def _int32_zero() -> jax.Array:
    return jnp.zeros((), jnp.int32)


def _agree(finite: jax.Array, axis_name: str | None) -> jax.Array:
    """All replicas finite: one int32 psum of the 'bad' flag over axis_name."""
    if axis_name is None:
        return finite
    bad = lax.psum(jnp.logical_not(finite).astype(jnp.int32), axis_name)
    return bad == 0


# --------------------------------------------------------------------------
# zero_nonfinite


class ZeroNonfiniteState(NamedTuple):
    """State of `zero_nonfinite`.

    Attributes:
        nonfinite_zeroed: per-leaf int32 scalars (the structure of the
            params), how many elements the last update set to zero.
        nonfinite_zeroed_total: per-leaf int32 scalars, elements set to zero
            since init.
    """

    nonfinite_zeroed: optax.Updates
    nonfinite_zeroed_total: optax.Updates


def zero_nonfinite() -> optax.GradientTransformationExtraArgs:
    """Replaces NaN, +Inf and -Inf entries of the updates by 0 and counts them.

    Unlike `optax.zero_nans`, which only looks for NaN, every nonfinite entry
    (tested with `jnp.isfinite`) is replaced; finite entries pass through bit
    for bit. The state counts, per leaf, the entries zeroed by the last update
    and since init. Complex entries with a nonfinite part are zeroed whole.

    Cost: one fused reduction per leaf (the count of nonfinite entries); the
    zeroing select fuses into the next elementwise consumer. No collectives:
    each replica zeroes its own entries.

    Returns:
        An `optax.GradientTransformationExtraArgs`.

    Examples:
        >>> import jax.numpy as jnp, jaxnan
        >>> tx = jaxnan.zero_nonfinite()
        >>> params = {"w": jnp.zeros(3)}
        >>> state = tx.init(params)
        >>> g = {"w": jnp.array([1.0, jnp.nan, -jnp.inf])}
        >>> updates, state = tx.update(g, state)
        >>> updates["w"], int(state.nonfinite_zeroed["w"])
        (Array([1., 0., 0.], dtype=float32), 2)

    .. versionadded:: 0.1.0
    """
    name = "jaxnan.zero_nonfinite"

    def init(params: optax.Params) -> ZeroNonfiniteState:
        base.validate_updates(params, argname="params", fn_name=name)

        def zeros():  # distinct buffers, so that the state can be donated
            return jax.tree_util.tree_map(lambda _: _int32_zero(), params)

        return ZeroNonfiniteState(zeros(), zeros())

    def update(updates, state, params=None, **extra_args):
        del params, extra_args
        base.validate_state(state, ZeroNonfiniteState, fn_name=name)
        base.validate_updates(updates, fn_name=name)
        base.validate_same_structure(
            updates,
            state.nonfinite_zeroed,
            name_a="updates",
            name_b="params",
            fn_name=name,
        )
        leaves, treedef = jax.tree_util.tree_flatten(updates)
        counts, new = [], []
        for x in leaves:
            if base.is_checked_leaf(x):
                bad = ~jnp.isfinite(x)
                counts.append(tree.leaf_nonfinite_count(x))
                new.append(jnp.where(bad, jnp.zeros_like(x), x))
            else:
                counts.append(_int32_zero())
                new.append(x)
        counts_tree = jax.tree_util.tree_unflatten(treedef, counts)
        total = jax.tree_util.tree_map(
            lambda t, c: t + c, state.nonfinite_zeroed_total, counts_tree
        )
        return (
            jax.tree_util.tree_unflatten(treedef, new),
            ZeroNonfiniteState(counts_tree, total),
        )

    return optax.GradientTransformationExtraArgs(init, update)


# --------------------------------------------------------------------------
# clip_by_global_norm

# Extra-argument key through which `skip_nonfinite` hands the global norm of
# the updates (and whether they were all finite) to a `clip_by_global_norm`
# that receives the same updates (checked by object identity at trace time),
# so that it is computed once, with one overflow-safe slow path, not two.
_PRECOMPUTED_NORM = "_jaxnan_precomputed_norm"


class ClipByGlobalNormState(NamedTuple):
    """State of `jaxnan.clip_by_global_norm`.

    Attributes:
        global_norm: float32 scalar, the L2 norm of the finite entries of the
            last updates, before clipping (for logging).
        clip_input_finite: bool scalar, whether every entry of the last
            updates was finite. `skip_nonfinite` reads it to avoid a second
            pass over the gradients.
    """

    global_norm: jax.Array
    clip_input_finite: jax.Array


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformationExtraArgs:
    r"""Clips updates by their global norm; a nonfinite entry poisons nothing else.

    On finite updates this is bit for bit `optax.clip_by_global_norm`: when the
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
    are summed in float32 (or wider), so float16 gradients with a norm above
    256 do not overflow as they do in optax.

    Cost: one fused reduction per leaf (the sum of squares that any global
    norm clipping computes); its finiteness doubles as the nonfinite test. A
    second, overflow-safe pass over the finite entries runs only when that sum
    is not finite (a nonfinite entry, or finite entries whose squares
    overflow), inside a scalar `lax.cond`. No collectives: under sharded
    `jit` the norm is global by construction; inside `shard_map`/`pmap` each
    shard clips by its own norm.

    Args:
        max_norm: the largest global norm the updates may have; a positive
            float.

    Returns:
        An `optax.GradientTransformationExtraArgs`; its state keeps the
        pre-clip norm of the finite entries and whether all were finite.

    Raises:
        ValueError: when `max_norm` is not positive.

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
    if isinstance(max_norm, (int, float)) and not max_norm > 0:
        raise ValueError(
            f"jaxnan.clip_by_global_norm: max_norm must be positive, got {max_norm}."
        )

    def init(params: optax.Params) -> ClipByGlobalNormState:
        base.validate_updates(params, argname="params", fn_name=name)
        return ClipByGlobalNormState(jnp.zeros((), jnp.float32), jnp.array(True))

    def update(updates, state, params=None, **extra_args):
        del params
        base.validate_state(state, ClipByGlobalNormState, fn_name=name)
        base.validate_updates(updates, fn_name=name)
        leaves = tree.checked_leaves(updates)
        pre = extra_args.get(_PRECOMPUTED_NORM)
        if pre is not None and pre[0] == tuple(id(x) for x in leaves):
            _, norm, finite = pre  # computed by skip_nonfinite on these updates
        else:
            norm, finite = tree.norm_and_finite(leaves)
        trigger = norm < max_norm

        def clip(t):
            if not base.is_checked_leaf(t):
                return t
            return lax.select(trigger, t, (t / norm.astype(t.dtype)) * max_norm)

        new = jax.tree_util.tree_map(clip, updates)
        return new, ClipByGlobalNormState(norm, finite)

    return optax.GradientTransformationExtraArgs(init, update)


# --------------------------------------------------------------------------
# skip_nonfinite


class SkipNonfiniteState(NamedTuple):
    """State of `skip_nonfinite`.

    Attributes:
        nonfinite_streak: int32 scalar, consecutive skipped steps.
        nonfinite_total: int32 scalar, skipped steps since init.
        last_nonfinite_step: int32 scalar, index (from 0) of the last skipped
            update call, -1 when none was skipped.
        skip_step: int32 scalar, number of update calls so far.
        gave_up: bool scalar, set once `nonfinite_streak` reaches
            `max_streak`; it stays set until the state is re-initialised.
        inner_state: the state of the wrapped transformation.
    """

    nonfinite_streak: jax.Array
    nonfinite_total: jax.Array
    last_nonfinite_step: jax.Array
    skip_step: jax.Array
    gave_up: jax.Array
    inner_state: optax.OptState


def _varying_axes(aval: Any) -> frozenset:
    """The mesh axes a value varies over inside `shard_map` (empty outside)."""
    mat = getattr(aval, "manual_axis_type", None)
    return frozenset(getattr(mat, "varying", ()) or ())


def _make_varying(x: jax.Array, axes: frozenset) -> jax.Array:
    """`x`, marked as varying over `axes` inside `shard_map` (a no-op outside)."""
    missing = axes - _varying_axes(jax.typeof(x))
    if not missing:
        return x
    return lax.pcast(x, tuple(sorted(missing)), to="varying")


def _leads_with_clip(inner_state: optax.OptState) -> bool:
    """Whether `inner` is `jaxnan.clip_by_global_norm` or a chain starting with it.

    Decided from the state's structure: such a clip receives exactly the
    updates that `skip_nonfinite` receives, so the norm computed for the
    finiteness test can be handed to it (`_PRECOMPUTED_NORM`).
    """
    if isinstance(inner_state, ClipByGlobalNormState):
        return True
    return (
        type(inner_state) is tuple
        and bool(inner_state)
        and isinstance(inner_state[0], ClipByGlobalNormState)
    )


def norm_for_inner(
    updates: optax.Updates, extra_args: dict, inner_state: optax.OptState
) -> tuple[jax.Array, jax.Array, dict]:
    """One pass over `updates`: their global norm and exact finiteness.

    Returns ``(norm, finite, extra_args)``. `finite` says whether every entry
    is finite; it is exact (an overflowing sum of finite squares is told
    apart from a nonfinite entry by a slow path that runs only then). When
    `inner_state` is that of a `jaxnan.clip_by_global_norm` (or a chain
    starting with one), `norm` is the clip's norm (overflow-safe, over the
    finite entries) and `extra_args` hands it on, so that the clip neither
    reads the updates again nor compiles a second slow path. Otherwise `norm`
    is the square root of the float32 sum of squares (+Inf when the squares
    overflow) and the slow path only decides finiteness.
    """
    leaves = tree.checked_leaves(updates)
    if not leaves:
        return jnp.zeros((), jnp.float32), jnp.array(True), extra_args
    if _leads_with_clip(inner_state):
        norm, finite = tree.norm_and_finite(leaves)
        ids = tuple(id(x) for x in leaves)
        return norm, finite, {**extra_args, _PRECOMPUTED_NORM: (ids, norm, finite)}
    sq = sum(tree.sum_of_squares(x) for x in leaves).astype(jnp.float32)
    finite = lax.cond(
        jnp.isfinite(sq),
        lambda: jnp.array(True),
        # Compiled into every step, run only when `sq` is not finite: the
        # small leaves share one reduction (fewer kernels to compile).
        lambda: tree.all_finite_packed(leaves),
    )
    return jnp.sqrt(sq), finite, extra_args


def guarded_update(
    inner: optax.GradientTransformationExtraArgs,
    accept: jax.Array,
    updates: optax.Updates,
    inner_state: optax.OptState,
    params: optax.Params | None,
    extra_args: dict,
) -> tuple[optax.Updates, optax.OptState]:
    """`inner.update` when `accept`, else exactly zero updates and `inner_state`.

    One `lax.cond` around the inner update. Selecting afterwards with
    `jnp.where` between the new and the old state makes XLA keep a copy of the
    optimizer moments when the state is donated (measured: 2x the parameter
    bytes of extra temporary memory on CPU); the conditional needs none. The
    state keeps its dtypes, and inside `shard_map` both branches agree on
    which values vary across devices.

    When `inner` returns updates of the same types as it receives (the usual
    case), the skip branch hands back its input updates and the zeroing is a
    `where`-select after the conditional, which XLA fuses into the consumer
    (`optax.apply_updates`): the branch that is never taken on a healthy step
    then holds no kernel at all, which saves compile time.
    """

    def apply():
        return inner.update(updates, inner_state, params, **extra_args)

    out_types, inner_types = jax.eval_shape(apply)
    state_axes = jax.tree_util.tree_map(
        lambda n, o: _varying_axes(n) | _varying_axes(jax.typeof(o)),
        inner_types,
        inner_state,
    )
    passthrough = _same_types(updates, out_types)

    def skip():
        if passthrough:
            out = jax.tree_util.tree_map(
                lambda u, t: _make_varying(u, _varying_axes(t)), updates, out_types
            )
        else:
            out = jax.tree_util.tree_map(
                lambda a: _make_varying(jnp.zeros(a.shape, a.dtype), _varying_axes(a)),
                out_types,
            )
        return out, jax.tree_util.tree_map(_make_varying, inner_state, state_axes)

    def accept_branch():
        new_updates, new_inner = apply()
        new_inner = jax.tree_util.tree_map(
            lambda n, o, ax: _make_varying(
                lax.convert_element_type(n, jnp.result_type(o)), ax
            ),
            new_inner,
            inner_state,
            state_axes,
        )
        return new_updates, new_inner

    out, new_inner = lax.cond(accept, accept_branch, skip)
    if passthrough:
        out = jax.tree_util.tree_map(
            lambda u: jnp.where(accept, u, jnp.zeros_like(u)), out
        )
    return out, new_inner


def _same_types(updates: optax.Updates, out_types: Any) -> bool:
    """Whether `out_types` matches `updates` in structure, shape and dtype.

    Inside `shard_map` it must also vary over at least the axes `updates`
    varies over, so that the skip branch can hand `updates` back.
    """
    u_leaves, u_def = jax.tree_util.tree_flatten(updates)
    o_leaves, o_def = jax.tree_util.tree_flatten(out_types)
    if u_def != o_def:
        return False
    return all(
        jnp.shape(u) == o.shape
        and jnp.result_type(u) == o.dtype
        and _varying_axes(jax.typeof(u)) <= _varying_axes(o)
        for u, o in zip(u_leaves, o_leaves)
    )


def skip_nonfinite(
    inner: optax.GradientTransformation,
    *,
    max_streak: int | None = None,
    axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Skips the whole step when the updates or the loss are not finite.

    A step is skipped when any entry of the updates, or of the loss given as
    the extra argument ``loss=`` (``tx.update(g, state, params, loss=loss)``),
    is NaN, +Inf or -Inf. A skipped step returns updates that are exactly 0
    (a `where`-select, so no NaN leaks through 0 * NaN) and leaves the inner
    state bit for bit unchanged: Adam's moments and step count are never
    touched by a bad step. A finite step is exactly `inner`.

    Unlike `optax.apply_if_finite`, reaching `max_streak` consecutive skips
    never lets a nonfinite update through (which would poison the moments for
    good): the step is still skipped and `state.gave_up` is set, for a host
    loop to act on (stop, roll back, lower the learning rate).

    Given `axis_name` (inside `shard_map` or `pmap`), the replicas agree with
    one int32 `lax.psum`: if any replica sees a nonfinite value, all skip.
    Under sharded `jit` no collective is needed: the reduction is global.

    Cost: one fused reduction over the gradients (leaves of one shape share
    it), none when `inner` begins with `jaxnan.clip_by_global_norm`, whose
    norm and finiteness are computed here once and handed to it; then
    one `lax.cond` around `inner`, whose updates XLA writes out before
    `optax.apply_updates` reads them (outside a conditional it fuses the
    two). `benchmarks/RESULTS.md` has the figures.

    Args:
        inner: the transformation to protect, such as ``optax.adamw(1e-3)``
            or ``optax.chain(jaxnan.clip_by_global_norm(1.0), optax.adam(1e-3))``.
        max_streak: after this many consecutive skipped steps, set
            `gave_up`. None: never.
        axis_name: the mapped axis to agree over, inside `shard_map`/`pmap`.

    Returns:
        An `optax.GradientTransformationExtraArgs` whose state is a
        `SkipNonfiniteState`.

    Raises:
        TypeError: when `inner` is not an optax transformation, or update gets
            a state of another transform or non-floating updates.
        ValueError: when `max_streak` is not a positive int, or update gets an
            empty or mismatched tree.

    Examples:
        >>> import jax.numpy as jnp, optax, jaxnan
        >>> tx = jaxnan.skip_nonfinite(optax.adam(1e-2), max_streak=3)
        >>> params = {"w": jnp.ones(2)}
        >>> state = tx.init(params)
        >>> bad = {"w": jnp.array([jnp.nan, 1.0])}
        >>> updates, state = tx.update(bad, state, params, loss=jnp.float32(1.0))
        >>> updates["w"], int(state.nonfinite_total)
        (Array([0., 0.], dtype=float32), 1)

    .. versionadded:: 0.1.0
    """
    name = "jaxnan.skip_nonfinite"
    base.validate_inner(inner, fn_name="skip_nonfinite")
    if max_streak is not None and (
        isinstance(max_streak, bool)
        or not isinstance(max_streak, int)
        or max_streak < 1
    ):
        raise ValueError(
            f"jaxnan.skip_nonfinite: max_streak must be a positive int or None, "
            f"got {max_streak!r}."
        )
    inner = optax.with_extra_args_support(inner)

    def init(params: optax.Params) -> SkipNonfiniteState:
        base.validate_updates(params, argname="params", fn_name=name)
        # Distinct buffers per field, so that the state can be donated.
        return SkipNonfiniteState(
            nonfinite_streak=_int32_zero(),
            nonfinite_total=_int32_zero(),
            last_nonfinite_step=jnp.full((), -1, jnp.int32),
            skip_step=_int32_zero(),
            gave_up=jnp.array(False),
            inner_state=inner.init(params),
        )

    def update(updates, state, params=None, **extra_args):
        base.validate_state(state, SkipNonfiniteState, fn_name=name)
        base.validate_updates(updates, fn_name=name)
        if params is not None:
            base.validate_same_structure(
                updates, params, name_a="updates", name_b="params", fn_name=name
            )
        tap = _UPDATE_TAP.get()
        if tap is not None or _leads_with_clip(state.inner_state):
            norm, finite, extra_args = norm_for_inner(
                updates, extra_args, state.inner_state
            )
        else:
            finite = tree.all_finite(updates)
        loss = extra_args.get("loss")
        if loss is not None:
            finite = finite & tree.all_finite(loss)
        finite = _agree(finite, axis_name)
        accept = finite if tap is None else finite & ~tap.hold
        out, kept_inner = guarded_update(
            inner, accept, updates, state.inner_state, params, extra_args
        )
        if tap is not None:
            tap.records.append((norm, params, out))
        streak = jnp.where(
            finite,
            jnp.zeros_like(state.nonfinite_streak),
            optax.safe_increment(state.nonfinite_streak),
        )
        total = jnp.where(
            finite, state.nonfinite_total, optax.safe_increment(state.nonfinite_total)
        )
        last = jnp.where(finite, state.last_nonfinite_step, state.skip_step)
        gave_up = state.gave_up
        if max_streak is not None:
            gave_up = gave_up | (streak >= max_streak)
        new_state = SkipNonfiniteState(
            nonfinite_streak=streak,
            nonfinite_total=total,
            last_nonfinite_step=last,
            skip_step=optax.safe_increment(state.skip_step),
            gave_up=gave_up,
            inner_state=kept_inner,
        )
        return out, new_state

    return optax.GradientTransformationExtraArgs(init, update)
