"""`NonFiniteError.details` has one schema, `errors.Details`: every raiser
fills the common keys (``function``, ``phase``, ``leaves``), so one handler
reads them from `@checked`, `Report.throw()` and `jaxnan.guard` alike."""

import ast
import pathlib
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxnan
from jaxnan._src.core import errors
from tests import helpers

SRC = pathlib.Path(__file__).resolve().parents[1] / "jaxnan" / "_src"


# -- every raise site in jaxnan/_src fills the schema (static) -------------


def _details_keys(source: str) -> list[tuple[int, set[str] | None]]:
    """(line, keys) of every ``NonFiniteError(message, details)`` call.

    The details are a dict literal or a ``Details(...)`` call with keywords;
    anything else (a variable, ``**kwargs``) gives None: not checkable.
    """
    out = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call) or _name(node.func) != "NonFiniteError":
            continue
        args = node.args[1:] + [k.value for k in node.keywords if k.arg == "details"]
        details = args[0] if args else None
        keys: set[str] | None = None
        if isinstance(details, ast.Dict) and None not in details.keys:
            keys = {k.value for k in details.keys if isinstance(k, ast.Constant)}
        elif isinstance(details, ast.Call) and _name(details.func) == "Details":
            if not details.args and all(k.arg for k in details.keywords):
                keys = {k.arg for k in details.keywords}
        elif details is None:
            keys = set()
        out.append((node.lineno, keys))
    return out


def _name(func: ast.expr) -> str:
    return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")


def _schema_violations(calls: dict) -> dict:
    """Call sites whose details are not checkable, miss a common key or use
    a key outside the schema."""
    bad = {}
    for where, keys in calls.items():
        if keys is None:
            bad[where] = "details not a dict literal or Details(...) call"
        elif errors.COMMON_KEYS - keys:
            bad[where] = f"missing {sorted(errors.COMMON_KEYS - keys)}"
        elif keys - errors.DETAILS_SCHEMA:
            bad[where] = f"unknown {sorted(keys - errors.DETAILS_SCHEMA)}"
    return bad


def test_every_raise_site_fills_the_common_keys_and_only_schema_keys():
    calls = {
        (str(p.relative_to(SRC)), line): keys
        for p in SRC.rglob("*.py")
        for line, keys in _details_keys(p.read_text())
    }
    raisers = {path for path, _ in calls}
    assert raisers == {"checks/check.py", "checks/host.py", "guard/step.py"}, calls
    assert _schema_violations(calls) == {}


def test_the_schema_checker_finds_each_violation():
    src = """
raise errors.NonFiniteError('jaxnan: x', {'function': 'f', 'lines': 1})
raise NonFiniteError('jaxnan: x', errors.Details(function='f', phase=None))
raise NonFiniteError('jaxnan: x', details)
raise NonFiniteError('jaxnan: x')
raise NonFiniteError('jaxnan: x', details=Details(function='f', phase=p, leaves={}))
"""
    calls = dict(_details_keys(src))
    assert calls == {
        2: {"function", "lines"},
        3: {"function", "phase"},
        4: None,
        5: set(),
        6: {"function", "phase", "leaves"},
    }
    assert _schema_violations(calls) == {
        2: "missing ['leaves', 'phase']",
        3: "missing ['leaves']",
        4: "details not a dict literal or Details(...) call",
        5: "missing ['function', 'leaves', 'phase']",
    }


def test_the_schema_is_the_typed_details():
    assert errors.COMMON_KEYS == {"function", "phase", "leaves"}
    assert errors.DETAILS_SCHEMA == set(errors.Details.__annotations__)
    assert errors.DETAILS_SCHEMA - errors.COMMON_KEYS == {
        "examples",
        "inputs",
        "outputs",
        "incident",
        "diagnosis",
        "state",
    }


# -- the three raisers, triggered for real, read by one handler ------------


def _common(run) -> tuple[jaxnan.NonFiniteError, tuple]:
    """The one handler: runs `run`, catches any jaxnan error, reads the
    common keys."""
    try:
        run()
    except jaxnan.NonFiniteError as e:
        d = e.details
        return e, (d["function"], d["phase"], d["leaves"])
    raise AssertionError("no NonFiniteError")


def loss_fn(params, batch):
    return jnp.mean((batch["x"] @ params["w"] - batch["y"]) ** 2)


def _nan_batch():
    x = np.ones((4, 3), np.float32)
    x[2, 1] = np.nan
    return {"x": jnp.asarray(x), "y": jnp.zeros(4)}


def test_checked_fills_the_common_keys():
    params = {"w": jnp.ones(3)}
    e, common = _common(lambda: jaxnan.checked(loss_fn)(params, _nan_batch()))
    assert common == ("loss_fn", jaxnan.Phase.INPUT, {"batch['x']": (1, 0, 0)})
    assert e.details["phase"] is jaxnan.Phase.INPUT
    assert e.details["examples"] == (1, 1)
    assert set(e.details) == errors.COMMON_KEYS | {"examples"}


def test_checked_record_has_the_error_phase_vocabulary():
    records = []
    f = jaxnan.checked(loss_fn, on_nonfinite=records.append)
    jax.block_until_ready(f({"w": jnp.ones(3)}, _nan_batch()))
    (record,) = records
    assert record.phase is jaxnan.Phase.INPUT
    assert record.leaves == {"batch['x']": (1, 0, 0)}


def test_checked_backward_phase():
    def sqrt_loss(params):
        return jnp.sum(jnp.sqrt(params["w"]))

    grad = jax.grad(jaxnan.checked(sqrt_loss))
    _, common = _common(lambda: grad({"w": jnp.array([0.0, 4.0])}))
    assert common == (
        "sqrt_loss",
        jaxnan.Phase.BACKWARD,
        {"params['w']": (0, 1, 0)},
    )


def test_check_throw_fills_the_common_keys():
    rep, _ = jaxnan.check(loss_fn)({"w": jnp.ones(3)}, _nan_batch())
    e, common = _common(rep.throw)
    assert common == ("loss_fn", jaxnan.Phase.INPUT, {"batch['x']": (1, 0, 0)})
    assert e.details["inputs"] == {"batch['x']": (1, 0, 0)}
    assert e.details["outputs"] == {"output": (1, 0, 0)}
    assert set(e.details) == errors.COMMON_KEYS | {"inputs", "outputs"}


def test_check_throw_created_inside_is_forward():
    def log_loss(x):
        return jnp.log(x)

    rep, _ = jax.jit(jaxnan.check(log_loss))(jnp.array([1.0, 0.0, -1.0]))
    e, common = _common(rep.throw)
    assert common == (
        "log_loss",
        jaxnan.Phase.FORWARD,
        {"output": (1, 0, 1)},
    )
    assert e.details["inputs"] == {}


def _guard_run(loss, params, batches):
    """Drives ``guard(train_step, policy="raise")`` over `batches`."""
    tx = jaxnan.skip_nonfinite(optax.sgd(0.1))
    step = jaxnan.guard(helpers.optax_train_step(tx, loss), policy="raise")
    state = (params, tx.init(params))
    for batch in batches:
        state = step(*state, batch)[:2]


def _log_loss(params, batch):
    return jnp.mean(jnp.log(batch["x"] @ params["w"]))


_GOOD = {"x": jnp.ones((4, 3)), "y": jnp.zeros(4)}
_GUARD_CASES = {
    # A NaN in the batch at step 2: phase input, the batch leaf.
    "nan_input": (
        loss_fn,
        jnp.zeros(3),
        lambda: (_GOOD, _GOOD, _nan_batch(), _GOOD),
        jaxnan.Phase.INPUT,
        {"batch['x']": (1, 0, 0)},
    ),
    # A finite batch whose log is NaN: the update was held (skip_nonfinite),
    # so only the loss, output 2, is NaN.
    "created_nan": (
        _log_loss,
        jnp.ones(3),
        lambda: (_GOOD, {"x": jnp.ones((4, 3)).at[1].set(-1.0)}, _GOOD),
        jaxnan.Phase.FORWARD,
        {"output[2]": (1, 0, 0)},
    ),
}


@pytest.mark.parametrize("case", sorted(_GUARD_CASES))
def test_guard_raise_fills_the_common_keys(case):
    loss, w, batches, phase, leaves = _GUARD_CASES[case]
    e, common = _common(lambda: _guard_run(loss, {"w": w}, batches()))
    assert common == ("train_step", phase, leaves)
    assert e.details["incident"].phase is phase
    assert set(e.details) == errors.COMMON_KEYS | {"incident", "diagnosis", "state"}
    diagnosis = e.details["diagnosis"]
    if phase is jaxnan.Phase.INPUT:
        assert e.details["incident"].step == 2
        assert diagnosis.nonfinite_inputs == leaves
    else:
        assert diagnosis.primitive == "log"


# -- the error and the vocabulary ------------------------------------------


def test_an_error_made_by_hand_has_the_common_keys():
    e = jaxnan.NonFiniteError("jaxnan: 1 nan in batch['x']")
    assert e.details == {"function": None, "phase": None, "leaves": {}}
    e = jaxnan.NonFiniteError("jaxnan: x", {"phase": "backward"})
    assert e.details["phase"] is jaxnan.Phase.BACKWARD


def test_an_unknown_details_key_is_a_clear_error():
    with pytest.raises(TypeError, match=r"unknown details keys \['lines'\]"):
        jaxnan.NonFiniteError("jaxnan: x", {"function": "f", "lines": 1})
    with pytest.raises(ValueError, match="'sideways' is not a valid Phase"):
        jaxnan.NonFiniteError("jaxnan: x", {"phase": "sideways"})


def test_the_old_checked_phases_still_compare_equal_with_a_warning():
    with pytest.warns(DeprecationWarning, match="'forward-inputs' is now spelled"):
        assert jaxnan.Phase.INPUT == "forward-inputs"
    with pytest.warns(DeprecationWarning, match="'forward-outputs' is now spelled"):
        assert jaxnan.Phase("forward-outputs") is jaxnan.Phase.FORWARD
    with pytest.warns(DeprecationWarning) as got:
        assert not jaxnan.Phase.BACKWARD == "forward-outputs"
        assert jaxnan.Phase.BACKWARD != "forward-inputs"
    assert [w.filename for w in got] == [__file__] * 2  # the user's line
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert jaxnan.Phase.INPUT == "input" and jaxnan.Phase.INPUT != "forward"
        assert {jaxnan.Phase.INPUT: 1}["input"] == 1
