"""NaN-safe optax gradient transformations: zero and skip (clip: `clip.py`).

All decisions are taken inside the compiled graph, with no host sync: zeroing
and clipping by `where`-selects (never a multiply by a 0/1 mask, since
0 * NaN = NaN), skipping by selects placed inside the inner optimizer's own
equations (see `guarded_update` for where, and why).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.extend import source_info_util

from jaxnan._src.core import deprecations, dtypes, shard_norms, tree, validation
from jaxnan._src.transforms import state_types, update_tap
from jaxnan._src.transforms.clip import ClipByGlobalNormState, KnownNorm, as_arrays
from jaxnan._src.transforms.select import guarded_update

source_info_util.register_exclusion(__file__)


def _int32_zero() -> jax.Array:
    return jnp.zeros((), jnp.int32)


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

    This is not a guard of the optimizer: what the optimizer chained after
    it makes of the zeroed gradients is not checked. Wrap the chain in
    `jaxnan.skip_nonfinite` for the promise that no nonfinite value reaches
    the params or the optimizer state.

    Cost: one fused reduction per leaf (the count of nonfinite entries); the
    zeroing select fuses into the next elementwise consumer. No collectives:
    each replica zeroes its own entries.

    Returns:
        An `optax.GradientTransformationExtraArgs`.

    Raises:
        TypeError: when init or update gets non-floating leaves, or update
            gets a state of another transform.
        ValueError: when update gets an empty or mismatched tree, or leaves
            of another shape than `params` (naming the leaf path and both
            shapes).

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
        validation.validate_updates(params, argname="params", fn_name=name)

        def zeros():  # distinct buffers, so that the state can be donated
            return jax.tree_util.tree_map(lambda _: _int32_zero(), params)

        return ZeroNonfiniteState(zeros(), zeros())

    def update(updates, state, params=None, **extra_args):
        validation.validate_update_call(
            updates,
            state,
            ZeroNonfiniteState,
            params=params,
            mirror="nonfinite_zeroed",
            fn_name=name,
        )
        del params, extra_args
        leaves, treedef = jax.tree_util.tree_flatten(updates)
        counts, new = [], []
        for x in leaves:
            if dtypes.is_checked_leaf(x):
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


class SkipNonfiniteState(NamedTuple):
    """State of `skip_nonfinite`.

    Attributes:
        nonfinite_streak: int32 scalar, consecutive skipped steps.
        nonfinite_total: int32 scalar, skipped steps since init, for any
            reason.
        inner_nonfinite_total: int32 scalar, the skipped steps whose
            gradients and loss were finite but whose new params or inner
            state were not (the optimizer's own arithmetic, or a state
            already poisoned); also counted in `nonfinite_total`.
        last_nonfinite_step: int32 scalar, index (from 0) of the last skipped
            update call, -1 when none was skipped.
        skip_step: int32 scalar, number of update calls so far.
        gave_up: bool scalar, set once `nonfinite_streak` reaches
            `give_up_after`; it stays set until the state is re-initialised.
        inner_state: the state of the wrapped transformation.
    """

    nonfinite_streak: jax.Array
    nonfinite_total: jax.Array
    inner_nonfinite_total: jax.Array
    last_nonfinite_step: jax.Array
    skip_step: jax.Array
    gave_up: jax.Array
    inner_state: optax.OptState


def _leads_with_clip(inner_state: optax.OptState) -> bool:
    """Whether `inner` is `jaxnan.clip_by_global_norm` or a chain starting with it.

    Decided from the state's structure: such a clip receives exactly the
    updates that `skip_nonfinite` receives, so the norm computed for the
    finiteness test can be handed to it (`KnownNorm`).
    """
    if isinstance(inner_state, ClipByGlobalNormState):
        return True
    return (
        type(inner_state) is tuple
        and bool(inner_state)
        and isinstance(inner_state[0], ClipByGlobalNormState)
    )


def norm_for_inner(
    updates: optax.Updates,
    extra_args: dict,
    inner_state: optax.OptState,
    shard_axes: list[tuple] | None = None,
) -> tuple[jax.Array, jax.Array, dict]:
    """One pass over `updates`: their global norm and exact finiteness.

    Returns ``(norm, finite, extra_args)``. `finite` says whether every entry
    is finite; it is exact (an overflowing sum of finite squares is not
    taken for a nonfinite entry). When
    `inner_state` is that of a `jaxnan.clip_by_global_norm` (or a chain
    starting with one), `norm` is the clip's norm (overflow-safe, over the
    finite entries) and `extra_args` hands it on, so that the clip neither
    reads the updates again nor compiles a second slow path. Otherwise `norm`
    is the square root of the float32 sum of squares (+Inf when the squares
    overflow), read in the same loop per leaf as the finiteness
    (`tree.squares_and_finite`): no slow path, no extra buffer; it is a
    decision's input, with a zero derivative (`lax.stop_gradient`).

    `shard_axes` (inside `shard_map`, the mesh axes each checked leaf is
    split over): the norms and the flag are those of the whole tensors
    (`shard_norms.global_norm`), the same on every device.
    """
    leaves = tree.checked_leaves(updates)
    if not leaves:
        return jnp.zeros((), jnp.float32), jnp.array(True), extra_args
    if shard_axes is not None:
        plain, safe, finite = shard_norms.global_norm(leaves, shard_axes)
        if not _leads_with_clip(inner_state):
            return plain.astype(jnp.float32), finite, extra_args
        known = KnownNorm(updates, safe, finite)
        return safe, finite, {**extra_args, "known_norm": known}
    if _leads_with_clip(inner_state):
        norm, finite = tree.norm_and_finite(leaves)
        known = KnownNorm(updates, norm, finite)
        return norm, finite, {**extra_args, "known_norm": known}
    # A decision's input, not differentiated: the variadic reduction has no
    # derivative rule, and `jax.grad` through the guard must still work.
    parts = [tree.squares_and_finite(jax.lax.stop_gradient(x)) for x in leaves]
    sq = sum(q.astype(jnp.float32) for q, _ in parts)
    finite = functools.reduce(jnp.logical_and, [ok for _, ok in parts])
    return jnp.sqrt(sq), finite, extra_args


@deprecations.renamed_keywords
def skip_nonfinite(
    inner: optax.GradientTransformation,
    *,
    give_up_after: int | None = None,
    axis_name: str | None = None,
    sharded_params: bool = False,
    exact: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """Skips the whole step when anything nonfinite would reach the params.

    The promise: no nonfinite value ever reaches the params or the optimizer
    state through this guard, whatever its source, in float16, bfloat16,
    float32 and float64. A step is skipped when any entry of the updates, or
    of the loss given as the extra argument ``loss=``
    (``tx.update(g, state, params, loss=loss)``) or ``value=`` (the name
    optax's ``contrib.reduce_on_plateau``, ``polyak_sgd`` and ``lbfgs``
    read it by), is NaN, +Inf or -Inf; and
    also when those are finite but what `inner` makes of them is not: its
    new state, or the params ``optax.apply_updates(params, updates)`` would
    give (Adam with ``eps=0`` on a zero gradient, a float16 moment that
    overflows, a NaN already in the state). Those steps are counted in
    `inner_nonfinite_total` as well. A skipped step returns updates that are
    exactly ``-0.0`` (a `where`-select, so no NaN leaks through 0 * NaN;
    ``p + -0.0`` is `p` bit for bit, signed zeros included) and leaves the
    inner state bit for bit unchanged: Adam's moments and step count are
    never touched by a bad step. The one exception is a `jaxnan.monitor`
    inside `inner`: it records every step, skipped or not.

    What is exact on a finite step. The updates and the new state are made
    by `inner`'s own equations, and each state leaf keeps one dtype: the one
    `inner`'s update gives it, taken from `init` on (optax's ``contrib.dog``,
    ``dowg`` and ``prodigy`` turn a bfloat16 scalar of a mixed tree into a
    float32 one at their first update; init's state is widened to it, which
    is exact), so that the state is a fixed-type carry. Where that update
    cannot be traced at init with no extra argument or with ``value=`` (a
    scalar loss, as ``contrib.momo`` needs), each new leaf is rounded to
    init's dtype. Bit for bit:

    * default (``exact=False``): the params and state of a jitted step
      ``optax.apply_updates(params, updates)`` are those of the same step
      without the guard, for the optax optimizers and wrappers tested
      (`tests/test_skip_matrix.py`), except ``optax.contrib``'s
      ``dadapt_adamw``, ``mechanize`` (in float64), ``momo``,
      ``momo_adam``, ``muon``, ``schedule_free`` and
      ``optax.rmsprop(centered=True, momentum=0.9)``, and in float16 or
      bfloat16 ``optax``'s ``adaptive_grad_clip``, ``noisy_sgd``,
      ``scale_by_radam``, ``scale_by_rms``, ``scale_by_stddev`` and
      ``contrib.galore``/``scale_by_galore`` (their gradients pass a select against the
      SVD hang), and the
      updates are ``jax.jit(inner.update)``'s except for those: there the
      last bit of some entries can differ (XLA:CPU lets LLVM contract
      ``a * b + c`` into an FMA kernel by kernel, and the guard's select in
      a kernel can change that choice for the arithmetic before it). Two
      more open cases, of any optimizer, where the params can differ in
      their last bit (strict xfails in `tests/test_skip_promise.py`): a 0-d
      parameter (a learned temperature; XLA:CPU fuses the check's scalar
      arithmetic into the step's kernel; its updates are still
      ``jax.jit(inner.update)``'s), and a chain that scales twice by
      constants (``optax.chain(optax.sgd(lr), optax.scale(c))``: without
      the guard XLA folds the two factors into one, so the updates differ
      from ``jax.jit(inner.update)``'s too; ``exact=True`` gives those bit
      for bit);
    * ``exact=True``: the updates and the new state are always bit for
      bit ``jax.jit(inner.update)``'s, for every optimizer: `inner` runs in
      a branch of a `lax.cond`, which XLA compiles on its own. The updates
      are then written out of the conditional, so the caller's
      ``params + updates`` is rounded on its own, where a fused unguarded
      step may contract it into one FMA (1 ulp apart from the fused
      unguarded step for most optimizers); it costs a second evaluation of
      `inner` (`benchmarks/RESULTS.md` has the step time).

    Extra arguments, ``loss=`` included, are passed on to `inner`, as
    `optax.chain` passes them to each transformation: jaxnan's loss-aware
    transforms inside it (`jaxnan.skip_spikes`, `jaxnan.dynamic_loss_scale`)
    read the loss there. An optax transformation that passes unknown extra
    arguments on to a function of the user's gets it too: ``optax.lbfgs``'s
    line search calls ``value_fn(params, loss=...)``, so define
    ``def value_fn(params, loss=None)``. When `inner`'s update fails on the
    arguments of a state that fits the params, its own error is raised,
    chained, naming the extra arguments forwarded (and this fix).

    A skipped step never hangs in `inner`. Its equations are evaluated on
    every step (the skip is a select), so an optimizer that iterates on its
    gradients could loop on a nonfinite one: ``optax.contrib.galore``'s SVD
    (LAPACK's gesdd on the CPU) never returns on some matrices mixing +-Inf
    with finite entries (Reference-LAPACK lapack#1409). When `inner`'s
    update holds such a primitive (an SVD), it is given the gradients with
    their nonfinite entries set to 0 (bit for bit the gradients on a step
    that is applied; the skip is decided on the gradients themselves), at
    the cost of one select per gradient entry, fused into the optimizer's
    reads (`benchmarks/RESULTS.md`). Other optimizers are unchanged.

    optax's functions that read the inner optimizer's own state take
    `state.inner_state`: ``optax.contrib.schedule_free_eval_params(
    state.inner_state, params)`` (given the guard's state, it fails with
    "'SkipNonfiniteState' object has no attribute 'b1'").

    Unlike `optax.apply_if_finite`, reaching `give_up_after` consecutive
    skips never lets a nonfinite update through (which would poison the moments for
    good): the step is still skipped and `state.gave_up` is set, for a host
    loop to act on (stop, roll back, lower the learning rate).

    Given `axis_name` (inside `shard_map` or `pmap`), the replicas agree with
    one int32 `lax.psum` (of two flags: what came in, and what `inner` made):
    if any replica sees a nonfinite value, all skip.
    Under sharded `jit` no collective is needed: the reduction is global.
    When the params themselves are split over devices (FSDP), the checks of
    the leaves that are split take the form XLA partitions into all-reduces
    of a few scalars (a variadic reduction would be partitioned into an
    all-gather of the per-device partials per operand and leaf shape), and
    their sums are complex64 (two float32 sums to an element), so that XLA
    merges them into one all-reduce of their own instead of splitting the
    step's gradient all-reduce around them. A leaf counts as split when its
    type says so (a mesh of explicit axes) or, inside `jaxnan.guard`, when
    a state leaf of its shape is sharded: the guard adds one all-reduce of
    scalars to an FSDP step (`tests/test_collectives.py`). Other leaves keep
    the variadic form, which reads each input once and writes nothing out:
    one device and data parallel compile as before. ``sharded_params=True``
    gives every leaf the split form (FSDP under plain `jax.jit` on a mesh
    without explicit axes); on one device it reads the inputs once per two
    sums (+23% bytes accessed on the MLP step, 72.0 -> 88.9 MB). Both forms
    take the same decisions.

    Cost: one fused reduction over the gradients (leaves of one shape share
    it), none when `inner` begins with `jaxnan.clip_by_global_norm`, whose
    norm and finiteness are computed here once and handed to it. The
    outgoing check joins the gradient check: one fused reduction per leaf
    shape reads the gradients, the optimizer state and the params, and XLA
    recomputes the optimizer's arithmetic inside it (nothing is written
    out). Then `inner` runs as without the guard, with a select on each new
    state leaf and inside its last multiply (`guarded_update`): no copy of
    the params or moments, and XLA fuses it with `optax.apply_updates` as it
    does without the guard (what is bit for bit: above).
    `benchmarks/RESULTS.md` has the figures.

    Args:
        inner: the transformation to protect, such as ``optax.adamw(1e-3)``
            or ``optax.chain(jaxnan.clip_by_global_norm(1.0), optax.adam(1e-3))``.
        give_up_after: after this many consecutive skipped steps, set
            `gave_up` (and keep skipping). None: never. It was called
            ``max_streak`` before 0.2 (still accepted, with a
            `DeprecationWarning`); `jaxnan.guard`'s ``max_streak`` raises.
        axis_name: the mapped axis to agree over, inside `shard_map`/`pmap`.
        sharded_params: give every leaf the reductions that partition into
            all-reduces (FSDP under plain `jax.jit`); False: only the
            leaves known to be split (by their type, or by `jaxnan.guard`).
        exact: run `inner` in a `lax.cond` branch, so that its updates and
            state are bit for bit ``jax.jit(inner.update)``'s for every
            optimizer (see above for the cost).

    Returns:
        An `optax.GradientTransformationExtraArgs` whose state is a
        `SkipNonfiniteState`.

    Raises:
        TypeError: when `inner` is not an optax transformation, `axis_name`
            is not a str (or a tuple of them), `exact` or `sharded_params`
            is not a bool, or update gets a state of another transform or
            non-floating updates.
        ValueError: when `give_up_after` is not a positive int, or update gets an
            empty or mismatched tree, or leaves of the wrong shape.

    Examples:
        >>> import jax.numpy as jnp, optax, jaxnan
        >>> tx = jaxnan.skip_nonfinite(optax.adam(1e-2), give_up_after=3)
        >>> params = {"w": jnp.ones(2)}
        >>> state = tx.init(params)
        >>> bad = {"w": jnp.array([jnp.nan, 1.0])}
        >>> updates, state = tx.update(bad, state, params, loss=jnp.float32(1.0))
        >>> updates["w"], int(state.nonfinite_total)  # -0.0: p + -0.0 is p
        (Array([-0., -0.], dtype=float32), 1)

    .. versionadded:: 0.1.0
    """
    name = "jaxnan.skip_nonfinite"
    validation.validate_inner(inner, fn_name="skip_nonfinite")
    if give_up_after is not None:
        give_up_after = validation.check_int(
            "skip_nonfinite", "give_up_after", give_up_after, low=1
        )
    validation.check_axis_name("skip_nonfinite", axis_name)
    validation.check_bool("skip_nonfinite", "sharded_params", sharded_params)
    validation.check_bool("skip_nonfinite", "exact", exact)
    inner = optax.with_extra_args_support(inner)

    def init(params: optax.Params) -> SkipNonfiniteState:
        validation.validate_updates(params, argname="params", fn_name=name)
        # Distinct buffers per field, so that the state can be donated.
        return SkipNonfiniteState(
            nonfinite_streak=_int32_zero(),
            nonfinite_total=_int32_zero(),
            inner_nonfinite_total=_int32_zero(),
            last_nonfinite_step=jnp.full((), -1, jnp.int32),
            skip_step=_int32_zero(),
            gave_up=jnp.array(False),
            inner_state=state_types.settled(inner, params, inner.init(params)),
        )

    def update(updates, state, params=None, **extra_args):
        validation.validate_update_call(
            updates,
            state,
            SkipNonfiniteState,
            params=params,
            extra_args=extra_args,
            inner_accepts=lambda: validation.inner_accepts(
                inner.update,
                updates,
                state.inner_state,
                params,
                extra_args,
                init=inner.init,
                fn_name="skip_nonfinite",
            ),
            fn_name=name,
        )
        updates = as_arrays(updates)
        incoming: list[Any] = []
        tap = update_tap.current()
        clip = _leads_with_clip(state.inner_state)
        norm = None
        if clip:
            norm, finite, extra_args = norm_for_inner(
                updates, extra_args, state.inner_state
            )
        else:
            finite = jnp.array(True)
            incoming = tree.checked_leaves(updates)  # checked with the outgoing
        loss = extra_args.get("loss")
        # optax's loss-reading transforms (reduce_on_plateau, polyak_sgd, the
        # line searches) take the loss as ``value=``: it is a loss too.
        for given in (loss, extra_args.get("value")):
            if given is not None:
                finite = finite & tree.all_finite(given)
        hold = jnp.array(False) if tap is None else tap.hold
        proposed: list = []
        out, kept_inner, finite, inner_ok, incoming_norm = guarded_update(
            inner,
            finite & ~hold,
            updates,
            state.inner_state,
            params,
            extra_args,
            axis_name,
            incoming=incoming,
            norm_incoming=tap is not None and not clip,
            sharded_params=sharded_params,
            exact=exact,
            on_proposed=proposed.append,
        )
        if tap is not None:
            tap.records.append(
                update_tap.TapRecord(
                    incoming_norm if norm is None else norm,
                    params,
                    out,
                    loss is not None,
                    updates,
                    proposed[0],
                    loss,
                )
            )
        applied = finite & inner_ok

        def bump(counter, flag):  # a step the guard holds changes no counter
            return jnp.where(flag & ~hold, optax.safe_increment(counter), counter)

        streak = jnp.where(
            applied,
            jnp.zeros_like(state.nonfinite_streak),
            bump(state.nonfinite_streak, True),
        )
        total = bump(state.nonfinite_total, ~applied)
        inner_total = bump(state.inner_nonfinite_total, finite & ~inner_ok)
        last = jnp.where(applied | hold, state.last_nonfinite_step, state.skip_step)
        gave_up = state.gave_up
        if give_up_after is not None:
            gave_up = gave_up | (streak >= give_up_after)
        new_state = SkipNonfiniteState(
            nonfinite_streak=streak,
            nonfinite_total=total,
            inner_nonfinite_total=inner_total,
            last_nonfinite_step=last,
            skip_step=optax.safe_increment(state.skip_step),
            gave_up=gave_up,
            inner_state=kept_inner,
        )
        return out, new_state

    return optax.GradientTransformationExtraArgs(init, update)
