"""The guard's hint to the checks: which state leaves are split over devices.

`jaxnan.guard` is called with the state itself, so it knows what a trace
does not: which parameters and moments are sharded (FSDP). It traces the
step with their shapes named (`core.split_leaves`), so that
`jaxnan.skip_nonfinite`'s finiteness reductions over those leaves take the
form XLA partitions into one all-reduce of scalars, and the others keep the
variadic form that is cheaper on one device.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

from jax.extend import source_info_util

from jaxnan._src.core import split_leaves

source_info_util.register_exclusion(__file__)


def traced_with_split(body: Callable, state: Sequence[Any]) -> Callable:
    """`body`, traced with the shapes of the split leaves of `state` named.

    Without a split leaf (one device, data parallel) `body` itself: the
    program is the one the guard compiles without this hint. Read once, from
    the state of the call that builds the compiled entry; a later call whose
    state is sharded otherwise keeps it (a cost, never another decision).
    """
    shapes = split_leaves.split_shapes(state)
    if not shapes:
        return body

    @functools.wraps(body)
    def traced(*args: Any) -> Any:
        with split_leaves.assume_split(shapes):
            return body(*args)

    return traced
