"""Rollback the way large runs do it: N steps back, a skip window, a budget.

PaLM restarted about 100 steps before a loss spike and skipped the 200-500
batches around it; Megatron writes a tracker file the next launch reads to
skip iterations. `RunPlan` holds what `jaxnan.guard` needs for that, apart
from the snapshots themselves (`snapshots.Snapshots`):

* the data position of each call (the step by default, or what the loop
  sets with ``step.position = p``) and whether the call is to be skipped:
  its position is in the bad-batch record (`bad_batches.BadBatches`, read
  back from a file by a resumed run) or in the skip window after a
  rollback. A skipped call runs *held*: the state comes back as it went
  in, bit for bit, with the step's own metrics;
* what a resolved incident adds to the record (its batch, the batches a
  rollback undid, the skip window after it);
* the step numbering of a resumed run (``start_step``).
"""

from __future__ import annotations

import collections
import os
from typing import Any

import jax.numpy as jnp
import numpy as np
from jax.extend import source_info_util

from jaxnan._src.core.validation import check_int
from jaxnan._src.guard import incidents, program
from jaxnan._src.guard.bad_batches import BadBatch, BadBatches, SkippedAs
from jaxnan._src.guard.snapshots import Snapshots

source_info_util.register_exclusion(__file__)


def check_path(path: Any) -> str | None:
    """The `bad_batches` path as a string, checked before any step runs.

    Raises:
        TypeError: when it is not a path (str or os.PathLike) or None.
        ValueError: when it is a directory or its directory does not exist.
    """
    if path is None:
        return None
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(
            f"jaxnan.guard: bad_batches must be a path (str or os.PathLike) or "
            f"None, got {type(path).__name__} {path!r}."
        )
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path) or not os.path.isdir(folder):
        what = "is a directory" if os.path.isdir(path) else f"has no folder {folder!r}"
        raise ValueError(
            f"jaxnan.guard: bad_batches={path!r} {what}. Pass a file path in an "
            "existing directory (a run's bad_batches.jsonl), or None."
        )
    return path


class RunPlan:
    """Skips, budget and step numbering of one guarded run.

    Args:
        policy: the guard's policy (the rollback options need ``"rollback"``).
        steps_back: a rollback restores a good snapshot at least this many
            steps before the bad step (0: the newest).
        skip_batches: after a rollback, the next this many batches are
            skipped (run held).
        max_rollbacks: the most rollbacks a run makes; the next bad step
            raises `jaxnan.NonFiniteError` carrying the last good state.
            None: no limit.
        bad_batches: the bad-batch record's JSON-lines file, read now when
            it exists (a resumed run), appended to as batches are skipped;
            None: kept in memory only.
        start_step: the global step number of the first call (a run resumed
            from a checkpoint of step ``s`` passes ``s + 1``).

    Raises:
        ValueError: for a value out of range, or a rollback option given
            with a policy that does not roll back, naming the argument and
            the fix.
        TypeError: for a `bad_batches` that is not a path.

    Examples:
        >>> from jaxnan._src.guard import incidents, rollback
        >>> plan = rollback.RunPlan(incidents.Policy.ROLLBACK, skip_batches=2)
        >>> [plan.place(s) for s in range(3)], plan.position
        ([False, False, False], 3)
    """

    def __init__(
        self,
        policy: incidents.Policy,
        *,
        rolls_back: bool = True,
        snapshot_every: int = 1,
        steps_back: int = 0,
        skip_batches: int = 0,
        max_rollbacks: int | None = None,
        bad_batches: str | os.PathLike | None = None,
        start_step: int = 0,
    ):
        fix = "Pass an int, or leave it out."
        self.steps_back = check_int("guard", "steps_back", steps_back, low=0, fix=fix)
        self.skip_batches = check_int(
            "guard", "skip_batches", skip_batches, low=0, fix=fix
        )
        if max_rollbacks is not None:
            max_rollbacks = check_int(
                "guard", "max_rollbacks", max_rollbacks, low=1, fix="Or None: no limit."
            )
        self.max_rollbacks = max_rollbacks
        self.start_step = check_int("guard", "start_step", start_step, low=0, fix=fix)
        options = {
            "steps_back": steps_back,
            "skip_batches": skip_batches,
            "max_rollbacks": max_rollbacks,
        }
        given = [name for name, value in options.items() if value not in (0, None)]
        if given and not rolls_back:
            name = given[0]
            raise ValueError(
                f"jaxnan.guard: {name}={options[name]!r} applies to rollbacks, but "
                f"policy={policy.value!r} does not roll back. Pass "
                f"policy='rollback', or leave {name} out."
            )
        path = check_path(bad_batches)
        self.record = BadBatches.load(path) if path else BadBatches()
        self.position = self.start_step
        self.skipped = 0  # calls held because their batch is skipped
        self._counted: int | None = None  # the last call counted in `skipped`
        # enough to name the positions of the steps a rollback undoes
        self.held = jnp.asarray(held_vector(program.HEALTH_SIZE))
        self._keep = self.steps_back + 2 * snapshot_every + self.skip_batches + 16
        self.verified: int | None = None  # newest step read healthy
        # step -> data position of the recent calls a rollback may undo
        self._positions: collections.OrderedDict[int, int] = collections.OrderedDict()

    def snapshots(self, every: int) -> Snapshots:
        """The run's snapshot store: every `every` steps, `steps_back`, the budget."""
        return Snapshots(every, self.steps_back, self.max_rollbacks)

    def step_of(self, call: int) -> int:
        """The global step number of call `call` (from 0)."""
        return self.start_step + call

    def place(self, step: int) -> bool:
        """Gives call `step` the next data position; whether it is skipped."""
        self._positions[step] = self.position
        while len(self._positions) > self._keep:
            self._positions.popitem(last=False)
        self.position += 1
        return self.holds(step)

    def holds(self, step: int) -> bool:
        """Whether call `step`'s batch is to be skipped (run held); counted once."""
        position = self._positions.get(step)
        held = position is not None and self.record.should_skip(position)
        if held and self._counted != step:
            self._counted = step
            self.skipped += 1
        return held

    def position_of(self, step: int) -> int:
        """The data position of call `step` (counted from the oldest one known)."""
        if step in self._positions:
            return self._positions[step]
        oldest, position = next(iter(self._positions.items()), (step, step))
        return position + step - oldest

    def resolved(self, incident: incidents.Incident) -> None:
        """Records what a resolved bad step takes out of training.

        Its own batch (``nonfinite``); for a rollback, the batches it undid
        (``undone``) and the skip window after it (``window``), all at once.
        """
        cause = incident.cause
        rows = tuple(incident.rows)
        self.record.add(
            BadBatch(
                incident.step,
                self.position_of(incident.step),
                SkippedAs.NONFINITE,
                cause,
                rows,
            )
        )
        if incident.action is not incidents.Action.ROLLED_BACK:
            return
        for s in incident.undone[:-1]:
            self.record.add(BadBatch(s, self.position_of(s), SkippedAs.UNDONE, cause))
        first = self.position_of(incident.step) + 1
        for k in range(self.skip_batches):
            step = incident.step + 1 + k
            self.record.add(BadBatch(step, first + k, SkippedAs.WINDOW, cause))

    def summary(self) -> dict[str, int]:
        """``batches_skipped``: calls run held because their batch is skipped."""
        return {"batches_skipped": self.skipped}


def checked_position(value: Any) -> int:
    """A data position set by the loop (``step.position = value``), checked.

    Raises:
        TypeError: when it is not an int.
        ValueError: when it is an int below 0.
    """
    return check_int(
        "guard", "position", value, low=0, fix="Set the batch index of the next call."
    )


def last_good(
    pending: Any, last_step: int, plan: RunPlan, state: Any
) -> tuple[int, Any] | None:
    """``(step, state)`` of `jaxnan.GuardedStep.last_good`.

    `state` is the guard's `last_state` after its last call, step
    `last_step`. The health of that step (`pending`, None once read) is read
    now, which waits for the step. A healthy step verifies the state it
    made. A bad step changed nothing in the graph but `skip_nonfinite`'s
    counters: its state is the one the newest healthy step made, verified
    when that step was read (``plan.verified``). None before any call, or
    while no step has been read healthy.
    """
    if last_step < plan.start_step:
        return None
    healthy = pending is not None and not (np.asarray(pending.health)[program.BAD] > 0)
    if healthy or plan.verified is not None:
        return last_step, state
    return None


def held_vector(size: int) -> np.ndarray:
    """The health vector that makes a call run held (as after a bad step)."""
    vector = np.zeros((size,), np.float32)
    vector[program.BAD] = 1.0
    return vector
