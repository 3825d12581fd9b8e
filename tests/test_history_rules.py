"""The guard's history-aware cause rules and the evidence they cite.

Each rule is run on a `Context` built by hand (locate's diagnosis, the
figures of the steps before, the probe of the state), so that the verdict
and its evidence are exact; `tests/test_guard_cases.py` runs them on whole
training loops.
"""

import math

import jax.numpy as jnp
import optax
import pytest

import jaxnan
from jaxnan._src.guard import evidence, history, history_rules
from jaxnan._src.guard.evidence import Evidence, Figure, LeafStats, Probe, Trace
from jaxnan._src.locate.api import Diagnosis
from jaxnan._src.locate.causes import Cause, Phase


def _trace(loss, grad, ratio=None):
    n = len(loss)
    rows = [(i, loss[i], grad[i], (ratio or [0.01] * n)[i], False) for i in range(n)]
    return Trace.before(rows, step=n)


def _located(cause, phase=Phase.FORWARD, **kw):
    kw.setdefault("inputs_seen", f"{cause} seen")
    return Diagnosis(found=True, cause=cause, phase=phase, fix=cause.fix, **kw)


def _leaf(path, shape, rms=1.0, zeros=0, dtype="float32", max_abs=1.0):
    size = math.prod(shape)
    return LeafStats(path, dtype, shape, size, rms * math.sqrt(size), max_abs, zeros, 0)


def _context(located, trace=None, probe=None, growth=()):
    probe = probe or Probe()
    trace = trace or _trace([1.0] * 10, [1.0] * 10)
    return history_rules.Context(10, located, trace, tuple(growth), probe, 100.0)


FLAT = [1.0, 0.9, 1.1, 1.0, 0.95, 1.05, 1.0, 0.9, 1.0, 1.1]
GEOMETRIC = [3.1 * 10 ** (k / 2) for k in range(10)]  # x10 every 2 steps


def test_evidence_text_and_record():
    e = Evidence.grew("exploding_gradient", Figure.GRAD_NORM, 3.1, 3.4e4, 20)
    assert e.text == "gradient norm grew 1.1e+04x over 20 steps: 3.1 -> 3.4e+04"
    assert e.to_dict() == {
        "rule": "exploding_gradient",
        "figure": "gradient norm",
        "text": e.text,
        "first": 3.1,
        "last": 3.4e4,
        "steps": 20,
        "leaf": None,
    }
    inf = Evidence("schedule", Figure.LEARNING_RATE, "lr", last=math.nan)
    assert inf.to_dict()["last"] == "nan"  # JSON has no NaN


def test_climb_shift_and_jump_on_exact_series():
    assert evidence.climb(GEOMETRIC, 100.0) == (3.1, GEOMETRIC[-1], 9)
    assert evidence.climb(FLAT, 100.0) is None
    spike = [1.0] * 9 + [1e6]  # one spike after a quiet run: not a climb
    assert evidence.climb(spike, 100.0) is None
    assert evidence.climb([1.0, 2.0, math.inf, 8.0, 1e4], 100.0) == (1.0, 1e4, 3)
    shifted = [1.0] * 8 + [1e5, 3.0, 1e8, 2e6, 1e4, 5e7, 1e3, 1e6]
    assert evidence.shift(shifted, 100.0) == (1.0, 550000.0, 8)
    trace = _trace(FLAT[:8] + [1.0, 1.2], [1.0] * 8 + [2e5, 1.0])
    jump = trace.jump("grad_norm", 100.0, "r", calm="loss")
    assert jump.text == (
        "gradient norm jumped 2e+05x at step 8 (1 -> 2e+05) while the loss stayed at 1"
    )
    moved = _trace(FLAT[:8] + [50.0, 1.0], [1.0] * 8 + [2e5, 1.0])
    assert moved.jump("grad_norm", 100.0, "r", calm="loss") is None


def test_geometric_gradient_growth_with_a_flat_loss_is_exploding():
    ctx = _context(_located(Cause.OVERFLOW), _trace(FLAT, GEOMETRIC))
    verdict = history_rules.decide(ctx)
    assert verdict.cause is Cause.EXPLODING_GRADIENT
    assert verdict.evidence[0].text == (
        "gradient norm grew 3.2e+04x over 9 steps: 3.1 -> 9.8e+04"
    )
    assert verdict.evidence[-1].text == (
        "without that growth the cause at the line would be overflow"
    )
    assert "clip_by_global_norm" in verdict.fix


def test_a_climbing_loss_is_the_learning_rate_even_with_gradients_growing():
    ctx = _context(_located(Cause.UNSAFE_OP), _trace(GEOMETRIC, GEOMETRIC))
    verdict = history_rules.decide(ctx)
    assert verdict.cause is Cause.LEARNING_RATE
    assert [e.rule for e in verdict.evidence] == ["divergence", "divergence"]
    assert verdict.evidence[0].text.startswith("loss grew 3.2e+04x over 9 steps")
    assert verdict.fix.startswith("Lower the learning rate")


def test_input_data_is_never_put_down_to_the_history():
    located = _located(
        Cause.INPUT_DATA,
        Phase.INPUT,
        inputs_seen="nonfinite values in the arguments: batch['x']",
    )
    verdict = history_rules.decide(_context(located, _trace(GEOMETRIC, GEOMETRIC)))
    assert verdict.cause is Cause.INPUT_DATA
    assert [e.text for e in verdict.evidence] == [
        "nonfinite values in the arguments: batch['x']"
    ]


def test_early_warning_growth_is_cited_with_its_figures():
    growth = history.Growth("update_ratio", 0.00757, 7.19, 7)
    verdict = history_rules.decide(_context(_located(Cause.UNSAFE_OP), growth=[growth]))
    assert verdict.cause is Cause.LEARNING_RATE
    assert verdict.evidence[0].text == (
        "update_ratio 7.19, x950 its median 0.00757 over the 7 steps before, "
        "then the NaN"
    )
    assert verdict.evidence[0].figure is Figure.UPDATE_RATIO


@pytest.mark.parametrize(
    ("value", "earlier", "want"),
    [
        (math.nan, (), "learning rate at optimizer step 7 is nan (schedule)"),
        (
            8.0,
            (1.0, 1.0, 1.5),
            "learning rate at optimizer step 7 is 8, 8x its median 1 over the 3 "
            "steps before (schedule)",
        ),
        (3.0, (1.0, 1.0, 1.5), None),  # a 3x step is not a surge
    ],
)
def test_schedule_rule_reads_a_nonfinite_or_surging_rate(value, earlier, want):
    lr = evidence.LearningRate(value, 7, "schedule", earlier)
    verdict = history_rules.decide(
        _context(_located(Cause.UPDATE, Phase.UPDATE), probe=Probe(learning_rate=lr))
    )
    if want is None:
        assert verdict.cause is Cause.UPDATE
    else:
        assert verdict.cause is Cause.LEARNING_RATE
        assert verdict.evidence[0].text == want
        assert "schedule" in verdict.fix and "eps=" not in verdict.fix


def test_a_nan_rate_in_the_state_is_the_schedule_not_a_poisoned_state():
    lr = evidence.LearningRate(math.nan, 0, "opt_state.hyperparams['learning_rate']")
    located = _located(Cause.POISONED_STATE, Phase.INPUT)
    verdict = history_rules.decide(_context(located, probe=Probe(learning_rate=lr)))
    assert verdict.cause is Cause.LEARNING_RATE


def test_optimizer_state_rule_names_the_underflowed_moment():
    mu = _leaf("opt_state[0].mu['w']", (4, 4), zeros=2)
    nu = _leaf("opt_state[0].nu['w']", (4, 4), zeros=9)
    probe = Probe(mu=(mu,), nu=(nu,), count=30)
    located = _located(Cause.UPDATE, Phase.UPDATE, primitive="div", dtype="float32")
    verdict = history_rules.decide(_context(located, probe=probe))
    assert verdict.cause is Cause.UPDATE
    assert verdict.evidence[0].text == (
        "opt_state[0].nu['w'] (float32) is exactly 0.0 at 9 of 16 entries where "
        "opt_state[0].mu['w'] is 0.0 at only 2: nu underflowed"
    )
    assert "eps" in verdict.fix and "float16" not in verdict.fix
    # A fresh state (count 0, all zeros) says nothing; a float16 division does.
    fresh = Probe(
        mu=(_leaf("s.mu", (2,), zeros=2, dtype="float16"),),
        nu=(_leaf("s.nu", (2,), zeros=2, dtype="float16"),),
        count=0,
    )
    located16 = _located(Cause.UPDATE, Phase.UPDATE, primitive="div", dtype="float16")
    verdict = history_rules.decide(_context(located16, probe=fresh))
    assert [e.rule for e in verdict.evidence] == ["optimizer_state", "optimizer_state"]
    assert verdict.evidence[0].text.startswith("the update divides in float16")
    assert "eps=1e-4 for float16" in verdict.fix


def test_optimizer_state_rule_names_a_first_moment_near_overflow():
    mu = _leaf("opt.mu['w']", (3,), dtype="float16", max_abs=60000.0)
    probe = Probe(mu=(mu,), nu=(_leaf("opt.nu['w']", (3,), dtype="float16"),))
    located = _located(Cause.UPDATE, Phase.UPDATE, primitive="mul", dtype="float16")
    verdict = history_rules.decide(_context(located, probe=probe))
    assert verdict.evidence[0].text == (
        "opt.mu['w'] (float16) reaches 6e+04, near its max 6.6e+04: mu overflows"
    )


def test_initialization_rule_reads_the_gain_of_a_weight_matrix():
    probe = Probe(
        params=(
            _leaf("params['Dense_0']['kernel']", (256, 64), rms=0.2),
            _leaf("params['Dense_0']['bias']", (64,), rms=50.0),
            _leaf("params['Embed_0']['embedding']", (1000, 8), rms=1.0),
        )
    )
    assert probe.gain(probe.params[0]) == pytest.approx(3.2)
    assert probe.gain(probe.params[1]) is None
    eqx = _leaf("model.layers[0].weight", (64, 256), rms=0.2)
    assert Probe().gain(eqx) == pytest.approx(3.2)  # (out, in): fan-in 256
    located = _located(Cause.OVERFLOW, primitive="exp")
    verdict = history_rules.decide(_context(located, probe=probe))
    assert verdict.cause is Cause.OVERFLOW
    assert verdict.evidence[0].text == (
        "params['Dense_0']['kernel'] [256, 64] has RMS 0.2, 3.2x the "
        "1/sqrt(fan_in) = 0.0625 of a LeCun init"
    )
    assert "initialize at 1/sqrt(fan_in)" in verdict.fix
    calm = Probe(params=(_leaf("params['k']", (256, 64), rms=0.0625),))
    verdict = history_rules.decide(_context(located, probe=calm))
    assert verdict.fix == Cause.OVERFLOW.fix  # located's own fix


def test_located_cause_is_kept_with_what_the_equation_received():
    located = _located(Cause.UNSAFE_OP, inputs_seen="log received 0.0 at 3 of 8")
    verdict = history_rules.decide(_context(located))
    assert verdict == history_rules.Verdict(
        Cause.UNSAFE_OP,
        Cause.UNSAFE_OP.fix,
        (Evidence("located", Figure.LOCATED, "log received 0.0 at 3 of 8"),),
    )
    assert history_rules.decide(_context(None)) is None  # no replay, no history


def test_a_registered_rule_runs_by_priority_and_is_replaced_by_name():
    calls = []

    @jaxnan.register_history_rule(priority=1)
    def always_precision(ctx):
        calls.append(ctx.step)
        ev = Evidence("always_precision", Figure.LOCATED, "said so")
        return history_rules.Verdict(Cause.PRECISION, "use float32", (ev,))

    try:
        verdict = history_rules.decide(_context(_located(Cause.OVERFLOW)))
        assert verdict.cause is Cause.PRECISION and calls == [10]
        jaxnan.register_history_rule(lambda ctx: None, name="always_precision")
        assert history_rules.decide(_context(_located(Cause.OVERFLOW))).cause is (
            Cause.OVERFLOW
        )
    finally:
        del history_rules.HISTORY_RULES["always_precision"]


def test_probe_reads_params_moments_and_the_injected_rate():
    opt = optax.inject_hyperparams(optax.adam)(learning_rate=0.5)
    params = {"w": jnp.array([[3.0, 4.0]]), "b": jnp.zeros(2)}
    named = evidence.named_leaves((params, opt.init(params)), ["params", "opt_state"])
    found = evidence.probe(named, step=5)
    assert [(s.path, s.shape, s.norm) for s in found.params] == [
        ("params['b']", (2,), 0.0),
        ("params['w']", (1, 2), 5.0),
    ]
    assert [s.path for s in found.nu] == [
        "opt_state.inner_state[0].nu['b']",
        "opt_state.inner_state[0].nu['w']",
    ]
    lr = found.learning_rate
    assert (lr.value, lr.count, found.count) == (0.5, 0, 0)
    assert lr.source == "opt_state.hyperparams['learning_rate']"
    sched = evidence.probe(named, schedule=lambda n: 0.1 * (n + 1), step=5, window=3)
    assert sched.learning_rate.value == pytest.approx(0.1)  # at the state's count 0
    assert sched.learning_rate.earlier == ()


def test_guard_rejects_a_schedule_that_is_not_callable():
    tx = jaxnan.skip_nonfinite(optax.sgd(0.1))

    def train_step(params, opt_state, x):
        return params, opt_state, jnp.sum(x)

    with pytest.raises(TypeError, match="schedule must be an optax schedule"):
        jaxnan.guard(train_step, schedule=0.1)
    del tx
