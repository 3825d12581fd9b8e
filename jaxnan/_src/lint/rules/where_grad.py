"""where-nan-grad: an unsafe op in a where branch that the predicate guards."""

from __future__ import annotations

import functools

from jax.extend import source_info_util

from jaxnan._src.core import primitives
from jaxnan._src.lint import graph, patterns, registry
from jaxnan._src.lint.graph import Node
from jaxnan._src.lint.signs import NONNEG, NONZERO, POS, Analysis

source_info_util.register_exclusion(__file__)

WHERE_NAN_GRAD = registry.rule(
    "where-nan-grad",
    "error",
    "a where/select whose unselected branch computes sqrt, log, div, pow, "
    "arctan2, arccos or arcsin on the values it guards: the forward pass is "
    "fine but the gradient is 0 * NaN = NaN",
    "double where: jnp.where(c, jnp.sqrt(jnp.where(c, x, 1.0)), 0.0)",
    "jnp.where(x > 0, jnp.sqrt(x), 0.0)",
    "jnp.where(x > 0, jnp.sqrt(jnp.where(x > 0, x, 1.0)), 0.0)",
)

# The primitives looked for under a where (integer_pow too, with a negative
# exponent); their guarded operands are in `primitives.DOMAINS`.
_GUARDED_PRIMITIVES = frozenset(
    {"sqrt", "rsqrt", "log", "log1p", "div", "pow", "atan2", "acos", "asin"}
)

# Elementwise ops a branch value is followed back through.
_THROUGH = graph.PASS | {
    "add",
    "sub",
    "mul",
    "neg",
    "div",
    "exp",
    "abs",
    "integer_pow",
    "square",
    "sqrt",
    "rsqrt",
    "log",
    "log1p",
    "pow",
    "atan2",
    "acos",
    "asin",
    "tanh",
    "logistic",
    "sin",
    "cos",
    "max",
    "min",
    "convert_element_type",
    "stop_gradient",
}

_NAMES = {"div": "division", "integer_pow": "negative power"}


def unsafe_operands(nd: Node) -> tuple[int, ...]:
    """The operands of `nd` that must stay in its domain, () when none."""
    if nd.prim == "integer_pow":
        return (0,) if nd.params["y"] < 0 else ()
    if nd.prim not in _GUARDED_PRIMITIVES:
        return ()
    return primitives.DOMAINS[nd.prim].operands


def _operand_safe(an: Analysis, nd: Node, i: int) -> bool:
    x = nd.ins[i]
    if graph.is_const(x) or patterns.is_guarded(x) or patterns.has_guard_below(x):
        return True
    s = an.sign(x)
    if nd.prim == "rsqrt":
        return s == POS
    if nd.prim in ("div", "integer_pow"):
        return s in (POS, NONZERO)
    if nd.prim == "atan2":
        return s == POS or an.sign(nd.ins[1 - i]) == POS
    if nd.prim in ("acos", "asin"):
        return False
    if nd.prim == "log1p":
        return s in (POS, NONNEG)
    return s == POS


def _candidate(ctx: registry.Context, u: Node) -> bool:
    return (
        bool(unsafe_operands(u))
        and id(u) not in ctx.claimed
        and any(id(x) in ctx.analysis.tainted for x in u.ins)
    )


def _reaches_predicate(an: Analysis, u: Node, predicate_ancestors) -> bool:
    for i in unsafe_operands(u):
        if _operand_safe(an, u, i):
            continue
        if graph.ancestors(u.ins[i], 200) & predicate_ancestors():
            return True
    return False


def _select_hits(ctx: registry.Context, nd: Node):
    predicate_ancestors = functools.cache(lambda: graph.ancestors(nd.ins[0]))
    for case in nd.ins[1:]:
        for u in graph.chain(case, 6, lambda n: n.prim in _THROUGH):
            if _candidate(ctx, u) and _reaches_predicate(
                ctx.analysis, u, predicate_ancestors
            ):
                ctx.claimed.add(id(u))
                yield registry.Hit(
                    WHERE_NAN_GRAD,
                    u,
                    f"jaxnan: `{_NAMES.get(u.prim, u.prim)}` inside a jnp.where "
                    "branch that the predicate is meant to guard: the forward "
                    "value is selected away, but its gradient is 0 * NaN = NaN "
                    "(jax#1052)",
                )


@registry.register(WHERE_NAN_GRAD)
def where_nan_grad(ctx: registry.Context):
    """Selects whose branches take an unsafe op of what the predicate tests."""
    for nd in ctx.graph.nodes:
        if (
            nd.prim == "select_n"
            and nd.outs[0].is_float
            and ctx.analysis.differentiated(nd)
        ):
            yield from _select_hits(ctx, nd)
