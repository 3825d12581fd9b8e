"""The README's Inspect block runs as pasted."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _block():
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Inspect") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_inspect_block_runs(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    monkeypatch.chdir(tmp_path)
    exec(compile(_block(), "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "[1 1] [2. 6.]" in out
    assert "max |x| = 3.6e+04, 55% of the float16 range" in out
    assert (tmp_path / "activations.png").stat().st_size > 0
