"""The one error class of jaxnan, the one schema of its details, and text helpers.

- `Phase`: where a nonfinite value is observed (``input``, ``forward``,
  ``backward``, ``update``), the one phase vocabulary of jaxnan (errors,
  `jaxnan.NonfiniteRecord`, `jaxnan.Incident`, `jaxnan.Diagnosis`).
- `NonFiniteError` and `Details`, the typed schema of its ``details``: the
  common keys (`COMMON_KEYS`) that every raiser fills, and the extras of each
  raiser.
- The text of leaf counts (`describe_counts`, `leaf_lines`) and plain values
  (`plain`); the text of a `jaxnan.Diagnosis` is `jaxnan._src.locate.render`.
"""

from __future__ import annotations

import enum
import os
import sys
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, TypedDict

from jax.extend import source_info_util

source_info_util.register_exclusion(__file__)

# The 0.1 spellings of `jaxnan.checked`'s phases, still understood (with a
# DeprecationWarning) by `Phase(...)` and by comparisons with a `Phase`.
_OLD_PHASES = {"forward-inputs": "input", "forward-outputs": "forward"}


def _warn_old_phase(old: str) -> str:
    """The new spelling of `old`, warned at the first frame outside jaxnan/enum."""
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_code.co_filename in (__file__, enum.__file__):
        frame, level = frame.f_back, level + 1
    new = _OLD_PHASES[old]
    warnings.warn(
        f"jaxnan: the phase {old!r} is now spelled {new!r} "
        f"(jaxnan.Phase.{new.upper()}); {old!r} is deprecated since 0.2.",
        DeprecationWarning,
        stacklevel=level,
    )
    return new


class Phase(str, enum.Enum):
    """Where a nonfinite value is observed: the one phase vocabulary of jaxnan.

    The ``phase`` of every `NonFiniteError`'s details, of
    `jaxnan.NonfiniteRecord`, `jaxnan.Incident` and `jaxnan.Diagnosis`.
    Members are strings (``Phase.INPUT == "input"``). The 0.1 spellings of
    `jaxnan.checked`, ``"forward-inputs"`` and ``"forward-outputs"``, are
    deprecated: ``Phase("forward-inputs")`` is `INPUT` and
    ``Phase.INPUT == "forward-inputs"`` is True, each with a
    `DeprecationWarning`.

    Attributes:
        INPUT: already in the arguments: the batch, the parameters or the
            optimizer state (`jaxnan.checked`: its arguments;
            `jaxnan.check`: the arguments of the function).
        FORWARD: created by the forward pass, from finite arguments
            (`jaxnan.checked` and `jaxnan.check`: while the function ran,
            including a gradient it computes itself; `jaxnan.locate` tells
            the passes apart).
        BACKWARD: created while differentiating (`jaxnan.checked`: in the
            gradients flowing back to the arguments).
        UPDATE: finite gradients, nonfinite optimizer update.

    Examples:
        >>> import jaxnan
        >>> jaxnan.Phase("backward") is jaxnan.Phase.BACKWARD
        True
        >>> print(jaxnan.Phase.INPUT, jaxnan.Phase.INPUT == "input")
        input True
    """

    INPUT = "input"
    FORWARD = "forward"
    BACKWARD = "backward"
    UPDATE = "update"

    @classmethod
    def _missing_(cls, value: object) -> Phase | None:
        if isinstance(value, str) and value in _OLD_PHASES:
            return cls(_warn_old_phase(value))
        return None

    def __eq__(self, other: object) -> bool:
        if type(other) is str and other in _OLD_PHASES:
            return self.value == _warn_old_phase(other)
        return str.__eq__(self, other)

    def __ne__(self, other: object) -> bool:
        if type(other) is str and other in _OLD_PHASES:
            return self.value != _warn_old_phase(other)
        return str.__ne__(self, other)

    __hash__ = str.__hash__

    def __str__(self) -> str:
        return self.value

    def __repr__(self) -> str:
        return repr(self.value)

    __format__ = str.__format__


class CommonDetails(TypedDict):
    """The keys of `NonFiniteError.details` that every raiser fills.

    Attributes:
        function: the name of the checked function or guarded step, or None.
        phase: where the nonfinite values were observed (a `Phase`), or None
            when the raiser could not tell (a guard whose replay failed).
        leaves: ``{path: (nan, +inf, -inf)}`` for each nonfinite leaf of that
            phase: the arguments for `Phase.INPUT`, else the outputs (for
            `jaxnan.checked`'s `Phase.BACKWARD`, the gradients); empty when
            unknown.
    """

    function: str | None
    phase: Phase | None
    leaves: dict[str, tuple[int, int, int]]


class Details(CommonDetails, total=False):
    """The one schema of `NonFiniteError.details`: common keys, then extras.

    A plain dict at run time. Every error jaxnan raises carries the keys of
    `CommonDetails` (``function``, ``phase``, ``leaves``); the other keys are
    set only by the raiser named below.

    Attributes:
        examples: ``(bad, total)``: the examples of a vmapped batch holding a
            nonfinite value, ``(1, 1)`` outside `vmap` (`jaxnan.checked`).
        inputs: ``{path: (nan, +inf, -inf)}`` of every nonfinite argument
            leaf (`jaxnan.Report.throw`).
        outputs: the same for the output leaves (`jaxnan.Report.throw`).
        incident: the `jaxnan.Incident` that raised (`jaxnan.guard`,
            ``policy="raise"`` or `max_streak` exceeded).
        diagnosis: the `jaxnan.Diagnosis` of the bad step, or None when the
            replay failed (`jaxnan.guard`); its ``to_dict()`` has the keys of
            `DETAILS_KEYS`.
        state: the outputs of the last good step, the state to resume from
            (`jaxnan.guard`).
    """

    examples: tuple[int, int]
    inputs: dict[str, tuple[int, int, int]]
    outputs: dict[str, tuple[int, int, int]]
    incident: Any
    diagnosis: Any
    state: Any


COMMON_KEYS: frozenset[str] = Details.__required_keys__
"""The keys every `NonFiniteError` carries (``function``, ``phase``, ``leaves``)."""

DETAILS_SCHEMA: frozenset[str] = frozenset(Details.__annotations__)
"""Every key `NonFiniteError.details` may hold: `COMMON_KEYS` and the extras.
tests/test_report.py checks that every ``NonFiniteError(...)`` raised in
``jaxnan/_src`` fills the common keys and uses these keys only."""


def as_details(values: Mapping[str, Any] | None) -> Details:
    """`values` checked against `Details`, with the common keys filled.

    A missing common key is None (``leaves``: empty); ``phase`` becomes a
    `Phase`.

    Raises:
        TypeError: for a key that is not one of `Details`.
    """
    out: dict[str, Any] = dict(values or {})
    unknown = sorted(set(out) - DETAILS_SCHEMA)
    if unknown:
        raise TypeError(
            f"jaxnan.NonFiniteError(message, details): unknown details keys "
            f"{unknown}; the keys are {sorted(DETAILS_SCHEMA)} (see "
            "help(jaxnan.NonFiniteError)). Put other data in the message."
        )
    out.setdefault("function", None)
    out.setdefault("leaves", {})
    phase = out.setdefault("phase", None)
    if phase is not None:
        out["phase"] = Phase(phase)
    return out  # type: ignore[return-value]


class NonFiniteError(FloatingPointError):
    """A NaN, +Inf or -Inf was found where jaxnan was asked to look.

    Every jaxnan entry point raises this same class. Its message starts with
    ``jaxnan:`` and names what was found, where and what to try. Structured
    data rides along in `details`, a dict typed by `Details`: one schema for
    every entry point. Every error carries ``details["function"]`` (the
    name of the checked function or step, or None), ``details["phase"]`` (a
    `jaxnan.Phase`, or None) and ``details["leaves"]`` (``{path: (nan,
    +inf, -inf)}`` of the nonfinite leaves of that phase); each raiser adds
    its extras (`jaxnan.checked`: ``examples``; `jaxnan.Report.throw`:
    ``inputs`` and ``outputs``; `jaxnan.guard`: ``incident``, ``diagnosis``
    and ``state``), so one handler reads the common keys of all of them.

    Args:
        message: the text, starting with ``jaxnan:``.
        details: keys of `Details`; the common keys left out are None
            (``leaves``: empty).

    Raises:
        TypeError: (on construction) for a details key not in `Details`.

    Examples:
        >>> import jax.numpy as jnp, jaxnan
        >>> def loss(x):
        ...     return jnp.log(x)
        >>> report, _ = jaxnan.check(loss)(jnp.array([1.0, 0.0]))
        >>> try:
        ...     report.throw()
        ... except jaxnan.NonFiniteError as e:
        ...     d = e.details
        ...     print(d["function"].split(".")[-1], d["phase"], d["leaves"])
        loss forward {'output': (0, 0, 1)}
    """

    def __init__(self, message: str, details: Mapping[str, Any] | None = None):
        super().__init__(message)
        self.details: Details = as_details(details)


def describe_counts(nan: int, posinf: int, neginf: int) -> str:
    """'2 nan, 1 +inf' style text for one leaf's counts."""
    parts = []
    if nan:
        parts.append(f"{nan} nan")
    if posinf:
        parts.append(f"{posinf} +inf")
    if neginf:
        parts.append(f"{neginf} -inf")
    return ", ".join(parts) if parts else "finite"


def leaf_lines(
    rows: Sequence[tuple[str, tuple[int, int, int]]], indent: str = "  "
) -> str:
    """One line per nonfinite leaf: `path: counts`."""
    return "\n".join(f"{indent}{path}: {describe_counts(*c)}" for path, c in rows)


DETAILS_KEYS: tuple[str, ...] = (
    "found",
    "primitive",
    "file",
    "line",
    "function",
    "code",
    "phase",
    "cause",
    "fix",
    "inputs_seen",
    "nonfinite_inputs",
    "nonfinite_outputs",
    "iteration",
    "device",
    "process",
    "name_stack",
    "dtype",
    "shapes",
    "signature",
    "user_function",
    "fn_name",
    "created",
    "nan_event",
    "input_elements",
    "consumed_by",
    "compiled_outputs",
    "layer",
    "layer_stats",
)
"""The keys of a diagnosis as plain values (`jaxnan.Diagnosis.to_dict`, the
``diagnosis`` of a guard's incident log and of ``details["diagnosis"]``):
phase and cause are strings from `jaxnan`'s vocabulary, counts are ``[nan,
+inf, -inf]`` lists, indices and shapes are lists of ints."""


def plain(value: Any) -> Any:
    """Enums to their string values, tuples to lists, recursively."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


def shown_where(file: str | None, line: int | None) -> str | None:
    """``file:line`` as printed: relative to the working directory when under it.

    Messages and tables show a path a person can open from where they ran the
    program (``jaxnan/examples/demo.py:65``, not the start of an absolute path
    cut by a narrow column); a file elsewhere keeps its full path. Records
    (`jaxnan.Diagnosis.where`, the guard's JSON lines) keep the full path.

    Examples:
        >>> import os
        >>> shown_where(os.path.join(os.getcwd(), "train.py"), 12)
        'train.py:12'
        >>> shown_where(None, None) is None
        True
    """
    if file is None:
        return None
    try:
        rel = os.path.relpath(file)
    except ValueError:  # another drive (Windows)
        rel = file
    shown = file if rel.startswith(os.pardir + os.sep) or rel == os.pardir else rel
    return f"{shown}:{line}"


def shown_location(where: str | None) -> str | None:
    """`shown_where` of a ``file:line`` string (an incident's ``where``).

    Examples:
        >>> import os
        >>> shown_location(os.path.join(os.getcwd(), "a", "b.py") + ":3")
        'a/b.py:3'
    """
    if not where or ":" not in where:
        return where
    file, _, line = where.rpartition(":")
    return shown_where(file, line) if line.isdigit() else where


# Their examples run under --doctest-modules, though they now live in `jaxnan`.
__test__ = {"NonFiniteError": NonFiniteError, "Phase": Phase}

NonFiniteError.__module__ = "jaxnan"
Phase.__module__ = "jaxnan"
