"""Observer states: transforms whose state must see every step, even a skipped one."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from jax.extend import source_info_util

source_info_util.register_exclusion(__file__)

# --------------------------------------------------------------------------
# Observer states: transforms whose state must see every step.

# State types of transforms that only record what they see (`jaxnan.monitor`),
# mapped to the name of their field holding a wrapped transformation's state
# (None when there is none). A guard (`skip_nonfinite`, `skip_spikes`,
# `dynamic_loss_scale`) that skips a step still advances such a state, so that
# the step that was skipped is recorded; everything else it keeps bit for bit.
OBSERVER_STATES: dict[type, str | None] = {}


def register_observer_state(cls: type, inner_field: str | None = None) -> type:
    """Registers a NamedTuple state type that a skipping guard still advances."""
    OBSERVER_STATES[cls] = inner_field
    return cls


def is_observer_state(x: Any) -> bool:
    """Whether `x` is the state of a registered observer transform."""
    return type(x) in OBSERVER_STATES


def merge_observed(new: Any, old: Any, keep_new: Callable[[Any, Any], Any]) -> Any:
    """`old`, except in observer states, which take `new`'s recorded fields.

    `keep_new(n, o)` chooses per array leaf outside observer states (for
    example ``lambda n, o: o``, or a `where`-select). The two trees have the
    same structure. An observer's wrapped state is merged recursively.
    """

    def one(n, o):
        if not is_observer_state(n):
            return keep_new(n, o)
        field = OBSERVER_STATES[type(n)]
        if field is None:
            return n
        return n._replace(
            **{field: merge_observed(getattr(n, field), getattr(o, field), keep_new)}
        )

    return jax.tree_util.tree_map(one, new, old, is_leaf=is_observer_state)


def recorded_free_leaves(state: Any) -> list[Any]:
    """The array leaves of `state` outside the records of observer states.

    An observer's wrapped state (its inner optimizer) is included. These are
    the leaves a guard promises to keep finite: an observer records what it
    saw, NaN included, on purpose.
    """
    out: list[Any] = []
    for x in jax.tree_util.tree_leaves(state, is_leaf=is_observer_state):
        if is_observer_state(x):
            field = OBSERVER_STATES[type(x)]
            if field is not None:
                out += recorded_free_leaves(getattr(x, field))
        else:
            out.append(x)
    return out
