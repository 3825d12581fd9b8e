"""examples/orbax_last_good.py: only verified states reach Orbax; a resumed
run skips the recorded batches. Skipped without orbax-checkpoint, which
`import jaxnan` never imports."""

import importlib.util
import pathlib
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_import_jaxnan_does_not_import_orbax():
    code = "import sys, jaxnan; print('orbax' in ' '.join(sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True
    )
    assert out.stdout.strip() == "False", out.stderr


def test_orbax_saves_only_verified_states_and_resume_skips(tmp_path):
    pytest.importorskip("orbax.checkpoint")
    path = ROOT / "examples" / "orbax_last_good.py"
    spec = importlib.util.spec_from_file_location("orbax_last_good", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.main(workdir=str(tmp_path))
    # first launch: calls 0-24, bad batch 23, rolled back to the snapshot
    # after step 15 (5 steps back at least), window 24-25
    assert out["saved"] == {9: True, 19: True}
    assert out["first"]["rolled_back"] == 1
    reasons = {r.position: r.reason.value for r in out["record"]}
    assert reasons == {
        **{p: "undone" for p in range(16, 23)},
        23: "nonfinite",
        24: "window",
        25: "window",
    }
    # resumed after the checkpoint of step 19: skips 20-25 itself
    assert out["resumed_from"] == 19
    assert out["resumed"]["batches_skipped"] == 6
    assert out["resumed"]["bad_steps"] == 0
    assert out["final"] == {29: True, 39: True}
    assert out["naive"] == {29: False, 39: False}  # NaN over the good ones
    # bit-exact a plain loop over positions 0-19, then 26-39
    tx = optax.adam(1e-2)
    params = mod.init(jax.random.key(0))
    opt_state = tx.init(params)
    plain = mod.make_step(tx)
    for position in [*range(20), *range(26, 40)]:
        params, opt_state, _ = plain(params, opt_state, mod.batch_at(position, ()))
    got = jax.tree_util.tree_leaves(out["params"])
    want = jax.tree_util.tree_leaves(params)
    assert all(np.array_equal(a, b) for a, b in zip(got, want))
