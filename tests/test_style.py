import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is in the [test] extra")
@pytest.mark.parametrize(
    "cmd", [["ruff", "check", "."], ["ruff", "format", "--check", "."]]
)
def test_ruff_clean(cmd):
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_ci_runs_the_readme_commands():
    ci = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    for marker in ("<!-- setup:demo -->", "<!-- setup:test -->"):
        assert marker in readme and marker.split(":")[1].rstrip(" ->") in ci
    assert 'pip install -e ".[demo]" && python -m jaxnan demo' in readme
    assert 'pip install -e ".[test]" && python -m pytest -q' in readme
