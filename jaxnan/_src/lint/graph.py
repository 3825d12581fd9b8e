"""The inlined graph that `jaxnan.lint` matches patterns on.

`build(fn, args)` traces `fn` to a jaxpr and inlines it into one flat list of
`Node`s: calls, custom_jvp/vjp/vmap, remat and shard_map bodies in place (the
one traversal of `primitives.sub_jaxprs`; an unknown higher-order primitive
raises `NotImplementedError`), cond branches with their outputs merged by a
``cond_merge`` node, scan and while bodies once, their carries entering
through ``loop_carry`` and their outputs leaving through ``loop_out``.
Small all-constant equations are folded with numpy, so masks and epsilons
built from constants stay constants.

The helpers below walk the graph: `strip` (through ops that keep values),
`scalar_const`, `ancestors`, `chain` (producers), `consumers` and `flows_to`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.extend import core as jex_core
from jax.extend import source_info_util

from jaxnan._src.core import primitives
from jaxnan._src.core.primitives import Role

source_info_util.register_exclusion(__file__)

PASS = (
    primitives.REARRANGING
    | primitives.SUBSETTING
    | {"reduce_precision", "scan_slice"}  # scan_slice: one step of a scanned xs
)
"""Ops that keep the values (and so the sign) of their first input."""


class Val:
    """One value of the graph: an input, a constant or a node's output."""

    __slots__ = ("aval", "node", "const", "kind", "idx")

    def __init__(self, aval, node=None, const=None, kind="eqn", idx=0):
        self.aval = aval
        self.node = node
        self.const = const
        self.kind = kind
        self.idx = idx

    @property
    def dtype(self):
        """The numpy dtype (object for PRNG keys and other extended dtypes)."""
        try:
            return np.dtype(getattr(self.aval, "dtype", np.float32))
        except TypeError:  # PRNG key arrays and other extended dtypes
            return np.dtype(object)

    @property
    def is_float(self) -> bool:
        """True for a floating value (float16 and bfloat16 included)."""
        return (
            np.issubdtype(self.dtype, np.floating)
            or self.dtype in primitives.LOW_PRECISION
        )


class Node:
    """One equation of the graph (or a pseudo-op: cond_merge, loop_carry, ...).

    Attributes:
        prim: the primitive name.
        params: the equation params.
        ins: the input `Val`s.
        outs: the output `Val`s.
        eqn: the jaxpr equation (its source line).
        n: the position in `Graph.nodes`.
        sites: the enclosing call equations, innermost last (their lines
            stand in when the equation's own traceback stops at a library).
    """

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


# -- constant folding --------------------------------------------------------

_FOLD_UFUNCS = {
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


def _fold_broadcast(vals, params, shape):
    v = vals[0]
    if not v.ndim:
        return np.broadcast_to(v, shape)
    dims = params["broadcast_dimensions"]
    kept = [v.shape[dims.index(d)] if d in dims else 1 for d in range(len(shape))]
    return np.broadcast_to(np.reshape(v, kept), shape)


def _first(vals, params, shape):
    return vals[0]


def _reshape(vals, params, shape):
    return np.reshape(vals[0], shape)


def _integer_pow(vals, params, shape):
    return np.power(vals[0].astype(np.float64), params["y"])


def _select_n(vals, params, shape):
    return np.choose(np.asarray(vals[0], np.int32), vals[1:])


def _ufunc(f):
    return lambda vals, params, shape: f(*vals)


_FOLDS: dict[str, Callable] = {
    **{p: _ufunc(f) for p, f in _FOLD_UFUNCS.items()},
    "convert_element_type": _first,
    "copy": _first,
    "reduce_precision": _first,
    "broadcast_in_dim": _fold_broadcast,
    "reshape": _reshape,
    "squeeze": _reshape,
    "expand_dims": _reshape,
    "integer_pow": _integer_pow,
    "select_n": _select_n,
}
"""Primitive -> ``fold(values, params, out_shape)`` with numpy."""


def fold(prim, params, ins, out_avals) -> np.ndarray | None:
    """Evaluates a small all-constant equation with numpy, else None."""
    if len(out_avals) != 1 or not ins or any(x.const is None for x in ins):
        return None
    shape = getattr(out_avals[0], "shape", None)
    if prim not in _FOLDS or shape is None or int(np.prod(shape)) > 4096:
        return None
    try:
        with np.errstate(all="ignore"):
            out = _FOLDS[prim]([x.const for x in ins], params, shape)
        return np.asarray(out).astype(getattr(out_avals[0], "dtype", None))
    except Exception:  # noqa: BLE001 - anything numpy cannot do stays symbolic
        return None


# -- building ----------------------------------------------------------------


class Graph:
    """The inlined graph: `nodes` in program order, `inputs`, `outputs`."""

    def __init__(self):
        self.nodes: list[Node] = []
        self.inputs: list[Val] = []
        self.outputs: list[Val] = []
        self.sites: tuple = ()  # enclosing call equations, innermost last

    def const(self, value, aval) -> Val:
        """A constant value (numpy array, or None when it is opaque)."""
        return Val(aval, const=_np_const(value), kind="const")

    def node(self, prim, params, ins, eqn, out_avals) -> Node:
        """Adds a node, or returns one standing for a static choice/constant."""
        nd = Node(prim, params, ins, eqn, len(self.nodes), self.sites)
        if prim == "select_n" and ins[0].const is not None and ins[0].const.size:
            which = np.unique(np.asarray(ins[0].const, np.int32))
            case = ins[1 + int(which[0])]
            if which.size == 1 and case.aval.shape == out_avals[0].shape:
                nd.outs = [case]  # a static choice (jnp.var's ddof branch)
                return nd
        folded = fold(prim, params, ins, out_avals)
        if folded is not None:
            nd.outs = [Val(out_avals[0], const=folded, kind="const")]
            return nd
        nd.outs = [Val(a, node=nd, idx=i) for i, a in enumerate(out_avals)]
        self.nodes.append(nd)
        return nd

    def inline(self, jaxpr, consts, in_vals) -> list[Val]:
        """Adds the equations of `jaxpr` applied to `in_vals`; its outputs."""
        env: dict[Any, Val] = {}
        for v, c in zip(jaxpr.constvars, consts):
            env[v] = self.const(c, v.aval)
        for v, x in zip(jaxpr.invars, in_vals):
            env[v] = x

        def read(a):
            if isinstance(a, jex_core.Literal):
                return self.const(a.val, a.aval)
            return env[a]

        for eqn in jaxpr.eqns:
            outs = self._eqn(eqn, [read(a) for a in eqn.invars])
            for v, o in zip(eqn.outvars, outs):
                env[v] = o
        return [read(a) for a in jaxpr.outvars]

    def _eqn(self, eqn, ins) -> list[Val]:
        name = eqn.primitive.name
        out_avals = [v.aval for v in eqn.outvars]
        subs = primitives.sub_jaxprs(eqn)  # raises on an unknown one
        if not subs or subs[0].role is Role.AUXILIARY:
            return self.node(name, eqn.params, ins, eqn, out_avals).outs
        build = _BUILDERS.get(name, Graph._call)
        return build(self, eqn, subs, ins, out_avals)

    # One builder per higher-order primitive; calls (the rest) inline in place.

    def _call(self, eqn, subs, ins, out_avals) -> list[Val]:
        (sub,) = subs
        saved = self.sites
        self.sites = saved + (eqn,)
        try:
            outs = self.inline(
                sub.jaxpr, sub.consts, ins[len(ins) - len(sub.jaxpr.invars) :]
            )
        finally:
            self.sites = saved
        return outs[: len(out_avals)]

    def _cond(self, eqn, subs, ins, out_avals) -> list[Val]:
        branch_outs = [self.inline(s.jaxpr, s.consts, ins[1:]) for s in subs]
        return [
            self.node("cond_merge", {}, list(col), eqn, [a]).outs[0]
            for col, a in zip(zip(*branch_outs), out_avals)
        ]

    def _carry(self, eqn, x) -> Val:
        return self.node("loop_carry", {}, [x], eqn, [x.aval]).outs[0]

    def _loop_outs(self, eqn, outs, out_avals) -> list[Val]:
        return [self.node("loop_out", {}, outs, eqn, [a]).outs[0] for a in out_avals]

    def _scan(self, eqn, subs, ins, out_avals) -> list[Val]:
        (body,) = subs
        nc, ncar = eqn.params["num_consts"], eqn.params["num_carry"]
        inner = list(ins[:nc]) + [self._carry(eqn, x) for x in ins[nc : nc + ncar]]
        for x, v in zip(ins[nc + ncar :], body.jaxpr.invars[nc + ncar :]):
            inner.append(self.node("scan_slice", {}, [x], eqn, [v.aval]).outs[0])
        outs = self.inline(body.jaxpr, body.consts, inner)
        return self._loop_outs(eqn, outs, out_avals)

    def _while(self, eqn, subs, ins, out_avals) -> list[Val]:
        cond, body = subs
        cn, bn = eqn.params["cond_nconsts"], eqn.params["body_nconsts"]
        carries = [self._carry(eqn, x) for x in ins[cn + bn :]]
        self.inline(cond.jaxpr, cond.consts, list(ins[:cn]) + carries)
        outs = self.inline(body.jaxpr, body.consts, list(ins[cn : cn + bn]) + carries)
        return self._loop_outs(eqn, outs, out_avals)


_BUILDERS = {"cond": Graph._cond, "scan": Graph._scan, "while": Graph._while}


def build(fn, args) -> tuple[Graph, Any]:
    """The inlined graph of ``fn(*args)`` and its closed jaxpr."""
    closed = jax.make_jaxpr(fn)(*args)
    g = Graph()
    g.inputs = [Val(v.aval, kind="input") for v in closed.jaxpr.invars]
    g.outputs = g.inline(closed.jaxpr, closed.consts, g.inputs)
    return g, closed


# -- walking -----------------------------------------------------------------


def strip(v: Val) -> Val:
    """Follows shape-only and float->float cast producers to the source value."""
    for _ in range(64):
        nd = v.node
        if nd is None:
            return v
        if nd.prim in PASS or nd.prim == "stop_gradient":
            v = nd.ins[0]
        elif nd.prim == "convert_element_type" and nd.ins[0].is_float:
            v = nd.ins[0]
        else:
            return v
    return v


def prim_of(v: Val) -> str | None:
    """The primitive of `producer(v)`, None for an input or a constant."""
    nd = strip(v).node
    return None if nd is None else nd.prim


def scalar_const(v: Val) -> float | None:
    """The value of `v` when it is a constant with all elements equal."""
    v = strip(v)
    if v.const is not None and v.const.size >= 1:
        vals = np.asarray(v.const, np.float64).ravel()
        if np.all(vals == vals[0]):
            return float(vals[0])
    return None


def is_const(v: Val) -> bool:
    """True when `v` (or the value it keeps) is a constant."""
    return v.const is not None or strip(v).const is not None


def ancestors(v: Val, limit: int = 400) -> set[int]:
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


def chain(v: Val, depth: int, through: Callable[[Node], bool]) -> list[Node]:
    """Nodes producing `v` up to `depth` steps back, following `through`."""
    out: list[Node] = []
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
            ins = nd.ins[:1] if nd.prim in PASS else nd.ins  # not the indices
            stack.extend((y, d + 1) for y in ins)
    return out


def consumers(g: Graph) -> dict[int, list[Node]]:
    """Value id -> the nodes reading it."""
    cons: dict[int, list[Node]] = {}
    for nd in g.nodes:
        for x in nd.ins:
            cons.setdefault(id(x), []).append(nd)
    return cons


def flows_to(
    cons, v: Val, prims: set[str], depth: int, through: frozenset | set = frozenset()
) -> Node | None:
    """The first node of `prims` that `v` reaches within `depth` steps."""
    follow = PASS | {"convert_element_type", "neg"} | set(through)
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
            if nd.prim in follow:
                stack.extend((o, d + 1) for o in nd.outs)
    return None
