"""Every Python block of README.md runs as pasted, each in a fresh namespace."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_has_blocks():
    assert len(BLOCKS) >= 9


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index):
    code = BLOCKS[index]
    namespace = {"__name__": f"readme_block_{index}"}
    if "report.throw()" in code:  # the block shows the error it raises
        import jaxnan

        with pytest.raises(jaxnan.NonFiniteError):
            exec(compile(code, f"README.md[{index}]", "exec"), namespace)
        return
    exec(compile(code, f"README.md[{index}]", "exec"), namespace)
