"""What `jaxnan.guard` donates: what the wrapped jit donates, unless told.

A drop-in behaves like the function it wraps: a step under a `jax.jit`
without ``donate_argnums`` leaves the caller's arrays alive, one that donates
its state consumes it. The guard reads the wrapper's own setting:

* `jax.jit`: ``donate_argnums`` / ``donate_argnames``;
* `nnx.jit`: the same, on the `jax.jit` it wraps;
* `eqx.filter_jit`: ``donate="all"`` (every argument), ``"all-except-first"``
  (all but the first), ``"none"`` (the default) or ``"warn"`` (all);

and an unjitted step donates nothing. ``donate=True`` donates the whole state
(every argument the step returns again, and NNX objects); ``donate=False``
nothing. Only state is ever donated: the batch is kept for replay.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import numpy as np
from jax.extend import source_info_util

from jaxnan._src.core import compat

source_info_util.register_exclusion(__file__)


def donated_positions(fn: Callable) -> Callable[[int], bool]:
    """Which argument positions the jit wrapping `fn` donates.

    Examples:
        >>> import jax
        >>> from jaxnan._src.guard import donation
        >>> f = jax.jit(lambda a, b: a + b, donate_argnums=(1,))
        >>> [donation.donated_positions(f)(i) for i in range(2)]
        [False, True]
        >>> donation.donated_positions(lambda a: a)(0)
        False
    """
    for layer in wrapper_chain(fn):
        nums = compat.jit_donated_argnums(layer)
        if nums is not None:
            return frozenset(nums).__contains__
        if is_filter_jit(layer):
            first, rest = bool(layer.donate_first), bool(layer.donate_rest)
            return lambda i: first if i == 0 else rest
    return lambda i: False


def is_filter_jit(fn: Callable) -> bool:
    """Whether `fn` is an `eqx.filter_jit` function."""
    return hasattr(fn, "donate_first") and hasattr(fn, "donate_rest")


def wrapper_chain(fn: Callable) -> Iterator[Callable]:
    """`fn`, then the functions it wraps, outermost first (eight at most).

    An ``nnx.jit`` function wraps its `jax.jit` (``jitted_fn``); decorators
    made with `functools.wraps` wrap their ``__wrapped__``.

    Examples:
        >>> import functools, jax
        >>> from jaxnan._src.guard import donation
        >>> def add_one(a):
        ...     return a + 1
        >>> f = jax.jit(add_one)
        >>> g = functools.wraps(f)(lambda a: f(a))
        >>> chain = list(donation.wrapper_chain(g))
        >>> len(chain), chain[1] is f, chain[2] is add_one
        (3, True, True)
    """
    for _ in range(8):
        yield fn
        inner = getattr(fn, "jitted_fn", None)  # nnx.jit: its jax.jit
        if inner is None:
            inner = getattr(fn, "__wrapped__", None)
        if inner is None or inner is fn:
            return
        fn = inner


def state_mask(
    layout: Any, graph_state: Any, donates: Callable[[int], bool]
) -> tuple[bool, ...]:
    """Per state leaf of `layout` (`program.flatten` order): donated or not.

    `graph_state` is the split state of the NNX objects (a tuple of one
    state per object, in `layout.graph_args` order), or None.
    """
    mask: list[bool] = []
    if layout.graph_args:
        for i, state in zip(layout.graph_args, _per_object(graph_state, layout)):
            mask += [donates(i)] * len(jax.tree_util.tree_leaves(state))
    for i in layout.state_args:
        mask += [donates(i)] * layout.counts[i]
    return tuple(mask)


def _per_object(graph_state: Any, layout: Any) -> Sequence[Any]:
    """The states of the graph objects one by one (NNX: keys 0, 1, ...)."""
    if len(layout.graph_args) == 1:
        return [graph_state]
    try:
        return [graph_state[k] for k in range(len(layout.graph_args))]
    except (KeyError, TypeError, IndexError):  # one state for all: all or none
        return [graph_state] + [()] * (len(layout.graph_args) - 1)


class Donating:
    """`body(health, state, inputs)` compiled, donating the masked state leaves.

    Called and lowered like the jitted body; the state is passed in two
    lists so that `jax.jit` donates exactly the leaves of `mask`.
    """

    def __init__(self, body: Callable, mask: Sequence[bool]):
        self.mask = tuple(mask)

        def split_body(health, donated, kept, inputs):
            return body(health, self._merge(donated, kept), inputs)

        self._jitted = jax.jit(split_body, donate_argnums=(1,))

    def _split(self, state: Sequence[Any]) -> tuple[list, list]:
        donated = [x for x, d in zip(state, self.mask) if d]
        kept = [x for x, d in zip(state, self.mask) if not d]
        return donated, kept

    def _merge(self, donated: Sequence[Any], kept: Sequence[Any]) -> list:
        d, k = iter(donated), iter(kept)
        return [next(d) if m else next(k) for m in self.mask]

    def __call__(self, health: Any, state: Sequence[Any], inputs: Sequence[Any]):
        return self._jitted(health, *self._split(state), inputs)

    def lower(self, health: Any, state: Sequence[Any], inputs: Sequence[Any]):
        """The lowered program (nothing runs or is donated)."""
        return self._jitted.lower(health, *self._split(state), inputs)


def owned(inputs: list) -> list:
    """The inputs, host numpy arrays copied: a loader may reuse its buffers.

    The guard keeps a step's batch to replay it one step late; on CPU a
    numpy array can be used by the compiled step without a copy, so a loader
    writing the next batch into the same buffer would change the kept one
    (and every replay would come back finite, "nondeterministic"). Device
    arrays are immutable and kept as they are; the copy costs one host
    memcpy of the numpy leaves per step.
    """
    return [np.array(x) if isinstance(x, np.ndarray) else x for x in inputs]
