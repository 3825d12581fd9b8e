"""The bad-batch record: which batches a run skipped, kept for the next launch.

Megatron writes a tracker file that the next launch reads to skip
iterations; PaLM restarted about 100 steps before a loss spike and skipped
the 200-500 batches around it. `jaxnan.guard(..., bad_batches=path)` keeps
such a record as JSON lines, one per batch it took out of training:

* ``nonfinite``: the batch of a bad step (its rows and cause);
* ``undone``: a batch whose update a rollback undid;
* ``window``: a batch in the skip window after a rollback (``skip_batches``),
  written whole when the rollback happens, so a run stopped inside the
  window skips the rest of it when resumed.

A resumed run given the same path reads it back and skips those data
positions itself (the call runs held: the state is left as it was, bit for
bit); a data loop that would rather not load them at all asks
`BadBatches.should_skip` first and tells the guard each batch's position
(``step.position = p``).

Under several processes every process decides the same skips; process 0
writes the file, every process reads it.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
from collections.abc import Iterable, Iterator
from typing import IO, Any

from jax.extend import source_info_util

from jaxnan._src.guard import multihost

source_info_util.register_exclusion(__file__)


class SkippedAs(str, enum.Enum):
    """Why a batch is in the bad-batch record (the ``reason`` of a line)."""

    NONFINITE = "nonfinite"
    UNDONE = "undone"
    WINDOW = "window"


@dataclasses.dataclass(frozen=True)
class BadBatch:
    """One batch the run took out of training.

    Attributes:
        step: the global step of the call that got it (``start_step`` plus
            the call's index; for a ``window`` batch not yet reached, the
            step it would have been).
        position: its data position: the batch index the guard counts (the
            step by default), or the one the loop set (``step.position``).
        reason: a `SkippedAs`.
        cause: for a ``nonfinite`` batch the incident's cause
            (``input_data``, ...); else the cause of the rollback's incident.
        rows: for a ``nonfinite`` batch, the rows at fault (global indices).
    """

    step: int
    position: int
    reason: SkippedAs
    cause: str | None = None
    rows: tuple[int, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of its line."""
        return {
            "step": self.step,
            "position": self.position,
            "reason": self.reason.value,
            "cause": self.cause,
            "rows": list(self.rows),
        }


class BadBatches:
    """The batches a run took out of training, by data position.

    Args:
        records: the records to start from.
        path: the JSON-lines file new records are appended to (process 0
            only), or None.

    Raises:
        TypeError: for a `path` that is not a str or os.PathLike, or
            `records` that are not `jaxnan.BadBatch` records.

    Examples:
        >>> import os, tempfile
        >>> import jaxnan
        >>> path = os.path.join(tempfile.mkdtemp(), "bad_batches.jsonl")
        >>> record = jaxnan.BadBatches(path=path)
        >>> record.add(jaxnan.BadBatch(12, 12, jaxnan.SkippedAs.NONFINITE,
        ...                            "input_data", (6,)))
        >>> again = jaxnan.BadBatches.load(path)
        >>> again.should_skip(12), again.should_skip(13), len(again)
        (True, False, 1)
        >>> again.records[0].rows
        (6,)
    """

    def __init__(
        self, records: Iterable[BadBatch] = (), *, path: str | os.PathLike | None = None
    ):
        if path is not None and not isinstance(path, (str, os.PathLike)):
            raise TypeError(
                f"jaxnan.BadBatches: path must be a str, os.PathLike or None, got "
                f"{type(path).__name__} {path!r}."
            )
        self.path = None if path is None else os.fspath(path)
        self._records: list[BadBatch] = list(records)
        for r in self._records:
            if not isinstance(r, BadBatch):
                raise TypeError(
                    "jaxnan.BadBatches: records must be jaxnan.BadBatch records "
                    f"(as BadBatches.load reads them), got {type(r).__name__}."
                )
        self._positions = {r.position for r in self._records}
        self._file: IO[str] | None = None

    @classmethod
    def load(cls, path: str | os.PathLike) -> BadBatches:
        """The record in `path` (none yet when the file does not exist).

        New records are appended to the same file.

        Raises:
            TypeError: when `path` is not a path.
            ValueError: for a line that is not a record, naming file and line.
        """
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(
                f"jaxnan.BadBatches.load: path must be a str or os.PathLike, got "
                f"{type(path).__name__} {path!r}."
            )
        path = os.fspath(path)
        records = []
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                for number, line in enumerate(f, 1):
                    if line.strip():
                        records.append(_parse(line, path, number))
        return cls(records, path=path)

    @property
    def records(self) -> tuple[BadBatch, ...]:
        """Every record, in the order written."""
        return tuple(self._records)

    @property
    def positions(self) -> frozenset[int]:
        """The data positions to skip."""
        return frozenset(self._positions)

    def should_skip(self, position: int) -> bool:
        """Whether the batch at data `position` is to be skipped."""
        return position in self._positions

    def add(self, record: BadBatch) -> None:
        """Adds `record` (appended to the file, by process 0, and flushed)."""
        self._records.append(record)
        self._positions.add(record.position)
        if self.path is None or multihost.process_index() != 0:
            return
        if self._file is None:
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
        self._file.write(json.dumps(record.to_dict()) + "\n")
        self._file.flush()

    def close(self) -> None:
        """Closes the file (reopened at the next `add`)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self) -> Iterator[BadBatch]:
        return iter(self.records)

    def __contains__(self, position: object) -> bool:
        return position in self._positions


def _parse(line: str, path: str, number: int) -> BadBatch:
    try:
        d = json.loads(line)
        return BadBatch(
            step=int(d["step"]),
            position=int(d["position"]),
            reason=SkippedAs(d["reason"]),
            cause=d.get("cause"),
            rows=tuple(int(r) for r in d.get("rows", ())),
        )
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(
            f"jaxnan.BadBatches: {path}:{number} is not a bad-batch record "
            f"({type(e).__name__}: {e}): {line.strip()[:80]!r}. Each line is "
            '{"step": int, "position": int, "reason": "nonfinite" | "undone" | '
            '"window", "cause": str, "rows": [int]}; fix or remove that line.'
        ) from None
