"""Division: by a sum/norm/variance with no epsilon, or an epsilon the dtype loses."""

from __future__ import annotations

import jax
import numpy as np
from jax.extend import source_info_util

from jaxnan._src.core import primitives
from jaxnan._src.lint import graph, patterns, registry
from jaxnan._src.lint.graph import Node, Val
from jaxnan._src.lint.signs import NONZERO, POS

source_info_util.register_exclusion(__file__)

DIV_NO_EPSILON = registry.rule(
    "div-no-epsilon",
    "warning",
    "division by a sum, norm, variance or std that can be 0, with no epsilon",
    "x / (jnp.sum(w) + 1e-6), or x / jnp.maximum(jnp.sum(mask), 1)",
    "x / jnp.linalg.norm(x)",
    "x / optax.safe_norm(x, 1e-6)",  # an epsilon alone leaves sqrt-zero-grad
)
EPSILON_UNDERFLOW = registry.rule(
    "epsilon-underflow",
    "error",
    "an epsilon below the smallest normal number of the dtype in use "
    "(1e-8 in float16 is 0, float16's smallest normal is 6.1e-5)",
    "use an epsilon the dtype can hold (1e-3..1e-5 in float16), or compute "
    "the normalisation in float32",
    "x16 / (jnp.sum(x16) + 1e-8)",
    "x16 / (jnp.sum(x16) + 1e-3)",
)

_ROOT_KINDS = {"variance": "a std", "sum of squares": "a norm"}


def _sum_kind(d: Val, nd: Node) -> str:
    k = patterns.square_kind(d)
    return "a sum of squares" if k == "sum of squares" else "a sum"


def _root_kind(d: Val, nd: Node) -> str:
    return _ROOT_KINDS.get(patterns.square_kind(nd.ins[0]), "a sqrt")


def _variance_kind(d: Val, nd: Node) -> str | None:
    return "a variance" if patterns.square_kind(d) == "variance" else None


def _select_kind(d: Val, nd: Node) -> str | None:
    """jnp.var's ddof guard: the one case that is not a constant."""
    vals = [x for x in nd.ins[1:] if graph.strip(x).const is None]
    return denominator_kind(vals[0]) if len(vals) == 1 else None


_KINDS = {
    "reduce_sum": _sum_kind,
    "sqrt": _root_kind,
    "div": _variance_kind,
    "select_n": _select_kind,
}


def denominator_kind(d: Val) -> str | None:
    """'a sum' / 'a norm' / 'a std' / ... when `d` is one, else None."""
    nd = graph.strip(d).node
    kind = None if nd is None else _KINDS.get(nd.prim)
    return None if kind is None else kind(d, nd)


def added_epsilon(d: Val):
    """The epsilon added to `d`, as (value, dtype), or None."""
    nd = graph.strip(d).node
    if nd is None or nd.prim not in ("add", "max"):
        return None
    for x in nd.ins:
        k = graph.scalar_const(x)
        if k is not None:
            return k, x.dtype
    return None


def _guarded_by_select(cons, nd: Node, d: Val) -> bool:
    """True when `nd`'s output only feeds a select whose predicate tests `d`."""
    sel = graph.flows_to(cons, nd.outs[0], {"select_n"}, 4, through={"mul", "div"})
    if sel is None:
        return False
    return bool(graph.ancestors(sel.ins[0], 100) & graph.ancestors(d, 100))


def _denominator(nd: Node) -> Val | None:
    if nd.prim == "div":
        return nd.ins[1]
    if nd.prim == "rsqrt":
        return nd.ins[0]
    return None


def _underflow_hit(nd: Node, k: float, dt) -> registry.Hit | None:
    dt = np.dtype(dt)
    if dt not in primitives.LOW_PRECISION:
        return None
    tiny = float(jax.numpy.finfo(dt).tiny)
    if not 0 <= k < tiny:
        return None
    return registry.Hit(
        EPSILON_UNDERFLOW,
        nd,
        f"jaxnan: the epsilon added to this denominator is {k:g} in {dt.name} "
        f"(below its smallest normal {tiny:.2g}): an epsilon like 1e-8 rounds "
        "to 0 there",
    )


def _unguarded(ctx: registry.Context, cons, nd: Node, d: Val) -> str | None:
    """The kind of denominator when nothing keeps it away from 0."""
    kind = denominator_kind(d)
    if kind is None or ctx.analysis.sign(d) in (POS, NONZERO):
        return None
    if patterns.has_guard_below(d) or _guarded_by_select(cons, nd, d):
        return None  # jnp.where(norm < c, g, g / norm * c), as in clipping
    return kind


@registry.register(DIV_NO_EPSILON, EPSILON_UNDERFLOW)
def division(ctx: registry.Context):
    """Divisions (and rsqrt) by a sum, norm or variance, and their epsilons."""
    cons = graph.consumers(ctx.graph)
    for nd in ctx.graph.nodes:
        d = _denominator(nd)
        if d is None or id(nd) in ctx.claimed or not nd.outs[0].is_float:
            continue
        eps = added_epsilon(d)
        if eps is not None:
            hit = _underflow_hit(nd, *eps)
            if hit is not None:
                ctx.claimed.add(id(nd))
                yield hit
            continue
        kind = _unguarded(ctx, cons, nd, d)
        if kind is not None:
            ctx.claimed.add(id(nd))
            yield registry.Hit(
                DIV_NO_EPSILON,
                nd,
                f"jaxnan: division by {kind} that can be 0, with no epsilon",
            )
