"""`examples/multihost_guard.py` as users launch it on one machine: 2 processes
x 2 CPU devices (``--local 2 --cpu-devices 2``), a NaN in process 1's rows.

Two launches (about 5 s each on 2 cores): the run, then a resumed run that
leaves out the batches the first one logged; a hang is killed at `TIMEOUT` and fails
with both processes' output.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "multihost_guard.py"
TIMEOUT = 40
BAD_STEP = 3
GLOBAL_ROW = 9  # process 1's local row 1: rows 8-15 are process 1's


def _env():
    env = dict(os.environ)
    flags = env.get("XLA_FLAGS", "").split()
    env["XLA_FLAGS"] = " ".join(
        f for f in flags if "xla_force_host_platform_device_count" not in f
    )
    for name in ("JAX_NUM_CPU_DEVICES", "JAX_PLATFORMS", "JAX_COORDINATOR_ADDRESS"):
        env.pop(name, None)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def _launch(tmp_path, *args):
    cmd = [sys.executable, str(SCRIPT), "--local", "2", "--cpu-devices", "2"]
    cmd += ["--steps", "6", "--bad-step", str(BAD_STEP), "--log-dir", str(tmp_path)]
    proc = subprocess.Popen(
        [*cmd, *args],
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # one group: the launcher and both processes
    )
    try:
        out, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"2 processes hung past {TIMEOUT} s:\n{out}") from None
    out = "\n".join(ln for ln in out.splitlines() if not ln.startswith("[Gloo]"))
    assert proc.returncode == 0, out
    # Read from the files: the two processes share the pipe, so a line of
    # one can be cut by the other's output.
    results = [
        json.loads((tmp_path / f"result.process{i}.json").read_text()) for i in (0, 1)
    ]
    return out, results


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("multihost_example")
    return tmp_path, *_launch(tmp_path)


def test_two_processes_skip_the_nan_row_of_one_and_agree(first_run):
    tmp_path, out, results = first_run
    assert [r["process"] for r in results] == [0, 1]
    for r in results:
        assert (r["processes"], r["devices"], r["steps"]) == (2, 4, 6)
        assert r["skipped"] == 1
        assert r["incidents"] == [[BAD_STEP, [GLOBAL_ROW], "batch['x']"]]
    # One incident printed, by process 0, naming the global row and its owner.
    assert out.count("went nonfinite") == 1
    assert (
        f"row {GLOBAL_ROW} of batch['x'] (batch {BAD_STEP}) on process 1, device 2048"
        in out
    )
    # The same parameters on both processes.
    assert results[0]["params_sum"] == results[1]["params_sum"]
    # Each process writes its own log, saying which it is.
    for i in (0, 1):
        (line,) = (tmp_path / f"incidents.process{i}.jsonl").read_text().splitlines()
        record = json.loads(line)
        assert record["process"] == i and record["step"] == BAD_STEP
        assert record["rows"] == [GLOBAL_ROW]


def test_resumed_run_leaves_out_the_logged_batches(first_run, tmp_path):
    log = first_run[0] / "incidents.process0.jsonl"
    out, results = _launch(tmp_path, "--skip-from", str(log), "--policy", "rollback")
    for r in results:
        assert r["left_out"] == [BAD_STEP] and r["incidents"] == []
        # the same parameters as the first run, which skipped that batch
        assert r["params_sum"] == first_run[2][0]["params_sum"]
    assert "went nonfinite" not in out
