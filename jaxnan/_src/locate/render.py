"""The text of a `jaxnan.Diagnosis` (its ``str``): `render`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from jax.extend import source_info_util

from jaxnan._src.core.errors import describe_counts, leaf_lines, shown_where

source_info_util.register_exclusion(__file__)

# The labelled lines of a creation event after its phase, in order: each is
# shown when its field is set. (The device is named in the first line.)
_EVENT_FIELDS: tuple[tuple[str, str], ...] = (
    ("iteration", "iteration: "),
    ("signature", "types:   "),
    ("name_stack", "name stack: "),
    ("inputs_seen", "inputs:  "),
)


def _is_set(value: Any) -> bool:
    return value is not None and value != "" and value != ()


def _where_lines(d: Any) -> list[str]:
    """Where the event happened: the user line, and its function and code."""
    where = shown_where(d.file, d.line) or "an unknown line"
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
        f"{shown_where(e['file'], e['line'])}{code}"
    )


def on_device(device: int | None, process: int | None) -> str:
    """`` on device 3 (process 0)``: who held the first nonfinite value.

    Empty when no device is known; without a process (a `shard_map` over
    some mesh axes only: `device` is a position in their grid), the position.

    Examples:
        >>> on_device(3, 0)
        ' on device 3 (process 0)'
        >>> on_device(None, None)
        ''
    """
    if device is None:
        return ""
    if process is None:
        return f" at position {device} of the shard_map's manual mesh axes"
    return f" on device {device} (process {process})"


def _event_lines(d: Any, name: str) -> list[str]:
    what = f" ({describe_counts(*d.created)})" if d.created else ""
    where = on_device(d.device, getattr(d, "process", None))
    lines = [
        f"jaxnan: `{d.primitive}` created the first nonfinite value{what} in "
        f"the {d.phase} pass of {name}{where}.",
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
                f"{shown_where(used['file'], used['line'])}{code}"
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
