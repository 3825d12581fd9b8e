"""Per-rule configuration and ``# jaxnan: ignore[rule]`` suppression comments.

`levels(rules)` checks a ``{rule id: level}`` mapping, where a level is a
`Severity` or ``"off"``; `suppressed(finding)` reads the comment on the
finding's line; `from_pyproject(path)` reads ``[tool.jaxnan.lint]``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

from jax.extend import source_info_util

from jaxnan._src.lint import registry
from jaxnan._src.lint.registry import Severity

source_info_util.register_exclusion(__file__)

OFF = "off"
_COMMENT = re.compile(r"#\s*jaxnan:\s*ignore(?:\[([^\]]*)\])?")


def _known(rule_id: str, where: str) -> str:
    if rule_id not in registry.LINT_RULES:
        valid = ", ".join(registry.LINT_RULES)
        raise ValueError(
            f"jaxnan: {where} names the lint rule {rule_id!r}, which does not "
            f"exist; use one of {valid}."
        )
    return rule_id


def levels(rules: Mapping[str, str] | None) -> dict[str, Severity | None]:
    """``{rule id: Severity, or None for "off"}``, checked.

    Raises:
        ValueError: for an unknown rule id or level.

    Examples:
        >>> levels({"div-no-epsilon": "off", "log-softmax": "error"})
        {'div-no-epsilon': None, 'log-softmax': 'error'}
    """
    out: dict[str, Severity | None] = {}
    for rule_id, level in (rules or {}).items():
        _known(rule_id, f"lint(rules={{{rule_id!r}: ...}})")
        if level == OFF:
            out[rule_id] = None
            continue
        try:
            out[rule_id] = Severity(level)
        except ValueError:
            valid = ", ".join(repr(s.value) for s in Severity)
            raise ValueError(
                f"jaxnan: lint(rules={{{rule_id!r}: {level!r}}}) is not a level; "
                f"use {valid} or 'off'."
            ) from None
    return out


def ignored_rules(code: str, where: str = "a comment") -> frozenset[str] | None:
    """The rules a ``# jaxnan: ignore[...]`` comment on `code` silences.

    None when there is no such comment; ``frozenset({"*"})`` for a bare
    ``# jaxnan: ignore``.

    Raises:
        ValueError: when the comment names a rule that does not exist.

    Examples:
        >>> sorted(ignored_rules("y = x / n  # jaxnan: ignore[div-no-epsilon]"))
        ['div-no-epsilon']
        >>> ignored_rules("y = x / n  # jaxnan: ignore")
        frozenset({'*'})
        >>> ignored_rules("y = x / n") is None
        True
    """
    m = _COMMENT.search(code)
    if m is None:
        return None
    if m.group(1) is None:
        return frozenset({"*"})
    names = [n.strip() for n in m.group(1).split(",") if n.strip()]
    return frozenset(_known(n, where) for n in names)


def suppressed(rule_id: str, file: str | None, line: int | None, code: str) -> bool:
    """True when the finding's line carries an ignore comment for its rule."""
    where = f"the ignore comment at {file}:{line}"
    found = ignored_rules(code, where)
    return found is not None and ("*" in found or rule_id in found)


def from_pyproject(path: str) -> dict[str, str]:
    """The ``rules`` table of ``[tool.jaxnan.lint]`` in `path` ({} without one).

    Raises:
        ValueError: when the table is not a mapping of rule ids to levels, or
            the file cannot be parsed (no tomllib before Python 3.11).
    """
    if not os.path.exists(path):
        return {}
    try:
        import tomllib
    except ImportError:  # Python 3.10
        raise ValueError(
            f"jaxnan: reading {path} needs Python 3.11 (tomllib); pass the "
            "levels with --rule RULE=LEVEL instead."
        ) from None
    with open(path, "rb") as f:
        try:
            data = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"jaxnan: {path} is not valid TOML: {e}") from None
    table = data.get("tool", {}).get("jaxnan", {}).get("lint", {})
    rules = table.get("rules", {})
    if not isinstance(rules, dict):
        raise ValueError(
            f"jaxnan: [tool.jaxnan.lint] rules in {path} must be a table such "
            'as rules = {"div-no-epsilon" = "off"}.'
        )
    return {str(k): str(v) for k, v in rules.items()}
