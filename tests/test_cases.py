"""The scenario suite: every tests/cases/case_*.py, located with jaxnan.locate.

Each case declares EXPECT (primitive, phase, cause, and optionally iteration
or, for phase "input", the leaf) and marks the creating line with the comment
`# <- creates`. The runner checks that `jaxnan.locate` names exactly that
line, primitive, phase and cause, and that the case really goes nonfinite
under `jax.jit` (locate's own compiled run of the plain function, which agrees
with its replay).
"""

import functools
import importlib.util
import pathlib

import pytest

import jaxnan
from jaxnan._src.locate import replay
from jaxnan._src.locate.causes import CAUSES
from tests import helpers

CASES_DIR = pathlib.Path(__file__).parent / "cases"
CASE_FILES = sorted(CASES_DIR.glob("case_*.py"))
CASE_NAMES = [p.stem[len("case_") :] for p in CASE_FILES]
MARKER = "# <- creates"


@functools.cache
def load_case(name):
    path = CASES_DIR / f"case_{name}.py"
    spec = importlib.util.spec_from_file_location(f"jaxnan_case_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.cache
def made(name):
    """``make()`` of a case, once per session."""
    return load_case(name).make()


def marker_line(name):
    return helpers.marker_lines(CASES_DIR / f"case_{name}.py", MARKER)


def test_suite_size():
    assert len(CASE_FILES) >= 45
    reported = [p for p in CASE_FILES if "Reported: https://" in p.read_text()]
    assert len(reported) >= 15


@pytest.mark.parametrize("name", CASE_NAMES)
def test_case_is_well_formed(name):
    module = load_case(name)
    expect = module.EXPECT
    allowed = {
        "primitive",
        "phase",
        "cause",
        "leaf",
        "iteration",
        "seen",
        "device",
        "element",
    }
    assert set(expect) <= allowed, set(expect) - allowed
    assert expect["cause"] in CAUSES
    assert module.__doc__ and callable(module.make)
    assert expect["phase"] in ("input", "forward", "backward", "update")
    lines = marker_line(name)
    if expect["phase"] == "input":
        assert lines == [] and isinstance(expect["leaf"], str)
    else:
        assert len(lines) == 1, f"case_{name}.py needs exactly one {MARKER!r}"
        assert isinstance(expect["primitive"], str)


def _record_compiled_counts(monkeypatch):
    """The counts of every compiled run of the plain function locate makes."""
    got = []
    compiled_counts = replay.Run.compiled_counts

    def recording(self):
        got.append(compiled_counts(self))
        return got[-1]

    monkeypatch.setattr(replay.Run, "compiled_counts", recording)
    return got


@pytest.mark.parametrize("name", CASE_NAMES)
def test_locate_names_the_creating_equation(name, monkeypatch):
    module = load_case(name)
    expect = module.EXPECT
    fn, args = made(name)
    history = getattr(module, "HISTORY", None)  # filled in by make()
    compiled = _record_compiled_counts(monkeypatch)
    diagnosis = jaxnan.locate(fn, history=history)(*args)
    # The case goes nonfinite under jax.jit, not only in locate's replay:
    # locate (check_compiled=True) compiled and ran the plain function once,
    # and its nonfinite outputs are the replay's.
    assert len(compiled) == 1 and compiled[0] is not None, name
    assert compiled[0], f"case {name} stays finite under jit"
    assert compiled[0] == diagnosis.nonfinite_outputs, str(diagnosis)
    assert diagnosis.compiled_outputs is None, str(diagnosis)
    got = {
        "found": diagnosis.found,
        "primitive": diagnosis.primitive,
        "phase": diagnosis.phase,
        "cause": diagnosis.cause,
    }
    want = {
        "found": True,
        "primitive": expect["primitive"],
        "phase": expect["phase"],
        "cause": expect["cause"],
    }
    if expect["phase"] == "input":
        assert expect["leaf"] in diagnosis.nonfinite_inputs, (
            name,
            dict(diagnosis.nonfinite_inputs),
        )
        got["primitive"] = diagnosis.primitive
        assert got == want, str(diagnosis)
        if "element" in expect:
            elements = diagnosis.input_elements[expect["leaf"]]
            assert elements[0] == tuple(expect["element"]), str(diagnosis)
            assert diagnosis.consumed_by[expect["leaf"]]["line"], str(diagnosis)
        return
    (line,) = marker_line(name)
    got["where"] = (pathlib.Path(diagnosis.file or "").name, diagnosis.line)
    want["where"] = (f"case_{name}.py", line)
    if "iteration" in expect:
        got["iteration"] = tuple(diagnosis.iteration or ())
        want["iteration"] = tuple(expect["iteration"])
    if "device" in expect:
        got["device"] = diagnosis.device
        want["device"] = expect["device"]
    assert got == want, str(diagnosis)
    assert diagnosis.fix and diagnosis.inputs_seen
    if "seen" in expect:
        assert expect["seen"] in diagnosis.inputs_seen, diagnosis.inputs_seen
