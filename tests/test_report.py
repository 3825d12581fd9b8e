"""`NonFiniteError.details` has one schema, `report.DETAILS_SCHEMA`."""

import ast
import pathlib

import jax.numpy as jnp
import pytest

import jaxnan
from jaxnan._src import report

SRC = pathlib.Path(__file__).resolve().parents[1] / "jaxnan" / "_src"


def _details_keys(source: str) -> list[tuple[int, set[str]]]:
    """(line, keys) of every ``NonFiniteError(message, {...})`` call."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        details = node.args[1] if len(node.args) > 1 else None
        if name == "NonFiniteError" and isinstance(details, ast.Dict):
            out.append((node.lineno, {k.value for k in details.keys}))
    return out


def test_every_raised_error_uses_the_schema_keys():
    calls = {
        (str(p.relative_to(SRC)), line): keys
        for p in SRC.rglob("*.py")
        for line, keys in _details_keys(p.read_text())
    }
    # checks, @checked and guard raise with details.
    assert len(calls) >= 3, calls
    unknown = {k: keys - set(report.DETAILS_SCHEMA) for k, keys in calls.items()}
    assert not {k: v for k, v in unknown.items() if v}, unknown


def test_the_key_finder_finds_a_key():
    src = "raise report.NonFiniteError('jaxnan: x', {'function': 'f', 'lines': 1})"
    assert _details_keys(src) == [(1, {"function", "lines"})]


def test_check_throw_details():
    def f(x):
        return jnp.log(x)

    rep, _ = jaxnan.check(f)(jnp.array([1.0, -1.0]))
    with pytest.raises(jaxnan.NonFiniteError) as e:
        rep.throw()
    assert set(e.value.details) <= set(report.DETAILS_SCHEMA)
    assert e.value.details["function"].endswith(".f")
