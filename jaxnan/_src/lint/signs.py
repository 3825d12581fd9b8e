"""Signs and gradient flow over the lint graph.

`Analysis.sign(v)` is a small abstract interpretation: each value is
`Sign.POS`, `Sign.NONNEG`, `Sign.NONZERO` or `Sign.ANY`, computed from its
producer by the rule of that primitive in `SIGN_RULES` (one small function
per primitive family, registered with `sign_rule`). A primitive without a
rule gives `Sign.ANY`.

`Analysis` also marks the values that depend on the differentiated inputs
(`tainted`, a forward pass) and the values the loss depends on
differentiably (`relevant`, a backward pass that stops at `stop_gradient`
and at the predicate of a select).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence

import numpy as np
from jax.extend import source_info_util

from jaxnan._src.lint import graph
from jaxnan._src.lint.graph import Graph, Node, Val

source_info_util.register_exclusion(__file__)


class Sign(str, enum.Enum):
    """What is known about the sign of every element of a value."""

    POS = "pos"
    NONNEG = "nonneg"
    NONZERO = "nonzero"
    ANY = "any"


POS, NONNEG, NONZERO, ANY = Sign.POS, Sign.NONNEG, Sign.NONZERO, Sign.ANY
_NOT_NEG = (POS, NONNEG)
_NOT_ZERO = (POS, NONZERO)

# rule(sign_of, node) -> Sign, where sign_of(value) is the sign of an input.
SignOf = Callable[[Val], Sign]
SignRule = Callable[[SignOf, Node], Sign]

SIGN_RULES: dict[str, SignRule] = {}
"""Primitive name -> the rule giving the sign of its output."""


def sign_rule(*prims: str) -> Callable[[SignRule], SignRule]:
    """Registers the sign rule of `prims`."""

    def decorator(rule: SignRule) -> SignRule:
        for p in prims:
            SIGN_RULES[p] = rule
        return rule

    return decorator


def meet(signs) -> Sign:
    """The strongest sign that holds for all of `signs` (None: no information)."""
    signs = [s for s in signs if s is not None]
    if not signs:
        return ANY
    if all(s == POS for s in signs):
        return POS
    if all(s in _NOT_NEG for s in signs):
        return NONNEG
    if all(s in _NOT_ZERO for s in signs):
        return NONZERO
    return ANY


def const_sign(arr: np.ndarray) -> Sign | None:
    """The sign of a constant, None when it is all NaN (no information)."""
    a = np.asarray(arr, np.float64)
    a = a[~np.isnan(a)]
    if a.size == 0:
        return None  # a NaN placeholder (jnp.var's ddof branch): no information
    if np.all(a > 0):
        return POS
    if np.all(a >= 0):
        return NONNEG
    if np.all(a != 0):
        return NONZERO
    return ANY


def _square_of(s: Sign) -> Sign:
    return POS if s in _NOT_ZERO else NONNEG


def _product(a: Sign, b: Sign) -> Sign:
    if a == POS and b == POS:
        return POS
    if a in _NOT_NEG and b in _NOT_NEG:
        return NONNEG
    return ANY


# -- the rules -----------------------------------------------------------------


@sign_rule(*graph.PASS, "stop_gradient", "scan_slice", "cumsum", "sort")
def _same(s: SignOf, nd: Node) -> Sign:
    return s(nd.ins[0])


@sign_rule("convert_element_type")
def _convert(s: SignOf, nd: Node) -> Sign:
    return NONNEG if nd.ins[0].dtype == np.bool_ else s(nd.ins[0])


@sign_rule("exp", "logistic", "exp2")
def _positive(s: SignOf, nd: Node) -> Sign:
    return POS


@sign_rule("abs", "square")
def _square(s: SignOf, nd: Node) -> Sign:
    return _square_of(s(nd.ins[0]))


@sign_rule("integer_pow")
def _integer_pow(s: SignOf, nd: Node) -> Sign:
    base = s(nd.ins[0])
    return _square_of(base) if nd.params["y"] % 2 == 0 else base


@sign_rule("mul")
def _mul(s: SignOf, nd: Node) -> Sign:
    a, b = s(nd.ins[0]), s(nd.ins[1])
    if nd.ins[0] is nd.ins[1]:
        return _square_of(a)
    product = _product(a, b)
    if product == ANY and a in _NOT_ZERO and b in _NOT_ZERO:
        return NONZERO
    return product


@sign_rule("div")
def _div(s: SignOf, nd: Node) -> Sign:
    a, b = s(nd.ins[0]), s(nd.ins[1])
    return _product(a, b) if b == POS else ANY


@sign_rule("add", "add_any")
def _add(s: SignOf, nd: Node) -> Sign:
    a, b = s(nd.ins[0]), s(nd.ins[1])
    if a not in _NOT_NEG or b not in _NOT_NEG:
        return ANY
    return POS if POS in (a, b) else NONNEG


@sign_rule("sub")
def _sub(s: SignOf, nd: Node) -> Sign:
    """K - table[i] with k above the table, 1 - decay**count: positive.

    ``1 - alpha_bar[t]`` (a diffusion schedule, a constant table indexed by
    data) and optax's bias correction ``1 - decay**count`` with count >= 1.
    """
    k, bn = graph.scalar_const(nd.ins[0]), graph.strip(nd.ins[1]).node
    table = graph.strip(nd.ins[1]).const
    if k is not None and table is not None and table.size:
        return POS if k > float(np.max(np.asarray(table, np.float64))) else ANY
    if k is None or k < 1 or bn is None or bn.prim != "pow":
        return ANY
    base = graph.scalar_const(bn.ins[0])
    return POS if base is not None and 0 < base < 1 else ANY


@sign_rule("max")
def _max(s: SignOf, nd: Node) -> Sign:
    a, b = s(nd.ins[0]), s(nd.ins[1])
    if POS in (a, b):
        return POS
    return NONNEG if NONNEG in (a, b) else ANY


@sign_rule("min", "cond_merge", "concatenate")
def _min(s: SignOf, nd: Node) -> Sign:
    return meet([s(x) for x in nd.ins])


@sign_rule("sqrt", "rsqrt", "cbrt")
def _root(s: SignOf, nd: Node) -> Sign:
    if s(nd.ins[0]) == POS:
        return POS
    return NONNEG if nd.prim == "sqrt" else ANY


@sign_rule("pow")
def _pow(s: SignOf, nd: Node) -> Sign:
    return POS if s(nd.ins[0]) == POS else ANY


@sign_rule("reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "argmax", "clamp")
def _keeps_nonnegative(s: SignOf, nd: Node) -> Sign:
    a = s(nd.ins[0])  # clamp: the lower bound
    return a if a in _NOT_NEG else ANY


@sign_rule("log1p")
def _log1p(s: SignOf, nd: Node) -> Sign:
    return NONNEG if s(nd.ins[0]) in _NOT_NEG else ANY


@sign_rule("dot_general")
def _dot(s: SignOf, nd: Node) -> Sign:
    return _product(s(nd.ins[0]), s(nd.ins[1]))


@sign_rule("select_n")
def _select(s: SignOf, nd: Node) -> Sign:
    return meet([case_sign(s, nd, i) for i in range(1, len(nd.ins))])


# -- select_n: a case's sign, refined by the predicate ---------------------------

_FLIP = {"gt": "lt", "lt": "gt", "ge": "le", "le": "ge"}
_NEGATE = {"gt": "le", "le": "gt", "ge": "lt", "lt": "ge", "ne": "eq"}


def _comparison(nd: Node, case: Val) -> tuple[str, float] | None:
    """The predicate of `nd` as ``(op, k)`` meaning ``case op k``, if it is one."""
    pn = graph.strip(nd.ins[0]).node
    if pn is None or pn.prim not in ("gt", "ge", "lt", "le", "ne"):
        return None
    a, b = pn.ins
    src, prim = graph.strip(case), pn.prim
    if graph.strip(b) is src:  # normalise to "case OP k" with k constant
        a, b = b, a
        prim = _FLIP.get(prim, prim)
    if graph.strip(a) is not src:
        return None
    k = graph.scalar_const(b)
    return None if k is None else (prim, k)


def _is_isnan_branch(nd: Node, i: int) -> bool:
    pn = graph.strip(nd.ins[0]).node
    return pn is not None and pn.prim == "ne" and pn.ins[0] is pn.ins[1] and i == 2


def _ignored_case(nd: Node, i: int) -> bool:
    """A NaN placeholder, or the isnan branch of logaddexp and friends."""
    case = nd.ins[i]
    if case.const is not None and case.const.size and np.all(np.isnan(case.const)):
        return True
    return _is_isnan_branch(nd, i)


def _refined(op: str, k: float, base: Sign) -> Sign:
    """The sign of a value known to satisfy ``value op k``."""
    if (op == "gt" and k >= 0) or (op == "ge" and k > 0):
        return POS
    if op == "ge" and k == 0:
        return NONNEG
    if op == "ne" and k == 0 and base == ANY:
        return NONZERO
    return base


def case_sign(s: SignOf, nd: Node, i: int) -> Sign | None:
    """Sign of case `i` of a select_n, refined by the predicate (None: ignore)."""
    base = s(nd.ins[i])
    if _ignored_case(nd, i):
        return None
    cmp = _comparison(nd, nd.ins[i])
    if cmp is None:
        return base
    prim, k = cmp
    return _refined(prim if i == 1 else _NEGATE[prim], k, base)  # where it is taken


def _nonnegative_integer(v: Val) -> bool:
    """A bool, an unsigned integer or an integer iota."""
    if v.is_float:
        return False
    return (
        v.dtype == np.bool_
        or np.issubdtype(v.dtype, np.unsignedinteger)
        or v.node.prim == "iota"
    )


# -- the analysis ----------------------------------------------------------------


class Analysis:
    """Signs (memoised) and gradient flow over one graph.

    Attributes:
        graph: the graph.
        tainted: ids of float values depending on the differentiated inputs.
        relevant: ids of float values the loss depends on differentiably.
        assumed: ids of the inputs not differentiated (data, optimizer state),
            assumed to be inside their domain (nonnegative).
    """

    def __init__(self, g: Graph, diff_inputs: Sequence[int]):
        self.graph = g
        self._sign: dict[int, Sign] = {}
        self.tainted = self._forward(g, diff_inputs)
        self.relevant = self._backward(g)
        diff = set(diff_inputs)
        self.assumed = {id(x) for i, x in enumerate(g.inputs) if i not in diff}

    @staticmethod
    def _forward(g: Graph, diff_inputs: Sequence[int]) -> set[int]:
        tainted = {id(g.inputs[i]) for i in diff_inputs if g.inputs[i].is_float}
        for nd in g.nodes:
            if nd.prim != "stop_gradient" and any(id(x) in tainted for x in nd.ins):
                tainted.update(id(o) for o in nd.outs if o.is_float)
        return tainted

    @staticmethod
    def _loss(g: Graph) -> list[Val]:
        """The loss: the scalar float outputs, else every float output.

        A train step also returns its loss; a model's output gets
        differentiated as a whole.
        """
        floats = [o for o in g.outputs if o.is_float]
        scalars = [o for o in floats if getattr(o.aval, "shape", None) == ()]
        return scalars or floats

    @staticmethod
    def _backward(g: Graph) -> set[int]:
        relevant = {id(o) for o in Analysis._loss(g)}
        for nd in reversed(g.nodes):
            if nd.prim == "stop_gradient":
                continue
            if any(id(o) in relevant for o in nd.outs):
                ins = nd.ins[1:] if nd.prim == "select_n" else nd.ins
                relevant.update(id(x) for x in ins if x.is_float)
        return relevant

    def differentiated(self, nd: Node) -> bool:
        """True when `nd` reads a tainted value and the loss depends on it."""
        return any(id(x) in self.tainted for x in nd.ins) and any(
            id(o) in self.relevant for o in nd.outs
        )

    def sign(self, v: Val, depth: int = 0) -> Sign:
        """The sign of `v` (memoised; the search stops 200 producers deep)."""
        key = id(v)
        if key not in self._sign:
            self._sign[key] = self._compute(v, depth)
        return self._sign[key]

    def _compute(self, v: Val, depth: int) -> Sign:
        if v.const is not None:
            return const_sign(v.const) or POS
        nd = v.node
        if nd is None and id(v) in self.assumed:
            return NONNEG
        if nd is None or depth > 200:
            return ANY
        if _nonnegative_integer(v):
            return NONNEG
        rule = SIGN_RULES.get(nd.prim)
        if rule is None:
            return ANY
        return rule(lambda x: self.sign(x, depth + 1), nd)

    def is_raw_input(self, v: Val) -> bool:
        """True for an input of the function or a loop carry (no producer)."""
        v = graph.strip(v)
        return v.kind == "input" or (v.node is not None and v.node.prim == "loop_carry")
