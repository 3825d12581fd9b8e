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
create anything: their output shares the input's code and costs nothing;
equations whose outputs are selected input elements (`select_n`, `max`,
`slice`, widening converts: `primitives.SELECTING`) cannot either and are not
checked.

Two strategies (in `records.py`) share the walk:

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
rules live in `rules.py`, which registers them here. `run` interprets a whole
program; `run_block` a block of flattened top-level equations, which is how
`blocks.py` runs deep models (each distinct block compiled once).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from jax.extend import core as jex_core
from jax.extend import source_info_util

from jaxnan._src.core import dtypes, primitives
from jaxnan._src.locate.strategies import (
    Capture,
    Cell,
    Detect,
    Entry,
    Node,
    Slot,
    Stop,
    Table,
    Target,
    host_code,
)

source_info_util.register_exclusion(__file__)

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


def is_float_aval(aval: Any) -> bool:
    """Whether an abstract value is floating (real or complex)."""
    return dtypes.is_inexact_dtype(getattr(aval, "dtype", None))


def join_names(a: str, b: str) -> str:
    """Joins two name stacks with ``/``."""
    if not b:
        return a
    if not a:
        return b
    return f"{a}/{b}"


class Interpreter:
    """Holds the strategy, the static node table and the capture target.

    Args:
        mode: ``"detect"``, ``"capture"``, or a `Detect`/`Capture`/`Table` instance.
        depth: the deepest loop nesting (`loop_depth`).
        target: the capture target (with ``mode="capture"``).
    """

    def __init__(self, mode: Any, depth: int, target: Target | None = None):
        if mode == "detect":
            mode = Detect()
        elif mode == "capture":
            mode = Capture(target)
        if not isinstance(mode, Detect | Capture | Table):
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
        self.pending: list[tuple[Any, Any, int]] = []
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
        higher = primitives.is_higher_order(eqn)
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
            eqn.primitive.name in primitives.REARRANGING
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
        checked = any(float_outs) and primitives.can_create(eqn)
        node = self._add_checked(eqn, ins, checked=checked)
        prod = node.index if top else self.unit
        cells = []
        for v, x, is_f in zip(eqn.outvars, outs, float_outs):
            cell = Cell(x) if is_f else None
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


def _fresh_cell(v: Any, x: Any) -> Cell | None:
    return Cell(x) if is_float_aval(v.aval) else None


def fresh_slot(v: Any, x: Any, producer: int) -> Slot:
    """A `Slot` for value `x` of variable `v` whose code is not known yet."""
    return Slot(x, _fresh_cell(v, x), producer)


def _read(env: dict, v: Any) -> Slot:
    if isinstance(v, jex_core.Literal):
        cell = Cell(v.val, host_code(v.val)) if is_float_aval(v.aval) else None
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
    except Stop:
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

    Returns:
        ``(state, slots)``: the final record (detect) or capture buffers
        (capture), and the `Slot` of each of `outvars` (empty when the
        capture pass stopped early).
    """
    ctx = Ctx(interp, interp.strategy.initial_state(interp))
    env = {v: fresh_slot(v, x, p) for v, x, p in zip(invars, args, producers)}
    try:
        for e in entries:
            ctx.name_stack, ctx.callers = e.name_stack, e.callers
            ctx.step(env, e.eqn)
    except Stop:
        return ctx.state, []
    ctx.flush()
    return ctx.state, [_read(env, v) for v in outvars]
