"""The records of the `locate` interpreter and its two strategies.

Each floating value gets one int8 *code* (`value_code`): 0 finite, 1 some
+-Inf and no NaN, 2 some NaN. `Detect` folds the created flags of the
equations into a fixed-size `Record` of the first event (and of the first
NaN-creating one, in the same pass); `Capture` reads the
concrete inputs and outputs of one target equation. `Node` is what the host
knows about each equation instance, `Slot` what the evaluation loop knows
about each variable.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import source_info_util
from jax.sharding import PartitionSpec

from jaxnan._src.core import dtypes, sharding

source_info_util.register_exclusion(__file__)

CODE_FINITE, CODE_INF, CODE_NAN = 0, 1, 2


class Record(NamedTuple):
    """The fixed-size record of the first creation event (detect mode).

    Attributes:
        index: int32 scalar, the node index of the first event, -1 if none.
        iteration: int32[depth], the enclosing loop iterations, outermost
            first, -1 padded.
        device: int32 scalar, the position inside the device grid of the
            enclosing `shard_map`/`pmap` where the event happened first, -1
            outside them.
        nan_index: int32 scalar, the node index of the first event that
            created a NaN out of NaN-free inputs, -1 if none (the NaN that
            follows an Inf event, found without a second pass).
    """

    index: jax.Array
    iteration: jax.Array
    device: jax.Array
    nan_index: jax.Array

    @classmethod
    def empty(cls, depth: int) -> Record:
        """A record holding no event."""
        return cls(
            jnp.full((), -1, jnp.int32),
            jnp.full((depth,), -1, jnp.int32),
            jnp.full((), -1, jnp.int32),
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


class Cell:
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
    cell: Cell | None  # None for non-floating values
    producer: int  # node index of the top-level producer, -1 for inputs


class Stop(Exception):
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
    if not dtypes.is_inexact_dtype(a.dtype):
        return CODE_FINITE
    if np.isnan(a).any():
        return CODE_NAN
    if np.isinf(a).any():
        return CODE_INF
    return CODE_FINITE


# -- strategies ------------------------------------------------------------


class Detect:
    """Strategy of the first pass: thread a `Record` of the first event.

    Attributes:
        allow: which nodes may hold the event (None: all); `jaxnan.locate`
            restricts a second pass to the cone of the bad outputs.
        min_code: the smallest code an event must create (`CODE_NAN`: NaN
            events only). The record's ``nan_index`` holds the first
            NaN-creating event whatever `min_code` is.
        escaping: count an event inside a loop body only in an iteration
            whose outputs (carry or stacked) hold a nonfinite value: a value
            created under a `jnp.where` and masked in iteration 0 is passed
            over for the iteration where one got through (`gate`). Events
            of a `while` condition, whose outputs are booleans, are dropped.
    """

    def __init__(
        self, allow: Any = None, min_code: int = CODE_INF, escaping: bool = False
    ):
        self.allow = allow
        self.min_code = min_code
        self.escaping = escaping

    def gate(self, before: Record, after: Record, ins, outs) -> Record:
        """The record after one loop iteration (`escaping`: see the class)."""
        del ins
        if not self.escaping:
            return after
        codes = [value_code(x) for x in outs if dtypes.is_inexact_dtype(x.dtype)]
        if not codes:
            return before
        escaped = functools.reduce(jnp.maximum, codes) > CODE_FINITE
        return jax.tree_util.tree_map(
            lambda a, b: jnp.where(escaped, a, b), after, before
        )

    def initial_state(self, interp: Any) -> Record:
        """The record before any equation ran."""
        return Record.empty(interp.depth)

    def on_checked(self, ctx: Any, node: Node, ins, cells, invals, outs) -> None:
        """Queues the created flag of a checked equation."""
        in_codes = [s.cell.get() for s in ins if s.cell is not None]
        static_in = [c for c in in_codes if isinstance(c, int)]
        if static_in and max(static_in) >= CODE_NAN:
            return  # a NaN literal came in: nothing can be created here
        if self.allow is not None and not self.allow(node):
            return
        out_codes = [c.get() for c in cells if c is not None]
        cout = functools.reduce(jnp.maximum, out_codes)
        cin = functools.reduce(jnp.maximum, in_codes) if in_codes else 0
        created = cout > cin
        nan = created & (cout >= CODE_NAN)
        if self.min_code > CODE_INF:
            created = nan
        ctx.pending.append((created, nan, node.index))

    def flush(self, ctx: Any) -> None:
        """Folds the pending created flags of `ctx` into its record."""
        if not ctx.pending:
            return
        idxs = np.asarray([i for _, _, i in ctx.pending], np.int32)
        hit, first = _first([f for f, _, _ in ctx.pending], idxs)
        nan_hit, nan_first = _first([f for _, f, _ in ctx.pending], idxs)
        ctx.pending = []
        st = ctx.state
        take = (st.index < 0) & hit
        take_nan = (st.nan_index < 0) & nan_hit
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
            jnp.where(take_nan, nan_first, st.nan_index),
        )

    def merge_devices(self, ctx: Any, stacked: Record, ndev: int) -> Record:
        """The event with the smallest index over devices, with its position."""
        del ndev
        stacked = jax.tree_util.tree_map(replicated, stacked)
        old = ctx.state
        valid = stacked.index >= 0
        key = jnp.where(valid, stacked.index, jnp.iinfo(jnp.int32).max)
        pos = jnp.argmin(key).astype(jnp.int32)
        take = (old.index < 0) & jnp.any(valid)
        nan_valid = stacked.nan_index >= 0
        nan_key = jnp.where(nan_valid, stacked.nan_index, jnp.iinfo(jnp.int32).max)
        take_nan = (old.nan_index < 0) & jnp.any(nan_valid)
        return Record(
            jnp.where(take, stacked.index[pos], old.index),
            jnp.where(take, stacked.iteration[pos], old.iteration),
            jnp.where(take, pos, old.device),
            jnp.where(take_nan, jnp.min(nan_key), old.nan_index),
        )


def replicated(x: jax.Array) -> jax.Array:
    """`x` replicated when it is sharded over a mesh of explicit axes.

    The per-device records of a device map are stacked on a leading axis
    sharded over the devices; on a mesh of explicit axes (`jax.set_mesh`)
    jax refuses to index such an axis. Elsewhere `x` is returned as is.
    """
    if sharding.sharded_in_type(x):
        return jax.sharding.reshard(x, PartitionSpec())
    return x


def _first(flags: list, idxs: np.ndarray) -> tuple[Any, Any]:
    """(whether any flag is set, the index of the first set one)."""
    if len(flags) == 1:
        return flags[0], jnp.int32(idxs[0])
    stacked = jnp.stack(flags)
    return jnp.any(stacked), jnp.asarray(idxs)[jnp.argmax(stacked)]


class Table:
    """Strategy that only builds the node table: nothing is checked.

    `blocks.detect` traces each distinct block with it for the nodes, and
    compiles the `Detect` block only where the block computed a nonfinite
    value.
    """

    escaping = False

    def initial_state(self, interp: Any) -> Record:
        """An empty record (threaded through loops like `Detect`'s)."""
        return Record.empty(interp.depth)

    def on_checked(self, ctx: Any, node: Node, ins, cells, invals, outs) -> None:
        """Nothing: no value is checked."""

    def flush(self, ctx: Any) -> None:
        """Nothing is pending."""
        ctx.pending = []

    def gate(self, before: Record, after: Record, ins, outs) -> Record:
        """The record after a loop iteration (nothing is recorded)."""
        del before, ins, outs
        return after

    def merge_devices(self, ctx: Any, stacked: Record, ndev: int) -> Record:
        """The record before the device map (nothing was recorded)."""
        del stacked, ndev
        return ctx.state


class Capture:
    """Strategy of the second pass: read the values of the target equation."""

    escaping = False

    def __init__(self, target: Target):
        self.target = target

    def initial_state(self, interp: Any) -> tuple:
        """Zero buffers shaped like the target equation's inputs/outputs."""
        node = interp.target_node
        return tuple(
            jnp.zeros(a.shape, a.dtype) for a in node.in_avals + node.out_avals
        )

    def on_checked(self, ctx: Any, node: Node, ins, cells, invals, outs) -> None:
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
            raise Stop

    def flush(self, ctx: Any) -> None:
        """Nothing is pending in the capture pass."""
        ctx.pending = []

    def gate(self, before: tuple, after: tuple, ins, outs) -> tuple:
        """The buffers after a loop iteration (the target's iteration decides)."""
        del before, ins, outs
        return after

    def merge_devices(self, ctx: Any, stacked: tuple, ndev: int) -> tuple:
        """The buffers of the device where the event happened."""
        pos = max(self.target.device, 0) if ndev > 1 else 0
        return jax.tree_util.tree_map(lambda s: replicated(s)[pos], stacked)
