"""Incident records of `jaxnan.guard`: the vocabulary, the JSON-lines log, summary.

One `Incident` per bad step (or early warning), written once: to the Python
logger ``jaxnan.guard`` (WARNING for incidents and warnings), as one JSON
object per line to an optional file, and counted for `summary`.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
import os
from collections import Counter
from typing import IO, Any

from jax.extend import source_info_util

from jaxnan._src.core.errors import Phase
from jaxnan._src.guard import multihost
from jaxnan._src.locate.api import Diagnosis

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


class Cause(str, enum.Enum):
    """Why the guard says a step went bad, beyond `jaxnan.locate`'s causes.

    The guard's own verdicts; a diagnosis it shares with `jaxnan.locate`
    (``learning_rate`` after growth, ``input_data``, ...) is that cause
    (`causes.Cause`), not a second spelling of it.

    Attributes:
        NONDETERMINISTIC: the step was bad but its replay on the same state,
            batch and RNG was not (suspect hardware, an unseeded op or a
            race).
        GROWTH: the early warning itself (no NaN yet).
    """

    NONDETERMINISTIC = "nondeterministic"
    GROWTH = "growth"


@dataclasses.dataclass(frozen=True)
class Incident:
    """One bad step (or early warning) seen by `jaxnan.guard`.

    Attributes:
        step: index of the guarded call (from 0) that went bad; also the
            index of its batch in the order the loop fed them.
        action: what the guard did (`Action`).
        cause: a `jaxnan.locate` cause (``input_data``, ``unsafe_op``,
            ``learning_rate``, ...) or a `Cause` of the guard
            (``nondeterministic``, ``growth``).
        message: the text printed once for this incident.
        leaf: the batch leaf that holds the bad examples
            (``"batch['x']"``), when known.
        rows: indices of the examples along the batch axis that make the
            step nonfinite on their own.
        primitive: the primitive that created the first nonfinite value.
        where: ``file:line`` of the user line of that primitive.
        phase: a `jaxnan.Phase` (``input``, ``forward``, ``backward`` or
            ``update``), the ``phase`` of the error's details.
        loss: the step's loss (NaN when it was not finite).
        grad_norm: the global gradient norm of the step.
        deterministic: whether the replay reproduced the failure.
        restored_step: for a rollback, the step whose state was restored.
        diagnosis: the full `jaxnan.Diagnosis` of the replay, if any; for a
            repeat (``nonfinite again``) the earlier step's, with this step's
            own `nonfinite_inputs` when its batch is the cause.
        repeat_of: for a repeat, the step that was located (the first of a
            run of repeats); None for a step located itself.
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

    def to_dict(self) -> dict[str, Any]:
        """Plain values for JSON and loggers (the diagnosis as a dict)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["action"] = self.action.value
        d["rows"] = list(self.rows)
        d["diagnosis"] = self.diagnosis.to_dict() if self.diagnosis else None
        for key in ("loss", "grad_norm"):
            value = d[key]
            if value is not None and value != value:  # NaN is not JSON
                d[key] = "nan"
            elif value in (float("inf"), float("-inf")):
                d[key] = str(value)
        return d


class IncidentLog:
    """Where incidents go: Python logging, a JSON-lines file and counters."""

    def __init__(self, path: str | os.PathLike | None, verbose: bool):
        self.path = None if path is None else os.fspath(path)
        self.verbose = verbose
        self.incidents: list[Incident] = []
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
        actions = Counter(i.action for i in self.incidents)
        causes = Counter(
            i.cause for i in self.incidents if i.action is not Action.WARNED
        )
        return {
            "steps": steps,
            "bad_steps": sum(actions[a] for a in Action if a is not Action.WARNED),
            "skipped": actions[Action.SKIPPED],
            "rolled_back": actions[Action.ROLLED_BACK],
            "raised": actions[Action.RAISED],
            "warnings": actions[Action.WARNED],
            "nondeterministic": sum(not i.deterministic for i in self.incidents),
            "causes": dict(sorted(causes.items())),
        }
