import contextlib
import io
import json
import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig

import pytest

import jaxnan
from jaxnan.__main__ import main
from jaxnan.examples import demo_view
from tests import demo_output, helpers


def _run_demo(tmp_path, *extra):
    out = io.StringIO()
    log, png = tmp_path / "incidents.jsonl", tmp_path / "demo.png"
    argv = ["demo", "--log", str(log), "--plot-file", str(png), *extra]
    with contextlib.redirect_stdout(out):
        assert main(argv) == 0
    return out.getvalue(), log, png


def test_demo_survives_three_incidents_and_explains_each(tmp_path):
    text, log, png = _run_demo(tmp_path, "--no-progress")
    src = pathlib.Path(jaxnan.__file__).parent / "examples" / "demo.py"
    line = helpers.marker_line(src, "jnp.log(probs)")
    shown = f"{os.path.relpath(src)}:{line}"  # as printed: relative to the cwd
    blocks = demo_output.incidents(text)
    assert sorted(blocks) == [12, 25, 41, 43]
    assert "finished: 60 steps, 4 bad" in text
    assert "params finite: True" in text
    assert "<locals>" not in text and "of `train_step`" in text
    assert "before before" not in text
    # The NaN row: read from the batch, named by leaf and row.
    assert "row 6 of batch['x'] (batch 12)" in blocks[12]
    assert "cause:   input_data" in blocks[12]
    # The outlier row: found by per-example replay, the line named by locate.
    assert "row 19 of batch['x'] (batch 25)" in blocks[25]
    assert "`log` created the first nonfinite value" in blocks[25]
    assert f"where:   {shown} (`jnp.log`)" in blocks[25]
    assert "cause:   unsafe_op" in blocks[25] and "jax.nn.log_softmax" in blocks[25]
    # The learning-rate surge: warned before the first NaN, then diagnosed.
    warned = text.index("warning at step 40, before any NaN: update_ratio")
    assert warned < text.index("step 41 went nonfinite")
    # One cause per incident: the final one, with the evidence that overrode
    # what locate alone says at the line.
    causes = [x.strip() for x in blocks[41].splitlines() if "cause:" in x]
    assert causes == ["cause:   learning_rate"]
    assert "why:     update_ratio 7.19, x949 its median" in blocks[41]
    assert "the cause at the line would be unsafe_op" in blocks[41]
    assert "fix:     Lower the learning rate" in blocks[41]
    assert "jax.nn.log_softmax" not in blocks[41]
    assert f"as at step 41, learning_rate at {shown}." in blocks[43]
    # Undone steps and dropped batches, said aloud.
    assert (
        "rolled back to the state after step 10; step 11 undone (its batch is"
        in (blocks[12])
    )
    assert (
        "steps 36-40 undone (their batches are dropped), batch 41 skipped"
        in (blocks[41])
    )
    assert "step 42 undone (its batch is dropped), batch 43 skipped" in blocks[43]
    assert (
        "undone by rollbacks: 15 steps; 11 good batches dropped (11, 21-24, 36-40, "
        "42) and 4 bad ones skipped (12, 25, 41, 43); 45 of 60 batches trained on"
    ) in text
    records = [json.loads(r) for r in log.read_text().splitlines()]
    assert [(r["step"], r["action"], r["undone"]) for r in records] == [
        (12, "rolled_back", [11, 12]),
        (25, "rolled_back", [21, 22, 23, 24, 25]),
        (40, "warned", []),
        (41, "rolled_back", [36, 37, 38, 39, 40, 41]),
        (42, "warned", []),  # growing again on the restored state
        (43, "rolled_back", [42, 43]),
    ]
    assert [r["cause"] for r in records] == [
        "input_data",
        "unsafe_op",
        "growth",
        "learning_rate",
        "growth",
        "learning_rate",
    ]
    assert records[3]["diagnosis"]["cause"] == "learning_rate"  # one spelling
    assert records[1]["rows"] == [19] and records[1]["where"] == f"{src}:{line}"
    assert f"plot: {png}" in text and png.stat().st_size > 0
    assert "  bad steps   4 (4 rolled back)" in text  # no "skipped 0" beside
    # The plain table: every row's columns start where the header's do.
    table = text[text.index("  step  action") :].splitlines()
    starts = [table[0].index(c) for c in demo_view.HEADER]
    assert table[1].split() == ["-" * len(x) for x in table[1].split()]
    for row in table[2:7]:
        assert [row[s - 1] for s in starts[1:]] == [" "] * 4, row
    assert table[3].split() == ["25", "rolled", "back", "unsafe_op", shown] + (
        ["batch['x']", "row", "19"]
    )


def test_demo_with_rich_shows_the_bar_and_whole_file_lines(tmp_path, monkeypatch):
    pytest.importorskip("rich")
    pytest.importorskip("matplotlib")
    monkeypatch.setenv("COLUMNS", "80")  # the narrowest common terminal
    text, _, png = _run_demo(tmp_path)
    assert demo_output.problems(text) == []
    src = pathlib.Path(jaxnan.__file__).parent / "examples" / "demo.py"
    shown = f"{os.path.relpath(src)}:{helpers.marker_line(src, 'jnp.log(probs)')}"
    rows = [x for x in text.splitlines() if x.lstrip().startswith(("12 ", "25 "))]
    assert len(rows) == 2 and shown in rows[1] and "rolled back" in rows[0]
    assert "…" not in text  # nothing cut


def test_demo_output_checker_finds_what_is_missing(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "train.py").write_text("a = 1\nb = 2\n")
    (tmp_path / "plot.png").write_bytes(b"png")
    good = "\n".join(
        [
            "jaxnan.guard: step 3 went nonfinite (loss nan).",
            "  examples: row 2 of batch['x'] (batch 3)",
            "    cause:   input_data",
            "jaxnan.guard: step 7 went nonfinite (loss nan).",
            "    where:   pkg/train.py:2 (`jnp.log`)",
            "    activations of `train.py:2 (loss)`: max |x| = 1",
            "jaxnan.guard: step 9 nonfinite again (loss nan): as at step 7, "
            "unsafe_op at pkg/train.py:2.",
            "training ━━━━━━━━━━━━ 60/60 loss  0.4 bad steps 3 0:00:04",
            "plot: plot.png",
        ]
    )
    assert demo_output.incidents(good).keys() == {3, 7, 9}
    assert demo_output.problems(good, str(tmp_path)) == []
    bad = (
        good.replace("pkg/train.py:2 (`", f"{tmp_path}/pkg/train.py:2 (`")
        .replace("unsafe_op at pkg/train.py:2", "unsafe_op at pkg/train.py:9")
        .replace("  examples: row 2 of batch['x'] (batch 3)\n", "")
        .replace("60/60", "59/60")
        .replace("plot: plot.png", "plot: skipped, matplotlib is not installed")
    )
    assert demo_output.problems(bad, str(tmp_path)) == [
        "no completed progress bar (rich)",
        "plot not written (skipped, matplotlib is not installed)",
        "step 3: a bad batch without its row",
        f"step 7: {tmp_path}/pkg/train.py:2 is not a path relative to {tmp_path}",
        "step 9: pkg/train.py has no line 9",
    ]
    assert demo_output.problems("", str(tmp_path)) == [
        "no completed progress bar (rich)",
        "no plot line",
        "no incident",
    ]


def test_import_jaxnan_imports_neither_matplotlib_nor_rich():
    code = (
        "import sys, jaxnan, jaxnan.examples.demo\n"
        "print(sorted(m for m in ('matplotlib', 'rich') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


@pytest.mark.skipif(
    os.environ.get("JAXNAN_TESTS_FRESH_VENV") != "1",
    reason="set JAXNAN_TESTS_FRESH_VENV=1: builds a virtual environment and "
    "lets pip fetch the build backend (.ci/run checks the same on every run)",
)
def test_readme_demo_line_in_a_fresh_virtual_environment(tmp_path):
    """The README's set-up line, verbatim, in a new venv, on a copy of the repo.

    The dependencies come from this interpreter's site-packages (a ``.pth``
    file, as ``--system-site-packages`` does for a system Python), so pip
    installs only jaxnan itself; it fetches nothing but the build backend that
    the line fetches on any machine. 20-30 s (benchmarks/RESULTS.md).
    """
    root = pathlib.Path(__file__).resolve().parents[1]
    repo = tmp_path / "repo"
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for name in files:
        if (root / name).is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / name, repo / name)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    purelib = sysconfig.get_paths()["purelib"]
    inner = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import sysconfig; print(sysconfig.get_paths()['purelib'])",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    pathlib.Path(inner, "_outer_site.pth").write_text(purelib + "\n")
    cmd = _readme_line(root / "README.md", "demo")
    env = dict(os.environ, PATH=f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}")
    env.pop("PYTHONPATH", None)
    run = subprocess.run(
        ["bash", "-c", cmd],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert demo_output.problems(run.stdout, str(repo)) == [], run.stdout


def _readme_line(readme: pathlib.Path, name: str) -> str:
    """The bash line after ``<!-- setup:NAME -->``, as `.ci/run` reads it."""
    text = readme.read_text()
    after = text[text.index(f"<!-- setup:{name} -->") :]
    return after.split("```bash\n", 1)[1].split("\n", 1)[0]


def test_demo_help_documents_every_option(capsys):
    try:
        main(["demo", "--help"])
    except SystemExit as e:
        assert e.code == 0
    text = capsys.readouterr().out
    for option in ("--steps", "--policy", "--snapshot-every", "--plot", "--no-plot"):
        assert option in text
    for option in ("--plot-file", "--log", "--progress"):
        assert option in text
    assert text.count("default") >= 6
