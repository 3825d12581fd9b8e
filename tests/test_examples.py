import importlib.util
import pathlib
import sys

import pytest

from tests import helpers

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load(name):
    path = ROOT / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses (flax.struct) look their module up
    spec.loader.exec_module(mod)
    return mod, path


def test_data_parallel_guard_skips_once_and_locates():
    mod, path = _load("data_parallel_guard")
    out = mod.main(steps=16, bad_step=12)
    assert out["skipped"] == [12] and out["total"] == 1
    assert out["params_finite"]
    d = out["diagnosis"]
    line = helpers.marker_line(path, "# scale may be 0")
    assert (d.primitive, d.line, d.phase) == ("div", line, "forward")
    assert d.cause == "unsafe_op"


@pytest.mark.parametrize(
    "name, leaf, row",
    [
        ("guard_optax", "batch['x']", 3),
        ("guard_nnx", "batch['image']", 5),
        ("guard_linen", "batch['x']", 2),
        ("guard_equinox", "batch['x']", 7),
    ],
)
def test_guarded_training_scripts_skip_and_name_the_row(name, leaf, row):
    if name != "guard_optax":
        pytest.importorskip("equinox" if name == "guard_equinox" else "flax")
    mod, _ = _load(name)
    out = mod.main(steps=8, bad_step=4, batch_size=8)
    summary = out["summary"]
    assert summary["steps"] == 8 and summary["skipped"] == 1
    assert summary["causes"] == {"input_data": 1}
    (incident,) = out["incidents"]
    assert (incident.step, incident.leaf, incident.rows) == (4, leaf, (row,))
