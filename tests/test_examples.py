import importlib.util
import pathlib

from tests import helpers

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load(name):
    path = ROOT / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
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
