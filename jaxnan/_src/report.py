"""The one error class of jaxnan and helpers that format findings as text."""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from typing import Any

from jax.extend import source_info_util

source_info_util.register_exclusion(__file__)


class NonFiniteError(FloatingPointError):
    """A NaN, +Inf or -Inf was found where jaxnan was asked to look.

    Every jaxnan entry point raises this same class. Its message starts with
    ``jaxnan:`` and names what was found, where and what to try. Structured
    data rides along in `details`, a dict whose keys are those of
    `DETAILS_SCHEMA` (one schema for every entry point; each fills the keys
    it knows, see there), possibly empty.

    Examples:
        >>> import jaxnan
        >>> try:
        ...     raise jaxnan.NonFiniteError("jaxnan: 1 nan in batch['x']")
        ... except FloatingPointError as e:
        ...     print(e)
        jaxnan: 1 nan in batch['x']
    """

    def __init__(self, message: str, details: Mapping[str, Any] | None = None):
        super().__init__(message)
        self.details: dict[str, Any] = dict(details or {})


DETAILS_SCHEMA: Mapping[str, str] = {
    "function": "str, the name of the checked function (checks, @checked).",
    "phase": "str, what was checked: 'forward-inputs', 'forward-outputs' or "
    "'backward' (@checked).",
    "leaves": "dict, leaf path -> (nan, +inf, -inf) counts of the nonfinite "
    "leaves of that phase (@checked).",
    "examples": "(bad, total) ints, the examples of the batch holding a "
    "nonfinite value (@checked).",
    "inputs": "dict, argument leaf path -> (nan, +inf, -inf) counts of the "
    "nonfinite arguments (jaxnan.check's report.throw()).",
    "outputs": "dict, output leaf path -> counts of the nonfinite outputs "
    "(jaxnan.check's report.throw()).",
    "incident": "the jaxnan.guard incident that raised (guard, policy='raise').",
    "diagnosis": "the jaxnan.Diagnosis of the bad step, or None (guard); its "
    "to_dict() has the keys of DETAILS_KEYS.",
    "state": "the outputs of the last good step, the state to resume from (guard).",
}
"""The one schema of `NonFiniteError.details`: key -> its value and who sets
it. tests/test_report.py checks that every ``NonFiniteError(...)`` raised in
``jaxnan/_src`` uses these keys only."""


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


# The labelled lines of a creation event after its phase, in order: each is
# shown when its field is set (a device id of 0 is set).
_EVENT_FIELDS: tuple[tuple[str, str], ...] = (
    ("iteration", "iteration: "),
    ("device", "device:  "),
    ("signature", "types:   "),
    ("name_stack", "name stack: "),
    ("inputs_seen", "inputs:  "),
)


def _is_set(value: Any) -> bool:
    return value is not None and value != "" and value != ()


def _where_lines(d: Any) -> list[str]:
    """Where the event happened: the user line, and its function and code."""
    where = d.where or "an unknown line"
    if d.phase == "backward":
        target = f"`{d.user_function}`" if d.user_function else "the op"
        lines = [f"  where:   gradient of {target} at {where}"]
    else:
        via = f" (`{d.user_function}`)" if d.user_function else ""
        lines = [f"  where:   {where}{via}"]
    if d.function:
        code = f": {d.code}" if d.code else ""
        lines.append(f"           in {d.function}{code}")
    return lines


def _nan_event_line(e: Mapping[str, Any]) -> str:
    """The first NaN, when the event itself created only infinities."""
    code = f": {e['code']}" if e.get("code") else ""
    return (
        f"  then:    `{e['primitive']}` made the first NaN at "
        f"{e['file']}:{e['line']}{code}"
    )


def _event_lines(d: Any, name: str) -> list[str]:
    what = f" ({describe_counts(*d.created)})" if d.created else ""
    lines = [
        f"jaxnan: `{d.primitive}` created the first nonfinite value{what} in "
        f"the {d.phase} pass of {name}.",
        *_where_lines(d),
        f"  phase:   {d.phase}",
    ]
    if d.nan_event:
        lines.append(_nan_event_line(d.nan_event))
    for field, label in _EVENT_FIELDS:
        value = getattr(d, field)
        if _is_set(value):
            lines.append(f"  {label}{value}")
    if getattr(d, "layer_stats", None):
        lines += [f"  {t}" for t in d.layer_stats.splitlines()]
    return lines


def _input_lines(d: Any, name: str) -> list[str]:
    lines = [f"jaxnan: nonfinite values were already in the arguments of {name}:"]
    for path, counts in sorted(d.nonfinite_inputs.items()):
        text = f"  {path}: {describe_counts(*counts)}"
        elements = d.input_elements.get(path)
        if elements:
            text += " at " + ", ".join(str(tuple(e)) for e in elements[:3])
            if sum(counts) > len(elements[:3]):
                text += ", ..."
        lines.append(text)
        used = d.consumed_by.get(path)
        if used:
            code = f": {used['code']}" if used.get("code") else ""
            lines.append(
                f"      first used by `{used['primitive']}` at "
                f"{used['file']}:{used['line']}{code}"
            )
    return lines


def _output_lines(d: Any) -> list[str]:
    """The nonfinite outputs, or why a created value left none."""
    if d.nonfinite_outputs:
        rows = leaf_lines(sorted(d.nonfinite_outputs.items()), "    ")
        return ["  nonfinite outputs:", rows]
    if d.phase != "input":
        return ["  the outputs are finite: the value was masked or absorbed later."]
    return []


def _compiled_line(compiled_outputs: Mapping[str, Sequence[int]]) -> str:
    """The compiled function's outputs, when they differ from the replay's."""
    compiled = ", ".join(
        f"{p} {describe_counts(*c)}" for p, c in sorted(compiled_outputs.items())
    )
    return (
        "  program: this replay follows JAX semantics equation by equation; "
        f"the compiled function gave different outputs ({compiled or 'all finite'}):"
        " XLA rewrote part of the step (e.g. x * mask into a select)."
    )


def render(d: Any) -> str:
    """The text of a `jaxnan.Diagnosis` (its ``str``)."""
    name = f"`{d.fn_name}`" if d.fn_name else "the function"
    if not d.found:
        return (
            f"jaxnan: all finite: no NaN or Inf in the arguments, the "
            f"intermediate values or the outputs of {name}."
        )
    lines = _input_lines(d, name) if d.phase == "input" else _event_lines(d, name)
    if d.cause:
        lines.append(f"  cause:   {d.cause}")
    if d.fix:
        lines.append(f"  fix:     {d.fix}")
    lines += _output_lines(d)
    if d.compiled_outputs is not None:
        lines.append(_compiled_line(d.compiled_outputs))
    return "\n".join(lines)


NonFiniteError.__module__ = "jaxnan"
