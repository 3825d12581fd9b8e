"""Block-wise detection: compile each distinct block of a program once.

Instrumenting every value of a deep model in one program makes XLA compile a
graph several times the size of the plain one, and its compile time grows
faster than the graph (28x the plain compile at 8 transformer layers). An
unrolled model repeats itself, so `detect` cuts the program into blocks and
compiles each *distinct* block once:

1. `flatten`: the top-level calls that the built-in rules inline anyway
   (`jit`, `closed_call`, `checkpoint`, `custom_jvp_call`, `custom_vjp_call`)
   are inlined into one list of `Entry` (equation, name stack, callers), the
   body variables renamed per call site.
2. `cut`: content-defined cut points (a hash of the last few equation
   signatures, as rsync and deduplicating stores cut files) make the blocks
   of layer k and layer k+1 start at the same relative equations, so that
   they are equal.
3. Each block has a key: the signatures of its equations (primitive, params,
   abstract values, literals, name stacks), its wiring (which output of which
   equation feeds which input, inputs from outside numbered by first use)
   and which of its values are used later. Blocks with equal keys compute
   the same function of their inputs and share everything compiled for one:
   - the node table, from one trace of the interpreter with the `Table`
     strategy (no check, nothing compiled), copied with the equations and
     producers of each block;
   - the plain block (`_plain`): its outputs and one finiteness code of every
     floating value it computes, read with one reduction per dtype over their
     concatenation;
   - the instrumented block (`interpreter.run_block` with the `Detect`
     strategy), compiled only for a block whose plain code is not finite.
4. The blocks run plain in program order on the values of the previous ones,
   dead values freed as they go. No equation of a block whose values are all
   finite can have created a nonfinite value, so the first event of the
   program lies in the first block whose code is not finite and that the
   instrumented block finds an event in (a block whose Inf only came in is
   passed over); the first NaN-creating event likewise, among the blocks
   holding a NaN. A block that holds loop or branch bodies (`scan`, `while`,
   `cond`, `shard_map`), a primitive evaluated by its rule or a side effect
   (`jax.debug.print`) always runs instrumented (`_by_rules`). The event
   block's inputs are kept, and `capture.capture_event` re-runs that block
   alone with the `Capture` strategy.
5. A program of at most `SMALL_PROGRAM` equations is one block, run
   instrumented at once while searching: at that size the plain pass saves
   less than its compiles cost.

The answer is the one a single instrumented program gives: the same creation
test on the same equations in the same order. Only fusion across block
boundaries differs, as it differs between any two XLA programs. On the
4-layer LM of `benchmarks/locate_speed.py` the instrumented blocks compile
3-4x slower than the plain ones: a healthy step compiles no instrumented
block, an event step one or two.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core
from jax.extend import source_info_util

from jaxnan._src.core import compat, dtypes, primitives
from jaxnan._src.locate import interpreter, primitive_rules, strategies
from jaxnan._src.locate.strategies import Entry, Node

source_info_util.register_exclusion(__file__)

# Producer indices at or above this mark a block input: EXTERNAL + k is the
# k-th input of the block (resolved when the node table is placed).
EXTERNAL = 1 << 40

# Content-defined cutting: a block ends after an equation whose window hash
# is 0 modulo AVERAGE, once it has MIN_LEN equations; never longer than MAX_LEN.
WINDOW, AVERAGE, MIN_LEN, MAX_LEN = 4, 16, 8, 64

# A program of at most this many equations (once flattened) is one block, run
# instrumented: at that size each compile's fixed cost outweighs what the
# plain blocks save, and no layer repeats enough to be reused. On the 46
# scenarios of tests/cases (39 of them this small) the detect passes went
# from 33.3-33.7 to 25.8 CPU-seconds, every answer unchanged.
SMALL_PROGRAM = 100

# The finiteness code of a plain block concatenates its values (one reduction
# per dtype instead of one per value); the copy is bounded by this size.
GROUP_BYTES = 16 << 20


def compiler_options() -> dict[str, Any]:
    """XLA options of the instrumented blocks.

    On CPU the LLVM backend at optimization level 0 halves the compile time
    of an instrumented block, and the classic elemental emitters instead of
    the MLIR fusion emitters halve it again (an instrumented block is mostly
    small code reductions, one kernel each; 11.2 s -> 3.7-5.2 s for six
    blocks of the 4-layer LM). Its run is a few times slower, and runs once;
    floating-point semantics do not depend on either (no fast math).
    """
    if jax.default_backend() == "cpu":
        return {
            "xla_backend_optimization_level": 0,
            "xla_cpu_use_fusion_emitters": False,
        }
    return {}


class Program(NamedTuple):
    """A top-level program with its calls inlined."""

    entries: list[Entry]
    invars: list  # the function's arguments
    constvars: list  # top-level and inlined constants
    const_values: list
    outvars: list  # variables or literals


class Block(NamedTuple):
    """A run of consecutive entries of a `Program`."""

    start: int  # position of the first entry in the program
    entries: list[Entry]
    invars: list  # read from outside, numbered by first use
    outvars: list  # used after the block or returned by the program
    key: Any


@dataclasses.dataclass
class _Compiled:
    fn: Any
    interp: interpreter.Interpreter
    out_producers: list
    block: Block  # the block it was traced on (its equations are in nodes)


@dataclasses.dataclass
class Detection:
    """What the block-wise detect pass found.

    Attributes:
        index: node index of the first creation event, -1 if none.
        iteration: int32 loop iterations of the event (outermost first).
        device: device position inside `shard_map`/`pmap`, -1 elsewhere.
        nodes: the node table of the whole program.
        out_producers: the producer node of each output of the program.
        outs: the output values.
        blocks: number of blocks run; compiled: how many were compiled.
        nan_index: node index of the first event that created a NaN out of
            NaN-free inputs, -1 if none.
        spans: ``(first node, end node)`` of each block in `nodes`.
    """

    index: int
    iteration: np.ndarray
    device: int
    nodes: list[Node]
    out_producers: tuple[int, ...]
    outs: list
    blocks: int = 0
    compiled: int = 0
    depth: int = 0
    event_block: Block | None = None
    event_args: list | None = None
    event_offset: int = 0
    nan_index: int = -1
    spans: list[tuple[int, int]] = dataclasses.field(default_factory=list)


# -- flattening ----------------------------------------------------------


def _inline_param(eqn: Any) -> str | None:
    rule = primitive_rules.RULES.get(eqn.primitive)
    return getattr(rule, "inline_param", None)


def flatten(closed: Any) -> Program:
    """Inlines the top-level calls of `closed` into one list of entries."""
    entries: list[Entry] = []
    constvars = list(closed.jaxpr.constvars)
    const_values = list(closed.consts)

    def atom(sub: dict, v: Any) -> Any:
        if isinstance(v, jex_core.Literal):
            return v
        return sub.get(v, v)

    def walk(jaxpr: Any, sub: dict, ns: str, callers: tuple, fresh: bool) -> None:
        for eqn in jaxpr.eqns:
            invars = [atom(sub, v) for v in eqn.invars]
            param = _inline_param(eqn)
            if param is not None:
                body = eqn.params[param]
                consts = ()
                if isinstance(body, jex_core.ClosedJaxpr):
                    body, consts = body.jaxpr, body.consts
                inner: dict = {}
                for v, c in zip(body.constvars, consts):
                    nv = jex_core.Var(v.aval)
                    constvars.append(nv)
                    const_values.append(c)
                    inner[v] = nv
                inner.update(zip(body.invars, invars))
                name = interpreter.join_names(ns, str(eqn.source_info.name_stack))
                walk(body, inner, name, (*callers, eqn), True)
                for o, bo in zip(eqn.outvars, body.outvars):
                    sub[o] = atom(inner, bo)
                continue
            outvars = eqn.outvars
            if fresh:
                outvars = [
                    v if isinstance(v, jex_core.DropVar) else jex_core.Var(v.aval)
                    for v in eqn.outvars
                ]
                sub.update(zip(eqn.outvars, outvars))
            if fresh or any(a is not b for a, b in zip(invars, eqn.invars)):
                eqn = eqn.replace(invars=invars, outvars=outvars)
            entries.append(Entry(eqn, ns, callers))

    top: dict = {}
    walk(closed.jaxpr, top, "", (), False)
    outvars = [atom(top, v) for v in closed.jaxpr.outvars]
    return Program(entries, list(closed.jaxpr.invars), constvars, const_values, outvars)


# -- keys and cuts -------------------------------------------------------


def _param_key(v: Any) -> Any:
    if isinstance(v, jex_core.Jaxpr | jex_core.ClosedJaxpr):
        return ("jaxpr", id(v))  # bodies are shared objects: identity
    if isinstance(v, tuple | list):
        return (type(v).__name__, tuple(_param_key(x) for x in v))
    if isinstance(v, dict):
        return ("dict", tuple(sorted((k, _param_key(x)) for k, x in v.items())))
    if isinstance(v, np.ndarray):
        return ("array", v.dtype.str, v.shape, v.tobytes())
    try:
        hash(v)
    except TypeError:
        return ("id", id(v))
    return (type(v), v)


def _signature(e: Entry) -> Any:
    eqn = e.eqn
    ins = tuple(
        ("literal", v.aval, np.asarray(v.val).tobytes())
        if isinstance(v, jex_core.Literal)
        else v.aval
        for v in eqn.invars
    )
    outs = tuple((v.aval, isinstance(v, jex_core.DropVar)) for v in eqn.outvars)
    return (
        eqn.primitive,
        _param_key(eqn.params),
        ins,
        outs,
        e.name_stack,
        str(eqn.source_info.name_stack),
        len(e.callers),
        frozenset(eqn.effects),
    )


def small(program: Program) -> bool:
    """Whether `program` is one block, run instrumented at once while searching."""
    return len(program.entries) <= SMALL_PROGRAM


def cut(program: Program) -> list[Block]:
    """Cuts a program into blocks at content-defined points, with their keys.

    A `small` program is one block.
    """
    entries = program.entries
    n = len(entries)
    interned: dict = {}
    ids = [interned.setdefault(_signature(e), len(interned)) for e in entries]
    last_use: dict = {}
    for pos, e in enumerate(entries):
        for v in e.eqn.invars:
            if not isinstance(v, jex_core.Literal):
                last_use[v] = pos
    for v in program.outvars:
        if not isinstance(v, jex_core.Literal):
            last_use[v] = n
    if small(program):
        return [_block(entries, ids, last_use, 0, n)]
    hashes = [hash(tuple(ids[max(0, i - WINDOW + 1) : i + 1])) for i in range(n)]
    bounds, start, i = [], 0, 0
    while i < n:
        length = i - start + 1
        end = None
        if (length >= MIN_LEN and hashes[i] % AVERAGE == 0) or i == n - 1:
            end = i + 1
        elif length >= MAX_LEN:
            # No natural cut (a short period): cut after the smallest hash of
            # the span, the same phase of every period, so blocks still align.
            span = range(start + MIN_LEN - 1, i + 1)
            end = min(span, key=lambda j: (hashes[j] % AVERAGE, j)) + 1
        if end is not None:
            bounds.append((start, end))
            start = i = end
        else:
            i += 1
    return [_block(entries, ids, last_use, a, b) for a, b in bounds]


def _block(entries, ids, last_use, a: int, b: int) -> Block:
    local: dict = {}
    ext: dict = {}
    wiring = []
    for pos in range(a, b):
        eqn = entries[pos].eqn
        w = []
        for v in eqn.invars:
            if isinstance(v, jex_core.Literal):
                w.append(None)
            elif v in local:
                w.append(local[v])
            else:
                w.append(-1 - ext.setdefault(v, len(ext)))
        wiring.append(tuple(w))
        for j, o in enumerate(eqn.outvars):
            if not isinstance(o, jex_core.DropVar):
                local[o] = (pos - a, j)
    live = [v for v in local if last_use.get(v, -1) >= b]
    key = (tuple(ids[a:b]), tuple(wiring), tuple(local[v] for v in live))
    return Block(a, entries[a:b], list(ext), live, key)


# -- detect --------------------------------------------------------------


def _interpreted(block: Block, depth: int, strategy: Any) -> _Compiled:
    """The `jax.jit` of `block` run by the interpreter with `strategy`.

    Compiled at its first call; tracing it builds the block's node table.
    """
    interp = interpreter.Interpreter(strategy, depth)
    out: _Compiled = _Compiled(None, interp, [], block)
    marks = [EXTERNAL + k for k in range(len(block.invars))]

    def fn(args: list) -> tuple:
        interp.nodes = []  # a retrace (other shardings) builds the same table
        state, slots = interpreter.run_block(
            interp, block.entries, block.invars, block.outvars, args, marks
        )
        out.out_producers = [s.producer for s in slots]
        return state, [s.value for s in slots]

    out.fn = jax.jit(fn, compiler_options=compiler_options())
    return out


def _plain(block: Block) -> Any:
    """``jit(block)(args) -> (outputs, code)``: the block uninstrumented.

    `code` is the largest finiteness code (`strategies.CODE_INF`,
    `strategies.CODE_NAN`, 0 when finite) of every floating value the block
    computes, read with one reduction per dtype over their concatenation
    (a reduction per value is what makes an instrumented block compile 3x
    slower than the plain one; `_groups` bounds the copy). No equation of a
    block whose values are all finite can have created a nonfinite value, so
    only a block with a nonzero code is re-run instrumented.
    """
    eqns = [e.eqn for e in block.entries]
    values = [
        v
        for e in eqns
        for v in e.outvars
        if not isinstance(v, jex_core.DropVar) and dtypes.is_inexact_dtype(v.aval.dtype)
    ]
    effects = set().union(*(e.effects for e in eqns))
    jaxpr = jex_core.Jaxpr(
        [],
        list(block.invars),
        [*block.outvars, *values],
        eqns,
        effects,
        debug_info=compat.unnamed_debug_info("block"),
    )
    run = jex_core.jaxpr_as_fun(jex_core.ClosedJaxpr(jaxpr, []))
    n_out = len(block.outvars)

    def fn(args: list) -> tuple:
        outs = run(*args)
        code = jnp.int8(0)
        for xs in _groups(outs[n_out:]):
            flat = jnp.concatenate([x.ravel() for x in xs]) if len(xs) > 1 else xs[0]
            code = jnp.maximum(code, strategies.value_code(flat))
        return list(outs[:n_out]), code

    return jax.jit(fn, compiler_options=compiler_options())


def _groups(values: Sequence[Any]) -> list[list[Any]]:
    """`values` grouped by dtype, a group's copy kept under `GROUP_BYTES`.

    Concatenating copies: a value of `GROUP_BYTES` or more is reduced on its
    own, and a group is closed once it holds `GROUP_BYTES`, so the code of a
    block never needs more than that much memory beyond its values.
    """
    done: list[list[Any]] = []
    open_: dict = {}
    for x in values:
        size = x.size * x.dtype.itemsize
        if size >= GROUP_BYTES:
            done.append([x])
            continue
        group = open_.setdefault(x.dtype, [[], 0])
        group[0].append(x)
        group[1] += size
        if group[1] >= GROUP_BYTES:
            done.append(open_.pop(x.dtype)[0])
    return done + [g for g, _ in open_.values()]


def _place(
    compiled: _Compiled, block: Block, offset: int, ext_prods: Sequence[int]
) -> tuple[list[Node], list[int]]:
    """The compiled block's node table, for `block` at `offset`."""
    same: dict[int, Any] = {}
    for rep, cur in zip(compiled.block.entries, block.entries):
        same[id(rep.eqn)] = cur.eqn
        for a, b in zip(rep.callers, cur.callers):
            same[id(a)] = b

    def prod(p: int) -> int:
        return ext_prods[p - EXTERNAL] if p >= EXTERNAL else p + offset

    nodes = []
    for n in compiled.interp.nodes:
        producers = tuple(q for q in (prod(p) for p in n.producers) if q >= 0)
        nodes.append(
            dataclasses.replace(
                n,
                index=n.index + offset,
                unit=n.unit + offset,
                eqn=same.get(id(n.eqn), n.eqn),
                producers=producers,
                callers=tuple(same.get(id(c), c) for c in n.callers),
            )
        )
    return nodes, [prod(p) if p >= 0 else -1 for p in compiled.out_producers]


def detect(
    closed: Any,
    consts: Sequence[Any],
    args: Sequence[Any],
    *,
    allow: Any = None,
    known: Detection | None = None,
    cache: dict | None = None,
    search: bool = True,
    escaping: bool = False,
) -> Detection:
    """Runs the instrumented program block by block (see the module doc).

    Args:
        closed: the `ClosedJaxpr` of the function.
        consts: its constant values.
        args: the flat argument values.
        allow: which nodes may hold the event (a predicate on the nodes of
            `known`); None: all.
        known: a previous detection of the same program, whose node table
            `allow` is evaluated on (required with `allow`).
        cache: compiled blocks kept between passes over the same program
            (a block whose nodes are all allowed reuses the unrestricted
            compile); a fresh one when None.
        search: look for the first event. False: only the node table and
            the outputs (every block plain where it can be), for arguments
            that already hold a NaN, which are the root cause.
        escaping: inside loop bodies, only events of an iteration whose
            outputs became nonfinite there (`strategies.Detect`).

    Returns:
        The `Detection`: first event, node table, output values.
    """
    depth = primitives.loop_depth(closed.jaxpr)
    program = flatten(closed)
    blocks = cut(program)
    env: dict = dict(zip(closed.jaxpr.constvars, consts))
    env.update(zip(program.constvars, program.const_values))
    env.update(zip(program.invars, args))
    last_block = _last_block(blocks, program.outvars)
    producer: dict = {}
    nodes: list[Node] = []
    cache = {} if cache is None else cache
    masks = _masks(allow, known, len(blocks))
    det = Detection(-1, np.full((depth,), -1, np.int32), -1, nodes, (), [], depth=depth)
    runner = _Runner(cache, depth, search, small(program), escaping)
    for bi, block in enumerate(blocks):
        vals = [env[v] for v in block.invars]
        table = _table(cache, block, depth, vals)
        outs = runner.run(det, block, vals, masks[bi], len(nodes))
        placed, out_prods = _place(
            table, block, len(nodes), [producer.get(v, -1) for v in block.invars]
        )
        det.spans.append((len(nodes), len(nodes) + len(placed)))
        nodes.extend(placed)
        for v, x, p in zip(block.outvars, outs, out_prods):
            env[v] = x
            producer[v] = p
        for v in last_block.get(bi, ()):
            env.pop(v, None)
    det.outs = [
        v.val if isinstance(v, jex_core.Literal) else env[v] for v in program.outvars
    ]
    det.out_producers = tuple(
        -1 if isinstance(v, jex_core.Literal) else producer.get(v, -1)
        for v in program.outvars
    )
    det.blocks, det.compiled = len(blocks), runner.count
    return det


class _Runner:
    """Runs the blocks of one pass: plain, then instrumented where needed.

    The `jax.jit` programs live in `cache` (shared by the passes over one
    program); `count` is how many this pass called for the first time.
    """

    def __init__(
        self,
        cache: dict,
        depth: int,
        search: bool = True,
        whole: bool = False,
        escaping: bool = False,
    ):
        self.cache, self.depth, self.count = cache, depth, 0
        self.escaping = escaping
        self.search = search
        self.whole = whole  # a `small` program's one block: no plain run first

    def run(self, det: Detection, block: Block, vals: list, mask, offset: int):
        """The outputs of `block`; folds its event into `det` while searching."""
        check = self.search and (det.index < 0 or det.nan_index < 0)
        check = check and _allowed(mask)
        by_rules = _by_rules(block) or (self.whole and check)
        code = strategies.CODE_NAN
        if not by_rules:
            plain = partial(_plain, block)
            outs, code = self._call(("plain", block.key), plain, vals)
            if check:
                code = int(code)  # waits for this block
        want = strategies.CODE_INF if det.index < 0 else strategies.CODE_NAN
        if by_rules or (check and code >= want):
            mask = mask if check else None
            make = partial(_detecting, block, self.depth, mask, self.escaping)
            key = ("run", block.key, mask, self.escaping)
            rec, outs = self._call(key, make, vals)
            if check:
                _note(det, rec, offset, block, vals)
        return outs

    def _call(self, key: Any, make: Any, vals: list) -> Any:
        """``cache[key](vals)``, ``cache[key] = make()`` first when missing."""
        entry = self.cache.get(key)
        if entry is None:
            entry = self.cache[key] = [make(), False]
        if not entry[1]:
            entry[1] = True
            self.count += 1
        return entry[0](vals)


def _table(cache: dict, block: Block, depth: int, vals: list) -> _Compiled:
    """The node table of `block`: the interpreter traced, nothing compiled.

    The same equations in the same order make the same nodes as the
    instrumented block, without its instrumentation (most of its trace).
    """
    key = ("table", block.key)
    table = cache.get(key)
    if table is None:
        table = cache[key] = _interpreted(block, depth, strategies.Table())
        jax.eval_shape(table.fn, vals)
    return table


def _detecting(block: Block, depth: int, mask: Any, escaping: bool = False) -> Any:
    """The instrumented `jax.jit` of `block` (`Detect`, restricted by `mask`)."""
    allow = None if mask is None else (lambda n: mask[n.index])
    strategy = strategies.Detect(allow, escaping=escaping)
    return _interpreted(block, depth, strategy).fn


def _by_rules(block: Block) -> bool:
    """Whether `block` holds an equation that only its rule evaluates right.

    Loop and branch bodies (`scan`, `while`, `cond`, `shard_map`): the
    block's plain code does not see the values inside them. Primitives with
    a rule (jaxnan's own report callbacks, evaluated as no-ops; a rule a user
    registered): the replay follows the rule, not the lowering. Equations
    with side effects (`jax.debug.print`, callbacks): a plain run and an
    instrumented one would run them twice. Such a block always runs
    instrumented.
    """
    return any(
        e.eqn.primitive in primitive_rules.RULES
        or e.eqn.effects
        or primitives.sub_jaxprs(e.eqn, strict=False)
        for e in block.entries
    )


def _allowed(mask: tuple[bool, ...] | None) -> bool:
    """Whether a block restricted by `mask` may hold the event at all."""
    return mask is None or any(mask)


def _note(det: Detection, rec: Any, offset: int, block: Block, vals: list) -> None:
    """Folds an instrumented block's record into the detection."""
    local, nan = int(rec.index), int(rec.nan_index)
    if det.nan_index < 0 <= nan:
        det.nan_index = nan + offset
    if det.index < 0 <= local:
        det.index = local + offset
        det.iteration = np.asarray(rec.iteration)
        det.device = int(rec.device)
        det.event_block, det.event_args = block, vals
        det.event_offset = offset


def _masks(allow: Any, known: Detection | None, n: int) -> list:
    """Per block, which of its nodes may hold the event (None: all)."""
    if allow is None:
        return [None] * n
    if known is None or len(known.spans) != n:
        raise ValueError("blocks.detect(allow=...) needs the detection `known`")
    out = []
    for a, b in known.spans:
        mask = tuple(bool(allow(node)) for node in known.nodes[a:b])
        out.append(None if all(mask) else mask)
    return out


def _last_block(blocks: Sequence[Block], outvars: Sequence[Any]) -> dict:
    """Block index -> the variables no later block reads (freed after it)."""
    last: dict = {}
    for bi, block in enumerate(blocks):
        for v in block.invars:
            last[v] = bi
        for v in block.outvars:
            last.setdefault(v, bi)
    keep = {v for v in outvars if not isinstance(v, jex_core.Literal)}
    out: dict = {}
    for v, bi in last.items():
        if v not in keep:
            out.setdefault(bi, []).append(v)
    return out
