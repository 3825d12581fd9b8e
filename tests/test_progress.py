"""tests/progress.py: one line per finished test file, with its counts."""

import os
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
A = """
def test_1():
    pass


def test_2():
    pass
"""
B = """
import pytest


def test_ok():
    pass


def test_bad():
    assert 0


@pytest.mark.skip(reason="no")
def test_skip():
    pass


@pytest.fixture
def broken():
    raise RuntimeError


def test_error(broken):
    pass
"""


def _run(tmp_path, *args):
    (tmp_path / "conftest.py").write_text(
        "from tests.progress import pytest_configure  # noqa: F401\n"
    )
    (tmp_path / "test_a.py").write_text(A)
    (tmp_path / "test_b.py").write_text(B)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:xdist"]
    return subprocess.run(
        [*cmd, "--rootdir", str(tmp_path), "-c", os.devnull, *args, str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout


def test_one_line_per_file_with_its_counts_and_no_dots(tmp_path):
    out = _run(tmp_path, "-q")
    lines = [x for x in out.splitlines() if x.startswith("[")]
    assert [re.sub(r"\(\d+ s\)", "(T)", x) for x in lines] == [
        "[2/6]  test_a.py  2 passed  (T)",
        "[6/6]  test_b.py  1 failed, 1 error, 1 passed, 1 skipped  (T)",
    ]
    assert ".." not in out  # passed tests print no dot
    assert "1 failed, 3 passed, 1 skipped, 1 error" in out  # pytest's own summary


def test_off_with_verbose(tmp_path):
    out = _run(tmp_path, "-v")
    assert "test_a.py::test_1 PASSED" in out
    assert not any(x.startswith("[2/6]") for x in out.splitlines())
