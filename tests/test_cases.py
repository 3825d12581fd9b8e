"""The scenario suite: every tests/cases/case_*.py, located with jaxnan.locate.

Each case declares EXPECT (primitive, phase, cause, and optionally iteration
or, for phase "input", the leaf) and marks the creating line with the comment
`# <- creates`. The runner checks that the case really goes nonfinite under
`jax.jit`, then that `jaxnan.locate` names exactly that line, primitive,
phase and cause.
"""

import functools
import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import pytest

import jaxnan
from jaxnan._src.causes import CAUSES
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
    """``make()`` of a case, once per session: both tests below use it."""
    return load_case(name).make()


def marker_line(name):
    return helpers.marker_lines(CASES_DIR / f"case_{name}.py", MARKER)


def _float_leaves(tree):
    return [
        leaf
        for leaf in jax.tree_util.tree_leaves(tree)
        if hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.inexact)
    ]


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


def test_every_case_goes_nonfinite_under_jit():
    # One jitted program runs all cases side by side (their arguments are
    # traced, not constants): one compile instead of one per case.
    cases = [made(name) for name in CASE_NAMES]
    fns = [fn for fn, _ in cases]
    outs = jax.jit(lambda all_args: [f(*a) for f, a in zip(fns, all_args)])(
        [args for _, args in cases]
    )
    finite = [
        name
        for name, out in zip(CASE_NAMES, outs)
        if all(bool(jnp.isfinite(leaf).all()) for leaf in _float_leaves(out))
    ]
    assert finite == [], f"these cases stay finite under jit: {finite}"


@pytest.mark.parametrize("name", CASE_NAMES)
def test_locate_names_the_creating_equation(name):
    if not hasattr(jaxnan, "locate"):
        pytest.skip("jaxnan.locate does not exist yet (helper A implements it)")
    module = load_case(name)
    expect = module.EXPECT
    fn, args = made(name)
    history = getattr(module, "HISTORY", None)  # filled in by make()
    diagnosis = jaxnan.locate(fn, history=history)(*args)
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
