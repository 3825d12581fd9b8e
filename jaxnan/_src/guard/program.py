"""The in-graph half of `jaxnan.guard`: a train step as one pure, donated program.

A user's step takes framework objects (Flax NNX modules and optimizers that
it mutates in place, Equinox modules holding functions, linen `TrainState`s,
plain pytrees) and returns new state and metrics. `Layout` turns its
arguments into flat lists of arrays (the *state*, donated, and the *inputs*:
batch, RNG) and back, so that one `jax.jit` compiles the whole step. Inside,
`guarded_body` runs the step and then:

* reads whether `jaxnan.skip_nonfinite` skipped the update (its
  `nonfinite_total` went up) and whether the loss is finite;
* on a bad step selects back every state leaf the step wrote outside the
  `skip_nonfinite` state (BatchNorm statistics, RNG counters, step counters,
  the parameters themselves), so a bad step changes nothing bit for bit;
  leaves the step did not touch get no select at all;
* returns a small float32 health vector: bad, loss, global gradient norm
  (computed by `skip_nonfinite` in its finiteness pass), and the
  update-to-parameter norm ratio, on the small parameter leaves.

The step dispatched right after a bad one (before the host has read the flag)
is *held*: it takes the bad step's health vector as input, tells
`skip_nonfinite` (through `update_tap.collect_updates`) to skip without
counting, and selects every other written leaf back, so the state stays the
bad step's input and the host can replay the bad step on exactly it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import source_info_util

from jaxnan._src.core import compat, dtypes
from jaxnan._src.frameworks import registry
from jaxnan._src.frameworks.registry import Adapter
from jaxnan._src.guard import losses, underflow
from jaxnan._src.guard.update_ratio import update_ratio
from jaxnan._src.transforms import nonfinite, update_tap

source_info_util.register_exclusion(__file__)

# Health vector layout (float32); ZEROS is NaN unless asked for (`underflow`).
BAD, LOSS, GRAD_NORM, RATIO, HELD, ZEROS = range(6)
HEALTH_SIZE = 6
# Largest leaf whose old value is kept for the update-to-parameter ratio.
RATIO_SAMPLE = 4096


def unwrap_jit(fn: Callable) -> Callable:
    """The Python function under `jax.jit`, `nnx.jit` or `eqx.filter_jit`.

    The guard compiles the step itself (one program with its checks and
    donation); a nested jit would hide the optimizer's norm from it.
    """
    for _ in range(8):
        if not hasattr(fn, "lower"):
            return fn
        inner = getattr(fn, "fun", None)  # nnx.jit
        if inner is None:
            inner = getattr(fn, "__wrapped__", None)  # jax.jit, eqx.filter_jit
        if inner is None or inner is fn:
            return fn
        fn = inner
    return fn


def graph_objects(layout: Layout, args: Sequence[Any]) -> Any:
    """The NNX objects among `args`: the one, or a tuple of them."""
    objs = tuple(args[i] for i in layout.graph_args)
    return objs[0] if len(objs) == 1 else objs


def is_graph_node(x: Any) -> bool:
    """True for an object a framework mutates in place (an NNX module).

    Any framework with a registered adapter (`jaxnan._src.frameworks`).
    """
    return registry.adapter_of(x) is not None


def adapter(layout: Layout) -> Adapter:
    """The framework adapter of the layout's graph arguments."""
    return registry.ADAPTERS[layout.framework]


def graph_view(layout: Layout, obj: Any) -> Any:
    """A graph argument as a pytree of its own arrays (`Adapter.pytree`)."""
    return adapter(layout).pytree(obj)


def is_array(x: Any) -> bool:
    """Arrays and numbers travel through the program; other leaves are static.

    A Python number in the state (linen's ``TrainState.step`` starts as 0)
    becomes an array after the first step, so it is an array from the start.
    """
    return isinstance(x, (jax.Array, np.ndarray, np.generic, int, float, complex))


def flatten_tree(tree: Any) -> tuple[list[Any], Any, list[bool]]:
    """``(leaves, treedef, arrays)``: `tree`'s leaves and which travel as arrays.

    A framework's own rule comes first (Equinox: inside a module, only
    `eqx.is_array` leaves are arrays, as under `eqx.filter_jit`; a Python
    bool such as ``Dropout.inference`` stays static), then `is_array`.
    """
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    says = registry.static_leaves(tree)
    if says is None:
        return leaves, treedef, [is_array(x) for x in leaves]
    arrays = [is_array(x) if s is None else not s for x, s in zip(leaves, says)]
    return leaves, treedef, arrays


def statics_of(leaves: Sequence[Any], arrays: Sequence[bool]) -> tuple[Any, ...]:
    """The layout's record of leaves: None for an array, else `Static`."""
    return tuple(None if a else Static(x) for x, a in zip(leaves, arrays))


class Static:
    """A non-array leaf (an Equinox activation function): compared by identity."""

    __slots__ = ("value",)

    def __init__(self, value: Any):
        self.value = value

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, Static) and other.value is self.value

    def __hash__(self) -> int:
        return id(self.value)


_SKIP_FIELDS = frozenset(nonfinite.SkipNonfiniteState._fields)


def _is_skip(x: Any) -> bool:
    """A `SkipNonfiniteState`, or a mapping of its fields (an ``nnx.State``)."""
    if isinstance(x, nonfinite.SkipNonfiniteState):
        return True
    return isinstance(x, Mapping) and _SKIP_FIELDS <= set(x.keys())


def skip_states(tree: Any) -> list[nonfinite.SkipNonfiniteState]:
    """Every `SkipNonfiniteState` inside `tree` (NNX objects included).

    In an ``nnx.State`` (``nnx.split((model, optimizer))``: NNX's functional
    API under a plain `jax.jit`) the optimizer state is a mapping of the
    fields; it is read as a `SkipNonfiniteState` of the same leaves.
    """
    leaves = jax.tree_util.tree_leaves(tree, is_leaf=_is_skip)
    return [
        x
        if isinstance(x, nonfinite.SkipNonfiniteState)
        else nonfinite.SkipNonfiniteState(**{f: x[f] for f in _SKIP_FIELDS})
        for x in leaves
        if _is_skip(x)
    ]


def first_leaf(x: Any) -> jax.Array:
    """The array of a state field (an array, or an NNX Variable holding one)."""
    return jax.tree_util.tree_leaves(x)[0]


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a step's arguments map to flat arrays and back (hashable, static).

    Attributes:
        nargs: number of positional arguments.
        graph_args: positions of Flax NNX graph nodes (their state is state).
        state_args: positions of pytree arguments that the step returns
            again (its first outputs), in order.
        graphdef: the adapter's definition of the graph nodes (`nnx.split`'s
            graph definition), or None.
        graph_treedef: tree structure of their state.
        treedefs: per non-graph argument, its tree structure.
        statics: per non-graph argument, its leaves with arrays replaced by
            None and other leaves by `Static`.
        framework: the name of the graph nodes' framework adapter, or None.
    """

    nargs: int
    graph_args: tuple[int, ...]
    state_args: tuple[int, ...]
    graphdef: Any
    graph_treedef: Any
    treedefs: tuple[Any, ...]
    statics: tuple[tuple[Any, ...], ...]
    framework: str | None = None

    @functools.cached_property
    def tree_args(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.nargs) if i not in self.graph_args)

    @functools.cached_property
    def input_args(self) -> tuple[int, ...]:
        return tuple(i for i in self.tree_args if i not in self.state_args)

    @functools.cached_property
    def positions(self) -> dict[int, int]:
        """Argument index -> index into `treedefs` / `statics`."""
        return {i: k for k, i in enumerate(self.tree_args)}

    @functools.cached_property
    def counts(self) -> dict[int, int]:
        """Argument index -> number of array leaves (non-graph arguments)."""
        return {
            i: sum(s is None for s in self.statics[k])
            for i, k in self.positions.items()
        }

    @property
    def mutates(self) -> bool:
        """Whether the step mutates NNX objects in place (its state)."""
        return bool(self.graph_args)


def make_layout(args: Sequence[Any], state_args: tuple[int, ...]) -> Layout:
    """The layout of `args`, with `state_args` the returned pytree arguments."""
    graph = tuple(i for i, a in enumerate(args) if is_graph_node(a))
    graphdef = graph_treedef = framework = None
    if graph:
        objs = tuple(args[i] for i in graph)
        found = registry.one_adapter(objs, "jaxnan.guard")
        framework = found.name
        graphdef, state = found.split(objs)
        graph_treedef = jax.tree_util.tree_structure(state)
    treedefs, statics = [], []
    for i, a in enumerate(args):
        if i in graph:
            continue
        leaves, treedef, arrays = flatten_tree(a)
        treedefs.append(treedef)
        statics.append(statics_of(leaves, arrays))
    return Layout(
        len(args),
        graph,
        tuple(state_args),
        graphdef,
        graph_treedef,
        tuple(treedefs),
        tuple(statics),
        framework,
    )


def _tree_position(layout: Layout, i: int) -> int:
    return layout.positions[i]


def flatten_arg(layout: Layout, args: Sequence[Any], i: int) -> list[Any]:
    """The array leaves of non-graph argument `i`."""
    statics = layout.statics[layout.positions[i]]
    leaves = jax.tree_util.tree_leaves(args[i])
    return [x for x, s in zip(leaves, statics) if s is None]


def flatten(layout: Layout, args: Sequence[Any]) -> tuple[list[Any], list[Any]]:
    """``(state_leaves, input_leaves)`` of `args`."""
    state: list[Any] = []
    if layout.graph_args:
        objs = tuple(args[i] for i in layout.graph_args)
        _, graph_state = adapter(layout).split(objs)
        state += jax.tree_util.tree_leaves(graph_state)
    for i in layout.state_args:
        state += flatten_arg(layout, args, i)
    inputs: list[Any] = []
    for i in layout.input_args:
        inputs += flatten_arg(layout, args, i)
    return state, inputs


@dataclasses.dataclass(frozen=True)
class Split:
    """Where a layout's state and input arrays sit among the leaves of `args`.

    For layouts without NNX objects, whose arguments flatten as one pytree:
    a call with the same tree structure is split by index, without the
    per-leaf work of `make_layout` and `flatten` (the guard's host cost per
    step). The non-array leaves must be the same objects.
    """

    state: tuple[int, ...]
    inputs: tuple[int, ...]
    statics: tuple[tuple[int, Any], ...]

    def __call__(self, leaves: Sequence[Any]) -> tuple[list, list] | None:
        """``(state, inputs)`` of the flat leaves of `args`, or None if stale."""
        for j, value in self.statics:
            if leaves[j] is not value:
                return None
        return [leaves[j] for j in self.state], [leaves[j] for j in self.inputs]


def make_split(layout: Layout) -> Split | None:
    """The `Split` of a layout without NNX objects (None with them)."""
    if layout.graph_args:
        return None
    starts, n = {}, 0
    for i in range(layout.nargs):
        starts[i] = n
        n += len(layout.statics[layout.positions[i]])
    statics, where = [], {}
    for i in range(layout.nargs):
        arrays = []
        for j, s in enumerate(layout.statics[layout.positions[i]]):
            if s is None:
                arrays.append(starts[i] + j)
            else:
                statics.append((starts[i] + j, s.value))
        where[i] = arrays
    state = [j for i in layout.state_args for j in where[i]]
    inputs = [j for i in layout.input_args for j in where[i]]
    return Split(tuple(state), tuple(inputs), tuple(statics))


def _unflatten_arg(layout: Layout, i: int, leaves: Any) -> Any:
    pos = _tree_position(layout, i)
    statics = layout.statics[pos]
    if len(leaves) == len(statics):  # arrays only
        return jax.tree_util.tree_unflatten(layout.treedefs[pos], leaves)
    it = iter(leaves)
    full = [next(it) if s is None else s.value for s in statics]
    return jax.tree_util.tree_unflatten(layout.treedefs[pos], full)


def _count_arrays(layout: Layout, i: int) -> int:
    return layout.counts[i]


def split_state(layout: Layout, state: Sequence[Any]) -> tuple[list, list]:
    """State leaves split into ``(graph_leaves, [leaves of each state arg])``."""
    n = layout.graph_treedef.num_leaves if layout.graph_args else 0
    graph = list(state[:n])
    per_arg = []
    for i in layout.state_args:
        k = layout.counts[i]
        per_arg.append(state[n : n + k])
        n += k
    return graph, per_arg


def rebuild(layout: Layout, state: Sequence[Any], inputs: Sequence[Any]) -> list[Any]:
    """The step's arguments from flat leaves (fresh NNX objects via `nnx.merge`)."""
    args: list[Any] = [None] * layout.nargs
    graph, per_arg = split_state(layout, state)
    if layout.graph_args:
        objs = adapter(layout).merge(
            layout.graphdef,
            jax.tree_util.tree_unflatten(layout.graph_treedef, graph),
        )
        for i, obj in zip(layout.graph_args, objs):
            args[i] = obj
    for i, leaves in zip(layout.state_args, per_arg):
        args[i] = _unflatten_arg(layout, i, leaves)
    rest = list(inputs)
    for i in layout.input_args:
        n = _count_arrays(layout, i)
        args[i] = _unflatten_arg(layout, i, rest[:n])
        rest = rest[n:]
    return args


def rebuild_state_args(layout: Layout, state: Sequence[Any]) -> list[Any]:
    """The pytree state arguments (not NNX objects) rebuilt from state leaves."""
    _, per_arg = split_state(layout, state)
    return [_unflatten_arg(layout, i, x) for i, x in zip(layout.state_args, per_arg)]


def read_new_state(
    layout: Layout, args: Sequence[Any], out: Any, fn_name: str
) -> tuple[list[Any], Any]:
    """``(new_state_leaves, metrics)`` after the step ran on `args`.

    Raises:
        ValueError: when the outputs do not have the layout's structure.
    """
    state: list[Any] = []
    if layout.graph_args:
        objs = tuple(args[i] for i in layout.graph_args)
        graphdef, graph_state = adapter(layout).split(objs)
        if graphdef != layout.graphdef:
            raise ValueError(
                f"jaxnan.guard: `{fn_name}` changed the structure of its Flax NNX "
                "arguments (added or removed a Variable or submodule). The guard "
                "needs the same structure after the step as before."
            )
        state += jax.tree_util.tree_leaves(graph_state)
    if not layout.state_args:
        return state, out
    n = len(layout.state_args)
    for j, i in enumerate(layout.state_args):
        leaves, treedef, arrays = flatten_tree(out[j])
        pos = _tree_position(layout, i)
        statics = statics_of(leaves, arrays)
        if treedef != layout.treedefs[pos] or statics != layout.statics[pos]:
            raise ValueError(
                f"jaxnan.guard: output {j} of `{fn_name}` does not have the "
                f"structure of its argument {i}. The guard reads a step returning "
                "(new_state..., metrics) with the new state in the order and "
                "structure of its first arguments."
            )
        state += [x for x, a in zip(leaves, arrays) if a]
    if len(out) == n:
        return state, None
    metrics = out[n] if len(out) == n + 1 else tuple(out[n:])
    return state, metrics


def output_structure(out: Any) -> tuple[Any, ...] | None:
    """The `signature` of each element of a tuple output (None otherwise)."""
    if not isinstance(out, (tuple, list)):
        return None
    return tuple(signature(x) for x in out)


def signature(tree: Any) -> tuple[Any, tuple[Any, ...]]:
    """``(treedef, shapes)`` of a pytree: what a new state must repeat.

    Shapes, not dtypes: linen's ``TrainState.step`` enters as a Python int
    and leaves as an int32 array. Static leaves have shape None.
    """
    leaves, treedef, arrays = flatten_tree(tree)
    return treedef, tuple(np.shape(x) if a else None for x, a in zip(leaves, arrays))


def infer_state_args(
    args: Sequence[Any], outs: tuple[Any, ...] | None, whole: Any = None
) -> tuple[int, ...]:
    """Positions of the pytree arguments a step returns first (plain/linen/eqx).

    A step returning ``(a', b', metrics...)`` for arguments ``(a, b,
    batch...)`` returns the state of ``a`` and ``b``: the leading outputs
    with the tree structure and leaf shapes (`signature`) of the argument at
    the same position. The outputs after them are the metrics: in
    ``(params, opt, x, y) -> (params, opt, loss, acc)`` the scalar loss does
    not repeat the batch ``x``, so the metrics are ``(loss, acc)``. A step
    whose output is not a tuple (`outs` None) and has the `signature`
    (`whole`) of its first argument returns that state alone: Flax linen's
    tutorials write ``train_step(state, batch) -> state``.
    """
    if outs is None:
        return (0,) if args and whole == signature(args[0]) else ()
    if len(outs) < 2:
        return ()
    n = 0
    for j in range(min(len(outs) - 1, len(args))):
        if outs[j] != signature(args[j]):
            break
        n += 1
    return tuple(range(n))


def sample_first(state: Sequence[Any]) -> dict[int, Any]:
    """The old values of the small float leaves (biases, norm scales).

    Only leaves of at most `RATIO_SAMPLE` entries: reading the old value of a
    large donated leaf, even a slice of it behind an optimization barrier,
    made XLA keep a copy of the whole leaf (+0.2x the parameter bytes on the
    benchmark MLP); small leaves cost nothing to keep.
    """
    return {
        j: x.astype(jnp.float32)
        for j, x in enumerate(state)
        if dtypes.is_inexact_dtype(x.dtype) and 0 < x.size <= RATIO_SAMPLE
    }


def select_back(bad: jax.Array, old: Sequence[Any], new: Sequence[Any]) -> list:
    """`old` on a bad step, else `new`, by one `lax.cond` over all the leaves.

    A conditional, not a `where`: XLA fuses a select into the computation of
    `new` and may then round it differently (a fused select changed the last
    bit of a BatchNorm running mean; an optimization barrier did not help).
    The conditional copies the chosen leaves; only small state (statistics,
    counters) goes through it, never the parameters.
    """
    if not new:
        return []
    return list(lax.cond(bad, lambda: list(old), lambda: list(new)))


def guarded_body(
    fn: Callable,
    layout: Layout,
    loss: str | Callable | None,
    fn_name: str,
    notes: list[str],
    zeros: bool = False,
) -> Callable:
    """``(hold, state, inputs) -> (new_state, metrics, health)``, to be jitted.

    What the guard should tell the user about the step, found while tracing
    it, is appended to `notes` (the host warns once).

    Raises (at trace time):
        ValueError: when the step's outputs cannot be read, it has no
            `skip_nonfinite` state, or no loss.
    """

    def run(state: list, inputs: list, hold: jax.Array):
        samples = sample_first(state)
        args = rebuild(layout, state, inputs)
        old_skip = skip_states(
            [graph_view(layout, args[i]) for i in layout.graph_args]
            + [args[i] for i in layout.state_args]
        )
        if not old_skip and not layout.graph_args and skip_states(args):
            raise ValueError(
                f"jaxnan.guard: the outputs of `{fn_name}` do not begin with its "
                "state: the guard reads the new state as the leading outputs, "
                "in the order of the arguments. Return (params, opt_state, "
                "loss), not (loss, params, opt_state) or the metrics alone."
            )
        if not old_skip:
            raise ValueError(
                f"jaxnan.guard: the state of `{fn_name}` holds no "
                "jaxnan.skip_nonfinite optimizer state. Wrap the optimizer: "
                "tx = jaxnan.skip_nonfinite(optax.adamw(...)) (nnx.Optimizer(model, "
                "tx, wrt=nnx.Param) for Flax NNX); the guard reads its verdict "
                "and leaves the optimizer's own skip in place."
            )
        old_totals = [first_leaf(s.nonfinite_total) for s in old_skip]
        with update_tap.collect_updates(hold) as tapped:
            out = fn(*args)
        if layout.state_args and not isinstance(out, tuple | list):
            out = (out,)  # `(state, batch) -> state`: the state alone
        # A `skip_nonfinite` update traced inside a `lax.scan` (several
        # optimizer steps per call) reports tracers of the scan's body:
        # unusable here, and its per-step skips do not make the call's.
        direct = [r for r in tapped if compat.in_current_trace(r.norm)]
        new_state, metrics = read_new_state(layout, args, out, fn_name)
        holders = [graph_view(layout, args[i]) for i in layout.graph_args]
        if layout.state_args:
            holders += list(out[: len(layout.state_args)])
        new_skip = skip_states(holders)
        value = losses.loss_of(metrics, loss, fn_name, direct)
        if value is None:  # no loss anywhere: the step is judged without one
            notes.append(losses.LOSSLESS.format(fn_name=fn_name))
            value = jnp.full((), jnp.nan, jnp.float32)
            loss_ok = jnp.array(True)
        else:
            if tapped and not any(r.loss_given for r in tapped):
                notes.append(losses.NO_LOSS.format(fn_name=fn_name))
            loss_ok = jnp.all(jnp.isfinite(value))
        skipped = jnp.array(False)
        for s, total in zip(new_skip, old_totals):
            skipped = skipped | (first_leaf(s.nonfinite_total) > total)
        kinds = _kinds(state, new_state, new_skip, direct, len(direct) == len(tapped))
        # A bad step is one skip_nonfinite skipped, one whose loss is
        # nonfinite, or one that wrote a nonfinite value into the state it
        # does not guard (a BatchNorm variance overflowing): every written
        # leaf is then selected back; what skip_nonfinite guards only when
        # it did not skip the step itself.
        written_ok = _all_finite([new_state[j] for j in kinds["other"]])
        bad = (skipped | ~loss_ok | ~written_ok) & ~hold
        kept = list(new_state)
        for pred, chosen in (
            (bad | hold, kinds["other"]),
            (hold, kinds["counter"]),
            (bad & ~skipped, kinds["guarded"]),
        ):
            picked = select_back(
                pred, [state[j] for j in chosen], [new_state[j] for j in chosen]
            )
            for j, x in zip(chosen, picked):
                kept[j] = x
        ratio = update_ratio(state, new_state, samples, direct, skipped | hold)
        norms = [r.norm for r in direct]
        if norms:
            gnorm = jnp.sqrt(sum(jnp.square(x) for x in norms))
        else:
            gnorm = jnp.full((), jnp.nan, jnp.float32)
        health = jnp.stack(
            [
                bad.astype(jnp.float32),
                jnp.mean(value).astype(jnp.float32),
                gnorm.astype(jnp.float32),
                ratio,
                hold.astype(jnp.float32),
                underflow.zero_fraction(direct if zeros else ()),
            ]
        )
        return kept, metrics, health

    def body(previous: jax.Array, state: list, inputs: list):
        """`previous`: the health vector of the step before (zeros for none)."""
        return run(state, inputs, previous[BAD] > 0)

    return body, run


def _kinds(
    state: Sequence[Any],
    new_state: Sequence[Any],
    new_skip: Sequence[Any],
    direct: Sequence[update_tap.TapRecord],
    trusted: bool,
) -> dict[str, list[int]]:
    """The written state leaves by how a bad step puts them back.

    * ``"counter"``: `skip_nonfinite`'s own counters (advance on a bad step,
      put back on a held one);
    * ``"guarded"``: the parameters it updates and its inner optimizer state,
      which its own skip leaves untouched: selected back only on a step that
      is bad for a reason it did not see (the loss, when not handed to it as
      ``loss=``; a nonfinite statistic). Empty when nothing else can make a
      step bad (no loss-less update, no other written float leaf), so the
      usual step selects no parameter;
    * ``"other"``: everything else the step wrote (statistics, RNG and step
      counters): selected back on every bad or held step.

    Without `trusted` (an update inside a `lax.scan`, whose per-step skips
    leave the call's other steps applied), the parameters and the inner
    state are ``"other"``.
    """
    inner = {id(x) for s in new_skip for x in jax.tree_util.tree_leaves(s.inner_state)}
    counters = {
        id(x)
        for s in new_skip
        for x in jax.tree_util.tree_leaves(s._replace(inner_state=None))
    }
    params = {id(x) for r in direct for x in jax.tree_util.tree_leaves(r.params)}
    kinds: dict[str, list[int]] = {"counter": [], "guarded": [], "other": []}
    for j, (o, n) in enumerate(zip(state, new_state)):
        if n is o:
            continue
        if id(n) in counters:
            kinds["counter"].append(j)
        elif trusted and (id(n) in inner or id(o) in params):
            kinds["guarded"].append(j)
        else:
            kinds["other"].append(j)
    floats = [j for j in kinds["other"] if dtypes.is_inexact_dtype(new_state[j].dtype)]
    loss_seen = bool(direct) and all(r.loss_given for r in direct)
    if loss_seen and not floats:  # nothing but skip_nonfinite can make it bad
        kinds["guarded"] = []
    return kinds


def _all_finite(leaves: Sequence[Any]) -> jax.Array:
    """Whether every float leaf is finite (True for none)."""
    ok = jnp.array(True)
    for x in leaves:
        if dtypes.is_inexact_dtype(x.dtype):
            ok = ok & jnp.all(jnp.isfinite(x))
    return ok


def per_example_body(run: Callable, batch_axes: Sequence[bool]) -> Callable:
    """``(state, inputs) -> bad per example``: the step on each example alone.

    `batch_axes[j]` says whether input leaf `j` has the batch as its leading
    axis; the others (an RNG key) are passed whole to every example.
    """

    def one(state, example):
        inputs = [x[None] if b else x for x, b in zip(example, batch_axes)]
        _, _, health = run(state, inputs, jnp.array(False))
        return health[BAD] > 0

    def body(state, inputs):
        mapped = [x for x, b in zip(inputs, batch_axes) if b]

        def step(xs):
            it = iter(xs)
            example = [next(it) if b else x for x, b in zip(inputs, batch_axes)]
            return one(state, example)

        return lax.map(step, mapped, batch_size=8)

    return body
