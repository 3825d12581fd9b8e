"""Incident records of `jaxnan.guard`: the vocabulary, the JSON-lines log, summary.

One `Incident` per bad step (or early warning), written once: to the Python
logger ``jaxnan.guard`` (WARNING for incidents and warnings), as one JSON
object per line to an optional file, and counted for `summary`.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import json
import logging
import os
from collections import Counter
from collections.abc import Iterable
from typing import IO, Any

from jax.extend import source_info_util

from jaxnan._src.core import errors
from jaxnan._src.core.errors import Phase
from jaxnan._src.guard import multihost
from jaxnan._src.guard.evidence import Evidence
from jaxnan._src.locate.api import Diagnosis
from jaxnan._src.locate.causes import Cause as Cause  # one cause vocabulary

source_info_util.register_exclusion(__file__)

LOGGER = logging.getLogger("jaxnan.guard")
LOGGER.addHandler(logging.NullHandler())  # no stderr fallback when unconfigured


class Policy(str, enum.Enum):
    """What `jaxnan.guard` does with a bad step.

    Attributes:
        SKIP: leave the state as it was before the step (bit for bit) and go
            on with the next batch (the default).
        RAISE: raise `jaxnan.NonFiniteError` carrying the incident and the
            state as it was before the step.
        ROLLBACK: restore the last good snapshot (taken every
            `snapshot_every` steps) and go on with the next batch; the
            steps since that snapshot are undone.
    """

    SKIP = "skip"
    RAISE = "raise"
    ROLLBACK = "rollback"


class Action(str, enum.Enum):
    """What the guard did about an incident (the ``action`` of its record)."""

    SKIPPED = "skipped"
    RAISED = "raised"
    ROLLED_BACK = "rolled_back"
    WARNED = "warned"


@dataclasses.dataclass(frozen=True)
class Incident:
    """One bad step (or early warning) seen by `jaxnan.guard`.

    Attributes:
        step: index of the guarded call (from 0) that went bad; also the
            index of its batch in the order the loop fed them.
        action: what the guard did (`Action`).
        cause: a `jaxnan.locate` cause (``input_data``, ``unsafe_op``,
            ``learning_rate``, ...) or one of the guard's own verdicts
            (``nondeterministic``, ``growth``): all `Cause` values.
        message: the text printed once for this incident.
        leaf: the batch leaf that holds the bad examples
            (``"batch['x']"``), when known.
        rows: indices of the examples along the batch axis that make the
            step nonfinite on their own.
        primitive: the primitive that created the first nonfinite value.
        where: ``file:line`` of the user line of that primitive.
        phase: a `jaxnan.Phase` (``input``, ``forward``, ``backward`` or
            ``update``), the ``phase`` of the error's details.
        loss: the step's loss (NaN when it was not finite); None for a step
            that returns no loss and hands none to its optimizer.
        grad_norm: the global gradient norm of the step.
        deterministic: whether the replay reproduced the failure.
        restored_step: for a rollback, the step whose state was restored.
        diagnosis: the full `jaxnan.Diagnosis` of the replay, if any; for a
            repeat (``nonfinite again``) the earlier step's, with this step's
            own `nonfinite_inputs` when its batch is the cause.
        repeat_of: for a repeat, the step that was located (the first of a
            run of repeats); None for a step located itself.
        undone: for a rollback, the steps whose updates it undid, this one
            last; their batches are not trained on again (the loop goes on
            with the next batch).
        evidence: what the cause rests on (`jaxnan.Evidence`, one per
            figure: ``gradient norm grew 1.1e+04x over 20 steps: 3.1 ->
            3.4e+04``), the report's ``why:`` lines.
        loss_term: when the nonfinite loss is a sum of terms, the one that
            went nonfinite first (its key in the returned metrics, or the
            name assigned on its line; see `jaxnan.Diagnosis.loss_term`).
        gradients: the gradient bracket: ``{"nonfinite": {path: count},
            "finite_before", "finite_after", "leaves"}``, the parameter leaves
            whose gradients are nonfinite, in model order, and the nearest
            ones that stayed finite (computed at the incident only).
    """

    step: int
    action: Action
    cause: str
    message: str
    leaf: str | None = None
    rows: tuple[int, ...] = ()
    primitive: str | None = None
    where: str | None = None
    phase: Phase | None = None
    loss: float | None = None
    grad_norm: float | None = None
    deterministic: bool = True
    restored_step: int | None = None
    diagnosis: Diagnosis | None = None
    repeat_of: int | None = None
    undone: tuple[int, ...] = ()
    evidence: tuple[Evidence, ...] = ()
    loss_term: str | None = None
    gradients: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain values for JSON and loggers (the diagnosis as a dict)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["action"] = self.action.value
        d["rows"] = list(self.rows)
        d["undone"] = list(self.undone)
        d["evidence"] = [e.to_dict() for e in self.evidence]
        d["diagnosis"] = self.diagnosis.to_dict() if self.diagnosis else None
        for key in ("loss", "grad_norm"):
            value = d[key]
            if value is not None and value != value:  # NaN is not JSON
                d[key] = "nan"
            elif value in (float("inf"), float("-inf")):
                d[key] = str(value)
        return d


def warning(step: int, cause: Cause, figures: str, advice: str, **fields) -> Incident:
    """The early-warning incident of a healthy step (growth, underflow).

    Its message: ``jaxnan.guard: warning at step <step>, before any NaN:
    <figures>. <advice>``; `fields` are the other `Incident` fields.
    """
    return Incident(
        step=step,
        action=Action.WARNED,
        cause=cause.value,
        message=(
            f"jaxnan.guard: warning at step {step}, before any NaN: {figures}. {advice}"
        ),
        **fields,
    )


def last_located(
    log: Iterable[Incident], step: int, window: int, bad_batch: bool
) -> Incident | None:
    """The last located incident, if bad `step` fails the way it did.

    The way it failed: a nonfinite batch again after an `input_data`
    incident, or a finite batch again after any other (a poisoned state
    stays poisoned: it is not located on every step); within `window`
    steps of it. Otherwise None: the step is diagnosed afresh.

    Examples:
        >>> seen = [Incident(3, Action.SKIPPED, "input_data", "...")]
        >>> last_located(seen, 5, 20, bad_batch=True).step
        3
        >>> last_located(seen, 5, 20, bad_batch=False) is None  # another way
        True
    """
    last = next(
        (i for i in reversed(log) if i.action is not Action.WARNED and i.deterministic),
        None,
    )
    if last is None or step - last.step > window:
        return None
    if bad_batch != (last.cause == Cause.INPUT_DATA.value):
        return None
    return last


def repeat(
    last: Incident,
    step: int,
    loss: float | None,
    grad_norm: float,
    streak: int,
    examples: tuple[str, str | None, tuple[int, ...]],
    diagnosis: Diagnosis | None,
) -> Incident:
    """`last` again for bad `step`: its ``nonfinite again`` incident.

    Args:
        last: the incident `step` repeats (`last_located`).
        step: the bad step.
        loss: its loss (None: the step returns none).
        grad_norm: its global gradient norm.
        streak: how many bad steps in a row it ends.
        examples: ``(line, leaf, rows)`` of its own bad examples, when its
            batch is the cause (``("", None, ())`` otherwise).
        diagnosis: `last`'s, with this step's own nonfinite inputs.

    Examples:
        >>> first = Incident(3, Action.SKIPPED, "unsafe_op", "...", where="a.py:7")
        >>> again = repeat(first, 4, 1.5, 2.0, 2, ("", None, ()), None)
        >>> again.message
        'jaxnan.guard: step 4 nonfinite again (loss 1.5, 2 in a row): as at step 3, unsafe_op at a.py:7.'
    """  # noqa: E501
    line, leaf, rows = examples
    in_a_row = f", {streak} in a row" if streak > 1 else ""
    origin = last.step if last.repeat_of is None else last.repeat_of
    at = errors.shown_location(last.where) or "the same place"
    seen = f"\n{line}" if line else ""
    return dataclasses.replace(
        last,
        step=step,
        repeat_of=origin,
        message=(
            f"jaxnan.guard: step {step} nonfinite again ({loss_text(loss)}"
            f"{in_a_row}): as at step {origin}, {last.cause} at {at}.{seen}"
        ),
        rows=rows,
        leaf=leaf,
        loss=loss,
        grad_norm=grad_norm,
        restored_step=None,
        undone=(),
        diagnosis=diagnosis,
    )


def loss_text(loss: float | None) -> str:
    """A bad step's loss in its report's first line.

    Examples:
        >>> loss_text(float("nan")), loss_text(2.0), loss_text(None)
        ('loss nan', 'loss 2', 'the step returns no loss')
    """
    return "the step returns no loss" if loss is None else f"loss {loss:.4g}"


def steps_text(steps: tuple[int, ...] | list[int]) -> str:
    """Steps as ranges: ``11, 21-24, 36-40``.

    Examples:
        >>> steps_text([11, 21, 22, 23, 24, 42])
        '11, 21-24, 42'
    """
    runs: list[list[int]] = []
    for s in sorted(steps):
        if runs and s == runs[-1][1] + 1:
            runs[-1][1] = s
        else:
            runs.append([s, s])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def undone_text(undone: tuple[int, ...]) -> str:
    """What a rollback undid, said aloud (the end of its ``action:`` line).

    Examples:
        >>> undone_text((11, 12))
        'step 11 undone (its batch is dropped), batch 12 skipped.'
        >>> undone_text((36, 37, 38, 39, 40, 41))
        'steps 36-40 undone (their batches are dropped), batch 41 skipped.'
        >>> undone_text((7,))
        'no other step undone, batch 7 skipped.'
    """
    *dropped, bad = undone
    if not dropped:
        return f"no other step undone, batch {bad} skipped."
    if len(dropped) == 1:
        return f"step {dropped[0]} undone (its batch is dropped), batch {bad} skipped."
    return (
        f"steps {steps_text(dropped)} undone (their batches are dropped), "
        f"batch {bad} skipped."
    )


def check_log_path(path: Any) -> str | None:
    """`path` as a string, checked writable before any step runs.

    The file itself is created at the first incident.

    Raises:
        TypeError: when `path` is not a path (str or os.PathLike) or None.
        ValueError: when it is a directory, its directory does not exist, or
            either is not writable.

    Examples:
        >>> from jaxnan._src.guard import incidents
        >>> incidents.check_log_path(None) is None
        True
        >>> try:
        ...     incidents.check_log_path("/no/such/dir/log.jsonl")
        ... except ValueError as e:
        ...     print(str(e)[:60])
        jaxnan.guard: log='/no/such/dir/log.jsonl': its directory '/
    """
    if path is None:
        return None
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(
            f"jaxnan.guard: log must be a path (str or os.PathLike) or None, got "
            f"{type(path).__name__} {path!r}."
        )
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    problem = None
    if os.path.isdir(path):
        problem = "is a directory"
    elif not os.path.isdir(folder):
        problem = f"its directory {folder!r} does not exist"
    elif os.path.exists(path) and not os.access(path, os.W_OK):
        problem = "is not writable"
    elif not os.path.exists(path) and not os.access(folder, os.W_OK):
        problem = f"its directory {folder!r} is not writable"
    if problem is not None:
        raise ValueError(
            f"jaxnan.guard: log={path!r}: {problem}. Create it first, or pass "
            "another path (or log=None)."
        )
    return path


class IncidentLog:
    """Where incidents go: Python logging, a JSON-lines file and counters.

    Args:
        path: the JSON-lines file (see `check_log_path`), or None.
        verbose: print each incident once.
        keep: how many incidents `incidents` keeps (the latest); the
            counts of `summary` cover all of them.
    """

    def __init__(self, path: str | os.PathLike | None, verbose: bool, keep: int = 1000):
        self.path = check_log_path(path)
        self.verbose = verbose
        self.incidents: collections.deque[Incident] = collections.deque(maxlen=keep)
        self._actions: Counter[Action] = Counter()
        self._causes: Counter[str] = Counter()
        self._nondeterministic = 0
        self._file: IO[str] | None = None

    def add(self, incident: Incident) -> None:
        """Records `incident`: the list, the logger, the file, stdout if verbose.

        The ``jaxnan.guard`` logger gets every incident at WARNING (it has a
        `logging.NullHandler`, so nothing reaches stderr unless logging is
        configured); with `verbose` the message is also printed, once, by
        process 0 only (every process decides the same, `multihost`). Each
        JSON line says which process wrote it (``"process"``).
        """
        self.incidents.append(incident)
        self._actions[incident.action] += 1
        if incident.action is not Action.WARNED:
            self._causes[incident.cause] += 1
        self._nondeterministic += not incident.deterministic
        LOGGER.warning("%s", incident.message)
        if self.verbose and multihost.process_index() == 0:
            print(incident.message, flush=True)
        if self.path is not None:
            if self._file is None:
                self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
            record = {**incident.to_dict(), "process": multihost.process_index()}
            self._file.write(json.dumps(record, default=str) + "\n")
            self._file.flush()

    def close(self) -> None:
        """Closes the JSON-lines file (reopened on the next incident)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def summary(self, steps: int) -> dict[str, Any]:
        """Counts for loggers: steps, skipped, rolled back, raised, causes."""
        actions, causes = self._actions, self._causes
        return {
            "steps": steps,
            "bad_steps": sum(actions[a] for a in Action if a is not Action.WARNED),
            "skipped": actions[Action.SKIPPED],
            "rolled_back": actions[Action.ROLLED_BACK],
            "raised": actions[Action.RAISED],
            "warnings": actions[Action.WARNED],
            "nondeterministic": self._nondeterministic,
            "causes": dict(sorted(causes.items())),
        }
