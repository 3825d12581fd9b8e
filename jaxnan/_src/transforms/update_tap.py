"""The trace-time tap through which `jaxnan.guard` talks to `skip_nonfinite`.

While the guard traces a train step, each `skip_nonfinite` update traced
inside it reads the tap: it computes its finiteness through the one-pass norm,
records a `TapRecord` for the guard, and skips without counting
when the guard holds the step. Outside a guard the tap is None and
`skip_nonfinite` compiles exactly as without it.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any, NamedTuple


class TapRecord(NamedTuple):
    """What one `skip_nonfinite` update traced inside a guard reports.

    Attributes:
        norm: global norm of the incoming updates (float32 scalar).
        params: its `params` argument (None if absent).
        updates: the updates it returns.
        loss_given: whether ``loss=`` was passed to it.
        incoming: the updates it received (the gradients), as arrays.
        proposed: the updates `inner` proposed, before the skip decision.
        loss: the ``loss=`` it was handed (None if absent).
    """

    norm: Any
    params: Any
    updates: Any
    loss_given: bool
    incoming: Any = None
    proposed: Any = None
    loss: Any = None


class UpdateTap(NamedTuple):
    """What `jaxnan.guard` hands to, and collects from, `skip_nonfinite`.

    Attributes:
        hold: traced bool scalar: when true, skip the update without
            counting it as nonfinite (the guard holds this step).
        records: one `TapRecord` appended by each update.
    """

    hold: Any
    records: list


_TAP: contextvars.ContextVar[UpdateTap | None] = contextvars.ContextVar(
    "jaxnan_update_tap", default=None
)


@contextlib.contextmanager
def collect_updates(hold: Any) -> Iterator[list]:
    """Inside the block, `skip_nonfinite` updates report to the guard.

    Each update computes its finiteness and the float32 sum of squares of
    its incoming updates in one pass, appends a `TapRecord` to the yielded
    list, and skips the inner update when `hold` is true, leaving its
    nonfinite counters as they are.
    """
    tap = UpdateTap(hold, [])
    token = _TAP.set(tap)
    try:
        yield tap.records
    finally:
        _TAP.reset(token)


def current() -> UpdateTap | None:
    """The tap of the guard tracing the current step, or None."""
    return _TAP.get()
