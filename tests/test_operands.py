"""`locate.operands`: the fixed-size summaries the cause rules read.

The answer on the devices (a value spanning processes, forced here with
``on_device=True`` over the 8 CPU devices, each holding a shard) must be the
host's answer (NumPy, float64), and a classification made from on-device
operands the one made from host arrays, text for text.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnan._src.locate import operands, precision
from jaxnan._src.locate.cause_rules import classify
from jaxnan._src.locate.causes import Event
from jaxnan._src.locate.operands import Operand, stats
from tests.helpers import sharded
from tests.test_causes import event


def _special(shape, dtype=np.float32, seed=0):
    """Values with every kind a rule asks about, at scattered places."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape).astype(np.float64) * 3
    flat = x.reshape(-1)
    picks = rng.choice(flat.size, size=12, replace=False)
    specials = [0.0, -0.0, -1.0, 1.0, np.nan, np.inf, -np.inf, -2.0, 2.5, 0.0]
    for i, v in zip(picks, specials):
        flat[i] = v
    return x.astype(dtype)


PREDICATES = {
    "everywhere": operands.everywhere,
    "finite": operands.finite,
    "nonfinite": operands.nonfinite,
    "nan": operands.is_nan,
    "zero": lambda xp, v: v == 0,
    "negative": lambda xp, v: v < 0,
    "outside_unit": lambda xp, v: xp.abs(v) > 1,
    "pole": lambda xp, v: (v <= 0) & (v == xp.round(v)),
    "none": lambda xp, v: v > 1e30,
}


def _same(a, b):
    assert a.count == b.count and a.size == b.size and a.index == b.index
    np.testing.assert_array_equal(a.values, b.values)
    np.testing.assert_array_equal([a.min, a.max, a.abs_max], [b.min, b.max, b.abs_max])


@pytest.mark.parametrize("dtype", [np.float32, np.float16, jnp.bfloat16])
@pytest.mark.parametrize("name", list(PREDICATES))
def test_device_stats_equal_host_stats(mesh8, name, dtype):
    host = _special((16, 6), dtype)
    device = Operand(sharded(jnp.asarray(host), mesh8), on_device=True)
    assert device.on_device and not Operand(host).on_device
    _same(stats(PREDICATES[name], device), stats(PREDICATES[name], host))


def test_pair_stats_on_device_name_the_first_position_and_both_values(mesh8):
    num = _special((8, 4), seed=1)
    den = _special((8, 4), seed=2)
    den[5, 3] = 0.0
    num[5, 3] = 7.0
    where = lambda xp, n, d: (d == 0) & (n != 0)  # noqa: E731
    on = [Operand(sharded(jnp.asarray(a), mesh8), on_device=True) for a in (num, den)]
    got, want = stats(where, *on), stats(where, num, den)
    _same(got, want)
    assert want.count >= 1 and want.values[1] == 0.0


def test_no_position_and_constant_operands(mesh8):
    x = np.full((8, 3), -1e10, np.float32)
    on = Operand(sharded(jnp.asarray(x), mesh8), on_device=True)
    assert on.constant() == Operand(x).constant() == float(np.float32(-1e10))
    x[2, 1] = np.nan
    on = Operand(sharded(jnp.asarray(x), mesh8), on_device=True)
    assert on.constant() is None and Operand(x).constant() is None
    none = stats(lambda xp, v: v > 0, on)
    assert (none.count, none.index, none.values) == (0, None, ())


def _on_device(ev: Event, mesh) -> Event:
    """The same event with every operand left on the 8 devices."""

    def move(a):
        a = np.asarray(a)
        if a.ndim and a.shape[0] % 8 == 0:
            return Operand(sharded(jnp.asarray(a), mesh), on_device=True)
        return Operand(jnp.asarray(a), on_device=True)

    return Event(
        ev.eqn,
        ev.primitive,
        ev.phase,
        [move(a) for a in ev.inputs],
        [move(a) for a in ev.outputs],
        ev.user_function,
    )


def _cases():
    x = np.linspace(-2, 2, 16, dtype=np.float32)
    z = np.zeros(16, np.float32)
    inf = np.full(16, np.inf, np.float32)
    x0 = x.copy()
    x0[[3, 9]] = 0.0
    big = np.full(16, 3e38, np.float32)
    half = np.linspace(0.5, 90.0, 16, dtype=np.float32)
    return {
        "log": (jnp.log, (x0,), "log", (x0,)),
        "sqrt": (jnp.sqrt, (x,), "sqrt", (x,)),
        "div": (lambda a, b: a / b, (x, z), "div", (x0, z)),
        "pow": (lambda a, b: a**b, (x, x), "pow", (x, np.full(16, 0.5, np.float32))),
        "exp": (jnp.exp, (half,), "exp", (half,)),
        "sub": (lambda a, b: a - b, (inf, inf), "sub", (inf, inf)),
        "mul": (lambda a, b: a * b, (z, inf), "mul", (z, inf)),
        "arcsin": (jnp.arcsin, (x,), "asin", (x,)),
        "overflow": (lambda a, b: a * b, (big, big), "mul", (big, big)),
        "lgamma": (jax.lax.lgamma, (x0,), "lgamma", (x0,)),
    }


@pytest.mark.parametrize("name", list(_cases()))
def test_classification_from_device_operands_is_the_hosts(mesh8, name):
    fn, trace_args, primitive, inputs = _cases()[name]
    ev = event(fn, *trace_args, primitive=primitive, inputs=inputs)
    want = classify(ev)
    got = classify(_on_device(ev, mesh8))
    assert got == want
    assert "received" in want.seen


def test_float8_cast_and_float32_replay_from_device_operands(mesh8):
    x = np.linspace(0, 1000, 16, dtype=np.float32)
    cast = lambda v: v.astype(jnp.float8_e4m3fn)  # noqa: E731
    ev = event(cast, x, primitive="convert_element_type", inputs=(x,))
    on = _on_device(ev, mesh8)
    # the float32 experiment, on the devices as on the host
    assert precision.equation_finite_in_float32(ev.eqn, on.inputs) is True
    assert precision.equation_finite_in_float32(ev.eqn, ev.inputs) is True
    ev.finite_in_float32 = on.finite_in_float32 = True
    got = classify(on)
    assert got == classify(ev) and got.cause == "precision"
    assert (
        "received max |x| 1000.0, above float8_e4m3fn's max 448.0, at 9 of" in got.seen
    )


@pytest.mark.parametrize("dtype", [np.float32, np.float16, jnp.bfloat16])
@pytest.mark.parametrize("kinds", ["special", "no_nan", "infinite_only", "empty"])
def test_census_and_extremes_are_numpys_on_host_and_device(mesh8, dtype, kinds):
    x = _special((16, 6), dtype).astype(np.float64)
    if kinds == "no_nan":
        x[np.isnan(x)] = 1.5
    elif kinds == "infinite_only":
        x = np.where(np.arange(x.size).reshape(x.shape) % 2, np.inf, -np.inf)
    elif kinds == "empty":
        x = np.zeros((0, 6))
    x = x.astype(dtype)
    host = Operand(x)
    device = Operand(sharded(jnp.asarray(x), mesh8), on_device=True)
    np.testing.assert_array_equal(host.census(), device.census())  # NaN == NaN
    f64 = x.astype(np.float64)
    want = [np.min(f64), np.max(f64), np.abs(f64).max()] if f64.size else [np.nan] * 3
    for op in (host, device):
        got = [op.min(), op.max(), op.abs_max()]
        np.testing.assert_array_equal(got, want)
        assert op.census().nan == int(np.isnan(f64).sum())
