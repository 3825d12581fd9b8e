"""Small patterns that several lint rule families look for."""

from __future__ import annotations

from jax.extend import source_info_util

from jaxnan._src.lint import graph
from jaxnan._src.lint.graph import Val

source_info_util.register_exclusion(__file__)

_SQUARE_THROUGH = graph.PASS | {"reduce_sum", "div", "convert_element_type"}
_GUARD_THROUGH = graph.PASS | {
    "reduce_sum",
    "mul",
    "square",
    "integer_pow",
    "convert_element_type",
}


def is_guarded(v: Val) -> bool:
    """True when `v` comes out of a select or a clamp.

    The inner where of a double where, or ``jnp.maximum(x, eps)``.
    """
    return graph.prim_of(v) in ("select_n", "clamp", "max", "min")


def has_guard_below(v: Val) -> bool:
    """True when a select feeds `v` through sums, products and squares."""
    through = graph.chain(v, 8, lambda n: n.prim in _GUARD_THROUGH)
    return any(nd.prim == "select_n" for nd in through)


def square_kind(v: Val) -> str | None:
    """'sum of squares' / 'variance' / None, looking through a few producers."""
    for nd in graph.chain(v, 6, lambda n: n.prim in _SQUARE_THROUGH):
        if nd.prim in ("square", "integer_pow") or (
            nd.prim == "mul" and nd.ins[0] is nd.ins[1]
        ):
            if graph.prim_of(nd.ins[0]) == "sub":
                return "variance"
            return "sum of squares"
    return None


def _root_arg(v: Val) -> Val | None:
    """The argument of sqrt/rsqrt/a power in (0, 1) producing `v`, else None."""
    nd = graph.strip(v).node
    if nd is None:
        return None
    if nd.prim in ("sqrt", "rsqrt"):
        return nd.ins[0]
    if nd.prim == "pow":
        k = graph.scalar_const(nd.ins[1])
        if k is not None and 0 < k < 1:
            return nd.ins[0]
    return None


def under_root(v: Val) -> Val:
    """The value under the root when `v` is sqrt(s) (or rsqrt), else `v`."""
    arg = _root_arg(v)
    return v if arg is None else arg


def added_epsilon(d: Val):
    """The epsilon added to `d`: ``(value, dtype, add node)``, or None.

    ``var + eps``, ``jnp.maximum(var, eps)``.
    """
    nd = graph.strip(d).node
    if nd is None or nd.prim not in ("add", "max"):
        return None
    for x in nd.ins:
        k = graph.scalar_const(x)
        if k is not None:
            return k, x.dtype, nd
    return None
