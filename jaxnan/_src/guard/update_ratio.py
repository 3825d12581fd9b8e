"""The health vector's update ratio: ||new - old|| / ||old|| on the small params.

Over the parameter leaves of at most `program.RATIO_SAMPLE` entries (their
old values are kept; see `program.sample_first`). A leaf split over devices
(FSDP, `core.split_leaves`) is read as `jaxnan.skip_nonfinite` proposed it,
before its skip decision, and summed in the checks' form (`tree.split_sums`):
its sums then ride in the checks' one all-reduce, where the new parameters,
known only after the decision, would cost an all-reduce of their own after
it. On a step that is not applied that leaf's difference is 0, as the new
parameters are the old ones. Other leaves are read as the step left them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend import source_info_util

from jaxnan._src.core import split_leaves, tree

source_info_util.register_exclusion(__file__)


def _proposals(records: Sequence[Any]) -> dict[int, Any]:
    """id(param leaf) -> (param, proposed update) or None, over the records."""
    out: dict[int, Any] = {}
    for r in records:
        leaves, treedef = jax.tree_util.tree_flatten(r.params)
        ups = None
        if r.proposed is not None:
            flat, updef = jax.tree_util.tree_flatten(r.proposed)
            ups = flat if updef == treedef else None
        for k, p in enumerate(leaves):
            u = None if ups is None else ups[k]
            same = u is not None and jnp.shape(u) == jnp.shape(p)
            out[id(p)] = (p, u) if same else None
    return out


def update_ratio(
    state: Sequence[Any],
    new_state: Sequence[Any],
    samples: dict[int, Any],
    records: Sequence[Any],
    not_applied: jax.Array,
) -> jax.Array:
    """||new - old|| / ||old|| over the sampled state leaves that are params.

    `samples[j]` is the old value of state leaf `j` (float32), `records` the
    `skip_nonfinite` tap records of the step (their `params` are the state
    leaves themselves), `not_applied` whether their updates were dropped.
    """
    made = _proposals(records)
    du = dp = jnp.zeros((), jnp.float32)
    for j, o in enumerate(state):
        if id(o) not in made or j not in samples:
            continue
        so = samples[j]
        pair = made[id(o)]
        if pair is not None and split_leaves.is_split(o):
            p, u = pair
            p = jnp.asarray(p)
            new = (p + u).astype(p.dtype).astype(jnp.float32)
            diff, old = tree.split_sums([jnp.square(new - so), jnp.square(so)])
            du = du + jnp.where(not_applied, jnp.zeros_like(diff), diff)
            dp = dp + old
        else:
            du = du + jnp.sum(jnp.square(new_state[j].astype(jnp.float32) - so))
            dp = dp + jnp.sum(jnp.square(so))
    return jnp.sqrt(du) / jnp.maximum(jnp.sqrt(dp), jnp.finfo(jnp.float32).tiny)
