"""Division: by a sum/norm/variance with no epsilon, or an epsilon the dtype loses."""

from __future__ import annotations

import jax
import numpy as np
from jax.extend import source_info_util

from jaxnan._src.core import primitives
from jaxnan._src.lint import graph, patterns, registry, source, witness
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
    if nd is not None and nd.prim == "convert_element_type":
        return denominator_kind(nd.ins[0])  # a count: jnp.sum(mask) as float
    kind = None if nd is None else _KINDS.get(nd.prim)
    return None if kind is None else kind(d, nd)


def _guarded_by_select(cons, nd: Node, d: Val) -> bool:
    """True when `nd`'s output only feeds a select whose predicate tests `d`."""
    sel = graph.flows_to(cons, nd.outs[0], {"select_n"}, 4, through={"mul", "div"})
    if sel is None:
        return False
    return bool(graph.ancestors(sel.ins[0], 100) & graph.ancestors(d, 100))


def _denominator(nd: Node) -> Val | None:
    if nd.prim == "div":
        return nd.ins[1]
    if nd.prim in ("rsqrt", "sqrt"):
        return nd.ins[0]
    return None


_STD_FIX = (
    "add eps to the variance: (x - mean) * jax.lax.rsqrt(var + 1e-5), or "
    "(x - mean) / jnp.sqrt(var + 1e-5)"
)
_FIXES = {
    "a sum": "x / jnp.maximum(jnp.sum(m), 1.0) (at least one term), or "
    "x / (jnp.sum(w) + 1e-6)",
    "a sum of squares": "x / (jnp.sum(x**2) + 1e-6)",
    "a norm": "x / (jnp.linalg.norm(x) + 1e-6), or "
    "x * jax.lax.rsqrt(jnp.sum(x**2) + 1e-12)",
    "a std": _STD_FIX,
    "a variance": "add eps to the variance: x / (var + 1e-5)",
    "a sqrt": "x / jnp.sqrt(s + 1e-6)",
}
_WHEN_ZERO = {
    "a sum": "every term is 0 (an all-zero mask, an empty batch)",
    "a sum of squares": "the vector is all zeros",
    "a norm": "the vector is all zeros",
    "a std": "all values are equal (a constant row, a padded position)",
    "a variance": "all values are equal (a constant row, a padded position)",
    "a sqrt": "its argument is 0",
}


_VARIANCE_UNDERFLOW_FIX = (
    "an epsilon the dtype holds, on the variance: jax.lax.rsqrt(var + 1e-5), "
    "or the mean and variance in float32 (x.astype(jnp.float32)), as "
    "flax.linen.LayerNorm computes them"
)


def _literal_epsilon(nd: Node, dt) -> float | None:
    """The epsilon as written on the line, when the dtype rounded it away."""
    tiny = float(jax.numpy.finfo(dt).tiny)
    lits = [k for k in source.literals(source.location(nd)[2]) if 0 < abs(k) < tiny]
    return lits[0] if len(lits) == 1 else None


def _underflow_hit(nd: Node, k: float, dt, add: Node) -> registry.Hit | None:
    dt = np.dtype(dt)
    if dt not in primitives.LOW_PRECISION:
        return None
    tiny = float(jax.numpy.finfo(dt).tiny)
    if not 0 <= k < tiny:
        return None
    variance = any(patterns.square_kind(x) == "variance" for x in add.ins)
    written = _literal_epsilon(nd, dt)
    if written:
        eps = f"the epsilon {written:g}"
    else:  # written elsewhere (self.eps): name the range rounded away
        zero = float(jax.numpy.finfo(dt).smallest_subnormal) / 2
        eps = f"the epsilon added here (any below {zero:.1g} rounds to 0)"
    held = "0" if k == 0 else f"the subnormal {k:.3g}, flushed to 0 on GPU and TPU"
    guards = "this denominator" if nd.prim in ("div", "rsqrt") else "this sqrt"
    return registry.Hit(
        EPSILON_UNDERFLOW,
        nd,
        f"jaxnan: {eps} is {held} in {dt.name} (smallest normal {tiny:.2g}), "
        f"so it does not keep {guards} away from 0: a variance or sum that is "
        "0 gives inf, and NaN in the gradient",
        fix=_VARIANCE_UNDERFLOW_FIX if variance else None,
        witness=witness.zero_under_epsilon(nd, add, tiny),
    )


def _unguarded(ctx: registry.Context, cons, nd: Node, d: Val) -> str | None:
    """The kind of denominator when nothing keeps it away from 0."""
    kind = denominator_kind(d)
    if kind is None or ctx.analysis.sign(d) in (POS, NONZERO):
        return None
    if patterns.has_guard_below(d) or _guarded_by_select(cons, nd, d):
        return None  # jnp.where(norm < c, g, g / norm * c), as in clipping
    return kind


def _no_epsilon_hit(nd: Node, kind: str) -> registry.Hit:
    return registry.Hit(
        DIV_NO_EPSILON,
        nd,
        f"jaxnan: division by {kind} with nothing keeping it away from 0: "
        f"it is 0 when {_WHEN_ZERO[kind]}, and x / 0 is inf (0 / 0 NaN)",
        fix=_FIXES[kind],
        witness=witness.zero_denominator(nd),
    )


@registry.register(DIV_NO_EPSILON, EPSILON_UNDERFLOW)
def division(ctx: registry.Context):
    """Divisions (and roots) by a sum, norm or variance, and their epsilons."""
    cons = graph.consumers(ctx.graph)
    reported: set[int] = set()  # the epsilons already reported
    for nd in ctx.graph.nodes:
        d = _denominator(nd)
        if d is None or id(nd) in ctx.claimed or not nd.outs[0].is_float:
            continue
        eps = patterns.added_epsilon(patterns.under_root(d) if nd.prim == "div" else d)
        if eps is not None:
            k, dt, add = eps
            hit = None
            if id(add) not in reported:
                hit = _underflow_hit(nd, k, dt, add)
            if hit is not None:
                reported.add(id(add))
                ctx.claimed.add(id(nd))
                yield hit
            continue
        kind = _unguarded(ctx, cons, nd, d) if nd.prim != "sqrt" else None
        if kind is not None:
            ctx.claimed.add(id(nd))
            yield _no_epsilon_hit(nd, kind)
