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
