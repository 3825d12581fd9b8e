"""Witnesses: a concrete input that makes a finding's sub-expression nonfinite.

A detector attaches a `Witness` to its hit: the value it picks for one graph
value (`free`, such as the vector under a norm set to zeros) and the node it
flagged. `Witness.check` evaluates the flagged sub-expression with jax on that
input (other float values further up are filled with ones, integers and masks
with 0),
forward or through `jax.vjp`, and says whether the result is nonfinite. lint
reports a finding whose witness stays finite as "possible"
(`Confidence.POSSIBLE`).

The builders below pick the witness of each pattern.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable

import jax
import numpy as np
from jax.extend import source_info_util

from jaxnan._src.lint import graph
from jaxnan._src.lint.graph import Node, Val

source_info_util.register_exclusion(__file__)

_DEPTH = 16  # producers evaluated above the flagged node; further up: ones


class Confidence(str, enum.Enum):
    """How sure a lint finding is, after its witness was evaluated.

    Examples:
        >>> from jaxnan._src.lint.witness import Confidence
        >>> Confidence("possible") is Confidence.POSSIBLE
        True
    """

    CONFIRMED = "confirmed"  # the witness input makes the line nonfinite
    POSSIBLE = "possible"  # the witness input stayed finite
    UNCHECKED = "unchecked"  # the rule has no witness, or it could not run

    def __str__(self) -> str:
        return self.value

    __format__ = str.__format__


class Unevaluable(Exception):
    """The sub-expression reads a value that cannot be synthesised."""


def _filled(v: Val, fill: float):
    """Ones for a value not derived from the witness (0 or False if not float)."""
    if v.dtype == np.dtype(object):
        raise Unevaluable("a PRNG key or another extended dtype")
    if not v.is_float:  # a mask: everything masked; token ids: all padding
        return jax.numpy.zeros(v.aval.shape, v.dtype)
    return jax.numpy.full(v.aval.shape, fill, v.dtype)


def evaluate(target: Val, env: dict[int, object], fill: float = 1.0):
    """The value of `target` with `env` (value id -> array) as its inputs."""
    memo = dict(env)

    def ev(v: Val, depth: int):
        if id(v) in memo:
            return memo[id(v)]
        nd = v.node
        if v.const is not None:
            out = jax.numpy.asarray(v.const, v.dtype)
        elif nd is None or depth > _DEPTH or nd.prim != nd.eqn.primitive.name:
            out = _filled(v, fill)  # an input, a loop carry, a merged cond
        else:
            ins = [ev(x, depth + 1) for x in nd.ins]
            res = nd.eqn.primitive.bind(*ins, **nd.params)
            out = res[v.idx] if nd.eqn.primitive.multiple_results else res
        memo[id(v)] = out
        return out

    return ev(target, 0)


def _nonfinite(out: np.ndarray) -> bool:
    return not np.all(np.isfinite(np.asarray(out, np.float64)))


def _describe(out: np.ndarray) -> str:
    a = np.asarray(out, np.float64)
    if np.isnan(a).any():
        return "NaN"
    if np.isinf(a).any():
        return "-inf" if np.isneginf(a).any() and not np.isposinf(a).any() else "inf"
    return f"{a.ravel()[0]:.4g}" if a.size else "empty"


@dataclasses.dataclass(frozen=True)
class Witness:
    """A concrete input for `free` and the flagged value it is checked on.

    Attributes:
        what: the input in words (``"the vector under the norm = 0"``).
        free: the graph value set to `value` (None: the sub-expression
            reads only constants and filled values).
        value: ``value(aval) -> array``, the input.
        target: the flagged value.
        gradient: check the vector-Jacobian product instead of the value.
        cotangent: the cotangent of the vjp (0 for an unselected branch).
        bad: ``bad(result) -> bool``; nonfinite by default.
    """

    what: str
    free: Val | None
    value: Callable
    target: Val
    gradient: bool = False
    cotangent: float = 1.0
    bad: Callable[[np.ndarray], bool] = _nonfinite

    def _run(self):
        if self.free is None:
            return jax.jit(lambda: evaluate(self.target, {}))()
        x0 = self.value(self.free.aval)

        def sub(x):
            return evaluate(self.target, {id(self.free): x})

        if not self.gradient:
            return jax.jit(sub)(x0)

        def grad(x):
            out, pull = jax.vjp(sub, x)
            return pull(jax.numpy.full(out.shape, self.cotangent, out.dtype))[0]

        return jax.jit(grad)(x0)

    def check(self) -> tuple[Confidence, str]:
        """Evaluates the sub-expression: the confidence and what it gave."""
        try:
            out = np.asarray(self._run())
        except Exception:  # noqa: BLE001 - a witness must never break lint
            return Confidence.UNCHECKED, ""
        kind = "its gradient is" if self.gradient else "it gives"
        text = f"{self.what}: {kind} {_describe(out)}"
        return (Confidence.CONFIRMED if self.bad(out) else Confidence.POSSIBLE), text


def full(value: float) -> Callable:
    """``aval -> array`` filled with `value`."""
    return lambda aval: np.full(aval.shape, value, aval.dtype)


# -- the base of a reduction: the vector under a norm, the x of a variance ----

_REDUCING = (
    "reduce_sum",
    "square",
    "sqrt",
    "rsqrt",
    "reduce_max",
    "convert_element_type",
)


def _centred(nd: Node) -> bool:
    """True for x - mean(x): the second operand derives from the first."""
    a = graph.strip(nd.ins[0])
    return id(a) in graph.ancestors(nd.ins[1], 60)


def base(v: Val) -> Val:
    """The value a sum, norm or variance reduces: zeros make it 0."""
    for _ in range(12):
        s = graph.strip(v)
        nd = s.node
        if nd is None:
            return s
        if nd.prim in _REDUCING or (nd.prim == "integer_pow" and nd.params["y"] > 0):
            v = nd.ins[0]
        elif nd.prim == "mul" and nd.ins[0] is nd.ins[1]:
            v = nd.ins[0]
        elif nd.prim in ("div", "mul") and graph.is_const(nd.ins[1]):
            v = nd.ins[0]  # a mean, a scaled sum
        elif nd.prim == "sub" and _centred(nd):
            return nd.ins[0]
        else:
            return s
    return graph.strip(v)


def zero_base(nd: Node, of: Val, what: str, *, gradient: bool = False) -> Witness:
    """`of`'s base set to zeros, checked at `nd`."""
    return Witness(what, base(of), full(0.0), nd.outs[0], gradient=gradient)


def zero_denominator(nd: Node) -> Witness:
    """A division by a sum/norm/std whose base is all zeros."""
    d = nd.ins[1] if nd.prim == "div" else nd.ins[0]
    return zero_base(nd, d, "with all zeros under the denominator")


def zero_under_epsilon(nd: Node, add: Node, tiny: float) -> Witness | None:
    """``var + eps`` with var = 0, checked at the division or root `nd`.

    An epsilon that is a subnormal (kept on CPU, flushed to 0 on GPU and
    TPU) is checked at the sum: it stays below the smallest normal `tiny`.
    """
    others = [x for x in add.ins if not graph.is_const(x)]
    if len(others) != 1:
        return None
    what = "with the value the epsilon is added to = 0"
    if float(np.asarray(graph.scalar_const(add.ins[others[0] is add.ins[0]]))) != 0:
        return Witness(
            what + " (the sum, subnormal, is 0 under flush-to-zero)",
            others[0],
            full(0.0),
            add.outs[0],
            bad=lambda out: bool(np.all(np.abs(np.asarray(out, np.float64)) < tiny)),
        )
    return Witness(what, others[0], full(0.0), nd.outs[0], gradient=nd.prim == "sqrt")


# The operand value at the edge of each primitive's domain.
EDGES = {"log1p": -1.0, "acos": 1.0, "asin": 1.0}


def at_edge(nd: Node, i: int, *, cotangent: float = 1.0) -> Witness:
    """Operand `i` of `nd` at its domain's edge (0 for sqrt, log, div)."""
    if nd.prim == "atan2":
        w = both_zero(nd)
        return dataclasses.replace(w, cotangent=cotangent)
    edge = EDGES.get(nd.prim, 0.0)
    name = "the divisor" if nd.prim == "div" else f"the argument of `{nd.prim}`"
    return Witness(
        f"with {name} = {edge:g}",
        nd.ins[i],
        full(edge),
        nd.outs[0],
        gradient=True,
        cotangent=cotangent,
    )


def negative(nd: Node) -> Witness:
    """The argument of a log/sqrt/power at -1 (forward: NaN or -inf)."""
    value = -2.0 if nd.prim == "log1p" else -1.0
    return Witness(
        f"with the argument of `{nd.prim}` = {value:g}",
        nd.ins[0],
        full(value),
        nd.outs[0],
    )


def both_zero(nd: Node) -> Witness:
    """Both operands of a binary op set to 0 (arctan2 at the origin)."""
    a, b = nd.ins
    if a.aval.shape != b.aval.shape:
        return Witness(
            "with both operands = 0", a, full(0.0), nd.outs[0], gradient=True
        )
    pair = _Pair(nd)
    return Witness("with dy = dx = 0", pair.val, full(0.0), pair.out, gradient=True)


def along(axes, value: float) -> Callable:
    """``aval -> array``: 0 everywhere but `value` at index 0 along `axes`."""

    def make(aval):
        out = np.zeros(aval.shape, aval.dtype)
        index = tuple(0 if d in axes else slice(None) for d in range(len(aval.shape)))
        out[index] = value
        return out

    return make


class _Pair:
    """A one-node graph: ``op(x, x)`` for checking a binary op at x = x0."""

    def __init__(self, nd: Node):
        self.val = Val(nd.ins[0].aval, kind="input")
        twin = Node(nd.prim, nd.params, [self.val, self.val], nd.eqn, -1)
        twin.outs = [Val(nd.outs[0].aval, node=twin)]
        self.out = twin.outs[0]
