"""float16/bfloat16: overflow of exp and squares, constants cast out of range.

Both detectors also run on the jaxpr of the gradient (the backward pass of a
float16 model).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.extend import source_info_util

from jaxnan._src.core import primitives
from jaxnan._src.lint import graph, registry
from jaxnan._src.lint.graph import Node, Val
from jaxnan._src.lint.registry import Severity

source_info_util.register_exclusion(__file__)

LOW_PRECISION_OVERFLOW = registry.rule(
    "low-precision-overflow",
    "warning",
    "exp, pow or a sum of squares of unbounded values in float16 (overflows "
    "above 65504: exp(x) for x > 11.1, x**2 for |x| > 256) or bfloat16 "
    "(8-bit mantissa; reported as info)",
    "compute in float32: jnp.exp(x.astype(jnp.float32))",
    "jnp.exp(x.astype(jnp.float16))",
    "jnp.exp(x.astype(jnp.float32))",
)
LOW_PRECISION_CAST = registry.rule(
    "low-precision-cast",
    "error",
    "-inf or a constant beyond the dtype's range (such as -1e9 or "
    "finfo(float32).min) cast to float16/bfloat16: it becomes -inf, and "
    "-inf - (-inf) or 0 * inf is NaN",
    "apply the mask after the cast with jnp.finfo(x.dtype).min, or keep "
    "masks in float32",
    "(x + jnp.where(m, 0.0, -1e9)).astype(jnp.float16)",
    "jnp.where(m, x16, jnp.finfo(jnp.float16).min)",
)

_LOW = primitives.LOW_PRECISION
_BOUNDED = ("tanh", "logistic", "sin", "cos", "clamp", "min")


def _is_low(v: Val) -> bool:
    return v.dtype in _LOW


def _minus_max(nd: Node) -> bool:
    """True for x - max(x), the stable softmax shift."""
    return graph.prim_of(nd.ins[1]) in (
        "reduce_max",
        "max",
        "stop_gradient",
        "broadcast_in_dim",
    )


def bounded_above(v: Val) -> bool:
    """True when `v` cannot grow without bound.

    A shifted, squashed or negated-positive value, or a constant.
    """
    nd = graph.strip(v).node
    if nd is None:
        return graph.strip(v).const is not None
    if nd.prim == "sub":
        return _minus_max(nd)
    if nd.prim == "neg":
        return graph.prim_of(nd.ins[0]) in ("abs", "square", "exp")
    if nd.prim == "mul":
        return any(
            graph.strip(x).const is not None and bounded_above(y)
            for x, y in (nd.ins, nd.ins[::-1])
        )
    return nd.prim in _BOUNDED


def _overflow_hit(nd: Node, what: str) -> registry.Hit:
    if nd.outs[0].dtype == np.dtype("float16"):
        return registry.Hit(
            LOW_PRECISION_OVERFLOW,
            nd,
            f"jaxnan: {what} of unbounded values in float16 overflows to inf "
            "above 65504",
        )
    return registry.Hit(
        LOW_PRECISION_OVERFLOW,
        nd,
        f"jaxnan: {what} of unbounded values in bfloat16 keeps only 8 bits of mantissa",
        Severity.INFO,
    )


def _growth(nd: Node) -> str | None:
    """What grows fast at `nd`: 'exp', 'pow', 'x**3', ... or None."""
    if nd.prim in ("exp", "pow"):
        return None if bounded_above(nd.ins[0]) else nd.prim
    if nd.prim == "integer_pow" and abs(nd.params["y"]) >= 3:
        return f"x**{nd.params['y']}"
    return None


def _is_square(nd: Node) -> bool:
    return (
        nd.prim == "square"
        or (nd.prim == "integer_pow" and nd.params["y"] == 2)
        or (nd.prim == "mul" and nd.ins[0] is nd.ins[1])
    )


@registry.register(LOW_PRECISION_OVERFLOW, on_gradient=True)
def low_precision_overflow(ctx: registry.Context):
    """exp, pow, high powers and summed squares of unbounded 16-bit values."""
    for nd in ctx.graph.nodes:
        if nd.outs and _is_low(nd.outs[0]):
            what = _growth(nd)
            if what is not None:
                yield _overflow_hit(nd, what)
    cons = graph.consumers(ctx.graph)
    for nd in ctx.graph.nodes:
        if not _is_square(nd) or not _is_low(nd.outs[0]) or bounded_above(nd.ins[0]):
            continue
        if graph.flows_to(cons, nd.outs[0], {"reduce_sum"}, 3) is not None:
            yield _overflow_hit(nd, "a sum of squares")


def const_extremes(v: Val, depth: int = 0) -> float:
    """The largest |constant| (inf included) that can flow into `v`."""
    v = graph.strip(v)
    if v.const is not None:
        a = np.abs(np.asarray(v.const, np.float64))
        a = a[~np.isnan(a)]
        return float(a.max()) if a.size else 0.0
    nd = v.node
    if nd is None or depth > 10:
        return 0.0
    if nd.prim == "select_n":
        return max(const_extremes(x, depth + 1) for x in nd.ins[1:])
    if nd.prim in ("add", "sub", "neg", "mul", "convert_element_type", "max", "min"):
        return max(const_extremes(x, depth + 1) for x in nd.ins)
    return 0.0


def _cast_hit(nd: Node) -> registry.Hit | None:
    dt = nd.outs[0].dtype
    src = nd.ins[0]
    if dt not in _LOW or not src.is_float or _is_low(src):
        return None
    big = const_extremes(src)
    fmax = float(jax.numpy.finfo(dt).max)
    if big <= fmax:
        return None
    what = "-inf/inf" if np.isinf(big) else f"a constant of {big:.3g}"
    return registry.Hit(
        LOW_PRECISION_CAST,
        nd,
        f"jaxnan: {what} cast to {dt.name} (max {fmax:.5g}) is inf there; masks "
        "then give -inf - (-inf) or 0 * inf = NaN",
    )


def _inf_constant_hit(nd: Node) -> registry.Hit | None:
    for x in nd.ins:
        if x.const is None or not _is_low(x) or x.const.size != 1:
            continue
        if np.isinf(np.asarray(x.const, np.float64)).any():
            return registry.Hit(
                LOW_PRECISION_CAST,
                nd,
                f"jaxnan: a constant that is inf in {x.dtype.name} (an -inf "
                "mask, or a value such as -1e9 that overflowed when converted)",
            )
    return None


@registry.register(LOW_PRECISION_CAST, on_gradient=True)
def low_precision_cast(ctx: registry.Context):
    """Constants beyond the 16-bit range: cast down, or already inf there."""
    for nd in ctx.graph.nodes:
        hit = None
        if nd.prim == "convert_element_type":
            hit = _cast_hit(nd)
        elif nd.prim in ("add", "sub", "mul", "select_n"):
            hit = _inf_constant_hit(nd)
        if hit is not None:
            yield hit
