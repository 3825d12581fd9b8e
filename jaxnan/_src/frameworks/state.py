"""Carrying state updates made inside a checked function back to the caller.

`checked` hands `fn` a rebuilt copy of its arguments (their floating leaves
pass through an identity whose derivative checks the gradients). For
immutable pytrees (dicts, tuples, Equinox modules, linen variable dicts)
that copy is indistinguishable from the original. Mutable objects are not:
a Flax NNX module updates its `BatchStat`, `RngState` and sown
`Intermediate` Variables in place, and updates made to the copy would be
lost. After `fn` returns, every stateful object found in the arguments gets
the state of its copy back, so the caller sees exactly what `fn` did.

Each framework's `registry.Adapter` says which objects are mutable
(`Adapter.is_sync_node`) and how to sync them (`Adapter.sync`); adapters
are made on first use, and only when the framework is already imported by
the user: ``import jaxnan`` never imports flax.
"""

from __future__ import annotations

from typing import Any

import jax
from jax.extend import source_info_util

from jaxnan._src.frameworks import registry
from jaxnan._src.frameworks.registry import Adapter

source_info_util.register_exclusion(__file__)


def active_syncs() -> list[Adapter]:
    """The adapters of the imported frameworks whose objects are mutated."""
    return [a for a in registry.active() if a.sync is not None]


def stateful_nodes(tree: Any, syncs: list[Adapter]) -> list[tuple[Any, Adapter]]:
    """The outermost stateful objects of `tree`, in flattening order."""
    if not syncs:
        return []

    def which(x: Any) -> Adapter | None:
        return next((s for s in syncs if (s.is_sync_node or s.is_node)(x)), None)

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

    A leaf is a constant when a framework's adapter says so
    (`Adapter.constants`: for Flax NNX, a Variable that is neither an
    `nnx.Param` nor an `nnx.BatchStat`, such as an attention mask of
    ``-inf``, whose +-Inf entries are intentional). Empty when no imported
    framework has constants.
    """
    flags = [a.constants(tree) for a in registry.active() if a.constants]
    if not flags:
        return []
    return [any(f) for f in zip(*flags)]
