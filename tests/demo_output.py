"""What a newcomer must see when the README's demo set-up line runs.

`problems(text)` lists what the output of ``python -m jaxnan demo`` lacks: the
plot file (written, not "skipped"), the progress bar, and for each incident
its ``file:line`` (a file that exists, relative to where the demo ran) or, for
a bad batch, its row. `.ci/run` runs it on the output of the README's line
(``python tests/demo_output.py LOG``, exit status 1 with the list); the tests
run it on made-up outputs (`tests/test_demo.py`) and, when
``JAXNAN_TESTS_FRESH_VENV=1``, on the line run in a fresh virtual environment.
No JAX here: it reads text.
"""

from __future__ import annotations

import os
import re
import sys

_BAR = re.compile(r"^training .*━.* (\d+)/\1\b", re.M)  # rich's bar, completed
_PLOT = re.compile(r"^plot: (.+)$", re.M)
_HEAD = re.compile(r"^jaxnan\.guard: step (\d+) (?:went nonfinite|nonfinite again)")
_WHERE = re.compile(r"(?<![\w/.-])(/?(?:[\w.-]+/)*[\w.-]+\.py):(\d+)\b")


def incidents(text: str) -> dict[int, str]:
    """Step -> the text of its incident block (head line to the next head)."""
    blocks: dict[int, str] = {}
    step = None
    for line in text.splitlines():
        head = _HEAD.match(line)
        if head:
            step = int(head.group(1))
            blocks[step] = line
        elif step is not None and line.startswith("  "):
            blocks[step] += "\n" + line
        else:
            step = None
    return blocks


def _where_problems(step: int, block: str, cwd: str) -> list[str]:
    if "cause:   input_data" in block:
        if not re.search(r"examples: row \d+ of batch", block):
            return [f"step {step}: a bad batch without its row"]
        return []
    lines = block.splitlines()
    located = [lines[0], *(x for x in lines if x.lstrip().startswith("where:"))]
    found = [hit for x in located for hit in _WHERE.findall(x)]
    if not found:
        return [f"step {step}: no file:line"]
    out = []
    for file, line in found:
        path = os.path.join(cwd, file)
        if os.path.isabs(file) or not os.path.isfile(path):
            out.append(f"step {step}: {file}:{line} is not a path relative to {cwd}")
        else:
            with open(path, encoding="utf-8") as f:
                if int(line) > len(f.readlines()):
                    out.append(f"step {step}: {file} has no line {line}")
    return out


def problems(text: str, cwd: str | None = None) -> list[str]:
    """What the demo's output `text`, run in `cwd`, fails to show."""
    cwd = os.getcwd() if cwd is None else cwd
    out = []
    if not _BAR.search(text):
        out.append("no completed progress bar (rich)")
    plot = _PLOT.search(text)
    if plot is None:
        out.append("no plot line")
    elif not os.path.isfile(os.path.join(cwd, plot.group(1))):
        out.append(f"plot not written ({plot.group(1)})")
    blocks = incidents(text)
    if not blocks:
        out.append("no incident")
    for step, block in blocks.items():
        out += _where_problems(step, block, cwd)
    if "before before" in text:
        out.append("'before before'")
    return out


if __name__ == "__main__":
    with open(sys.argv[1], encoding="utf-8") as f:
        found = problems(f.read())
    for p in found:
        print(f"demo output: {p}")
    sys.exit(1 if found else 0)
