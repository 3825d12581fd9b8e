import contextlib
import io
import json
import pathlib

import jaxnan
from jaxnan.__main__ import main
from tests import helpers


def test_demo_survives_three_incidents_and_explains_each(tmp_path):
    out = io.StringIO()
    log, png = tmp_path / "incidents.jsonl", tmp_path / "demo.png"
    argv = ["demo", "--no-progress", "--log", str(log), "--plot-file", str(png)]
    with contextlib.redirect_stdout(out):
        assert main(argv) == 0
    text = out.getvalue()
    src = pathlib.Path(jaxnan.__file__).parent / "examples" / "demo.py"
    line = helpers.marker_line(src, "jnp.log(probs)")
    assert "finished: 60 steps, 4 bad" in text
    assert "params finite: True" in text
    # The NaN row: read from the batch, named by leaf and row.
    assert "row 6 of batch['x'] (batch 12)" in text
    assert "cause:   input_data" in text
    # The outlier row: found by per-example replay, the line named by locate.
    assert "row 19 of batch['x'] (batch 25)" in text
    assert "`log` created the first nonfinite value" in text
    assert f"demo.py:{line}" in text
    assert "cause:   unsafe_op" in text and "jax.nn.log_softmax" in text
    # The learning-rate surge: warned before the first NaN, then diagnosed.
    warned = text.index("warning at step 40, before any NaN: update_ratio")
    assert warned < text.index("step 41 went nonfinite")
    assert "learning rate too high" in text
    assert "rolled back to the state after step 35" in text
    records = [json.loads(r) for r in log.read_text().splitlines()]
    assert [(r["step"], r["action"]) for r in records] == [
        (12, "rolled_back"),
        (25, "rolled_back"),
        (40, "warned"),
        (41, "rolled_back"),
        (43, "rolled_back"),
    ]
    assert records[1]["rows"] == [19] and records[1]["where"] == f"{src}:{line}"
    assert f"plot: {png}" in text and png.stat().st_size > 0


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
