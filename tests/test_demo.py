import contextlib
import io
import pathlib

import jaxnan
from jaxnan.__main__ import main
from tests import helpers


def test_demo_survives_and_names_the_line():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["demo"]) == 0
    text = out.getvalue()
    src = pathlib.Path(jaxnan.__file__).parent / "examples" / "demo.py"
    line = helpers.marker_line(src, "jnp.log(probs)")
    assert "finished: 60 steps, 3 skipped" in text
    assert "params finite: True" in text
    assert "`log` created the first nonfinite value" in text
    assert f"demo.py:{line}" in text
    assert "cause:   unsafe_op" in text
    assert "jax.nn.log_softmax" in text
    assert "[log-softmax]" in text or "[hand-written-cross-entropy]" in text
