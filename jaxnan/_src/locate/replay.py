"""One traced function and the instrumented passes that `locate` runs on it.

`Run` traces the function once (array leaves traced, the other leaves of an
Equinox module or a closure kept static), then runs the detect pass (block by
block, see `blocks`), the capture pass of the event and the plain compiled
function, whose outputs say whether XLA's program agrees with the replay.
Every detect pass is block-wise and they share their compiled blocks: a pass
restricted to the cone of the bad outputs recompiles only the blocks that
hold both allowed and excluded nodes.
"""

from __future__ import annotations

import ctypes
import functools
import sys
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.extend import source_info_util

from jaxnan._src.core import compat, dtypes, primitives, tree, validation
from jaxnan._src.locate import blocks, capture

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
        leaf_counts(v) if dtypes.is_inexact_dtype(dtype_of(v)) else (0, 0, 0)
        for v in values
    ]
    return np.array([np.asarray(r) for r in rows], np.int64).reshape(-1, 3)


class Run:
    """One traced function, its arguments, and the passes run over it."""

    def __init__(self, fn, name, static, args, kwargs):
        reject_tracers(name, args, kwargs)
        self.fn, self.name, self.args, self.kwargs = fn, name, args, kwargs
        self.first: blocks.Detection | None = None
        self.cache: dict = {}  # compiled blocks, shared by the detect passes
        static = tuple(i % len(args) for i in static if -len(args) <= i < len(args))
        dyn = [i for i in range(len(args)) if i not in static]
        names = validation.argument_names(fn, len(args))
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
        reject_multiprocess_pmap(name, self.closed.jaxpr)
        self.out_paths = [p for p, _ in tree.paths_and_leaves(out_shape, "output")]
        self.depth = primitives.loop_depth(self.closed.jaxpr)
        self.consts = list(self.closed.consts)

    def detect(
        self, allow=None, escaping: bool = False
    ) -> tuple[blocks.Detection, np.ndarray, np.ndarray]:
        """The first event (restricted by `allow`) and counts.

        Block by block (`blocks.detect`: each distinct block compiled once).
        The first pass is unrestricted; a pass restricted to the nodes
        `allow` accepts (the cone of the bad outputs) reuses its compiled
        blocks wherever a block's nodes are all allowed. The detection also
        holds the first NaN-creating event (``nan_index``) under the same
        restriction. `escaping` (with `allow`): inside loops, only events of
        an iteration whose outputs went nonfinite (`blocks.detect`).
        """
        in_counts = counts(self.leaves)
        if allow is None or self.first is None:
            # A NaN in the arguments is the root cause (phase input): the
            # pass then runs only for the outputs, with no instrumented block.
            search = not in_counts[:, 0].any()
            det = blocks.detect(
                self.closed, self.consts, self.leaves, cache=self.cache, search=search
            )
            if self.first is None:
                self.first = det
            if allow is None:
                return det, in_counts, counts(det.outs)
        det = blocks.detect(
            self.closed,
            self.consts,
            self.leaves,
            allow=allow,
            known=self.first,
            cache=self.cache,
            escaping=escaping,
        )
        return det, in_counts, counts(det.outs)

    def release_blocks(self) -> None:
        """Drops the compiled blocks and the first detection (no pass follows).

        Called between the whole-program compiles (the plain program, the
        layer statistics) and the block passes. The blocks' executables and
        values are dropped, and the heap pages the compiles freed are handed
        back to the system: glibc keeps them in the arenas of the threads
        that freed them, where the next compile does not reuse them.
        Measured on the 4-layer LM (peak resident set rise of `locate` with
        an event): 290 MiB -> 235 MiB, against 111 MiB for the plain compile
        and run.
        """
        self.cache.clear()
        self.first = None
        trim_heap()

    def capture(self, det: blocks.Detection, node, iteration, device_pos):
        """The event's concrete inputs, outputs, and the device of its element.

        The event's block is re-run alone in capture mode.
        """
        got = capture.capture_event(det, node, iteration, device_pos)
        return got.inputs, got.outputs, got.device

    def compiled_counts(self) -> dict[str, tuple[int, int, int]] | None:
        """Counts of the outputs of the plain compiled function, by path.

        A function the user already wrapped in `jax.jit` is called as is, so
        its compiled program (cached by jax since the training step ran) is
        reused instead of compiled again; unless it donates arguments, whose
        buffers the call would consume.
        """
        try:
            if _reusable_jit(self.fn, self.args, self.kwargs):
                outs = self.fn(*self.args, **self.kwargs)
            else:
                outs = jax.jit(self.flat_fn)(*self.leaves)
        except Exception:  # noqa: BLE001 - e.g. a primitive with a rule, no lowering
            return None
        return rows(counts(jax.tree_util.tree_leaves(outs)), self.out_paths)


@functools.cache
def _libc() -> Any:
    """glibc, or None elsewhere (then nothing is trimmed)."""
    if sys.platform != "linux":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")  # glibc; musl and others: OSError
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def trim_heap() -> None:
    """Hands the free pages of every malloc arena back to the system (glibc).

    glibc keeps the memory a compile freed in the arena of the thread that
    freed it, where the next compile does not reuse it; `locate` trims
    between its whole-program compiles and its block passes.
    """
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def _reusable_jit(fn: Any, args: tuple, kwargs: dict) -> bool:
    """Whether `fn` is a `jax.jit` function that donates none of `args`."""
    if not isinstance(fn, jax.stages.Wrapped) or not hasattr(fn, "trace"):
        return False
    infos = jax.tree_util.tree_leaves(
        fn.trace(*args, **kwargs).args_info, is_leaf=lambda x: hasattr(x, "donated")
    )
    return not any(getattr(i, "donated", True) for i in infos)


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


# What `jax.pmap` on process-local data traces to under several processes.
_PMAP_LOCAL = "host_local_array_to_global_array"


def _primitive_names(jaxpr: Any) -> set[str]:
    names = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        for sub in primitives.sub_jaxprs(eqn, strict=False):
            names |= _primitive_names(getattr(sub.jaxpr, "jaxpr", sub.jaxpr))
    return names


def global_pmap(fn: Any, args: tuple, kwargs: dict) -> tuple[Any, tuple, dict]:
    """``(fn, args, kwargs)`` to replay; for a `jax.pmap` on many processes, its run.

    Under `jax.distributed`, `jax.pmap(f)(x)` maps over this process's
    devices while its axis spans every process's: it runs a `jax.jit` of a
    `jax.shard_map` over all devices on arguments made global (see
    `compat.pmap_global_call`). That jit, on those global arguments, is what
    `locate` replays, on every process alike, so the replay reduces over
    the axis the compiled pmap reduced over and names the device and the
    process. Anything else is returned as it is.
    """
    if jax.process_count() == 1:
        return fn, args, kwargs
    got = compat.pmap_global_call(fn, args, kwargs)
    if got is None:
        return fn, args, kwargs
    jitted, flat, tree = got
    dyn_args, dyn_kwargs = jax.tree_util.tree_unflatten(tree, flat)

    def pmapped_over_every_process(*a, **k):
        return jitted(*jax.tree_util.tree_leaves((a, k)))

    if len(dyn_args) == len(args):  # no static argument: the user's names
        functools.update_wrapper(pmapped_over_every_process, fn)
    return pmapped_over_every_process, tuple(dyn_args), dict(dyn_kwargs)


def reject_multiprocess_pmap(name: str, jaxpr: Any) -> None:
    """A clear error for a `jax.pmap` inside the located function, many processes.

    `locate(jax.pmap(f))(x)` replays what the pmap runs (`global_pmap`);
    a pmap called INSIDE the located function is traced with it, and jax
    traces a pmap under several processes to a program over this process's
    devices only (``jax/_src/pmap.py``, `_get_mesh_devices`: "Tracing in
    multihost: use local devices"), whose collectives reduce over fewer
    devices than the compiled pmap: ``jax.make_jaxpr(lambda x:
    jax.pmap(lambda v: lax.psum(v, "i"), axis_name="i")(x))`` shows a mesh
    of ``jax.local_device_count()`` devices, and its psum of ones is that
    count, not the pmap's ``jax.device_count()``. Every process raises the
    same error (no process waits for another).
    """
    if jax.process_count() == 1 or _PMAP_LOCAL not in _primitive_names(jaxpr):
        return
    raise NotImplementedError(
        f"jaxnan.locate(`{name}`): a `jax.pmap` inside the located function, "
        f"under several processes ({jax.process_count()}, jax.distributed), "
        "is traced by jax to a program over this process's devices only "
        f"({jax.local_device_count()} of {jax.device_count()}): its "
        "collectives would reduce over fewer devices than the compiled pmap "
        "did (jax.make_jaxpr of a pmapped lax.psum of ones shows "
        f"{jax.local_device_count()}, the pmap computes "
        f"{jax.device_count()}). Locate the pmap itself "
        "(jaxnan.locate(jax.pmap(f))(x)), or the step written with jax.jit "
        "on global arrays (jax.make_array_from_process_local_data) or with "
        "jax.shard_map over a mesh of jax.devices(); all are located on "
        "every process, naming the process and device."
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
