"""Bad input to the inspect tools and `jaxnan.flax.opt_state` gets a clear error."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxnan
import jaxnan.flax


def test_opt_state_of_a_model_is_a_type_error():
    model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match=r"nnx\.Optimizer.*not the model"):
        jaxnan.flax.opt_state(model)
    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
    jaxnan.flax.opt_state(optimizer)  # still fine


@pytest.mark.parametrize(
    ("fill", "dtype"),
    [(float("nan"), jnp.float32), (float("inf"), jnp.float32), (1e5, jnp.float16)],
)
def test_impute_rejects_a_nonfinite_fill(fill, dtype):
    x = jnp.array([[1.0, jnp.nan]], dtype)
    with pytest.raises(
        ValueError, match=r"fill=.*not a finite " + jnp.dtype(dtype).name
    ):
        jaxnan.impute(x, strategy="constant", fill=fill)
    with pytest.raises(ValueError, match="not a finite"):
        jaxnan.impute_stats(x, strategy="constant", fill=fill)


def test_impute_fill_that_is_not_a_number():
    with pytest.raises(TypeError, match="fill='a'"):
        jaxnan.impute(jnp.ones((2, 1)), strategy="constant", fill="a")


def test_impute_stats_of_another_structure_is_rejected():
    batch = {"a": jnp.array([[1.0], [jnp.nan]]), "b": jnp.array([[2.0], [jnp.nan]])}
    # Same number of leaves and shapes, other keys: used to fill "a" with
    # "b"'s statistics silently.
    other = {"b": jnp.array([5.0]), "c": jnp.array([7.0])}
    with pytest.raises(ValueError, match="another structure"):
        jaxnan.impute(batch, stats=other)
    stats = jaxnan.impute_stats(batch, strategy="mean")
    clean, _ = jaxnan.impute(batch, stats=stats)
    np.testing.assert_array_equal(clean["a"], [[1.0], [1.0]])
    np.testing.assert_array_equal(clean["b"], [[2.0], [2.0]])


def test_clip_outliers_near_float32_max_is_finite():
    big = np.finfo(np.float32).max
    x = jnp.array([[big], [big * 0.9], [-big], [1.0]], jnp.float32)
    clipped, report = jaxnan.clip_outliers(x, z=1.0)
    assert not np.isnan(np.asarray(report.low)).any()
    assert not np.isnan(np.asarray(report.high)).any()
    assert np.isfinite(np.asarray(clipped)).all()
    # Same bounds as float64 arithmetic gives, rounded to float32.
    x64 = np.asarray(x, np.float64)[:, 0]
    mean, std = x64.mean(), x64.std()
    # (mean + std is beyond float32's max: +Inf, the correct rounding.)
    with np.errstate(over="ignore"):
        want = np.float32([mean - std, mean + std])
    assert np.isinf(want[1])
    np.testing.assert_allclose(float(report.low[0]), want[0], rtol=1e-6)
    assert float(report.high[0]) == want[1]


def test_clip_outliers_bounds_unchanged_on_ordinary_values():
    x = jnp.array([[0.3], [1.7], [2.2], [-3.1], [100.0]], jnp.float32)
    _, report = jaxnan.clip_outliers(x, z=1.5)
    xf = x[:, 0]
    mean = jnp.sum(xf) / 5
    std = jnp.sqrt(jnp.sum((xf - mean) ** 2) / 5)
    assert float(report.low[0]) == float(mean - 1.5 * std)
    assert float(report.high[0]) == float(mean + 1.5 * std)


def test_clip_outliers_takes_numpy_scalars_and_rejects_bools():
    x = jnp.array([[0.0], [1.0], [2.0], [50.0]])
    a, _ = jaxnan.clip_outliers(x, z=np.float32(1.0))
    b, _ = jaxnan.clip_outliers(x, z=1.0)
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="z=True"):
        jaxnan.clip_outliers(x, z=True)
    with pytest.raises(ValueError, match="z=nan"):
        jaxnan.clip_outliers(x, z=float("nan"))


def test_plot_stats_wrong_input(tmp_path):
    measure = jaxnan.activation_stats(lambda p, x: x * p)
    with pytest.raises(TypeError, match="got a function as stats"):
        jaxnan.plot_stats(measure, tmp_path / "s.png")
    with pytest.raises(TypeError, match="of type list"):
        jaxnan.plot_stats([1, 2], tmp_path / "s.png")
    with pytest.raises(TypeError, match=r"stats\['a'\] of type float"):
        jaxnan.plot_stats({"a": 1.0}, tmp_path / "s.png")
    stats = measure(jnp.float32(2.0), jnp.ones(3))
    with pytest.raises(TypeError, match="path=3"):
        jaxnan.plot_stats(stats, 3)
