"""Every Python block of README.md runs as pasted, each in a fresh namespace,
and the README keeps the shape a newcomer follows: the tool table near the
top, the set-up in two commands, the guard first in each framework section,
no block statement that prints nothing."""

import ast
import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
TEXT = README.read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", TEXT, re.S)
RAISES = "report.throw()"  # the one block that ends by showing its error


def _section(heading: str) -> str:
    start = TEXT.index(heading)
    end = TEXT.find("\n## ", start + len(heading))
    return TEXT[start : end if end > 0 else None]


def test_readme_has_blocks():
    assert len(BLOCKS) >= 12


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index):
    code = BLOCKS[index]
    namespace = {"__name__": f"readme_block_{index}"}
    if RAISES in code:  # runs up to its last line, which raises
        import jaxnan

        tree = ast.parse(code)
        *body, last = tree.body
        assert ast.unparse(last) == RAISES, "the raising line must come last"
        head = ast.Module(body=body, type_ignores=[])
        exec(compile(head, f"README.md[{index}]", "exec"), namespace)
        with pytest.raises(jaxnan.NonFiniteError):
            exec(ast.unparse(last), namespace)
        return
    exec(compile(code, f"README.md[{index}]", "exec"), namespace)


def bare_expressions(code: str) -> list[str]:
    """Top-level statements that compute a value and show nothing (a REPL
    prints them, a script does not)."""
    return [
        ast.unparse(node)
        for node in ast.parse(code).body
        if isinstance(node, ast.Expr)
        and not isinstance(node.value, ast.Call | ast.Constant)
    ]


def test_no_block_ends_in_a_value_that_prints_nothing():
    found = {i: bare_expressions(code) for i, code in enumerate(BLOCKS)}
    assert {i: e for i, e in found.items() if e} == {}
    assert bare_expressions("x = 1\nx, x + 1\nprint(x)\n") == ["(x, x + 1)"]


def test_which_tool_table_comes_first_and_names_every_tool():
    table = _section("## Which tool, when")
    assert TEXT.index("## Which tool, when") < TEXT.index("```")  # before code
    for tool in ("jaxnan.guard", "skip_nonfinite", "checked", "locate", "lint"):
        assert f"{tool}" in table, tool
    assert "activation_stats" in table and "impute" in table
    assert 'on_nonfinite="raise"' in table and "ends a guarded run" in table
    assert "call it yourself" in table


def test_set_up_is_two_commands_and_one_paragraph():
    setup = _section("## Set-up: two commands")
    assert setup.count("```bash") == 2
    prose = [
        p.strip()
        for p in re.sub(r"```.*?```", "", setup, flags=re.S).split("\n\n")
        if p.strip() and not p.strip().startswith(("##", "<!--"))
    ]
    assert len(prose) == 2, prose  # "On a fresh machine ..." and the paragraph
    assert 'pip install -e ".[demo]" && python -m jaxnan demo' in setup


@pytest.mark.parametrize("framework", ["### Flax NNX", "### Flax linen", "### Equinox"])
def test_framework_sections_open_with_the_guard(framework):
    start = TEXT.index(framework)
    end = TEXT.find("\n#", start + 4)
    first = re.search(r"```python\n(.*?)```", TEXT[start:end], re.S).group(1)
    assert "step = jaxnan.guard(train_step)" in first
    assert "jaxnan.skip_nonfinite(" in first and "loss=loss" in first
