"""Scenarios from public NaN reports, each on `jaxnan.guard`'s whole loop.

Every `tests/guard_cases/case_*.py` is a training run written the way its
report's author wrote theirs (cited in its docstring as ``owner/repo#N``), with
the fault at some step, transient or persistent. `run()` trains under
`jaxnan.guard` and returns the `GuardedStep`. EXPECT says what the first bad
step's incident must name: its cause, its phase, the step range, substrings
the fix must hold (a fix that would help that report), the evidence the cause
cites, and whether the fault persists (the run gives up) or the training goes
on healthy after it. A wrong cause or a fix that would not help fails.
"""

import functools
import importlib.util
import json
import pathlib
import re

import numpy as np
import pytest

from jaxnan._src.locate.causes import CAUSES

CASES_DIR = pathlib.Path(__file__).parent / "guard_cases"
CASE_FILES = sorted(CASES_DIR.glob("case_*.py"))
CASE_NAMES = [p.stem[len("case_") :] for p in CASE_FILES]
KEYS = {"cause", "phase", "steps", "fix", "not_fix", "evidence", "persistent"}


@functools.cache
def load_case(name):
    path = CASES_DIR / f"case_{name}.py"
    spec = importlib.util.spec_from_file_location(f"jaxnan_guard_case_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def first_bad(step):
    return next(i for i in step.incidents if i.action != "warned")


def test_suite_size_and_citations():
    assert len(CASE_FILES) >= 15
    for path in CASE_FILES:
        doc = load_case(path.stem[len("case_") :]).__doc__
        assert "Reported: https://github.com/" in doc, path.name
        assert re.search(r"\([\w.-]+/[\w.-]+#\d+\)", doc), path.name


@pytest.mark.parametrize("name", CASE_NAMES)
def test_guard_names_the_reported_cause(name, tmp_path):
    module = load_case(name)
    expect = module.EXPECT
    assert set(expect) <= KEYS and {"cause", "phase", "steps", "fix"} <= set(expect)
    assert expect["cause"] in CAUSES
    log = tmp_path / "incidents.jsonl"
    step = module.run(log=log)
    incident = first_bad(step)
    lo, hi = expect["steps"]
    got = (incident.cause, str(incident.phase), lo <= incident.step <= hi)
    assert got == (expect["cause"], expect["phase"], True), incident.message
    fix = incident.diagnosis.fix if incident.diagnosis else incident.message
    for want in expect["fix"]:
        assert want in fix, (want, fix)
    for unhelpful in expect.get("not_fix", ()):
        assert unhelpful not in fix, (unhelpful, fix)
    # Every incident names a cause with the evidence it used, in the report
    # and in the JSONL log.
    assert incident.evidence, incident.message
    texts = [e.text for e in incident.evidence]
    assert all(f"why:     {t}" in incident.message for t in texts), incident.message
    if "evidence" in expect:
        assert any(expect["evidence"] in t for t in texts), texts
    record = next(
        r
        for r in map(json.loads, log.read_text().splitlines())
        if r["step"] == incident.step and r["action"] != "warned"
    )
    assert record["cause"] == expect["cause"]
    assert [e["text"] for e in record["evidence"]] == texts
    # Transient or persistent: the run either gave up on repeated bad steps
    # or went on healthy after the fault.
    bad = [f for f in step.figures if f[4]]
    after = [f for f in step.figures if f[0] > incident.step]
    if expect.get("persistent", False):
        assert step.summary()["raised"] == 1 or all(f[4] for f in after)
    else:
        assert after and not after[-1][4] and len(bad) < len(step.figures) / 2
        assert all(np.isfinite(f[1]) for f in after[-3:])
