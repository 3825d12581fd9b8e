"""One traced function and the instrumented passes that `locate` runs on it.

`Run` traces the function once (array leaves traced, the other leaves of an
Equinox module or a closure kept static), then runs the detect pass (block by
block, see `blocks`), the capture pass of the event and the plain compiled
function, whose outputs say whether XLA's program agrees with the replay.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.extend import source_info_util

from jaxnan._src import base, blocks, interpreter, primitives, records, tree

source_info_util.register_exclusion(__file__)


def rows(counts: Any, paths: Sequence[str]) -> dict[str, tuple[int, int, int]]:
    c = np.asarray(counts).reshape(-1, 3)
    return {p: tuple(int(v) for v in row) for p, row in zip(paths, c) if row.any()}


@jax.jit
def leaf_counts(x: Any) -> jax.Array:
    return tree.counts_matrix([x])[0]


def dtype_of(v: Any) -> Any:
    return v.dtype if hasattr(v, "dtype") else np.result_type(v)


def counts(values: Sequence[Any]) -> np.ndarray:
    """NaN, +Inf, -Inf counts of each value (one small cached kernel per shape)."""
    rows = [
        leaf_counts(v) if base.is_inexact_dtype(dtype_of(v)) else (0, 0, 0)
        for v in values
    ]
    return np.array([np.asarray(r) for r in rows], np.int64).reshape(-1, 3)


class Run:
    """One traced function, its arguments, and the passes run over it."""

    def __init__(self, fn, name, static, args, kwargs):
        reject_tracers(name, args, kwargs)
        static = tuple(i % len(args) for i in static if -len(args) <= i < len(args))
        dyn = [i for i in range(len(args)) if i not in static]
        names = base.argument_names(fn, len(args))
        self.in_paths: list[str] = []
        for i in dyn:
            self.in_paths += [p for p, _ in tree.paths_and_leaves(args[i], names[i])]
        for k in sorted(kwargs):
            self.in_paths += [p for p, _ in tree.paths_and_leaves(kwargs[k], k)]
        self.dyn_tree = ([args[i] for i in dyn], kwargs)
        every, treedef = jax.tree_util.tree_flatten(self.dyn_tree)
        # Arrays are traced; other leaves (the functions, `custom_jvp`s and float
        # constants an Equinox module holds) are closed over, as static values.
        traced = [i for i, x in enumerate(every) if is_array_leaf(x)]
        leaves = [every[i] for i in traced]
        if len(self.in_paths) == len(every):
            self.in_paths = [self.in_paths[i] for i in traced]
        else:
            self.in_paths = []

        def flat_fn(*flat):
            full_leaves = list(every)
            for i, x in zip(traced, flat):
                full_leaves[i] = x
            dargs, kw = jax.tree_util.tree_unflatten(treedef, full_leaves)
            full = list(args)
            for i, a in zip(dyn, dargs):
                full[i] = a
            out = fn(*full, **kw)
            check_output(name, out)
            return out

        self.flat_fn = flat_fn
        self.leaves = leaves
        self.closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(*leaves)
        self.out_paths = [p for p, _ in tree.paths_and_leaves(out_shape, "output")]
        self.depth = primitives.loop_depth(self.closed.jaxpr)
        self.consts = list(self.closed.consts)

    def detect(
        self, allow=None, min_code=records.CODE_INF
    ) -> tuple[blocks.Detection, np.ndarray, np.ndarray]:
        """The first event (restricted by `allow` and `min_code`) and counts.

        The plain pass runs block by block (`blocks.detect`: each distinct
        block compiled once). A restricted pass (the cone of the bad outputs,
        NaN events only) is rare and runs as one instrumented program, since
        its restriction names nodes of the whole program; both give the same
        node table.
        """
        if allow is None and min_code == records.CODE_INF:
            det = blocks.detect(self.closed, self.consts, self.leaves)
        else:
            det = self._detect_whole(records.Detect(allow, min_code))
        return det, counts(self.leaves), counts(det.outs)

    def _detect_whole(self, strategy: records.Detect) -> blocks.Detection:
        interp = interpreter.Interpreter(strategy, self.depth)
        closed = self.closed

        def detect(consts, flat):
            return interpreter.run(interp, closed, consts, flat)

        rec, outs = jax.device_get(jax.jit(detect)(self.consts, self.leaves))
        return blocks.Detection(
            int(rec.index),
            np.asarray(rec.iteration),
            int(rec.device),
            interp.nodes,
            interp.out_producers,
            list(outs),
            depth=self.depth,
        )

    def capture(self, det: blocks.Detection, node, iteration, device_pos):
        """The event's concrete inputs, outputs, and the device of its element.

        The event's block is re-run when `det` is block-wise; otherwise the
        whole program runs in capture mode.
        """
        if det.event_block is not None:
            got = blocks.capture_event(det, node, iteration, device_pos)
            return got.inputs, got.outputs, got.device
        target = interpreter.Target(node.index, iteration, device_pos)
        interp = interpreter.Interpreter("capture", self.depth, target)
        interp.target_node = node
        closed = self.closed

        def capture(consts, flat):
            state, _ = interpreter.run(interp, closed, consts, flat)
            return state

        values = jax.device_get(jax.jit(capture)(self.consts, self.leaves))
        values = [np.asarray(v) for v in values]
        n_in = len(node.in_avals)
        return values[:n_in], values[n_in:], None

    def compiled_counts(self) -> dict[str, tuple[int, int, int]] | None:
        try:
            outs = jax.jit(self.flat_fn)(*self.leaves)
        except Exception:  # noqa: BLE001 - e.g. a primitive with a rule, no lowering
            return None
        return rows(counts(jax.tree_util.tree_leaves(outs)), self.out_paths)


def is_array_leaf(x: Any) -> bool:
    """An array, or a Python number the caller passed as an argument's leaf.

    A Python float that is ±inf is a constant of the model (the ``-inf``
    initial value of `eqx.nn.MaxPool2d`), not data: it stays static.
    """
    if isinstance(x, jax.Array | np.ndarray | np.generic | bool | int):
        return True
    if isinstance(x, float | complex):
        return not np.isinf(x)
    return False


def reject_tracers(name, args, kwargs):
    for leaf in jax.tree_util.tree_leaves((args, kwargs)):
        if isinstance(leaf, jax.core.Tracer):
            raise TypeError(
                f"jaxnan.locate(`{name}`) got a traced argument "
                f"({type(leaf).__name__}): locate runs on concrete values and "
                "cannot itself be transformed by jax.vmap, jax.jit or jax.grad. "
                "Call jaxnan.locate(fn)(*args) outside any transformation (on "
                "one example, or on the whole batch with fn = jax.vmap(f))."
            )


def check_output(name, out):
    for leaf in jax.tree_util.tree_leaves(out):
        if not (isinstance(leaf, jax.Array | np.ndarray | np.generic | int | float)):
            raise TypeError(
                f"jaxnan.locate(`{name}`): the function returned a "
                f"{type(leaf).__name__} ({leaf!r:.60}) among its outputs; locate "
                "needs a function whose outputs are arrays (a loss, gradients, "
                "a new train state)."
            )
