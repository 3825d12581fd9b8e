"""Every public callable says what it rejects: a Google-style Raises section.

Functions and classes with behaviour (`GuardedStep`, `Report`, ...) need a
``Raises:`` section; one that raises nothing of its own says so there
("Nothing: ..."). Records need none, for a reason the test
checks rather than a list of names: their constructor only stores fields
(a NamedTuple, a dataclass without its own validation, an Enum), and a type
alias is not called.
"""

import dataclasses
import enum
import inspect
import re

import pytest

import jaxnan


def _record_reason(obj):
    """Why `obj` needs no Raises section, or None when it does."""
    if not inspect.isclass(obj):
        return None if callable(obj) else "not callable"
    if issubclass(obj, enum.Enum):
        return "an Enum: looked up by value"
    if issubclass(obj, tuple) and hasattr(obj, "_fields"):
        return "a NamedTuple: its constructor only stores fields"
    if dataclasses.is_dataclass(obj) and "__post_init__" not in vars(obj):
        return "a dataclass without validation: its constructor only stores fields"
    return None


PUBLIC = [name for name in jaxnan.__all__ if not name.startswith("_")]
RAISES = re.compile(r"^Raises:\n((?:    \S.*\n(?:        .*\n)*)+)", re.M)


@pytest.mark.parametrize("name", PUBLIC)
def test_public_callable_documents_what_it_rejects(name):
    obj = getattr(jaxnan, name)
    if not hasattr(obj, "__module__") or obj.__module__ == "typing":
        return  # a type alias (ArrayTree)
    if _record_reason(obj) is not None:
        return
    doc = inspect.getdoc(obj) or ""
    match = RAISES.search(doc + "\n")
    assert match, f"jaxnan.{name}: its docstring has no Raises: section"
    entries = re.findall(r"^    (\w+):", match.group(1), re.M)
    assert entries, f"jaxnan.{name}: its Raises: section names no exception"
    for entry in entries:
        if entry == "Nothing":
            continue
        assert entry.endswith(("Error", "Exception", "Interrupt")) or entry in (
            "NonFiniteError",
        ), f"jaxnan.{name}: Raises: entry {entry!r} is not an exception"


def test_the_rule_is_not_vacuous():
    checked = [n for n in PUBLIC if _record_reason(getattr(jaxnan, n)) is None]
    assert {"checked", "locate", "guard", "activation_stats", "GuardedStep"} <= set(
        checked
    )
    assert RAISES.search("Raises:\n    ValueError: when x.\n")
    assert not RAISES.search("Returns:\n    A value.\n")
