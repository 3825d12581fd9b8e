"""The instrumented jaxpr interpreter behind `jaxnan.locate`.

`Ctx` evaluates a jaxpr equation by equation while being traced by
`jax.jit` (never op by op, eagerly). Each floating value gets one int8
*code* from one fused reduction: 0 when finite, 1 when it holds +-Inf but no
NaN, 2 when it holds a NaN (an integer max of codes is exact; the CPU float
max that can skip NaN is not involved). An equation *creates* a nonfinite
value when the largest code of its floating outputs exceeds the largest code
of its floating inputs: an Inf or NaN out of finite inputs, or a NaN out of
inputs without NaN (``inf - inf``, ``0 * inf``). Equations whose output is a
pure rearrangement of one input (reshape, transpose, broadcast, ...) cannot
create anything: their output shares the input's code and costs nothing.

Two strategies share the walk:

- `Detect` threads a fixed-size `Record` (first event index, loop
  iterations, device position) through the program, updated with
  `jnp.where`, so it survives `jit`, `scan`/`while` carries, `cond` branches
  and `shard_map`. The created flags of straight-line equations are
  collected and folded into the record once per block (one `argmax` over a
  stacked vector).
- `Capture` re-runs the program knowing the (static) event index and
  returns the concrete inputs and outputs of that equation, at the event's
  iteration inside loops and on the event's device inside `shard_map`.

Everything static (the equation, name stack, nesting, producers for the
phase analysis) lives in `Interpreter.nodes`, indexed by the event index.
The interpreter owns the rule table (`RULES`, `register_rule`); the built-in
rules live in `rules.py`, which registers them here.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core
from jax.extend import source_info_util

from jaxnan._src import base

source_info_util.register_exclusion(__file__)

CODE_FINITE, CODE_INF, CODE_NAN = 0, 1, 2

# Primitives whose output holds exactly the elements of their first input,
# rearranged: they cannot create a nonfinite value and share the input's code.
_REARRANGING = frozenset(
    {
        "reshape",
        "squeeze",
        "expand_dims",
        "broadcast_in_dim",
        "transpose",
        "copy",
        "copy_p",
        "rev",
        "optimization_barrier",
    }
)

# Primitives whose floating output elements are elements of their inputs
# (selected, negated, clamped, rounded, sorted): an output code never exceeds
# the input codes, so they cannot create and are not checked. `_can_create`
# handles the exceptions (complex abs, empty max/min reductions, narrowing
# converts).
_SELECTING = frozenset(
    {
        "select_n",
        "max",
        "min",
        "neg",
        "abs",
        "sign",
        "floor",
        "ceil",
        "round",
        "concatenate",
        "pad",
        "slice",
        "dynamic_slice",
        "dynamic_update_slice",
        "sort",
        "clamp",
        "cummax",
        "cummin",
        "real",
        "imag",
        "conj",
        "reduce_max",
        "reduce_min",
        "convert_element_type",
    }
)


def _can_create(eqn: Any) -> bool:
    """False when an equation's outputs hold only (transformed) input elements."""
    name = eqn.primitive.name
    if name not in _SELECTING:
        return True
    ins = [v.aval for v in eqn.invars]
    if name in ("abs", "sign"):  # |z| of a complex z can overflow
        return jnp.issubdtype(ins[0].dtype, jnp.complexfloating)
    if name in ("reduce_max", "reduce_min"):  # an empty reduction gives -+inf
        return any(ins[0].shape[a] == 0 for a in eqn.params["axes"])
    if name == "convert_element_type":  # only widening float converts
        src, dst = ins[0].dtype, eqn.outvars[0].aval.dtype
        if not (base.is_inexact_dtype(src) and base.is_inexact_dtype(dst)):
            return True
        if jnp.issubdtype(src, jnp.complexfloating) != jnp.issubdtype(
            dst, jnp.complexfloating
        ):
            return True
        return bool(jnp.finfo(dst).max < jnp.finfo(src).max)
    return False


# -- the rule table --------------------------------------------------------

Rule = Callable[..., tuple[Any, Any]]

RULES: dict[Any, Rule] = {}
"""The rule of each primitive the interpreter treats specially."""


def register_rule(primitive: Any) -> Callable[[Rule], Rule]:
    """Registers how `jaxnan.locate` evaluates a primitive.

    The rule is called as ``rule(ctx, *invals, **params)`` for every equation
    of `primitive` and returns ``(ctx, outvals)`` (a list of outputs when the
    primitive has multiple results, else one value). It runs while
    `jax.jit` traces the instrumented program, so it works on tracers.

    For a first-order primitive the rule only computes the outputs; the
    interpreter still checks them (an output that is nonfinite while the
    inputs were finite is a creation event). For a higher-order primitive
    (one whose params hold a jaxpr) the rule must evaluate the body with
    ``ctx.eval_jaxpr(jaxpr, consts, args)``, which checks every equation of
    the body inline, so that events inside are found and named. A
    higher-order primitive without a rule makes `locate` raise
    `NotImplementedError`. Registering again replaces the rule.

    Args:
        primitive: a `jax.extend.core.Primitive`.

    Returns:
        A decorator that stores the rule and returns it unchanged.

    Raises:
        TypeError: when `primitive` is not a jax primitive.

    Examples:
        A primitive with no lowering, evaluated by its rule:

        >>> import jax.numpy as jnp, jaxnan
        >>> from jax.extend.core import Primitive
        >>> double_p = Primitive("double")
        >>> _ = double_p.def_abstract_eval(lambda x: x)
        >>> @jaxnan.register_rule(double_p)
        ... def _double_rule(ctx, x):
        ...     return ctx, x + x
        >>> def f(x):
        ...     return jnp.log(double_p.bind(x))
        >>> jaxnan.locate(f)(jnp.zeros(2)).primitive
        'log'

    .. versionadded:: 0.1.0
    """
    if not isinstance(primitive, jex_core.Primitive):
        raise TypeError(
            f"jaxnan.register_rule(primitive) needs a jax primitive "
            f"(jax.extend.core.Primitive), got {type(primitive).__name__}: "
            f"{primitive!r}. Pass for example jax.extend.core.primitives.exp_p."
        )

    def decorator(rule: Rule) -> Rule:
        RULES[primitive] = rule
        return rule

    return decorator


# -- records and nodes -----------------------------------------------------


class Record(NamedTuple):
    """The fixed-size record of the first creation event (detect mode).

    Attributes:
        index: int32 scalar, the node index of the first event, -1 if none.
        iteration: int32[depth], the enclosing loop iterations, outermost
            first, -1 padded.
        device: int32 scalar, the position inside the device grid of the
            enclosing `shard_map`/`pmap` where the event happened first, -1
            outside them.
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


class Entry(NamedTuple):
    """One equation of a flattened top-level program (see `run_block`).

    Attributes:
        eqn: the equation.
        name_stack: the name stack of the calls it was inlined from.
        callers: the call equations it was inlined from, outermost first.
    """

    eqn: Any
    name_stack: str
    callers: tuple


class Slot(NamedTuple):
    """What the evaluation loop knows about one variable."""

    value: Any
    cell: _Cell | None  # None for non-floating values
    producer: int  # node index of the top-level producer, -1 for inputs


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


def is_float_aval(aval: Any) -> bool:
    """Whether an abstract value is floating (real or complex)."""
    return base.is_inexact_dtype(getattr(aval, "dtype", None))


# First-order primitives whose params hold a small jaxpr (a combiner applied
# elementwise, not a nested computation to interpret): bound as they are.
_COMBINER_PRIMITIVES = frozenset(
    {"reduce", "reduce_window", "select_and_scatter", "select_and_gather_add"}
)


def is_higher_order(eqn: Any) -> bool:
    """True when an equation's params hold a jaxpr (a nested computation)."""
    name = eqn.primitive.name
    if name.startswith("scatter") or name in _COMBINER_PRIMITIVES:
        return False
    return any(_is_jaxpr_param(v) for v in eqn.params.values())


def _is_jaxpr_param(v: Any) -> bool:
    if isinstance(v, jex_core.Jaxpr | jex_core.ClosedJaxpr):
        return True
    if isinstance(v, tuple | list):
        return any(isinstance(b, jex_core.Jaxpr | jex_core.ClosedJaxpr) for b in v)
    return False


def _sub_jaxprs(eqn: Any) -> list:
    out = []
    for v in eqn.params.values():
        items = v if isinstance(v, tuple | list) else (v,)
        for b in items:
            if isinstance(b, jex_core.ClosedJaxpr):
                out.append(b.jaxpr)
            elif isinstance(b, jex_core.Jaxpr):
                out.append(b)
    return out


def loop_depth(jaxpr: Any) -> int:
    """The deepest nesting of `scan`/`while` loops in `jaxpr`."""
    best = 0
    for eqn in jaxpr.eqns:
        inner = max((loop_depth(j) for j in _sub_jaxprs(eqn)), default=0)
        if eqn.primitive.name in ("scan", "while"):  # one iteration index each
            inner += 1
        best = max(best, inner)
    return best


def join_names(a: str, b: str) -> str:
    """Joins two name stacks with ``/``."""
    if not b:
        return a
    if not a:
        return b
    return f"{a}/{b}"


# -- strategies ------------------------------------------------------------


class Detect:
    """Strategy of the first pass: thread a `Record` of the first event."""

    def initial_state(self, interp: Interpreter) -> Record:
        """The record before any equation ran."""
        return Record.empty(interp.depth)

    def on_checked(self, ctx: Ctx, node: Node, ins, cells, invals, outs) -> None:
        """Queues the created flag of a checked equation."""
        in_codes = [s.cell.get() for s in ins if s.cell is not None]
        static_in = [c for c in in_codes if isinstance(c, int)]
        if static_in and max(static_in) >= CODE_NAN:
            return  # a NaN literal came in: nothing can be created here
        out_codes = [c.get() for c in cells if c is not None]
        cout = functools.reduce(jnp.maximum, out_codes)
        cin = functools.reduce(jnp.maximum, in_codes) if in_codes else 0
        ctx.pending.append((cout > cin, node.index))

    def flush(self, ctx: Ctx) -> None:
        """Folds the pending created flags of `ctx` into its record."""
        if not ctx.pending:
            return
        flags = [f for f, _ in ctx.pending]
        idxs = np.asarray([i for _, i in ctx.pending], np.int32)
        ctx.pending = []
        if len(flags) == 1:
            hit, first = flags[0], jnp.int32(idxs[0])
        else:
            stacked = jnp.stack(flags)
            hit = jnp.any(stacked)
            first = jnp.asarray(idxs)[jnp.argmax(stacked)]
        st = ctx.state
        take = (st.index < 0) & hit
        its = list(ctx.iters) + [-1] * (ctx.interp.depth - len(ctx.iters))
        it = (
            jnp.stack([jnp.asarray(i, jnp.int32) for i in its])
            if its
            else jnp.zeros((0,), jnp.int32)
        )
        ctx.state = Record(
            jnp.where(take, first, st.index),
            jnp.where(take, it, st.iteration),
            st.device,
        )

    def merge_devices(self, ctx: Ctx, stacked: Record, ndev: int) -> Record:
        """The event with the smallest index over devices, with its position."""
        del ndev
        old = ctx.state
        valid = stacked.index >= 0
        key = jnp.where(valid, stacked.index, jnp.iinfo(jnp.int32).max)
        pos = jnp.argmin(key).astype(jnp.int32)
        take = (old.index < 0) & jnp.any(valid)
        return Record(
            jnp.where(take, stacked.index[pos], old.index),
            jnp.where(take, stacked.iteration[pos], old.iteration),
            jnp.where(take, pos, old.device),
        )


class Capture:
    """Strategy of the second pass: read the values of the target equation."""

    def __init__(self, target: Target):
        self.target = target

    def initial_state(self, interp: Interpreter) -> tuple:
        """Zero buffers shaped like the target equation's inputs/outputs."""
        node = interp.target_node
        return tuple(
            jnp.zeros(a.shape, a.dtype) for a in node.in_avals + node.out_avals
        )

    def on_checked(self, ctx: Ctx, node: Node, ins, cells, invals, outs) -> None:
        """Stores the values when `node` is the target."""
        if node.index != self.target.index:
            return
        vals = tuple(
            jnp.asarray(x, dtype=b.dtype).reshape(b.shape)
            for x, b in zip(list(invals) + list(outs), ctx.state)
        )
        if ctx.iters:
            want = self.target.iteration[: len(ctx.iters)]
            match = jnp.all(
                jnp.stack([jnp.asarray(i, jnp.int32) for i in ctx.iters])
                == jnp.asarray(want, jnp.int32)
            )
            ctx.state = tuple(jnp.where(match, v, s) for v, s in zip(vals, ctx.state))
        else:
            ctx.state = vals
        if ctx.unit is None and ctx.shard is None:
            raise _Stop

    def flush(self, ctx: Ctx) -> None:
        """Nothing is pending in the capture pass."""
        ctx.pending = []

    def merge_devices(self, ctx: Ctx, stacked: tuple, ndev: int) -> tuple:
        """The buffers of the device where the event happened."""
        pos = max(self.target.device, 0) if ndev > 1 else 0
        return jax.tree_util.tree_map(lambda s: s[pos], stacked)


class Interpreter:
    """Holds the strategy, the static node table and the capture target.

    Args:
        mode: ``"detect"``, ``"capture"``, or a `Detect`/`Capture` instance.
        depth: the deepest loop nesting (`loop_depth`).
        target: the capture target (with ``mode="capture"``).
    """

    def __init__(self, mode: Any, depth: int, target: Target | None = None):
        if mode == "detect":
            mode = Detect()
        elif mode == "capture":
            mode = Capture(target)
        if not isinstance(mode, Detect | Capture):
            raise ValueError(f"jaxnan: unknown interpreter mode {mode!r}")
        self.strategy = mode
        self.depth = depth
        self.target = getattr(mode, "target", target)
        self.target_node: Node | None = None
        self.nodes: list[Node] = []
        self.out_producers: tuple[int, ...] = ()

    @property
    def mode(self) -> str:
        """``"detect"`` or ``"capture"``."""
        return "detect" if isinstance(self.strategy, Detect) else "capture"

    def add_node(self, *, top: bool, unit: int | None = None, **kw: Any) -> Node:
        """Appends a node (its own unit when `top`) and returns it."""
        index = len(self.nodes)
        node = Node(index=index, unit=index if top else unit, **kw)
        self.nodes.append(node)
        return node


class _EqnInfo:
    """What the interpreter knows about the equation a rule is applied to."""

    __slots__ = ("eqn", "ins", "out_slots", "unit")

    def __init__(self, eqn: Any, ins: list[Slot]):
        self.eqn = eqn
        self.ins = ins
        self.out_slots: list[Slot] | None = None
        self.unit: int | None = None


class Ctx:
    """The interpretation context handed to every rule.

    A rule ``rule(ctx, *invals, **params) -> (ctx, outvals)`` reads the
    current equation as `ctx.eqn`. A rule for a call-like higher-order
    primitive evaluates (and checks) its body inline with
    ``ctx.eval_jaxpr(jaxpr, consts, args)``. A rule for a loop or branch
    opens a scope with `ctx.child`, threads `ctx.state` (a pytree of fixed
    structure) through the construct, and calls `ctx.flush` first.

    Attributes:
        interp: the `Interpreter` (strategy, node table, capture target).
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
                top=True,
                eqn=eqn,
                name_stack=join_names(self.name_stack, str(eqn.source_info.name_stack)),
                producers=tuple(s.producer for s in info.ins if s.producer >= 0),
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
            ns = join_names(ns, str(eqn.source_info.name_stack))
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
        self.interp.strategy.flush(self)

    def merge_devices(self, stacked: Any, ndev: int) -> None:
        """Sets the state from per-device states stacked on a leading axis."""
        self.state = self.interp.strategy.merge_devices(self, stacked, ndev)

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
        ins = None
        ns = self.name_stack
        if info is not None:
            ns = join_names(ns, str(info.eqn.source_info.name_stack))
            if len(args) == len(info.ins):
                ins = [s._replace(value=x) for s, x in zip(info.ins, args)]
        outer = self.name_stack, self._info, self.callers
        self.name_stack, self._info = ns, None
        if info is not None:
            self.callers = self.callers + (info.eqn,)
        try:
            slots = self.eval_slots(jaxpr, consts, args, ins)
        finally:
            self.name_stack, self._info, self.callers = outer
        if info is not None:
            info.out_slots = slots
        return [s.value for s in slots]

    def eval_slots(self, jaxpr, consts, args, ins=None) -> list[Slot]:
        """Evaluates `jaxpr`; returns the `Slot` of each output.

        Args:
            jaxpr: anything with ``constvars``, ``invars``, ``eqns`` and
                ``outvars`` (a `Jaxpr`, or a block of equations).
            consts: values of its constvars.
            args: values of its invars.
            ins: `Slot`s of the invars (codes and producers known outside),
                or None for fresh ones.
        """
        env: dict[Any, Slot] = {}
        for v, x in zip(jaxpr.constvars, consts):
            env[v] = Slot(x, _fresh_cell(v, x), -1)
        for i, (v, x) in enumerate(zip(jaxpr.invars, args)):
            env[v] = ins[i] if ins is not None else Slot(x, _fresh_cell(v, x), -1)
        for eqn in jaxpr.eqns:
            self.step(env, eqn)
        return [_read(env, v) for v in jaxpr.outvars]

    def step(self, env: dict, eqn: Any) -> None:
        """Evaluates and checks one equation, binding its outputs in `env`."""
        ins = [_read(env, v) for v in eqn.invars]
        invals = [s.value for s in ins]
        prim = eqn.primitive
        rule = RULES.get(prim)
        higher = is_higher_order(eqn)
        if rule is None and higher:
            raise NotImplementedError(
                f"jaxnan: locate has no rule for the higher-order primitive "
                f"`{prim.name}` (it holds a nested jaxpr). Register one with "
                f"@jaxnan.register_rule(<the {prim.name} primitive>); see "
                "the docstring of jaxnan.register_rule."
            )
        info = _EqnInfo(eqn, ins)
        if rule is not None:
            self._info = info
            try:
                _, outs = rule(self, *invals, **eqn.params)
            finally:
                self._info = None
            if not prim.multiple_results and not higher:
                outs = [outs] if not isinstance(outs, list | tuple) else outs
        else:
            outs = prim.bind(*invals, **eqn.params)
            if not prim.multiple_results:
                outs = [outs]
        outs = list(outs)
        if higher:
            self._bind_higher(env, info, outs)
        else:
            self._check_first_order(env, eqn, ins, invals, outs)

    def _bind_higher(self, env: dict, info: _EqnInfo, outs: list) -> None:
        eqn = info.eqn
        if info.out_slots is not None:  # an inlined call: codes flow through
            for v, x, s in zip(eqn.outvars, outs, info.out_slots):
                env[v] = s._replace(value=x)
            return
        if self.unit is not None:
            uid = self.unit
        elif info.unit is not None:
            uid = info.unit
        else:
            saved, self._info = self._info, info
            try:
                uid = self._unit_index()
            finally:
                self._info = saved
        for v, x in zip(eqn.outvars, outs):
            env[v] = Slot(x, _fresh_cell(v, x), uid)

    def _check_first_order(self, env, eqn, ins, invals, outs) -> None:
        top = self.unit is None
        float_outs = [is_float_aval(v.aval) for v in eqn.outvars]
        if (
            eqn.primitive.name in _REARRANGING
            and len(eqn.outvars) == 1
            and ins
            and ins[0].cell is not None
            and float_outs[0]
        ):
            # Same elements as the first input: same code, nothing to check.
            prod = ins[0].producer if top else self.unit
            if top:
                prod = self._add_checked(eqn, ins, checked=False).index
            env[eqn.outvars[0]] = Slot(outs[0], ins[0].cell, prod)
            return
        checked = any(float_outs) and _can_create(eqn)
        node = self._add_checked(eqn, ins, checked=checked)
        prod = node.index if top else self.unit
        cells = []
        for v, x, is_f in zip(eqn.outvars, outs, float_outs):
            cell = _Cell(x) if is_f else None
            cells.append(cell)
            env[v] = Slot(x, cell, prod)
        if checked:
            self.interp.strategy.on_checked(self, node, ins, cells, invals, outs)

    def _add_checked(self, eqn, ins: list[Slot], *, checked: bool) -> Node:
        top = self.unit is None
        return self.interp.add_node(
            top=top,
            unit=self.unit,
            eqn=eqn,
            name_stack=join_names(self.name_stack, str(eqn.source_info.name_stack)),
            producers=tuple(s.producer for s in ins if s.producer >= 0) if top else (),
            loop_depth=len(self.iters),
            checked=checked,
            in_avals=tuple(v.aval for v in eqn.invars),
            out_avals=tuple(v.aval for v in eqn.outvars),
            shard=self.shard,
            callers=self.callers,
        )


def _fresh_cell(v: Any, x: Any) -> _Cell | None:
    return _Cell(x) if is_float_aval(v.aval) else None


def fresh_slot(v: Any, x: Any, producer: int) -> Slot:
    """A `Slot` for value `x` of variable `v` whose code is not known yet."""
    return Slot(x, _fresh_cell(v, x), producer)


def _read(env: dict, v: Any) -> Slot:
    if isinstance(v, jex_core.Literal):
        cell = _Cell(v.val, host_code(v.val)) if is_float_aval(v.aval) else None
        return Slot(v.val, cell, -1)
    return env[v]


def run(
    interp: Interpreter, closed: Any, consts: Sequence[Any], args: Sequence[Any]
) -> tuple[Any, list]:
    """Interprets a closed jaxpr at the top level (call inside a jit trace).

    The whole program is one instrumented computation; `jaxnan.locate` uses
    the block-wise `blocks.detect` instead, which compiles each distinct
    block once.

    Args:
        interp: the interpreter (strategy, depth, target).
        closed: the `ClosedJaxpr` to evaluate.
        consts: its constant values (passed as jit arguments).
        args: the flat argument values.

    Returns:
        ``(state, outs)``: the final record (detect) or capture buffers
        (capture), and the output values (empty when the capture pass stopped
        early).
    """
    ctx = Ctx(interp, interp.strategy.initial_state(interp))
    try:
        slots = ctx.eval_slots(closed.jaxpr, consts, args)
    except _Stop:
        return ctx.state, []
    ctx.flush()
    interp.out_producers = tuple(s.producer for s in slots)
    return ctx.state, [s.value for s in slots]


def run_block(
    interp: Interpreter,
    entries: Sequence[Entry],
    invars: Sequence[Any],
    outvars: Sequence[Any],
    args: Sequence[Any],
    producers: Sequence[int],
    codes: Sequence[Any] | None = None,
) -> tuple[Any, list[Slot]]:
    """Interprets a block of top-level equations (call inside a jit trace).

    Args:
        interp: the interpreter (strategy, depth, target).
        entries: the equations, each with the name stack and callers of the
            calls it was inlined from.
        invars: the variables the block reads from outside.
        outvars: the variables (or literals) it returns.
        args: the values of `invars`.
        producers: the producer index to give each of `invars`.
        codes: the code of each of `invars` when already known (a traced
            int8 scalar), else None.

    Returns:
        ``(state, slots)``: the final record (detect) or capture buffers
        (capture), and the `Slot` of each of `outvars` (empty when the
        capture pass stopped early).
    """
    ctx = Ctx(interp, interp.strategy.initial_state(interp))
    env = {v: fresh_slot(v, x, p) for v, x, p in zip(invars, args, producers)}
    for v, c in zip(invars, codes or ()):
        if c is not None and env[v].cell is not None:
            env[v].cell.code = c
    try:
        for e in entries:
            ctx.name_stack, ctx.callers = e.name_stack, e.callers
            ctx.step(env, e.eqn)
    except _Stop:
        return ctx.state, []
    ctx.flush()
    return ctx.state, [_read(env, v) for v in outvars]
