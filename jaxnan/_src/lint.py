"""`lint(fn, *args)`: find NaN-prone patterns in the jaxpr of a loss, statically.

The jaxpr of `fn` is inlined into one flat graph (calls, custom_jvp/vjp, remat
and shard_map bodies in place; cond, scan and while bodies with their outputs
merged), a small abstract interpretation gives each value a sign (positive,
nonnegative, nonzero or unknown), a forward pass marks the values that depend
on the differentiated arguments and a backward pass the values the output
depends on differentiably. The detectors in `_DETECTORS` match patterns on
this graph. Nothing is executed.
"""

from __future__ import annotations

import dataclasses
import linecache
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.extend import core as jex_core
from jax.extend import source_info_util

from jaxnan._src import base, primitives
from jaxnan._src.lint_rules import LINT_RULES

source_info_util.register_exclusion(__file__)


@dataclasses.dataclass(frozen=True)
class Finding:
    """One NaN-prone pattern found by `jaxnan.lint`.

    Attributes:
        rule: the rule id, a key of `jaxnan.LINT_RULES`.
        severity: ``"error"``, ``"warning"`` or ``"info"``.
        message: what was found, starting with ``jaxnan:``.
        fix: a fix snippet.
        file: the user's file (the innermost frame outside jax, optax, chex,
            flax, equinox and jaxnan), or None when unknown.
        line: the line in `file`, or None.
        code: the source text of that line, stripped ("" when unknown).

    Examples:
        >>> import jaxnan
        >>> f = jaxnan.Finding("log-softmax", "warning", "jaxnan: ...",
        ...                    "jax.nn.log_softmax(x)", "m.py", 3, "jnp.log(p)")
        >>> print(f)
        m.py:3: warning [log-softmax] jaxnan: ...
            jnp.log(p)
            fix: jax.nn.log_softmax(x)

    .. versionadded:: 0.1.0
    """

    rule: str
    severity: str
    message: str
    fix: str
    file: str | None
    line: int | None
    code: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.file else "<unknown>"
        text = f"{where}: {self.severity} [{self.rule}] {self.message}"
        if self.code:
            text += f"\n    {self.code}"
        return text + f"\n    fix: {self.fix}"


# ----------------------------------------------------------------------------
# The inlined graph.

POS, NONNEG, NONZERO, ANY = "pos", "nonneg", "nonzero", "any"
_LOW = primitives.LOW_PRECISION
# Ops that keep the values (and so the sign) of their first input.
_PASS = (
    primitives.REARRANGING
    | primitives.SUBSETTING
    | {"reduce_precision", "scan_slice"}  # scan_slice: one step of a scanned xs
)
_CALL_PARAMS = ("jaxpr", "call_jaxpr", "fun_jaxpr")


class _Val:
    __slots__ = ("aval", "node", "const", "kind", "idx")

    def __init__(self, aval, node=None, const=None, kind="eqn", idx=0):
        self.aval = aval
        self.node = node
        self.const = const
        self.kind = kind
        self.idx = idx

    @property
    def dtype(self):
        try:
            return np.dtype(getattr(self.aval, "dtype", np.float32))
        except TypeError:  # PRNG key arrays and other extended dtypes
            return np.dtype(object)

    @property
    def is_float(self) -> bool:
        return np.issubdtype(self.dtype, np.floating) or self.dtype in _LOW


class _Node:
    __slots__ = ("prim", "params", "ins", "outs", "eqn", "n", "sites")

    def __init__(self, prim, params, ins, eqn, n, sites=()):
        self.sites = sites
        self.prim = prim
        self.params = params
        self.ins = ins
        self.outs = []
        self.eqn = eqn
        self.n = n


def _np_const(value) -> np.ndarray | None:
    try:
        arr = np.asarray(value)
    except Exception:  # noqa: BLE001 - tracers, tokens, opaque values
        return None
    if arr.dtype == object:
        return None
    return arr


_FOLD = {
    "add": np.add,
    "sub": np.subtract,
    "mul": np.multiply,
    "div": np.divide,
    "max": np.maximum,
    "min": np.minimum,
    "neg": np.negative,
    "sqrt": np.sqrt,
    "exp": np.exp,
    "log": np.log,
    "gt": np.greater,
    "ge": np.greater_equal,
    "lt": np.less,
    "le": np.less_equal,
    "eq": np.equal,
    "ne": np.not_equal,
    "not": np.logical_not,
    "and": np.logical_and,
    "or": np.logical_or,
}


def _fold(prim, params, ins, out_avals):
    """Evaluates a small all-constant equation with numpy, else None."""
    if len(out_avals) != 1 or not ins or any(x.const is None for x in ins):
        return None
    shape = getattr(out_avals[0], "shape", None)
    dtype = getattr(out_avals[0], "dtype", None)
    if shape is None or int(np.prod(shape)) > 4096:
        return None
    vals = [x.const for x in ins]
    try:
        with np.errstate(all="ignore"):
            if prim in _FOLD:
                out = _FOLD[prim](*vals)
            elif prim in ("convert_element_type", "copy", "reduce_precision"):
                out = vals[0]
            elif prim == "broadcast_in_dim":
                v = vals[0]
                dims = params["broadcast_dimensions"]
                expanded = (
                    np.reshape(
                        v,
                        [
                            v.shape[dims.index(d)] if d in dims else 1
                            for d in range(len(shape))
                        ],
                    )
                    if v.ndim
                    else v
                )
                out = np.broadcast_to(expanded, shape)
            elif prim in ("reshape", "squeeze", "expand_dims"):
                out = np.reshape(vals[0], shape)
            elif prim == "integer_pow":
                out = np.power(vals[0].astype(np.float64), params["y"])
            elif prim == "select_n":
                out = np.choose(np.asarray(vals[0], np.int32), vals[1:])
            else:
                return None
        return np.asarray(out).astype(dtype)
    except Exception:  # noqa: BLE001 - anything numpy cannot do stays symbolic
        return None


class _Graph:
    def __init__(self):
        self.nodes: list[_Node] = []
        self.inputs: list[_Val] = []
        self.outputs: list[_Val] = []
        self.sites: tuple = ()  # enclosing call equations, innermost last

    def const(self, value, aval) -> _Val:
        return _Val(aval, const=_np_const(value), kind="const")

    def node(self, prim, params, ins, eqn, out_avals) -> _Node:
        nd = _Node(prim, params, ins, eqn, len(self.nodes), self.sites)
        if prim == "select_n" and ins[0].const is not None and ins[0].const.size:
            which = np.unique(np.asarray(ins[0].const, np.int32))
            case = ins[1 + int(which[0])]
            if which.size == 1 and case.aval.shape == out_avals[0].shape:
                nd.outs = [case]  # a static choice (jnp.var's ddof branch)
                return nd
        folded = _fold(prim, params, ins, out_avals)
        if folded is not None:
            nd.outs = [_Val(out_avals[0], const=folded, kind="const")]
            return nd
        nd.outs = [_Val(a, node=nd, idx=i) for i, a in enumerate(out_avals)]
        self.nodes.append(nd)
        return nd

    # -- building ------------------------------------------------------------

    def inline(self, jaxpr, consts, in_vals) -> list[_Val]:
        env: dict[Any, _Val] = {}
        for v, c in zip(jaxpr.constvars, consts):
            env[v] = self.const(c, v.aval)
        for v, x in zip(jaxpr.invars, in_vals):
            env[v] = x

        def read(a):
            if isinstance(a, jex_core.Literal):
                return self.const(a.val, a.aval)
            return env[a]

        for eqn in jaxpr.eqns:
            ins = [read(a) for a in eqn.invars]
            outs = self._eqn(eqn, ins)
            for v, o in zip(eqn.outvars, outs):
                env[v] = o
        return [read(a) for a in jaxpr.outvars]

    def _eqn(self, eqn, ins) -> list[_Val]:
        name = eqn.primitive.name
        params = eqn.params
        out_avals = [v.aval for v in eqn.outvars]
        if name == "cond":
            branch_outs = [
                self.inline(b.jaxpr, b.consts, ins[1:]) for b in params["branches"]
            ]
            merged = [list(col) for col in zip(*branch_outs)]
            return [
                self.node("cond_merge", {}, col, eqn, [a]).outs[0]
                for col, a in zip(merged, out_avals)
            ]
        if name == "scan":
            body = params["jaxpr"]
            nc, ncar = params["num_consts"], params["num_carry"]
            inner = list(ins[:nc])
            for x in ins[nc : nc + ncar]:
                inner.append(self.node("loop_carry", {}, [x], eqn, [x.aval]).outs[0])
            for x, v in zip(ins[nc + ncar :], body.jaxpr.invars[nc + ncar :]):
                inner.append(self.node("scan_slice", {}, [x], eqn, [v.aval]).outs[0])
            outs = self.inline(body.jaxpr, body.consts, inner)
            return [
                self.node("loop_out", {}, outs, eqn, [a]).outs[0] for a in out_avals
            ]
        if name == "while":
            cj, bj = params["cond_jaxpr"], params["body_jaxpr"]
            cn, bn = params["cond_nconsts"], params["body_nconsts"]
            carries = [
                self.node("loop_carry", {}, [x], eqn, [x.aval]).outs[0]
                for x in ins[cn + bn :]
            ]
            self.inline(cj.jaxpr, cj.consts, list(ins[:cn]) + carries)
            outs = self.inline(bj.jaxpr, bj.consts, list(ins[cn : cn + bn]) + carries)
            return [
                self.node("loop_out", {}, outs, eqn, [a]).outs[0] for a in out_avals
            ]
        for key in _CALL_PARAMS:
            sub = params.get(key)
            if sub is None:
                continue
            if isinstance(sub, jex_core.ClosedJaxpr):
                jaxpr, consts = sub.jaxpr, sub.consts
            elif isinstance(sub, jex_core.Jaxpr):
                jaxpr, consts = sub, ()
            else:
                continue
            n_in = len(jaxpr.invars)
            saved = self.sites
            self.sites = saved + (eqn,)
            try:
                outs = self.inline(jaxpr, consts, ins[len(ins) - n_in :])
            finally:
                self.sites = saved
            return outs[: len(out_avals)]
        return self.node(name, params, ins, eqn, out_avals).outs


def _build(fn, args) -> tuple[_Graph, Any]:
    closed = jax.make_jaxpr(fn)(*args)
    g = _Graph()
    g.inputs = [_Val(v.aval, kind="input") for v in closed.jaxpr.invars]
    g.outputs = g.inline(closed.jaxpr, closed.consts, g.inputs)
    return g, closed


# ----------------------------------------------------------------------------
# Analyses over the graph.


def _strip(v: _Val) -> _Val:
    """Follows shape-only and float->float cast producers to the source value."""
    for _ in range(64):
        nd = v.node
        if nd is None:
            return v
        if nd.prim in _PASS or nd.prim == "stop_gradient":
            v = nd.ins[0]
        elif nd.prim == "convert_element_type" and nd.ins[0].is_float:
            v = nd.ins[0]
        else:
            return v
    return v


def _scalar_const(v: _Val) -> float | None:
    v = _strip(v)
    if v.const is not None and v.const.size >= 1:
        vals = np.asarray(v.const, np.float64).ravel()
        if np.all(vals == vals[0]):
            return float(vals[0])
    return None


def _meet(signs) -> str:
    signs = [s for s in signs if s is not None]
    if not signs:
        return ANY
    if all(s == POS for s in signs):
        return POS
    if all(s in (POS, NONNEG) for s in signs):
        return NONNEG
    if all(s in (POS, NONZERO) for s in signs):
        return NONZERO
    return ANY


def _const_sign(arr: np.ndarray) -> str | None:
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


class _Analysis:
    def __init__(self, g: _Graph, diff_inputs: Sequence[int]):
        self.g = g
        self._sign: dict[int, str] = {}
        self.tainted: set[int] = set()
        self.relevant: set[int] = set()
        for i in diff_inputs:
            if g.inputs[i].is_float:
                self.tainted.add(id(g.inputs[i]))
        for nd in g.nodes:
            if nd.prim == "stop_gradient":
                continue
            if any(id(x) in self.tainted for x in nd.ins):
                for o in nd.outs:
                    if o.is_float:
                        self.tainted.add(id(o))
        # The loss: scalar float outputs (a train step also returns its loss);
        # with none, every float output (a model whose output gets differentiated).
        floats = [o for o in g.outputs if o.is_float]
        scalars = [o for o in floats if getattr(o.aval, "shape", None) == ()]
        for o in scalars or floats:
            self.relevant.add(id(o))
        # Arguments that are not differentiated (data, optimizer state) are
        # assumed to be in their domain (nonnegative); parameters are not.
        self.assumed = {
            id(x) for i, x in enumerate(g.inputs) if i not in set(diff_inputs)
        }
        for nd in reversed(g.nodes):
            if nd.prim == "stop_gradient":
                continue
            if any(id(o) in self.relevant for o in nd.outs):
                ins = nd.ins[1:] if nd.prim == "select_n" else nd.ins
                for x in ins:
                    if x.is_float:
                        self.relevant.add(id(x))
        # Input values reach the graph through the inputs list too.

    def differentiated(self, nd: _Node) -> bool:
        return any(id(x) in self.tainted for x in nd.ins) and any(
            id(o) in self.relevant for o in nd.outs
        )

    # -- signs -------------------------------------------------------------

    def sign(self, v: _Val, depth: int = 0) -> str:
        key = id(v)
        if key in self._sign:
            return self._sign[key]
        s = self._sign_uncached(v, depth)
        self._sign[key] = s
        return s

    def _sign_uncached(self, v: _Val, depth: int) -> str:
        if v.const is not None:
            return _const_sign(v.const) or POS
        nd = v.node
        if nd is None and id(v) in self.assumed:
            return NONNEG
        if nd is None or depth > 200:
            return ANY
        p, ins = nd.prim, nd.ins

        def s(i):
            return self.sign(ins[i], depth + 1)

        if not v.is_float:
            if v.dtype == np.bool_ or np.issubdtype(v.dtype, np.unsignedinteger):
                return NONNEG
            if p == "iota":
                return NONNEG
        if p in _PASS or p in ("stop_gradient", "scan_slice", "cumsum", "sort"):
            return s(0)
        if p == "convert_element_type":
            src = ins[0]
            if src.dtype == np.bool_:
                return NONNEG
            return s(0)
        if p in ("exp", "logistic", "exp2"):
            return POS
        if p in ("abs",):
            return POS if s(0) in (POS, NONZERO) else NONNEG
        if p == "square":
            return POS if s(0) in (POS, NONZERO) else NONNEG
        if p == "integer_pow":
            y = nd.params["y"]
            base = s(0)
            if y % 2 == 0:
                return POS if base in (POS, NONZERO) else NONNEG
            return base
        if p == "mul":
            a, b = s(0), s(1)
            if ins[0] is ins[1]:
                return POS if a in (POS, NONZERO) else NONNEG
            if a == POS and b == POS:
                return POS
            if a in (POS, NONNEG) and b in (POS, NONNEG):
                return NONNEG
            if a in (POS, NONZERO) and b in (POS, NONZERO):
                return NONZERO
            return ANY
        if p == "div":
            a, b = s(0), s(1)
            if a == POS and b == POS:
                return POS
            if a in (POS, NONNEG) and b == POS:
                return NONNEG
            return ANY
        if p in ("add", "add_any"):
            a, b = s(0), s(1)
            if POS in (a, b) and a in (POS, NONNEG) and b in (POS, NONNEG):
                return POS
            if a in (POS, NONNEG) and b in (POS, NONNEG):
                return NONNEG
            return ANY
        if p == "sub":  # 1 - decay**count (optax's bias correction), count >= 1
            k, bn = _scalar_const(ins[0]), _strip(ins[1]).node
            if k is not None and k >= 1 and bn is not None and bn.prim == "pow":
                base = _scalar_const(bn.ins[0])
                if base is not None and 0 < base < 1:
                    return POS
            return ANY
        if p == "max":
            a, b = s(0), s(1)
            if POS in (a, b):
                return POS
            if NONNEG in (a, b):
                return NONNEG
            return ANY
        if p == "min":
            return _meet([s(0), s(1)])
        if p in ("sqrt", "rsqrt", "cbrt"):
            a = s(0)
            return POS if a == POS else (NONNEG if p == "sqrt" else ANY)
        if p == "pow":
            return POS if s(0) == POS else ANY
        if p in ("reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "argmax"):
            return s(0) if s(0) in (POS, NONNEG) else ANY
        if p == "dot_general":
            a, b = s(0), s(1)
            if a == POS and b == POS:
                return POS
            if a in (POS, NONNEG) and b in (POS, NONNEG):
                return NONNEG
            return ANY
        if p == "clamp":
            lo = s(0)
            return lo if lo in (POS, NONNEG) else ANY
        if p == "select_n":
            return _meet([self._case_sign(nd, i, depth) for i in range(1, len(ins))])
        if p in ("cond_merge", "concatenate"):
            return _meet([self.sign(x, depth + 1) for x in ins])
        if p == "log1p":
            return NONNEG if s(0) in (POS, NONNEG) else ANY
        if p == "log":
            return ANY
        return ANY

    def _case_sign(self, nd: _Node, i: int, depth: int) -> str | None:
        """Sign of case `i` of a select_n, refined by the predicate."""
        case = nd.ins[i]
        base = self.sign(case, depth + 1)
        if case.const is not None and case.const.size and np.all(np.isnan(case.const)):
            return None
        pred = _strip(nd.ins[0])
        pn = pred.node
        if pn is None or pn.prim not in ("gt", "ge", "lt", "le", "ne"):
            return base
        if pn.prim == "ne" and pn.ins[0] is pn.ins[1] and i == 2:
            return None  # the isnan branch of logaddexp and friends
        a, b = pn.ins
        src = _strip(case)
        # normalise to "v OP k" with k constant
        prim = pn.prim
        if _strip(b) is src:
            a, b = b, a
            prim = {"gt": "lt", "lt": "gt", "ge": "le", "le": "ge"}.get(prim, prim)
        if _strip(a) is not src:
            return base
        k = _scalar_const(b)
        if k is None:
            return base
        taken_if_true = i == 1
        # the comparison restricted to where this case is taken
        op = (
            prim
            if taken_if_true
            else {"gt": "le", "le": "gt", "ge": "lt", "lt": "ge", "ne": "eq"}[prim]
        )
        if op == "gt" and k >= 0:
            return POS
        if op == "ge" and k > 0:
            return POS
        if op == "ge" and k == 0:
            return NONNEG
        if op == "ne" and k == 0:
            return NONZERO if base == ANY else base
        return base

    # -- small helpers -----------------------------------------------------

    def producer(self, v: _Val) -> _Node | None:
        return _strip(v).node

    def is_raw_input(self, v: _Val) -> bool:
        v = _strip(v)
        return v.kind == "input" or (v.node is not None and v.node.prim == "loop_carry")


def _ancestors(v: _Val, limit: int = 400) -> set[int]:
    """Ids of non-constant values that `v` depends on (bounded search)."""
    seen: set[int] = set()
    stack = [v]
    while stack and len(seen) < limit:
        x = stack.pop()
        if id(x) in seen or x.const is not None:
            continue
        seen.add(id(x))
        if x.node is not None:
            stack.extend(x.node.ins)
    return seen


def _chain(v: _Val, depth: int, through: Callable[[_Node], bool]):
    """Nodes producing `v` up to `depth` steps back, following `through`."""
    out: list[_Node] = []
    stack = [(v, 0)]
    seen: set[int] = set()
    while stack:
        x, d = stack.pop()
        nd = x.node
        if nd is None or id(nd) in seen or d > depth:
            continue
        seen.add(id(nd))
        out.append(nd)
        if through(nd):
            ins = nd.ins[:1] if nd.prim in _PASS else nd.ins  # not the indices
            for y in ins:
                stack.append((y, d + 1))
    return out


# ----------------------------------------------------------------------------
# Source lines.


def _lib_roots() -> tuple[str, ...]:
    """The standard library's directory (its frames are never the user's)."""
    return (os.path.dirname(os.path.abspath(os.__file__)) + os.sep,)


def _is_library(path: str, roots: tuple[str, ...]) -> bool:
    if path.startswith("<") or base.library_of(path) is not None:
        return True
    ap = os.path.abspath(path)
    # The standard library, but not an installed user package under it.
    return any(ap.startswith(r) and "site-packages" not in ap[len(r) :] for r in roots)


def _location(nd: _Node, roots) -> tuple[str | None, int | None, str]:
    for eqn in (nd.eqn, *reversed(nd.sites)):
        tb = getattr(getattr(eqn, "source_info", None), "traceback", None)
        frames = getattr(tb, "frames", None) or ()
        for fr in frames:
            if not _is_library(fr.file_name, roots):
                code = linecache.getline(fr.file_name, fr.line_num).strip()
                return fr.file_name, fr.line_num, code
    return None, None, ""


# ----------------------------------------------------------------------------
# Detectors.  Each takes (ctx) and yields (rule, node, message) triples.


@dataclasses.dataclass
class _Ctx:
    g: _Graph
    an: _Analysis
    claimed: set[int]  # ids of nodes already reported by an earlier rule


# The primitives where-nan-grad looks for under a where (integer_pow too,
# with a negative exponent); their guarded operands are in `primitives.DOMAINS`.
_WHERE_GUARDED = frozenset(
    {"sqrt", "rsqrt", "log", "log1p", "div", "pow", "atan2", "acos", "asin"}
)


def _unsafe_operands(nd: _Node) -> tuple[int, ...]:
    if nd.prim == "integer_pow":
        return (0,) if nd.params["y"] < 0 else ()
    if nd.prim not in _WHERE_GUARDED:
        return ()
    return primitives.DOMAINS[nd.prim].operands


def _is_guarded(v: _Val) -> bool:
    """True when `v` comes out of a select (the inner where of a double where)."""
    nd = _strip(v).node
    return nd is not None and nd.prim in ("select_n", "clamp", "max", "min")


def _operand_safe(an: _Analysis, nd: _Node, i: int) -> bool:
    x = nd.ins[i]
    if x.const is not None or _strip(x).const is not None or _is_guarded(x):
        return True
    if _has_guard_below(x):
        return True
    s = an.sign(x)
    if nd.prim in ("div", "integer_pow", "rsqrt"):
        return s in (POS, NONZERO) if nd.prim != "rsqrt" else s == POS
    if nd.prim == "atan2":
        return s == POS or an.sign(nd.ins[1 - i]) == POS
    if nd.prim in ("acos", "asin"):
        return False
    if nd.prim == "log1p":
        return s in (POS, NONNEG)
    return s == POS


_ELEMENTWISE_THROUGH = frozenset(
    {
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
    | _PASS
)


def _where_nan_grad(ctx: _Ctx):
    an = ctx.an
    for nd in ctx.g.nodes:
        if nd.prim != "select_n" or not nd.outs[0].is_float:
            continue
        if not an.differentiated(nd):
            continue
        pred_anc = None
        for case in nd.ins[1:]:
            for u in _chain(case, 6, lambda n: n.prim in _ELEMENTWISE_THROUGH):
                ops = _unsafe_operands(u)
                if not ops or id(u) in ctx.claimed:
                    continue
                if not any(id(x) in an.tainted for x in u.ins):
                    continue
                for i in ops:
                    if _operand_safe(an, u, i):
                        continue
                    if pred_anc is None:
                        pred_anc = _ancestors(nd.ins[0])
                    if not (_ancestors(u.ins[i], 200) & pred_anc):
                        continue
                    ctx.claimed.add(id(u))
                    name = {"div": "division", "integer_pow": "negative power"}.get(
                        u.prim, u.prim
                    )
                    yield (
                        "where-nan-grad",
                        u,
                        f"jaxnan: `{name}` inside a jnp.where branch that the "
                        "predicate is meant to guard: the forward value is "
                        "selected away, but its gradient is 0 * NaN = NaN "
                        "(jax#1052)",
                    )
                    break


def _sq_kind(an: _Analysis, v: _Val) -> str | None:
    """'sum of squares' / 'variance' / None, looking through a few producers."""
    for nd in _chain(
        v, 6, lambda n: n.prim in _PASS | {"reduce_sum", "div", "convert_element_type"}
    ):
        if nd.prim in ("square", "integer_pow") or (
            nd.prim == "mul" and nd.ins[0] is nd.ins[1]
        ):
            src = nd.ins[0]
            if _strip(src).node is not None and _strip(src).node.prim == "sub":
                return "variance"
            return "sum of squares"
    return None


def _has_guard_below(v: _Val) -> bool:
    for nd in _chain(
        v,
        8,
        lambda n: (
            n.prim
            in _PASS
            | {"reduce_sum", "mul", "square", "integer_pow", "convert_element_type"}
        ),
    ):
        if nd.prim == "select_n":
            return True
    return False


def _sqrt_zero_grad(ctx: _Ctx):
    an = ctx.an
    for nd in ctx.g.nodes:
        if nd.prim == "sqrt":
            pass
        elif nd.prim == "pow":
            k = _scalar_const(nd.ins[1])
            if k is None or not 0 < k < 1:
                continue
        else:
            continue
        if id(nd) in ctx.claimed or not an.differentiated(nd):
            continue
        x = nd.ins[0]
        if an.sign(x) != NONNEG or _has_guard_below(x):
            continue
        kind = _sq_kind(an, x) or "a value that can be 0"
        what = {
            "variance": "a variance (jnp.std)",
            "sum of squares": "a sum of squares (jnp.linalg.norm)",
        }.get(kind, kind)
        ctx.claimed.add(id(nd))
        yield (
            "sqrt-zero-grad",
            nd,
            f"jaxnan: sqrt of {what} that can be exactly 0, differentiated: its "
            "gradient is inf there and NaN after the chain rule (jax#3058)",
        )


def _softmax_parts(v: _Val) -> bool:
    """True when `v` is exp(z) / sum(exp(z)) (a softmax), up to shape ops."""
    nd = _strip(v).node
    if nd is None or nd.prim != "div":
        return False
    num = _strip(nd.ins[0]).node
    den = _strip(nd.ins[1]).node
    return (
        num is not None
        and num.prim == "exp"
        and den is not None
        and den.prim == "reduce_sum"
    )


def _is_sigmoid(v: _Val) -> str | None:
    nd = _strip(v).node
    if nd is None:
        return None
    if nd.prim == "logistic":
        return "sigmoid"
    if nd.prim == "sub" and _scalar_const(nd.ins[0]) == 1.0:
        inner = _strip(nd.ins[1]).node
        if inner is not None and inner.prim == "logistic":
            return "1 - sigmoid"
    return None


def _consumers(g: _Graph) -> dict[int, list[_Node]]:
    cons: dict[int, list[_Node]] = {}
    for nd in g.nodes:
        for x in nd.ins:
            cons.setdefault(id(x), []).append(nd)
    return cons


def _flows_to(
    cons, v: _Val, prims: set[str], depth: int, through: frozenset | set = frozenset()
) -> _Node | None:
    stack = [(v, 0)]
    seen = set()
    while stack:
        x, d = stack.pop()
        for nd in cons.get(id(x), ()):
            if id(nd) in seen or d > depth:
                continue
            seen.add(id(nd))
            if nd.prim in prims:
                return nd
            if nd.prim in _PASS | {"convert_element_type", "neg"} | set(through):
                stack.extend((o, d + 1) for o in nd.outs)
    return None


def _log_softmax_sigmoid(ctx: _Ctx):
    cons = _consumers(ctx.g)
    for nd in ctx.g.nodes:
        if nd.prim != "log" or id(nd) in ctx.claimed:
            continue
        x = nd.ins[0]
        if _softmax_parts(x):
            ctx.claimed.add(id(nd))
            mul = _flows_to(cons, nd.outs[0], {"mul", "dot_general"}, 3)
            if (
                mul is not None
                and _flows_to(cons, mul.outs[0], {"reduce_sum", "dot_general"}, 3)
                or (mul is not None and mul.prim == "dot_general")
            ):
                yield (
                    "hand-written-cross-entropy",
                    nd,
                    "jaxnan: hand-written cross-entropy -sum(y * log(softmax(x))): "
                    "a probability that underflows to 0 makes the loss inf and "
                    "its gradient NaN",
                )
            else:
                yield (
                    "log-softmax",
                    nd,
                    "jaxnan: log(softmax(x)) is -inf once a probability underflows "
                    "to 0 (logit gaps above ~88 in float32, ~11 in float16)",
                )
            continue
        kind = _is_sigmoid(x)
        if kind:
            ctx.claimed.add(id(nd))
            yield (
                "log-sigmoid",
                nd,
                f"jaxnan: log({kind}(x)) is -inf once the sigmoid saturates "
                "(|x| above ~17 in float32)",
            )


def _find_neg_inf_mask(v: _Val, depth: int = 0):
    """('pred', pred, kept_if_true) | ('const', array) | None for a -inf mask."""
    v = _strip(v)
    if v.const is not None:
        if v.const.size and np.any(np.isneginf(np.asarray(v.const, np.float64))):
            return ("const", v.const)
        return None
    nd = v.node
    if nd is None or depth > 12:
        return None
    if nd.prim == "select_n" and len(nd.ins) == 3:
        for i in (1, 2):
            c = _strip(nd.ins[i])
            if c.const is not None and np.any(
                np.isneginf(np.asarray(c.const, np.float64))
            ):
                return ("pred", nd.ins[0], i == 1)
        for i in (1, 2):
            r = _find_neg_inf_mask(nd.ins[i], depth + 1)
            if r is not None:
                return r
        return None
    if nd.prim in ("add", "sub", "max", "min", "convert_element_type", "mul"):
        for x in nd.ins:
            r = _find_neg_inf_mask(x, depth + 1)
            if r is not None:
                return r
    return None


def _from_iota(v: _Val, depth: int = 0) -> bool:
    v = _strip(v)
    if v.const is not None:
        return False
    nd = v.node
    if nd is None or depth > 8:
        return False
    if nd.prim == "iota":
        return True
    if nd.prim in ("add", "sub"):
        k = [_scalar_const(x) for x in nd.ins]
        others = [x for x, kk in zip(nd.ins, k) if kk is None]
        return len(others) == 1 and _from_iota(others[0], depth + 1)
    if nd.prim == "convert_element_type":
        return _from_iota(nd.ins[0], depth + 1)
    return False


def _keeps_diagonal(p: _Val, depth: int = 0) -> bool:
    """True when the boolean mask `p` provably keeps the diagonal (causal)."""
    p = _strip(p)
    if p.const is not None:
        arr = np.asarray(p.const, bool)
        return (
            bool(arr.size) and bool(np.all(arr.reshape(-1, arr.shape[-1]).any(-1)))
            if arr.ndim
            else bool(arr)
        )
    nd = p.node
    if nd is None or depth > 8:
        return False
    if nd.prim in ("ge", "le"):
        a, b = nd.ins if nd.prim == "ge" else nd.ins[::-1]
        # a >= b with a = iota_q + k (k >= 0), b = iota_k
        if _from_iota(a) and _from_iota(b):
            ka = _offset(a)
            kb = _offset(b)
            return ka - kb >= 0
        return False
    if nd.prim == "or":
        return any(_keeps_diagonal(x, depth + 1) for x in nd.ins)
    if nd.prim == "and":
        return all(_keeps_diagonal(x, depth + 1) for x in nd.ins)
    if nd.prim == "select_n" and len(nd.ins) == 3:
        # tril/triu: select_n(g, false_case, true_case)
        f, t = _strip(nd.ins[1]), _strip(nd.ins[2])
        if f.const is not None and not np.any(f.const):
            return _keeps_diagonal(nd.ins[0], depth + 1) and _keeps_diagonal(
                t, depth + 1
            )
    if nd.prim == "convert_element_type":
        return _keeps_diagonal(nd.ins[0], depth + 1)
    return False


def _offset(v: _Val) -> float:
    v = _strip(v)
    nd = v.node
    if nd is not None and nd.prim in ("add", "sub"):
        total = 0.0
        for j, x in enumerate(nd.ins):
            k = _scalar_const(x)
            if k is not None:
                total += -k if (nd.prim == "sub" and j == 1) else k
            else:
                total += _offset(x) if (nd.prim == "add" or j == 0) else 0.0
        return total
    if nd is not None and nd.prim == "convert_element_type":
        return _offset(nd.ins[0])
    return 0.0


def _masked_softmax(ctx: _Ctx):
    cons = _consumers(ctx.g)
    for nd in ctx.g.nodes:
        if nd.prim != "exp":
            continue
        if _flows_to(cons, nd.outs[0], {"reduce_sum"}, 3) is None:
            continue
        z = _strip(nd.ins[0])
        zn = z.node
        row = zn.ins[0] if zn is not None and zn.prim == "sub" else z
        found = _find_neg_inf_mask(row)
        if found is None:
            continue
        if found[0] == "const":
            arr = np.asarray(found[1], np.float64)
            rows = arr.reshape(-1, arr.shape[-1]) if arr.ndim else arr.reshape(1, 1)
            if np.all(np.isfinite(rows).any(-1)):
                continue
        else:
            _, pred, kept_if_true = found
            if kept_if_true and _keeps_diagonal(pred):
                continue
        yield (
            "masked-softmax-all-masked",
            nd,
            "jaxnan: softmax/logsumexp over a row masked with -inf, and the mask "
            "can remove every entry of a row: max is -inf, -inf - (-inf) = NaN",
        )


def _denominator_kind(an: _Analysis, d: _Val) -> str | None:
    nd = _strip(d).node
    if nd is None:
        return None
    if nd.prim == "reduce_sum":
        k = _sq_kind(an, d)
        return "a sum of squares" if k == "sum of squares" else "a sum"
    if nd.prim == "sqrt":
        k = _sq_kind(an, nd.ins[0])
        return {"variance": "a std", "sum of squares": "a norm"}.get(k, "a sqrt")
    if nd.prim == "div" and _sq_kind(an, d) == "variance":
        return "a variance"
    if nd.prim == "select_n":  # jnp.var's ddof guard
        vals = [x for x in nd.ins[1:] if _strip(x).const is None]
        if len(vals) == 1:
            return _denominator_kind(an, vals[0])
    return None


def _eps_check(d: _Val):
    """The epsilon added to `d`, as (value, dtype), or None."""
    nd = _strip(d).node
    if nd is None or nd.prim not in ("add", "max"):
        return None
    for x in nd.ins:
        k = _scalar_const(x)
        if k is not None:
            return k, x.dtype
    return None


def _guarded_by_select(cons, nd: _Node, d: _Val) -> bool:
    """True when `nd`'s output only feeds a select whose predicate tests `d`."""
    sel = _flows_to(cons, nd.outs[0], {"select_n"}, 4, through={"mul", "div"})
    if sel is None:
        return False
    return bool(_ancestors(sel.ins[0], 100) & _ancestors(d, 100))


def _division(ctx: _Ctx):
    an = ctx.an
    cons = _consumers(ctx.g)
    for nd in ctx.g.nodes:
        if id(nd) in ctx.claimed:
            continue
        if nd.prim == "div":
            d = nd.ins[1]
        elif nd.prim == "rsqrt":
            d = nd.ins[0]
        else:
            continue
        if not nd.outs[0].is_float:
            continue
        eps = _eps_check(d)
        if eps is not None:
            k, dt = eps
            dt = np.dtype(dt)
            if np.issubdtype(dt, np.floating) or dt in _LOW:
                tiny = float(jax.numpy.finfo(dt).tiny)
                if 0 <= k < tiny and dt in _LOW:
                    ctx.claimed.add(id(nd))
                    yield (
                        "epsilon-underflow",
                        nd,
                        f"jaxnan: the epsilon added to this denominator is {k:g} "
                        f"in {dt.name} (below its smallest normal {tiny:.2g}): an "
                        "epsilon like 1e-8 rounds to 0 there",
                    )
            continue
        kind = _denominator_kind(an, d)
        if kind is None or an.sign(d) in (POS, NONZERO) or _has_guard_below(d):
            continue
        if _guarded_by_select(cons, nd, d):
            continue  # jnp.where(norm < c, g, g / norm * c), as in clipping
        ctx.claimed.add(id(nd))
        yield (
            "div-no-epsilon",
            nd,
            f"jaxnan: division by {kind} that can be 0, with no epsilon",
        )


def _bounded_above(v: _Val) -> bool:
    nd = _strip(v).node
    if nd is None:
        return _strip(v).const is not None
    if nd.prim == "sub":
        m = _strip(nd.ins[1]).node
        if m is not None and m.prim in ("reduce_max", "max", "stop_gradient"):
            return True
        if _strip(nd.ins[1]).node is not None and _strip(nd.ins[1]).node.prim == (
            "broadcast_in_dim"
        ):
            return True
    if nd.prim == "neg":
        inner = _strip(nd.ins[0]).node
        return inner is not None and inner.prim in ("abs", "square", "exp")
    if nd.prim in ("tanh", "logistic", "sin", "cos", "clamp", "min"):
        return True
    if nd.prim == "mul":
        return any(
            _strip(x).const is not None and _bounded_above(y)
            for x, y in (nd.ins, nd.ins[::-1])
        )
    return False


def _low_precision_overflow(ctx: _Ctx):
    for nd in ctx.g.nodes:
        if not nd.outs or nd.outs[0].dtype not in _LOW:
            continue
        what = None
        if nd.prim == "exp" and not _bounded_above(nd.ins[0]):
            what = "exp"
        elif nd.prim == "pow" and not _bounded_above(nd.ins[0]):
            what = "pow"
        elif nd.prim == "integer_pow" and abs(nd.params["y"]) >= 3:
            what = f"x**{nd.params['y']}"
        if what is None:
            continue
        yield _lp_finding(nd, what)
    cons = _consumers(ctx.g)
    for nd in ctx.g.nodes:
        sq = (
            nd.prim in ("square",)
            or (nd.prim == "integer_pow" and nd.params["y"] == 2)
            or (nd.prim == "mul" and nd.ins[0] is nd.ins[1])
        )
        if not sq or nd.outs[0].dtype not in _LOW or _bounded_above(nd.ins[0]):
            continue
        if _flows_to(cons, nd.outs[0], {"reduce_sum"}, 3) is not None:
            yield _lp_finding(nd, "a sum of squares")


def _lp_finding(nd: _Node, what: str):
    dt = nd.outs[0].dtype
    if dt == np.dtype("float16"):
        return (
            "low-precision-overflow",
            nd,
            f"jaxnan: {what} of unbounded values in float16 overflows to inf above "
            "65504",
        )
    return (
        "low-precision-overflow",
        nd,
        f"jaxnan: {what} of unbounded values in bfloat16 keeps only 8 bits of mantissa",
        "info",
    )


def _const_extremes(v: _Val, depth: int = 0) -> float:
    """The largest |constant| (inf included) that can flow into `v`."""
    v = _strip(v)
    if v.const is not None:
        a = np.abs(np.asarray(v.const, np.float64))
        a = a[~np.isnan(a)]
        return float(a.max()) if a.size else 0.0
    nd = v.node
    if nd is None or depth > 10:
        return 0.0
    if nd.prim in ("select_n",):
        return max(_const_extremes(x, depth + 1) for x in nd.ins[1:])
    if nd.prim in ("add", "sub", "neg", "mul", "convert_element_type", "max", "min"):
        return max(_const_extremes(x, depth + 1) for x in nd.ins)
    return 0.0


def _low_precision_cast(ctx: _Ctx):
    for nd in ctx.g.nodes:
        if nd.prim == "convert_element_type":
            dt = nd.outs[0].dtype
            if dt not in _LOW or not nd.ins[0].is_float or nd.ins[0].dtype in _LOW:
                continue
            big = _const_extremes(nd.ins[0])
            fmax = float(jax.numpy.finfo(dt).max)
            if big > fmax:
                what = "-inf/inf" if np.isinf(big) else f"a constant of {big:.3g}"
                yield (
                    "low-precision-cast",
                    nd,
                    f"jaxnan: {what} cast to {dt.name} (max {fmax:.5g}) is inf "
                    "there; masks then give -inf - (-inf) or 0 * inf = NaN",
                )
        elif nd.prim in ("add", "sub", "mul", "select_n"):
            for x in nd.ins:
                if x.const is None or x.dtype not in _LOW or x.const.size != 1:
                    continue
                if np.isinf(np.asarray(x.const, np.float64)).any():
                    yield (
                        "low-precision-cast",
                        nd,
                        f"jaxnan: a constant that is inf in {x.dtype.name} (an "
                        "-inf mask, or a value such as -1e9 that overflowed when "
                        "converted)",
                    )
                    break


def _not_positive(ctx: _Ctx):
    an = ctx.an
    for nd in ctx.g.nodes:
        if id(nd) in ctx.claimed or not nd.outs or not nd.outs[0].is_float:
            continue
        if nd.prim in ("log", "rsqrt"):
            need = (POS,)
        elif nd.prim in ("sqrt", "log1p"):
            need = (POS, NONNEG)
        elif nd.prim == "pow":
            k = _scalar_const(nd.ins[1])
            if k is None or float(k).is_integer():
                continue
            need = (POS, NONNEG)
        else:
            continue
        x = nd.ins[0]
        if x.const is not None or _strip(x).const is not None:
            continue
        if an.is_raw_input(x) or an.sign(x) in need or _is_guarded(x):
            continue
        yield (
            "log-not-positive",
            nd,
            f"jaxnan: `{nd.prim}` of a value not known to be positive: NaN for "
            "negative values, -inf/inf at 0",
        )


_DETECTORS = (
    _where_nan_grad,
    _masked_softmax,
    _sqrt_zero_grad,
    _log_softmax_sigmoid,
    _division,
    _low_precision_cast,
    _low_precision_overflow,
    _not_positive,
)
_DTYPE_DETECTORS = (_low_precision_cast, _low_precision_overflow)


def _run(g: _Graph, diff: Sequence[int], detectors, roots) -> list[Finding]:
    ctx = _Ctx(g, _Analysis(g, diff), set())
    out = []
    for det in detectors:
        for item in det(ctx):
            rule, nd, msg = item[:3]
            info = LINT_RULES[rule]
            sev = item[3] if len(item) > 3 else info.severity
            file, line, code = _location(nd, roots)
            out.append(Finding(rule, sev, msg, info.fix, file, line, code))
    return out


def lint(fn: Callable[..., Any], *args: Any, argnums: int | Sequence[int] = 0):
    """Finds NaN-prone patterns in `fn` and its gradient, without running it.

    Traces `fn(*args)` to a jaxpr (`jax.make_jaxpr`; nothing is executed),
    inlines calls, custom_jvp/vjp, remat, cond, scan, while and shard_map
    bodies, and runs the detectors of `jaxnan.LINT_RULES` over it: a where
    whose unselected branch takes sqrt/log/div of the values it guards, the
    gradient of a norm or std at 0, log(softmax), log(sigmoid), hand-written
    cross-entropy, softmax over rows that a -inf mask can empty, division by a
    sum/norm/variance with no epsilon (or one the dtype rounds to 0), exp and
    sums of squares in float16, -inf or huge constants cast to float16, and
    log/sqrt/fractional powers of values not known to be positive.

    A value's sign comes from its producers (exp, softplus, squares, abs, a
    positive constant added, `maximum` with a positive constant, a where on
    `x > 0`). Gradient rules fire only where the value depends on the
    arguments in `argnums` and the output depends on it differentiably (not
    through `stop_gradient` or a comparison). When `fn` returns a float
    scalar, ``jax.grad(fn, argnums)`` is traced too and the dtype rules run on
    its jaxpr (the backward pass of a float16 model). Each finding points at
    the innermost frame outside jax, optax, chex, flax, equinox and jaxnan;
    a rule is reported once per line.

    Args:
        fn: the function to lint, usually a loss ``fn(params, batch)``.
        *args: example arguments (arrays or `jax.ShapeDtypeStruct`).
        argnums: the argument index (or indices) that is differentiated.

    Returns:
        A list of `jaxnan.Finding`, errors first, then in program order.

    Raises:
        TypeError: if `fn` is not callable.
        ValueError: if `argnums` is out of range.

    Examples:
        >>> import jax, jax.numpy as jnp, jaxnan
        >>> def loss(x):
        ...     return jnp.sum(jnp.where(x > 0, jnp.sqrt(x), 0.0))
        >>> [f.rule for f in jaxnan.lint(loss, jnp.ones(3))]
        ['where-nan-grad']
        >>> def safe(x):
        ...     inner = jnp.where(x > 0, x, 1.0)
        ...     return jnp.sum(jnp.where(x > 0, jnp.sqrt(inner), 0.0))
        >>> jaxnan.lint(safe, jnp.ones(3))
        []

    .. versionadded:: 0.1.0
    """
    if not callable(fn):
        raise TypeError(
            f"jaxnan: lint(fn=...) must be callable, got {type(fn).__name__}; "
            "pass the loss function itself, not its value."
        )
    nums = (argnums,) if isinstance(argnums, int) else tuple(argnums)
    for a in nums:
        if not -len(args) <= a < len(args):
            raise ValueError(
                f"jaxnan: lint(argnums={argnums!r}) is out of range for "
                f"{len(args)} argument(s); pass the index of the parameters."
            )
    nums = tuple(a % len(args) for a in nums)
    roots = _lib_roots()
    g, closed = _build(fn, args)
    # map argument indices to flat input positions
    sizes = [len(jax.tree_util.tree_leaves(a)) for a in args]
    starts = np.cumsum([0] + sizes)
    diff = [i for a in nums for i in range(starts[a], starts[a + 1])]
    findings = _run(g, diff, _DETECTORS, roots)
    outs = closed.out_avals
    if (
        len(outs) == 1
        and outs[0].shape == ()
        and (np.issubdtype(outs[0].dtype, np.floating) or outs[0].dtype in _LOW)
    ):
        try:
            gg, _ = _build(
                jax.grad(fn, argnums=nums if len(nums) > 1 else nums[0]), args
            )
        except (TypeError, ValueError):  # integer inputs, non-differentiable fn
            gg = None
        if gg is not None:
            findings += _run(gg, [], _DTYPE_DETECTORS, roots)
    seen = set()
    unique = []
    for f in findings:
        key = (f.rule, f.file, f.line) if f.file else (f.rule, f.message)
        if key in seen:
            continue
        seen.add(key)
        unique.append(f)
    order = {"error": 0, "warning": 1, "info": 2}
    return sorted(unique, key=lambda f: order[f.severity])


def cli(target: str, *, argnums: Sequence[int] = (0,), out=None) -> int:
    """Runs `lint` on ``module:factory`` and prints the findings.

    Args:
        target: ``module:factory``; ``factory()`` returns ``(fn, args)``.
        argnums: the differentiated argument indices.
        out: a text stream (default: sys.stdout).

    Returns:
        The exit status: 1 when an error-severity finding exists, 0 otherwise.

    Raises:
        ValueError: if `target` is not of the form ``module:factory``.
    """
    import importlib

    out = sys.stdout if out is None else out
    mod_name, sep, attr = target.partition(":")
    if not sep or not mod_name or not attr:
        raise ValueError(
            f"jaxnan: lint target={target!r} must be 'module:factory', e.g. "
            "'mypkg.train:make_loss' where make_loss() returns (fn, args)."
        )
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    factory = getattr(importlib.import_module(mod_name), attr)
    fn, args = factory()
    nums = argnums[0] if len(argnums) == 1 else tuple(argnums)
    findings = lint(fn, *args, argnums=nums)
    for f in findings:
        print(str(f), file=out)
    n_err = sum(f.severity == "error" for f in findings)
    print(
        f"jaxnan lint: {len(findings)} finding(s), {n_err} error(s) in {target}",
        file=out,
    )
    return 1 if n_err else 0
