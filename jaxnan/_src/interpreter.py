"""The instrumented jaxpr interpreter behind `jaxnan.locate`.

`Interpreter` evaluates a jaxpr equation by equation while being traced by one
`jax.jit` (never op by op, eagerly). Each floating value gets one int8 *code*
from one fused reduction: 0 when finite, 1 when it holds +-Inf but no NaN, 2
when it holds a NaN (an integer max of codes is exact; the CPU float max that
can skip NaN is not involved). An equation *creates* a nonfinite value when
the largest code of its floating outputs exceeds the largest code of its
floating inputs: an Inf or NaN out of finite inputs, or a NaN out of inputs
without NaN (``inf - inf``, ``0 * inf``). Equations whose output is a pure
rearrangement of one input (reshape, transpose, broadcast, ...) cannot create
anything: their output shares the input's code and costs nothing.

Two modes share the walk:

- ``"detect"`` threads a fixed-size `Record` (first event index, loop
  iterations, device position) through the program, updated with `jnp.where`,
  so it survives `jit`, `scan`/`while` carries, `cond` branches and
  `shard_map`. The created flags of straight-line equations are collected and
  folded into the record once per block (one `argmax` over a stacked vector).
- ``"capture"`` re-runs the program knowing the (static) event index and
  returns the concrete inputs and outputs of that equation, at the event's
  iteration inside loops and on the event's device inside `shard_map`.

Everything static (the equation, name stack, nesting, producers for the
phase analysis) lives in `Interpreter.nodes`, indexed by the event index.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core
from jax.extend import source_info_util

from jaxnan._src import base, primitives

source_info_util.register_exclusion(__file__)

CODE_FINITE, CODE_INF, CODE_NAN = 0, 1, 2


class Record(NamedTuple):
    """The fixed-size record of the first creation event (detect mode).

    Attributes:
        index: int32 scalar, the node index of the first event, -1 if none.
        iteration: int32[depth], the enclosing loop iterations, outermost
            first, -1 padded.
        device: int32 scalar, the position inside the `shard_map` device
            grid where the event happened first, -1 outside `shard_map`.
    """

    index: jax.Array
    iteration: jax.Array
    device: jax.Array

    @classmethod
    def empty(cls, depth: int) -> Record:
        """A record holding no event."""
        return cls(
            jnp.full((), -1, jnp.int32),
            jnp.full((depth,), -1, jnp.int32),
            jnp.full((), -1, jnp.int32),
        )


class Target(NamedTuple):
    """Where the capture pass stops to read values (all static)."""

    index: int
    iteration: tuple[int, ...]
    device: int


@dataclasses.dataclass
class Node:
    """Static facts about one equation instance of the interpreted program.

    Attributes:
        index: position in `Interpreter.nodes` (the event index).
        eqn: the jaxpr equation.
        name_stack: the full name stack, outer levels included.
        unit: index of the top-level node containing this one (itself for an
            equation of the top-level graph, with calls inlined).
        producers: for a top-level node, the nodes producing its inputs.
        loop_depth: number of enclosing `scan`/`while` loops.
        checked: whether the node has a created flag (False for the unit
            nodes standing for loops, conds and shard_maps).
        in_avals: abstract values of the inputs (per device inside
            `shard_map`).
        out_avals: abstract values of the outputs.
        shard: ``(mesh, axes)`` of the enclosing `shard_map`, else None.
        callers: the enclosing higher-order equations, outermost first (their
            source lines stand in when a body's traceback stops at a `jit`).
    """

    index: int
    eqn: Any
    name_stack: str
    unit: int
    producers: tuple[int, ...]
    loop_depth: int
    checked: bool
    in_avals: tuple
    out_avals: tuple
    shard: Any = None
    callers: tuple = ()


class _Cell:
    """The lazily computed code of one floating value (shared by aliases)."""

    __slots__ = ("x", "code")

    def __init__(self, x: Any, code: Any = None):
        self.x = x
        self.code = code

    def get(self) -> Any:
        if self.code is None:
            self.code = value_code(self.x)
        return self.code


class _Stop(Exception):
    """Raised by the capture pass once a top-level event has been read."""


def value_code(x: Any) -> jax.Array:
    """int8 scalar: 0 finite, 1 some +-Inf and no NaN, 2 some NaN (one pass)."""
    x = jnp.asarray(x)
    c = jnp.where(
        jnp.isnan(x),
        jnp.int8(CODE_NAN),
        jnp.where(jnp.isinf(x), jnp.int8(CODE_INF), jnp.int8(CODE_FINITE)),
    )
    if c.ndim == 0:
        return c
    return jnp.max(c, initial=jnp.int8(0))


def host_code(x: Any) -> int:
    """The code of a concrete (literal) value, computed on the host."""
    a = np.asarray(x)
    if not base.is_inexact_dtype(a.dtype):
        return CODE_FINITE
    if np.isnan(a).any():
        return CODE_NAN
    if np.isinf(a).any():
        return CODE_INF
    return CODE_FINITE


def _is_float_aval(aval: Any) -> bool:
    return base.is_inexact_dtype(getattr(aval, "dtype", None))


def _aval(v: Any) -> Any:
    return v.aval


def _join(a: str, b: str) -> str:
    if not b:
        return a
    if not a:
        return b
    return f"{a}/{b}"


class Interpreter:
    """Holds the mode, the static node table and the capture target."""

    def __init__(self, mode: str, depth: int, target: Target | None = None):
        if mode not in ("detect", "capture"):
            raise ValueError(f"jaxnan: unknown interpreter mode {mode!r}")
        self.mode = mode
        self.depth = depth
        self.target = target
        self.target_node: Node | None = None
        self.nodes: list[Node] = []
        self.out_producers: tuple[int, ...] = ()
        # Detect mode only: which nodes may hold the event (None: all), and
        # the smallest code an event must create (CODE_NAN: NaN events only).
        self.allow: Any = None
        self.min_code: int = CODE_INF

    def add_node(self, **kw: Any) -> Node:
        """Appends a node to the table and returns it."""
        node = Node(index=len(self.nodes), **kw)
        self.nodes.append(node)
        return node


class _EqnInfo:
    """What the interpreter knows about the equation a rule is applied to."""

    __slots__ = ("eqn", "in_cells", "in_prods", "out_cells", "out_prods", "unit")

    def __init__(self, eqn: Any, in_cells: list, in_prods: list):
        self.eqn = eqn
        self.in_cells = in_cells
        self.in_prods = in_prods
        self.out_cells = None
        self.out_prods = None
        self.unit = None


class Ctx:
    """The interpretation context handed to every rule.

    A rule ``rule(ctx, *invals, **params) -> (ctx, outvals)`` reads the
    current equation as `ctx.eqn`. A rule for a call-like higher-order
    primitive evaluates (and checks) its body inline with
    ``ctx.eval_jaxpr(jaxpr, consts, args)``. A rule for a loop or branch
    opens a scope with `ctx.child`, threads `ctx.state` (a pytree of fixed
    structure) through the construct, and calls `ctx.flush` first.

    Attributes:
        interp: the `Interpreter` (mode, node table, capture target).
        state: the threaded state (a `Record` in detect mode, the capture
            buffers in capture mode).
        iters: the traced iteration counters of the enclosing loops.
        name_stack: the name stack of the enclosing levels.
    """

    def __init__(
        self,
        interp: Interpreter,
        state: Any,
        *,
        iters: tuple = (),
        name_stack: str = "",
        unit: int | None = None,
        shard: Any = None,
    ):
        self.interp = interp
        self.state = state
        self.iters = tuple(iters)
        self.name_stack = name_stack
        self.unit = unit
        self.shard = shard
        self.pending: list[tuple[Any, int]] = []
        self.callers: tuple = ()
        self._info: _EqnInfo | None = None

    @property
    def eqn(self) -> Any:
        """The equation the current rule is applied to."""
        return None if self._info is None else self._info.eqn

    # -- scopes ---------------------------------------------------------
    def _unit_index(self) -> int:
        if self.unit is not None:
            return self.unit
        info = self._info
        if info.unit is None:
            eqn = info.eqn
            node = self.interp.add_node(
                eqn=eqn,
                name_stack=_join(self.name_stack, str(eqn.source_info.name_stack)),
                unit=len(self.interp.nodes),
                producers=tuple(p for p in info.in_prods if p >= 0),
                loop_depth=len(self.iters),
                checked=False,
                in_avals=(),
                out_avals=(),
                shard=self.shard,
                callers=self.callers,
            )
            info.unit = node.index
        return info.unit

    def child(
        self, state: Any, *, iters: tuple | None = None, shard: Any = None
    ) -> Ctx:
        """A context for a body (loop step, branch, per-device program).

        Args:
            state: the threaded state as seen inside the body.
            iters: the iteration counters inside the body (defaults to this
                context's).
            shard: ``(mesh, axes)`` when the body runs per device.

        Returns:
            A new `Ctx` whose equations belong to the current equation's unit.
        """
        eqn = self.eqn
        ns = self.name_stack
        if eqn is not None:
            ns = _join(ns, str(eqn.source_info.name_stack))
        sub = Ctx(
            self.interp,
            state,
            iters=self.iters if iters is None else iters,
            name_stack=ns,
            unit=self._unit_index(),
            shard=self.shard if shard is None else shard,
        )
        sub.callers = self.callers + ((eqn,) if eqn is not None else ())
        return sub

    def flush(self) -> None:
        """Folds the pending created flags into the record (detect mode)."""
        if self.interp.mode != "detect" or not self.pending:
            return
        flags = [f for f, _ in self.pending]
        idxs = np.asarray([i for _, i in self.pending], np.int32)
        self.pending = []
        if len(flags) == 1:
            hit, first = flags[0], jnp.int32(idxs[0])
        else:
            stacked = jnp.stack(flags)
            hit = jnp.any(stacked)
            first = jnp.asarray(idxs)[jnp.argmax(stacked)]
        st = self.state
        take = (st.index < 0) & hit
        its = list(self.iters) + [-1] * (self.interp.depth - len(self.iters))
        it = (
            jnp.stack([jnp.asarray(i, jnp.int32) for i in its])
            if its
            else jnp.zeros((0,), jnp.int32)
        )
        self.state = Record(
            jnp.where(take, first, st.index),
            jnp.where(take, it, st.iteration),
            st.device,
        )

    # -- evaluation -----------------------------------------------------
    def eval_jaxpr(self, jaxpr: Any, consts: Sequence[Any], args: Sequence[Any]):
        """Evaluates and checks `jaxpr` inline in this context.

        Inside a rule, when `args` are the equation's own inputs (a call-like
        primitive), the body's values keep the codes already computed for
        them and the phase analysis sees through the call.

        Args:
            jaxpr: a `Jaxpr` or `ClosedJaxpr`.
            consts: values of its constvars (ignored for a `ClosedJaxpr`).
            args: values of its invars.

        Returns:
            The list of output values.
        """
        if isinstance(jaxpr, jex_core.ClosedJaxpr):
            jaxpr, consts = jaxpr.jaxpr, jaxpr.consts
        info = self._info
        cells = prods = None
        ns = self.name_stack
        if info is not None:
            ns = _join(ns, str(info.eqn.source_info.name_stack))
            if len(args) == len(info.in_cells):
                cells, prods = info.in_cells, info.in_prods
        outer = self.name_stack, self._info, self.callers
        self.name_stack, self._info = ns, None
        if info is not None:
            self.callers = self.callers + (info.eqn,)
        try:
            outs, ocells, oprods = self._eval(jaxpr, consts, args, cells, prods)
        finally:
            self.name_stack, self._info, self.callers = outer
        if info is not None:
            info.out_cells, info.out_prods = ocells, oprods
        return outs

    def _eval(self, jaxpr, consts, args, arg_cells=None, arg_prods=None):
        from jaxnan._src import rules  # the rule table imports this module

        env: dict[Any, tuple[Any, Any, int]] = {}
        top = self.unit is None

        def bind(v, x, cell, prod):
            env[v] = (x, cell, prod)

        def fresh_cell(v, x):
            return _Cell(x) if _is_float_aval(v.aval) else None

        for v, x in zip(jaxpr.constvars, consts):
            bind(v, x, fresh_cell(v, x), -1)
        for i, (v, x) in enumerate(zip(jaxpr.invars, args)):
            cell = arg_cells[i] if arg_cells is not None else fresh_cell(v, x)
            prod = arg_prods[i] if arg_prods is not None else -1
            bind(v, x, cell, prod)

        def read(v):
            if isinstance(v, jex_core.Literal):
                cell = (
                    _Cell(v.val, host_code(v.val)) if _is_float_aval(v.aval) else None
                )
                return v.val, cell, -1
            return env[v]

        for eqn in jaxpr.eqns:
            ins = [read(v) for v in eqn.invars]
            invals = [x for x, _, _ in ins]
            prim = eqn.primitive
            rule = rules.RULES.get(prim)
            higher = primitives.is_higher_order(eqn)
            if rule is None and higher:
                raise NotImplementedError(
                    f"jaxnan: locate has no rule for the higher-order primitive "
                    f"`{prim.name}` (it holds a nested jaxpr). Register one with "
                    f"@jaxnan.register_rule(<the {prim.name} primitive>); see "
                    "the docstring of jaxnan.register_rule."
                )
            info = _EqnInfo(eqn, [c for _, c, _ in ins], [p for _, _, p in ins])
            if higher:
                self._info = info
                try:
                    _, outs = rule(self, *invals, **eqn.params)
                finally:
                    self._info = None
                outs = list(outs)
                if info.out_cells is not None:
                    ocells, oprods = list(info.out_cells), list(info.out_prods)
                else:
                    uid = info.unit if top else self.unit
                    if uid is None:
                        uid = self._unit_for(info)
                    ocells = [fresh_cell(v, x) for v, x in zip(eqn.outvars, outs)]
                    oprods = [uid] * len(outs)
                for v, x, c, p in zip(eqn.outvars, outs, ocells, oprods):
                    bind(v, x, c, p)
                continue
            if rule is not None:
                self._info = info
                try:
                    _, outs = rule(self, *invals, **eqn.params)
                finally:
                    self._info = None
                if not prim.multiple_results:
                    outs = [outs] if not isinstance(outs, list | tuple) else outs
            else:
                outs = prim.bind(*invals, **eqn.params)
                if not prim.multiple_results:
                    outs = [outs]
            outs = list(outs)
            self._after_first_order(eqn, ins, invals, outs, bind, fresh_cell, top)
        outs = [read(v) for v in jaxpr.outvars]
        return [x for x, _, _ in outs], [c for _, c, _ in outs], [p for _, _, p in outs]

    def _unit_for(self, info: _EqnInfo) -> int:
        saved = self._info
        self._info = info
        try:
            return self._unit_index()
        finally:
            self._info = saved

    def _after_first_order(self, eqn, ins, invals, outs, bind, fresh_cell, top):
        float_outs = [_is_float_aval(v.aval) for v in eqn.outvars]
        name = eqn.primitive.name
        if (
            name in primitives.REARRANGING
            and len(eqn.outvars) == 1
            and ins
            and ins[0][1] is not None
            and float_outs[0]
        ):
            # Same elements as the first input: same code, nothing to check.
            prod = ins[0][2] if top else self.unit
            if top:
                node = self._add_checked(eqn, ins, invals, outs, checked=False)
                prod = node.index
            bind(eqn.outvars[0], outs[0], ins[0][1], prod)
            return
        checked = any(float_outs)
        node = self._add_checked(eqn, ins, invals, outs, checked=checked)
        prod = node.index if top else self.unit
        cells = []
        for v, x, is_f in zip(eqn.outvars, outs, float_outs):
            cell = _Cell(x) if is_f else None
            cells.append(cell)
            bind(v, x, cell, prod)
        if not checked:
            return
        if self.interp.mode == "detect":
            in_codes = [c.get() for _, c, _ in ins if c is not None]
            static_in = [c for c in in_codes if isinstance(c, int)]
            if static_in and max(static_in) >= CODE_NAN:
                return  # a NaN literal came in: nothing can be created here
            if self.interp.allow is not None and not self.interp.allow(node):
                return
            out_codes = [c.get() for c in cells if c is not None]
            cout = functools.reduce(jnp.maximum, out_codes)
            cin = functools.reduce(jnp.maximum, in_codes) if in_codes else 0
            created = cout > cin
            if self.interp.min_code > CODE_INF:
                created = created & (cout >= self.interp.min_code)
            self.pending.append((created, node.index))
        elif node.index == self.interp.target.index:
            self._capture(invals, outs, top)

    def _add_checked(self, eqn, ins, invals, outs, *, checked: bool) -> Node:
        top = self.unit is None
        return self.interp.add_node(
            eqn=eqn,
            name_stack=_join(self.name_stack, str(eqn.source_info.name_stack)),
            unit=len(self.interp.nodes) if top else self.unit,
            producers=tuple(p for _, _, p in ins if p >= 0) if top else (),
            loop_depth=len(self.iters),
            checked=checked,
            in_avals=tuple(_aval(v) for v in eqn.invars),
            out_avals=tuple(_aval(v) for v in eqn.outvars),
            shard=self.shard,
            callers=self.callers,
        )

    def _capture(self, invals, outs, top: bool) -> None:
        vals = tuple(
            jnp.asarray(x, dtype=b.dtype).reshape(b.shape)
            for x, b in zip(list(invals) + list(outs), self.state)
        )
        if self.iters:
            want = self.interp.target.iteration[: len(self.iters)]
            match = jnp.all(
                jnp.stack([jnp.asarray(i, jnp.int32) for i in self.iters])
                == jnp.asarray(want, jnp.int32)
            )
            self.state = tuple(jnp.where(match, v, s) for v, s in zip(vals, self.state))
        else:
            self.state = vals
        if top and self.shard is None:
            raise _Stop


def run(
    interp: Interpreter, closed: Any, consts: Sequence[Any], args: Sequence[Any]
) -> tuple[Any, list]:
    """Interprets a closed jaxpr at the top level (call inside a jit trace).

    Args:
        interp: the interpreter (mode, depth, target).
        closed: the `ClosedJaxpr` to evaluate.
        consts: its constant values (passed as jit arguments).
        args: the flat argument values.

    Returns:
        ``(state, outs)``: the final record (detect) or capture buffers
        (capture), and the output values (empty when the capture pass stopped
        early).
    """
    if interp.mode == "detect":
        state = Record.empty(interp.depth)
    else:
        node = interp.target_node
        state = tuple(
            jnp.zeros(a.shape, a.dtype) for a in node.in_avals + node.out_avals
        )
    ctx = Ctx(interp, state)
    try:
        outs, _, prods = ctx._eval(closed.jaxpr, consts, args)
    except _Stop:
        return ctx.state, []
    ctx.flush()
    interp.out_producers = tuple(prods)
    return ctx.state, outs
