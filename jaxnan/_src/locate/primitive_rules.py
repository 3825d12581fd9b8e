"""The built-in rules of the `locate` interpreter.

A rule has the shape ``rule(ctx, *invals, **params) -> (ctx, outvals)``.
First-order primitives need no rule: the interpreter binds them and checks
their floating outputs. Higher-order primitives (those holding a jaxpr) need
one: the built-in rules below inline calls (`jit`, `closed_call`,
`custom_jvp_call`, `custom_vjp_call`, `checkpoint`), and evaluate `cond`,
`scan`, `while` and `shard_map` with an instrumented body that threads the
fixed-size record through branches, loop carries and devices. The table and
`register_rule` live in `interpreter.py` (re-exported here).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core as jex_core
from jax.extend import source_info_util
from jax.extend.core import primitives as prims
from jax.sharding import PartitionSpec

from jaxnan._src.core import compat, sharding
from jaxnan._src.locate.interpreter import RULES, Ctx, Rule, register_rule

source_info_util.register_exclusion(__file__)

__all__ = ["RULES", "Rule", "register_rule"]

# -- call-like primitives: inlined ---------------------------------------


def _inline(param: str) -> Rule:
    def rule(ctx: Ctx, *args: Any, **params: Any) -> tuple[Ctx, Any]:
        body = params[param]
        if isinstance(body, jex_core.ClosedJaxpr):
            return ctx, ctx.eval_jaxpr(body.jaxpr, body.consts, args)
        return ctx, ctx.eval_jaxpr(body, (), args)

    rule.__name__ = f"_inline_{param}_rule"
    rule.inline_param = param  # type: ignore[attr-defined]  # blocks.py flattens
    return rule


for _p, _param in (
    (prims.jit_p, "jaxpr"),
    (prims.closed_call_p, "call_jaxpr"),
    (prims.custom_jvp_call_p, "call_jaxpr"),  # the primal body
    (prims.custom_vjp_call_p, "call_jaxpr"),  # the primal body
    (prims.remat_p, "jaxpr"),
    (compat.custom_vmap_p, "call"),  # what `jaxnan.checked` lowers to
):
    register_rule(_p)(_inline(_param))


def _callback_rule(primitive: Any) -> Rule:
    """Binds a host callback, except `jaxnan.checked`'s own reports.

    Those (marked with a true ``jaxnan_report`` attribute) would raise or
    warn while `locate` replays the step that they reported; their result
    is a float32 zero, so the replay gives it without calling the host.
    """

    def rule(ctx: Ctx, *args: Any, callback: Any, **params: Any):
        if getattr(getattr(callback, "callback_func", None), "jaxnan_report", False):
            avals = params.get("result_avals", ())
            outs = [jnp.zeros(a.shape, a.dtype) for a in avals]
            return ctx, outs
        return ctx, primitive.bind(*args, callback=callback, **params)

    rule.__name__ = f"_{primitive.name}_rule"
    return rule


for _p in (compat.pure_callback_p, compat.debug_callback_p):
    register_rule(_p)(_callback_rule(_p))


def _is_own_report(eqn: Any) -> bool:
    callback = eqn.params.get("callback")
    return eqn.primitive in (compat.pure_callback_p, compat.debug_callback_p) and (
        getattr(getattr(callback, "callback_func", None), "jaxnan_report", False)
    )


# -- cond / switch -------------------------------------------------------


@register_rule(prims.cond_p)
def _cond_rule(ctx: Ctx, index: Any, *ops: Any, branches: tuple, **_: Any):
    ctx.flush()

    def make(branch: Any) -> Callable:
        def run_branch(state: Any, operands: tuple) -> tuple:
            sub = ctx.child(state)
            outs = sub.eval_jaxpr(branch.jaxpr, branch.consts, operands)
            sub.flush()
            return sub.state, tuple(outs)

        return run_branch

    state, outs = lax.switch(index, [make(b) for b in branches], ctx.state, ops)
    ctx.state = state
    return ctx, list(outs)


# -- loops ---------------------------------------------------------------


@register_rule(prims.scan_p)
def _scan_rule(
    ctx: Ctx,
    *args: Any,
    jaxpr: Any,
    length: int,
    reverse: bool,
    num_consts: int,
    num_carry: int,
    unroll: Any = 1,
    **_: Any,
):
    ctx.flush()
    consts = args[:num_consts]
    init = tuple(args[num_consts : num_consts + num_carry])
    xs = tuple(args[num_consts + num_carry :])

    def body(carry: tuple, x: tuple) -> tuple:
        i, state, c = carry
        step = (length - 1 - i) if reverse else i  # the index into xs
        sub = ctx.child(state, iters=(*ctx.iters, step))
        outs = sub.eval_jaxpr(jaxpr.jaxpr, jaxpr.consts, (*consts, *c, *x))
        sub.flush()
        state = ctx.interp.strategy.gate(state, sub.state, (*c, *x), outs)
        return (i + 1, state, tuple(outs[:num_carry])), tuple(outs[num_carry:])

    start = (jnp.zeros((), jnp.int32), ctx.state, init)
    (_, state, carry), ys = lax.scan(
        body, start, xs, length=length, reverse=reverse, unroll=unroll
    )
    ctx.state = state
    return ctx, [*carry, *ys]


@register_rule(prims.while_p)
def _while_rule(
    ctx: Ctx,
    *args: Any,
    cond_jaxpr: Any,
    body_jaxpr: Any,
    cond_nconsts: int,
    body_nconsts: int,
    **_: Any,
):
    ctx.flush()
    cconsts = args[:cond_nconsts]
    bconsts = args[cond_nconsts : cond_nconsts + body_nconsts]
    init = tuple(args[cond_nconsts + body_nconsts :])
    cond_fun = jex_core.jaxpr_as_fun(cond_jaxpr)
    # A vmapped loop can have a batched predicate: it goes on while any lane
    # does, and a lane whose predicate is False keeps its carry (as the
    # lowering of `while` selects, lane by lane).
    batched = bool(cond_jaxpr.out_avals[0].shape)

    def pred(c: tuple) -> Any:
        return cond_fun(*cconsts, *c)[0]

    def cond(carry: tuple) -> Any:
        p = pred(carry[2])
        return jnp.any(p) if batched else p

    gate = ctx.interp.strategy.gate

    def checked_cond(state: Any, i: Any, c: tuple) -> Any:
        # The predicate is evaluated once more, instrumented, so that a value
        # created in the condition function is found (iteration i: before
        # the body's step i). Its outputs are booleans: nothing escapes it
        # (`gate` with no floating output keeps the record from before).
        sub = ctx.child(state, iters=(*ctx.iters, i))
        out = sub.eval_jaxpr(cond_jaxpr.jaxpr, cond_jaxpr.consts, (*cconsts, *c))
        sub.flush()
        return gate(state, sub.state, c, out)

    def body(carry: tuple) -> tuple:
        i, state, c = carry
        sub = ctx.child(state, iters=(*ctx.iters, i))
        outs = sub.eval_jaxpr(body_jaxpr.jaxpr, body_jaxpr.consts, (*bconsts, *c))
        sub.flush()
        if batched:
            outs = [_lane_select(pred(c), new, old) for new, old in zip(outs, c)]
        state = gate(state, sub.state, c, outs)
        state = checked_cond(state, i + 1, tuple(outs))
        return i + 1, state, tuple(outs)

    state = checked_cond(ctx.state, jnp.zeros((), jnp.int32), init)
    _, state, carry = lax.while_loop(
        cond, body, (jnp.zeros((), jnp.int32), state, init)
    )
    ctx.state = state
    return ctx, list(carry)


def _lane_select(pred: Any, new: Any, old: Any) -> Any:
    """`new` where the batched predicate holds, `old` elsewhere (leading axes)."""
    p = jnp.reshape(pred, pred.shape + (1,) * (jnp.ndim(new) - pred.ndim))
    return jnp.where(p, new, old)


# -- shard_map -----------------------------------------------------------


@register_rule(compat.shard_map_p)
def _shard_map_rule(
    ctx: Ctx,
    *args: Any,
    jaxpr: Any,
    mesh: Any,
    in_specs: tuple,
    out_specs: tuple,
    **params: Any,
):
    body_eqns = getattr(jaxpr, "jaxpr", jaxpr).eqns
    if any(_is_own_report(e) for e in body_eqns):
        # `jaxnan.checked`'s report spread over the devices
        # (`checks.processes`): no device map to replay, its token is 0.
        return ctx, [jnp.zeros(v.aval.shape, v.aval.dtype) for v in ctx.eqn.outvars]
    ctx.flush()
    manual = params.get("newly_manual_axes", params.get("manual_axes"))
    manual = set(mesh.axis_names if manual is None else manual)
    axes = tuple(a for a in mesh.axis_names if a in manual)
    ndev = math.prod(mesh.shape[a] for a in axes)
    shard = (mesh, axes)
    # Replay with the body's own varying-axes typing: its collectives (psum
    # of a per-shard statistic) were traced under it and check it again.
    check_vma = bool(params.get("check_vma", False))

    def body(state: Any, iters: tuple, *xs: Any) -> tuple:
        sub = ctx.child(state, iters=iters, shard=shard)
        if isinstance(jaxpr, jex_core.ClosedJaxpr):
            outs = sub.eval_jaxpr(jaxpr.jaxpr, jaxpr.consts, xs)
        else:
            outs = sub.eval_jaxpr(jaxpr, (), xs)
        sub.flush()
        st = sub.state
        if check_vma:  # the per-device state leaves as varying values
            st = jax.tree_util.tree_map(lambda s: sharding.make_varying(s, axes), st)
        stacked = jax.tree_util.tree_map(lambda s: s[None], st)
        return stacked, tuple(outs)

    mapped = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(PartitionSpec(), PartitionSpec(), *in_specs),
        out_specs=(PartitionSpec(axes), tuple(out_specs)),
        axis_names=manual,
        check_vma=check_vma,
    )
    stacked, outs = mapped(ctx.state, tuple(ctx.iters), *args)
    ctx.merge_devices(stacked, ndev)
    return ctx, list(outs)
