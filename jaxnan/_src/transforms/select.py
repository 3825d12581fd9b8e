"""How a guard applies or skips one step of the optimizer it wraps.

`guarded_update` checks what the inner optimizer makes of a step and returns
its updates and state, or a skip (``-0.0`` updates, the state bit for bit),
decided inside the compiled graph. It serves `skip_nonfinite`, `skip_spikes`
and `dynamic_loss_scale`.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.extend import core as jex_core
from jax.extend import source_info_util

from jaxnan._src.core import dtypes, sharding, split_leaves, tree, validation
from jaxnan._src.transforms import hazards, observers

source_info_util.register_exclusion(__file__)


def _outgoing_leaves(
    updates: optax.Updates, state: optax.OptState, params: optax.Params | None
) -> list[jax.Array]:
    """What a guard checks on the way out: the new params and the new state.

    With `params`, each floating leaf is checked as ``optax.apply_updates``
    will compute it, ``(p + u).astype(p.dtype)``, so that an update that is
    finite but overflows the params' dtype is caught too; without, the
    updates themselves. Then every floating leaf of the new inner state
    outside observer records (`jaxnan.monitor` records NaN on purpose).
    """
    u_leaves, u_def = jax.tree_util.tree_flatten(updates)
    p_leaves = None
    if params is not None:
        p_flat, p_def = jax.tree_util.tree_flatten(params)
        if p_def == u_def:
            p_leaves = p_flat
    out = []
    for i, u in enumerate(u_leaves):
        if not dtypes.is_checked_leaf(u):
            continue
        p = None if p_leaves is None else p_leaves[i]
        if p is not None and dtypes.is_checked_leaf(p) and jnp.shape(p) == jnp.shape(u):
            p = jnp.asarray(p)
            out.append((p + u).astype(p.dtype))
        else:
            out.append(u)
    out += [
        x for x in observers.recorded_free_leaves(state) if dtypes.is_checked_leaf(x)
    ]
    return out


class Guarded(NamedTuple):
    """What `guarded_update` returns.

    Attributes:
        updates: the inner updates, or a skip (``-0.0``).
        inner_state: the new inner state, or the old one bit for bit.
        wanted: `accept` and the finiteness of the `incoming` leaves.
        inner_finite: whether what the inner optimizer made of the step is
            finite.
        incoming_norm: the float32 L2 norm of the `incoming` leaves when
            asked for (``norm_incoming=True``), else 0.
    """

    updates: optax.Updates
    inner_state: optax.OptState
    wanted: jax.Array
    inner_finite: jax.Array
    incoming_norm: jax.Array


def guarded_update(
    inner: optax.GradientTransformationExtraArgs,
    accept: jax.Array,
    updates: optax.Updates,
    inner_state: optax.OptState,
    params: optax.Params | None,
    extra_args: dict,
    axis_name: str | None = None,
    *,
    incoming: list[Any] = (),
    check_outgoing: bool = True,
    norm_incoming: bool = False,
    sharded_params: bool = False,
    exact: bool = False,
    on_proposed: Any = None,
) -> Guarded:
    """`inner.update` when the step is wanted and all is finite, else a skip.

    Returns a `Guarded` ``(updates, inner_state, wanted, inner_finite,
    incoming_norm)``: `wanted` is
    `accept` and the finiteness of the `incoming` leaves (the gradients, when
    the caller has not checked them itself), agreed over `axis_name`;
    `inner_finite` says whether what `inner` makes of the step is finite. The
    step is applied when both are True. A skip gives zero updates (``-0.0``,
    `no_update`) and `inner_state` bit for bit, except the records of observer
    states (`jaxnan.monitor`), which still see the step. A step that is
    applied gives the params bit for bit what `inner` alone gives them.

    The outgoing check: what `inner` makes of the step (`_outgoing_leaves`:
    the params as `optax.apply_updates` will make them, and the new inner
    state) must be finite, or the step is skipped all the same. So no
    nonfinite value reaches the params or the optimizer state, whether it
    came in with the gradients or was made by the optimizer's own arithmetic
    (Adam with ``eps=0`` on a zero gradient, a float16 second moment that
    overflows, a NaN already in a moment). The check is a fused reduction
    outside any conditional, over the optimizer's arithmetic, which XLA
    recomputes inside its loops instead of writing it out. The `incoming`
    leaves join the same reductions (one loop per shape reads the gradients,
    the moments and the params). Given `axis_name`, the replicas agree on
    both flags with one int32 `lax.psum`. `check_outgoing=False` leaves the
    outgoing check out (for the benchmark that measures its cost; the guards
    always check). `norm_incoming=True` also returns the norm of the
    `incoming` leaves, summed in the same reductions (no extra pass).
    The reductions over leaves split over devices take the form XLA
    partitions into one all-reduce (`_flags_and_squares`); `sharded_params`
    gives all of them that form. `on_proposed`, when given, is called with
    the updates `inner` proposes, as the check computes them, before the
    decision (`jaxnan.guard` reads its update ratio from them without a
    collective after the decision).

    The step itself (`_apply_or_skip`) evaluates `inner`'s equations again,
    outside any conditional, with a select on each new state leaf as it is
    made and inside the last multiply of each update. What was tried before,
    with figures on the MLP (compiled temporary memory of the donated step,
    as a fraction of the parameter bytes):

    * one `lax.cond` around `inner`: no copy, but the updates are written
      out of the conditional before the caller's ``params + updates`` reads
      them, where without the guard XLA contracts ``updates * -lr`` and that
      add into one fused multiply-add: 1 ulp apart within a few steps;
    * updates outside the conditional, state inside: the update reads the
      old moments the conditional overwrites, so XLA copies them (+1.9x);
    * selects after computing the new state, the check sharing it: XLA
      writes the new moments out for both (+1.4x; +2.9x and 1.39x time
      when it was measured with the updates selected too).

    The check evaluates `inner` on an `lax.optimization_barrier` copy of its
    inputs (no extra buffer), so that XLA recomputes its arithmetic inside
    the reductions instead of sharing it with the step. Eagerly (no tracer
    in sight), `inner` runs op by op and the results are `where`-selected.

    When `inner`'s equations hold a primitive that may never return on
    nonfinite input (`hazards.HANGS_ON_NONFINITE`: the SVD of
    ``optax.contrib.galore``), `inner` is given `hazards.finite_or_zero`
    updates, the gradients bit for bit on a step that is applied, so that a
    skipped step returns; the skip is decided on the gradients themselves.
    """
    closed, (out_types, inner_types) = jax.make_jaxpr(
        lambda: inner.update(updates, inner_state, params, **extra_args),
        return_shape=True,
    )()
    if hazards.hangs_on_nonfinite(closed.jaxpr):
        # A step that is skipped must return: `inner` sees finite gradients
        # (bit for bit the gradients on a step that is applied).
        updates = hazards.finite_or_zero(updates)
        closed = jax.make_jaxpr(
            lambda: inner.update(updates, inner_state, params, **extra_args)
        )()
    n_updates = len(jax.tree_util.tree_leaves(out_types))
    state_axes = jax.tree_util.tree_map(
        lambda n, o: sharding.varying_axes(n) | sharding.varying_axes(jax.typeof(o)),
        inner_types,
        inner_state,
    )

    def keep_types(new_inner):
        return jax.tree_util.tree_map(
            lambda n, o, ax: sharding.make_varying(
                lax.convert_element_type(n, jnp.result_type(o)), ax
            ),
            new_inner,
            inner_state,
            state_axes,
        )

    eager = not any(map(validation.is_traced, [accept, *closed.consts]))
    if eager:  # op by op, as `inner` alone runs: no fusion to keep
        new_updates, new_inner = inner.update(
            updates, inner_state, params, **extra_args
        )
        flat = jax.tree_util.tree_leaves((new_updates, new_inner))
    else:
        # The check reads its own copy of the inputs: XLA would otherwise
        # share the new moments between the check and the step, and write
        # them out.
        consts = lax.optimization_barrier(list(closed.consts))
        flat = jex_core.jaxpr_as_fun(jex_core.ClosedJaxpr(closed.jaxpr, consts))()
    proposed = jax.tree_util.tree_unflatten(
        jax.tree_util.tree_structure(out_types), flat[:n_updates]
    )
    if on_proposed is not None:
        on_proposed(proposed)
    if check_outgoing:
        outgoing = _outgoing_leaves(
            proposed,
            keep_types(
                jax.tree_util.tree_unflatten(
                    jax.tree_util.tree_structure(inner_types), flat[n_updates:]
                )
            ),
            params,
        )
    else:
        outgoing = []
    (in_ok, out_ok), sq = _flags_and_squares(
        list(incoming), outgoing, norm_incoming, sharded_params
    )
    in_ok = accept & in_ok
    if axis_name is not None:
        bad = jnp.stack([~in_ok, ~out_ok]).astype(jnp.int32)
        bad = lax.psum(bad, axis_name)
        in_ok, out_ok = bad[0] == 0, bad[1] == 0
    apply_ok = in_ok & out_ok
    if exact and not eager:
        checked_state = keep_types(
            jax.tree_util.tree_unflatten(
                jax.tree_util.tree_structure(inner_types), flat[n_updates:]
            )
        )
        out, new_inner = _apply_in_branch(
            apply_ok,
            lambda: inner.update(updates, inner_state, params, **extra_args),
            out_types,
            inner_state,
            checked_state,
            keep_types,
        )
    elif eager:
        out = jax.tree_util.tree_map(
            lambda u: jnp.where(apply_ok, u, no_update(u)), new_updates
        )
        new_inner = observers.merge_observed(
            keep_types(new_inner), inner_state, lambda n, o: jnp.where(apply_ok, n, o)
        )
    else:
        out, new_inner = _apply_or_skip(
            apply_ok, closed, out_types, inner_state, inner_types, state_axes
        )
    return Guarded(out, new_inner, in_ok, out_ok, jnp.sqrt(sq))


def _flags_and_squares(
    incoming: list, outgoing: list, norm_incoming: bool, sharded_params: bool
) -> tuple[tuple[jax.Array, jax.Array], jax.Array]:
    """``((incoming finite, outgoing finite), sum of squares of incoming)``.

    Leaves of one shape share a reduction (`tree.finite_flags_and_squares`).
    Its form is chosen per shape: the one XLA partitions into an all-reduce
    of a few scalars (``stacked=True``) for the shapes split over devices
    (`split_leaves.is_split`: an explicit sharding type, or the shapes of the
    state `jaxnan.guard` was called with), or all of them with
    `sharded_params`; the variadic one, which reads each input once and
    writes nothing out, for the others. Both take the same decisions.
    """
    leaves = [*incoming, *outgoing]
    split = {
        tuple(jnp.shape(x))
        for x in leaves
        if sharded_params or split_leaves.is_split(x)
    }
    in_ok, out_ok = jnp.array(True), jnp.array(True)
    sq = jnp.zeros((), jnp.float32)
    for stacked in (False, True):
        mine = [
            [x for x in xs if (tuple(jnp.shape(x)) in split) == stacked]
            for xs in (incoming, outgoing)
        ]
        if not any(mine):
            continue
        (i, o), q = tree.finite_flags_and_squares(
            mine, 0 if norm_incoming else None, stacked=stacked
        )
        in_ok, out_ok, sq = in_ok & i, out_ok & o, sq + q
    return (in_ok, out_ok), sq


def _apply_in_branch(
    ok: jax.Array,
    step: Any,
    out_types: Any,
    inner_state: optax.OptState,
    checked_state: optax.OptState,
    keep_types: Any,
) -> tuple[optax.Updates, optax.OptState]:
    """``step()`` in one branch of a `lax.cond`, a skip in the other.

    The exact variant (``exact=True``). XLA compiles a conditional's branch
    as a computation of its own, into which nothing outside it is fused: the
    inner optimizer's kernels are those of ``jax.jit(inner.update)`` alone,
    and so are its roundings (XLA:CPU lets LLVM contract ``a * b + c`` into
    an FMA kernel by kernel, so that a select added to a kernel can change
    the rounding of the arithmetic before it). The cost: the updates are
    written out of the conditional, so the caller's ``params + updates``
    is rounded twice where an unguarded step may contract it into one FMA,
    and the step reads the gradients and the state once more than the
    default (`benchmarks/RESULTS.md`). Observer records (`jaxnan.monitor`)
    take `checked_state`'s, the step's own, on a skip too.
    """

    def apply():
        u, n = step()
        return u, keep_types(n)

    def skip():
        u = jax.tree_util.tree_map(
            lambda t: no_update(jnp.zeros(t.shape, t.dtype)), out_types
        )
        kept = observers.merge_observed(checked_state, inner_state, lambda n, o: o)
        return u, kept

    return lax.cond(ok, apply, skip)


def _apply_or_skip(
    ok: jax.Array,
    closed: Any,
    out_types: Any,
    inner_state: optax.OptState,
    new_types: Any,
    state_axes: Any,
) -> tuple[optax.Updates, optax.OptState]:
    """Evaluates `inner`'s jaxpr `closed` again, applied when `ok`, else a skip.

    Each leaf of the new state is selected as it is made, ``where(ok, new,
    old)``, and the equations after it read the selected value: so the
    updates are computed from the state that is kept, as the optimizer reads
    its new moments in the program without the guard, and nothing of the
    unselected state outlives its select (no copy of the moments). A leaf of
    the updates made by a multiply ``a * b`` (the learning-rate scaling that
    ends nearly every optimizer) is computed as ``where(ok, a, -0.0) *
    where(ok, b, 1.0)``: on an applied step the same multiply, which XLA
    contracts with the caller's ``params + updates`` into the fused
    multiply-add of the unguarded program (a select after the multiply
    would cost a rounding); on a skip exactly ``-0.0``, even from NaN
    operands. Other update leaves are `where`-selected with `no_update`.
    Records of observer states (`jaxnan.monitor`) take the new value always.
    """
    jaxpr = closed.jaxpr
    n_updates = len(jax.tree_util.tree_leaves(out_types))
    made_by = {v: eqn for eqn in jaxpr.eqns for v in eqn.outvars}
    state_def = jax.tree_util.tree_structure(new_types)
    marks = observers.merge_observed(  # False for the records of observers
        jax.tree_util.tree_map(lambda _: False, new_types),
        jax.tree_util.tree_map(lambda _: True, new_types),
        lambda n, o: o,
    )
    olds = [
        sharding.make_varying(o, ax)
        for o, ax in zip(
            state_def.flatten_up_to(inner_state), state_def.flatten_up_to(state_axes)
        )
    ]
    selected = state_def.flatten_up_to(marks)
    state_vars = jaxpr.outvars[n_updates:]
    after = {
        v: functools.partial(_select, ok, old=old)
        for v, old, sel in zip(state_vars, olds, selected)
        if sel and _made_like(v, made_by, old)
    }
    before = {
        made_by[v]: functools.partial(_select_factors, ok)
        for v in jaxpr.outvars[:n_updates]
        if _made_by_multiply(v, made_by)
    }
    consts = [_cut_on_skip(ok, c) for c in closed.consts]
    flat = _evaluate(jaxpr, consts, before, after)
    leaves = []
    for v, u, t in zip(
        jaxpr.outvars, flat[:n_updates], jax.tree_util.tree_leaves(out_types)
    ):
        if not _made_by_multiply(v, made_by):
            u = jnp.where(ok, u, no_update(u))
        leaves.append(sharding.make_varying(u, sharding.varying_axes(t)))
    states = []
    axes = state_def.flatten_up_to(state_axes)
    for v, x, old, sel, ax in zip(state_vars, flat[n_updates:], olds, selected, axes):
        x = lax.convert_element_type(x, jnp.result_type(old))
        if sel and not (isinstance(v, jex_core.Var) and v in after):
            x = jnp.where(ok, x, old)
        states.append(sharding.make_varying(x, ax))
    return (
        jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_types), leaves),
        state_def.unflatten(states),
    )


def _cut_on_skip(ok: jax.Array, x: Any) -> Any:
    """`x`, through which no derivative flows back on a skipped step.

    ``where(ok, x, stop_gradient(x))`` has the value of `x` (XLA folds it
    away: the program is unchanged) and, under `jax.grad`, passes the
    cotangent back only when `ok`: on a skip the derivative of the inner
    optimizer's arithmetic on a NaN gradient is NaN (Adam's 0 * NaN), and a
    select, unlike a multiply, turns it into exactly 0. So a hyper-gradient
    through a skipped step is finite: zero through the update, the identity
    through the params and state that are kept.
    """
    if not (
        validation.is_traced(x) and jnp.issubdtype(jnp.result_type(x), jnp.inexact)
    ):
        return x
    return jnp.where(ok, x, lax.stop_gradient(x))


def _select(
    ok: jax.Array, new: jax.Array, *, old: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """``where(ok, new, old)``, twice: as the later equations see it, and as kept.

    The same value (XLA folds the two into one); the later equations' copy
    passes no derivative back to `old` on a skip (`_cut_on_skip`): the
    updates computed from it are dropped, and their derivative on a NaN
    gradient is NaN.
    """
    return jnp.where(ok, new, lax.stop_gradient(old)), jnp.where(ok, new, old)


def _select_factors(ok: jax.Array, a: Any, b: Any) -> tuple[jax.Array, jax.Array]:
    """The operands of an update's last multiply: themselves, or ``-0.0, 1.0``."""
    return (
        jnp.where(ok, a, jnp.full((), -0.0, jnp.result_type(a))),
        jnp.where(ok, b, jnp.ones((), jnp.result_type(b))),
    )


def _made_like(v: Any, made_by: dict, old: Any) -> bool:
    """Whether `v` is made by an equation, with the dtype and shape of `old`."""
    return (
        isinstance(v, jex_core.Var)
        and v in made_by
        and v.aval.dtype == jnp.result_type(old)
        and v.aval.shape == jnp.shape(old)
    )


def _made_by_multiply(v: Any, made_by: dict) -> bool:
    """Whether `v` is made by a floating ``mul`` (optax's scaling by -lr)."""
    return (
        isinstance(v, jex_core.Var)
        and v in made_by
        and made_by[v].primitive is lax.mul_p
        and jnp.issubdtype(v.aval.dtype, jnp.floating)
    )


def _evaluate(jaxpr: Any, consts: list, before: dict, after: dict) -> list:
    """`jaxpr`'s outputs, as `jax.extend.core.jaxpr_as_fun` computes them, with hooks.

    ``before[eqn](*operands)`` replaces the operands of an equation,
    ``after[var](value)`` gives ``(seen, kept)`` for a variable as soon as
    it is made: the equations after it read `seen`, the outputs `kept`.
    """
    env = dict(zip(jaxpr.constvars, consts))
    kept: dict = {}

    def read(v):
        return v.val if isinstance(v, jex_core.Literal) else env[v]

    with jax.debug_nans(False):
        for eqn in jaxpr.eqns:
            ins = [read(v) for v in eqn.invars]
            if eqn in before:
                ins = before[eqn](*ins)
            params = eqn.primitive.get_bind_params(eqn.params)
            with (
                source_info_util.user_context(
                    eqn.source_info.traceback,
                    name_stack=source_info_util.current_name_stack()
                    + eqn.source_info.name_stack,
                ),
                eqn.ctx.manager,
            ):
                outs = eqn.primitive.bind(*ins, **params)
            if not eqn.primitive.multiple_results:
                outs = [outs]
            for v, x in zip(eqn.outvars, outs):
                if v in after:
                    env[v], kept[v] = after[v](x)
                else:
                    env[v] = x
    return [
        kept[v] if isinstance(v, jex_core.Var) and v in kept else read(v)
        for v in jaxpr.outvars
    ]


def no_update(a: Any) -> jax.Array:
    """The update of a skipped step for a leaf like `a`: all ``-0.0``.

    Negative zero is the additive identity of IEEE arithmetic: ``p + -0.0``
    is `p` bit for bit, a ``-0.0`` parameter included (``-0.0 + 0.0`` is
    ``+0.0``). It compares equal to 0. Complex leaves get ``complex(-0.0,
    -0.0)``, the complex additive identity. Integer leaves get 0.
    """
    if jnp.issubdtype(a.dtype, jnp.complexfloating):
        # complex(-0.0, -0.0): -0+0j would turn a -0.0 imaginary part into +0.0.
        part = jnp.full(a.shape, -0.0, jnp.real(jnp.zeros((), a.dtype)).dtype)
        return lax.complex(part, part)
    if jnp.issubdtype(a.dtype, jnp.inexact):
        return jnp.full(a.shape, -0.0, a.dtype)
    return jnp.zeros(a.shape, a.dtype)
