"""float16/bfloat16: overflow of exp and squares, constants cast out of range.

Both detectors also run on the jaxpr of the gradient (the backward pass of a
float16 model).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.extend import source_info_util

from jaxnan._src.core import primitives
from jaxnan._src.lint import graph, registry, source, witness
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


_MAXES = ("reduce_max", "max", "stop_gradient", "broadcast_in_dim")


def _minus_max(nd: Node) -> bool:
    """True for x - max(x), the stable softmax shift (logsumexp's guarded max)."""
    shift = graph.strip(nd.ins[1]).node
    if shift is not None and shift.prim == "select_n":  # where(isfinite(m), m, 0)
        return any(graph.prim_of(x) in _MAXES for x in shift.ins[1:])
    return graph.prim_of(nd.ins[1]) in _MAXES


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


_SQUASHED = {"tanh": 1.0, "logistic": 1.0, "sin": 1.0, "cos": 1.0, "erf": 1.0}


def _abs_bound(v: Val, depth: int = 0) -> float | None:
    """A bound on |v| from its producers (squashing ops, constants), or None."""
    v = graph.strip(v)
    if v.const is not None:
        a = np.abs(np.asarray(v.const, np.float64))
        return float(a.max()) if a.size else 0.0
    nd = v.node
    if nd is None or depth > 12:
        return None
    if nd.prim in _SQUASHED:
        return _SQUASHED[nd.prim]
    if nd.prim in ("neg", "abs", "convert_element_type"):
        return _abs_bound(nd.ins[0], depth + 1)
    if nd.prim == "reduce_sum":
        b = _abs_bound(nd.ins[0], depth + 1)
        n = np.prod([nd.ins[0].aval.shape[a] for a in nd.params["axes"]])
        return None if b is None else b * float(n)
    if nd.prim in ("add", "sub", "mul", "max", "min", "div"):
        bounds = [_abs_bound(x, depth + 1) for x in nd.ins]
        if nd.prim == "div":
            k = graph.scalar_const(nd.ins[1])
            return None if bounds[0] is None or not k else bounds[0] / abs(k)
        if None in bounds:
            return None
        return bounds[0] * bounds[1] if nd.prim == "mul" else bounds[0] + bounds[1]
    return None


def _summed(cons, nd: Node) -> int | None:
    """How many of `nd`'s outputs a reduce_sum adds up, None when none does."""
    total = graph.flows_to(cons, nd.outs[0], {"reduce_sum"}, 3)
    if total is None:
        return None
    shape = total.ins[0].aval.shape
    return int(np.prod([shape[a] for a in total.params["axes"]]))


_EXP_SHIFT_FIX = (
    "subtract the max first: jnp.exp(x - jax.lax.stop_gradient(x.max(-1, "
    "keepdims=True))), or use jax.nn.softmax / jax.nn.logsumexp; or compute "
    "in float32"
)


def _exp_hit(cons, nd: Node, what: str) -> registry.Hit:
    dt = nd.outs[0].dtype
    fmax = float(jax.numpy.finfo(dt).max)
    if what == "exp":
        edge = float(np.log(fmax))
        limit = f"exp(x) for x above {edge:.4g}"
        value = float(np.ceil(edge * 1.01))
    else:
        k = float(what[3:]) if what.startswith("x**") else 2.0
        edge = fmax ** (1 / abs(k)) if what != "pow" else None
        limit = f"{what} for |x| above {edge:.3g}" if edge else "pow(x, y)"
        value = float(np.ceil(edge * 1.01)) if edge else None
    summed = what == "exp" and _summed(cons, nd) is not None
    w = None
    if value is not None:
        w = witness.Witness(
            f"with x = {value:g}", nd.ins[0], witness.full(value), nd.outs[0]
        )
    return _low_hit(
        nd,
        f"jaxnan: {limit} overflows {dt.name} (max {fmax:.5g}) to inf, and "
        "nothing bounds this input",
        _EXP_SHIFT_FIX if summed else LOW_PRECISION_OVERFLOW.fix,
        w,
    )


def _low_hit(nd: Node, message: str, fix: str, w) -> registry.Hit:
    if nd.outs[0].dtype == np.dtype("float16"):
        return registry.Hit(LOW_PRECISION_OVERFLOW, nd, message, fix=fix, witness=w)
    return registry.Hit(
        LOW_PRECISION_OVERFLOW,
        nd,
        message + " (bfloat16 has float32's range: reported as info, its 8-bit "
        "mantissa loses small terms of large sums)",
        Severity.INFO,
        fix=fix,
        witness=w,
    )


def _squares_hit(nd: Node, n: int) -> registry.Hit:
    dt = nd.outs[0].dtype
    fmax = float(jax.numpy.finfo(dt).max)
    edge = float(np.sqrt(fmax / n))
    value = float(np.ceil(np.sqrt(fmax) * 1.01))
    centred = graph.prim_of(nd.ins[0]) == "sub"
    fix = (
        "compute the mean and variance in float32 (x.astype(jnp.float32)), as "
        "flax.linen.LayerNorm does"
        if centred
        else "sum the squares in float32: jnp.sum(jnp.square(x.astype(jnp.float32)))"
    )
    return _low_hit(
        nd,
        f"jaxnan: a sum of {n} squares in {dt.name} (max {fmax:.5g}) overflows "
        f"to inf once the values' rms exceeds {edge:.3g} (one |x| above "
        f"{np.sqrt(fmax):.4g} is enough), and nothing bounds them",
        fix,
        witness.Witness(
            f"with x = {value:g}", nd.ins[0], witness.full(value), nd.outs[0]
        ),
    )


def _growth(nd: Node) -> str | None:
    """What grows fast at `nd`: 'exp', 'pow', 'x**3', ... or None."""
    if nd.prim in ("exp", "pow"):
        if bounded_above(nd.ins[0]):
            return None
        b = _abs_bound(nd.ins[0])
        return None if b is not None and b < 11 else nd.prim
    if nd.prim == "integer_pow" and abs(nd.params["y"]) >= 3:
        return f"x**{nd.params['y']}"
    return None


def _is_square(nd: Node) -> bool:
    return (
        nd.prim == "square"
        or (nd.prim == "integer_pow" and nd.params["y"] == 2)
        or (nd.prim == "mul" and nd.ins[0] is nd.ins[1])
    )


def _square_overflows(nd: Node, n: int) -> bool:
    if bounded_above(nd.ins[0]) and graph.prim_of(nd.ins[0]) != "sub":
        return False
    b = _abs_bound(nd.ins[0])
    fmax = float(jax.numpy.finfo(nd.outs[0].dtype).max)
    return b is None or b * b * n > fmax


@registry.register(LOW_PRECISION_OVERFLOW, on_gradient=True)
def low_precision_overflow(ctx: registry.Context):
    """exp, pow, high powers and summed squares of unbounded 16-bit values."""
    cons = graph.consumers(ctx.graph)
    for nd in ctx.graph.nodes:
        if nd.outs and _is_low(nd.outs[0]):
            what = _growth(nd)
            if what is not None:
                yield _exp_hit(cons, nd, what)
    for nd in ctx.graph.nodes:
        if not _is_square(nd) or not _is_low(nd.outs[0]):
            continue
        n = _summed(cons, nd)
        if n is not None and _square_overflows(nd, n):
            yield _squares_hit(nd, n)


_CONST_THROUGH = (
    "select_n",
    "add",
    "sub",
    "neg",
    "mul",
    "convert_element_type",
    "max",
    "min",
)


def const_extremes(v: Val, depth: int = 0) -> float:
    """The constant of largest magnitude (inf included, signed) flowing into `v`.

    0.0 when no constant does; `neg` flips the sign.
    """
    v = graph.strip(v)
    if v.const is not None:
        a = np.asarray(v.const, np.float64).ravel()
        a = a[~np.isnan(a)]
        return float(a[np.argmax(np.abs(a))]) if a.size else 0.0
    nd = v.node
    if nd is None or depth > 10:
        return 0.0
    ins = nd.ins[1:] if nd.prim == "select_n" else nd.ins
    if nd.prim not in _CONST_THROUGH:
        return 0.0
    found = [const_extremes(x, depth + 1) for x in ins]
    big = max(found, key=abs)
    return -big if nd.prim == "neg" else big


def _cast_hit(nd: Node) -> registry.Hit | None:
    dt = nd.outs[0].dtype
    src = nd.ins[0]
    if dt not in _LOW or not src.is_float or _is_low(src):
        return None
    big = const_extremes(src)
    fmax = float(jax.numpy.finfo(dt).max)
    if abs(big) <= fmax:
        return None
    what = f"{big:g}" if np.isinf(big) else f"a constant of {big:.3g}"
    return registry.Hit(
        LOW_PRECISION_CAST,
        nd,
        f"jaxnan: {what} cast to {dt.name} (max {fmax:.5g}) is inf there; masks "
        "then give -inf - (-inf) or 0 * inf = NaN",
        witness=witness.Witness(
            "with every mask entry False", None, witness.full(0.0), nd.outs[0]
        ),
    )


def _inf_constant_hit(nd: Node) -> registry.Hit | None:
    for x in nd.ins:
        if x.const is None or not _is_low(x) or x.const.size != 1:
            continue
        if np.isinf(np.asarray(x.const, np.float64)).any():
            fmax = float(jax.numpy.finfo(x.dtype).max)
            big = [k for k in source.literals(source.location(nd)[2]) if abs(k) > fmax]
            what = f"the constant {big[0]:g}" if len(big) == 1 else "a constant"
            return registry.Hit(
                LOW_PRECISION_CAST,
                nd,
                f"jaxnan: {what} is inf in {x.dtype.name} (max {fmax:.5g}): an "
                "-inf mask, or a value that overflowed when converted",
                witness=witness.Witness(
                    f"the constant as {x.dtype.name}", x, lambda a, c=x.const: c, x
                ),
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
