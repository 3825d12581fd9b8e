"""The bad step as it ran: `skip_nonfinite`'s clock put back for the replay.

A bad step advances `skip_nonfinite`'s ``skip_step`` (every call that is not
held does) while the guard selects everything else it wrote back, and the
held call after it leaves the counters as the bad step left them. So the
state the guard holds at an incident is the bad step's input with each
clock one ahead: replayed on it, a step that reads the clock (an injected
fault, `jaxnan.fault_step`; a schedule on it) would not be the step that
ran. `as_it_ran` puts each clock back by one before the replay, locate and
the other incident passes run; `clock_of` reads it on the host (a
replicated scalar, the same on every process). The other counters
(``nonfinite_total``, ``nonfinite_streak``, ``last_nonfinite_step``,
``gave_up``) stay as the bad step left them: `skip_nonfinite` only writes
them (a set ``gave_up`` still skips), so the step computes the same with
them, and whether the bad step bumped them (a skip) or not (a nonfinite
loss the update did not see) is not known here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.extend import source_info_util

from jaxnan._src.core import hosts
from jaxnan._src.guard import program
from jaxnan._src.transforms import inject

source_info_util.register_exclusion(__file__)


def clock_positions(layout: program.Layout, state: Sequence[Any]) -> tuple[int, ...]:
    """Indices into the flat `state` of every `skip_nonfinite` ``skip_step``.

    Found by identity after rebuilding the step's state arguments (NNX
    objects through their adapter), as `program.guarded_body` finds them.
    """
    graph, _ = program.split_state(layout, state)
    holders: list[Any] = program.rebuild_state_args(layout, state)
    if layout.graph_args:
        objs = program.adapter(layout).merge(
            layout.graphdef, jax.tree_util.tree_unflatten(layout.graph_treedef, graph)
        )
        objs = objs if isinstance(objs, tuple | list) else (objs,)
        holders += [program.graph_view(layout, o) for o in objs]
    ids = {id(program.first_leaf(s.skip_step)) for s in program.skip_states(holders)}
    return tuple(j for j, x in enumerate(state) if id(x) in ids)


def as_it_ran(layout: program.Layout, state: Sequence[Any]) -> list[Any]:
    """`state` with each ``skip_step`` one back: the bad step's own input.

    The other leaves are the same objects (the replay copies what it
    donates).
    """
    out = list(state)
    for j in clock_positions(layout, state):
        out[j] = out[j] - 1
    return out


def clock_of(layout: program.Layout, state: Sequence[Any]) -> int | None:
    """The first ``skip_step`` of `state` on the host (None without one)."""
    at = clock_positions(layout, state)
    return int(np.asarray(hosts.read(state[at[0]]))) if at else None


def fired(
    planted: Sequence[inject.Planted], layout: program.Layout, state: Sequence[Any]
) -> tuple[inject.Planted, ...]:
    """The injectors of `planted` that fire on the step of input `state`."""
    if not planted:
        return ()
    clock = clock_of(layout, state)
    return tuple(p for p in planted if p.fires_at(clock))
