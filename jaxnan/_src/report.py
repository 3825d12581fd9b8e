"""The one error class of jaxnan and helpers that format findings as text."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from jax.extend import source_info_util

source_info_util.register_exclusion(__file__)


class NonFiniteError(FloatingPointError):
    """A NaN, +Inf or -Inf was found where jaxnan was asked to look.

    Every jaxnan entry point raises this same class. Its message starts with
    ``jaxnan:`` and names what was found, where and what to try. Structured
    data rides along in `details` (a dict, possibly empty).

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


NonFiniteError.__module__ = "jaxnan"
