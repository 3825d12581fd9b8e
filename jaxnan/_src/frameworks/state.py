"""Carrying state updates made inside a checked function back to the caller.

`checked` hands `fn` a rebuilt copy of its arguments (their floating leaves
pass through an identity whose derivative checks the gradients). For
immutable pytrees (dicts, tuples, Equinox modules, linen variable dicts)
that copy is indistinguishable from the original. Mutable objects are not:
a Flax NNX module updates its `BatchStat`, `RngState` and sown
`Intermediate` Variables in place, and updates made to the copy would be
lost. After `fn` returns, every stateful object found in the arguments gets
the state of its copy back, so the caller sees exactly what `fn` did.

`STATE_SYNCS` holds one `StateSync` per kind of mutable object. Framework
entries are added on first use, and only when the framework is already
imported by the user: ``import jaxnan`` never imports flax.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
from jax.extend import source_info_util

source_info_util.register_exclusion(__file__)


class StateSync(NamedTuple):
    """How state updates on a copy reach the original object.

    Attributes:
        name: the kind of object, for messages.
        matches: ``matches(x) -> bool`` for the objects of this kind.
        sync: ``sync(original, copy, originals)`` makes `original` hold the
            state of `copy`. `originals` maps ``id(leaf)`` of each leaf handed
            to `fn` to the caller's leaf, so that state `fn` did not change is
            given back as the caller's own value, not as its copy.
    """

    name: str
    matches: Callable[[Any], bool]
    sync: Callable[[Any, Any, dict[int, Any]], None]


STATE_SYNCS: list[StateSync] = []


def _nnx_sync() -> StateSync | None:
    nnx = sys.modules.get("flax.nnx")
    if nnx is None:
        return None

    def matches(x: Any) -> bool:
        return isinstance(x, (nnx.Variable, nnx.Pytree))

    def sync(original: Any, copy: Any, originals: dict[int, Any]) -> None:
        def back(x: Any) -> Any:
            return originals.get(id(x), x)

        if isinstance(original, nnx.Variable):
            new = back(copy.get_value())
            if new is not original.get_value():
                original.set_value(new)
            return
        state = jax.tree_util.tree_map(back, nnx.state(copy))
        nnx.update(original, state)

    return StateSync("flax.nnx", matches, sync)


_BUILTIN: dict[str, Callable[[], StateSync | None]] = {"flax.nnx": _nnx_sync}


def active_syncs() -> list[StateSync]:
    """The entries of `STATE_SYNCS`, adding those of frameworks now imported."""
    for name, make in list(_BUILTIN.items()):
        if name in sys.modules:
            entry = make()
            del _BUILTIN[name]
            if entry is not None:
                STATE_SYNCS.append(entry)
    return STATE_SYNCS


def stateful_nodes(tree: Any, syncs: list[StateSync]) -> list[tuple[Any, StateSync]]:
    """The outermost stateful objects of `tree`, in flattening order."""
    if not syncs:
        return []

    def which(x: Any) -> StateSync | None:
        return next((s for s in syncs if s.matches(x)), None)

    nodes = jax.tree_util.tree_leaves(tree, is_leaf=lambda x: which(x) is not None)
    return [(x, s) for x in nodes if (s := which(x)) is not None]


def write_back(
    originals_tree: Any, copies_tree: Any, leaves: list, handed: list
) -> None:
    """Gives each stateful object of `originals_tree` the state of its copy.

    Args:
        originals_tree: the caller's arguments.
        copies_tree: the arguments handed to `fn` (after `fn` ran).
        leaves: the caller's leaves, in flattening order.
        handed: the leaves handed to `fn`, in the same order.
    """
    syncs = active_syncs()
    originals = stateful_nodes(originals_tree, syncs)
    if not originals:
        return
    copies = stateful_nodes(copies_tree, syncs)
    by_id = {id(h): x for h, x in zip(handed, leaves) if h is not x}
    for (orig, entry), (copy, _) in zip(originals, copies):
        if orig is not copy:
            entry.sync(orig, copy, by_id)


def constant_leaves(tree: Any) -> list[bool]:
    """Per leaf of `tree` (in `jax.tree_util.tree_leaves` order): a model constant?

    A Flax NNX Variable that is neither an `nnx.Param` nor an `nnx.BatchStat`
    (a plain `nnx.Variable` or a subclass holding an attention mask of
    ``-inf``, say) is not trained and not data: a constant of the model,
    whose +-Inf entries are intentional. Parameters, statistics, the batch
    and every leaf outside NNX are not. Empty when flax.nnx is not imported.
    """
    nnx = sys.modules.get("flax.nnx")
    if nnx is None:
        return []

    def is_var(x: Any) -> bool:
        return isinstance(x, nnx.Variable)

    out: list[bool] = []
    for x in jax.tree_util.tree_leaves(tree, is_leaf=is_var):
        if is_var(x):
            const = not isinstance(x, (nnx.Param, nnx.BatchStat))
            out += [const] * len(jax.tree_util.tree_leaves(x))
        else:
            out.append(False)
    return out
