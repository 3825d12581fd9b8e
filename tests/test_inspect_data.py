"""impute / drop_nonfinite_rows / clip_outliers: exact values, jit, sharding."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxnan


def _batch():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 5)).astype(np.float32)
    x[[1, 4, 9], 0] = np.nan
    x[[2, 3], 2] = np.nan
    x[7, 4] = np.nan
    x[10, :] = np.nan  # a whole row
    return {"x": x, "label": np.arange(16, dtype=np.int32)}


@pytest.mark.parametrize("use_jit", [False, True])
@pytest.mark.parametrize(
    "strategy,ref", [("mean", np.nanmean), ("median", np.nanmedian)]
)
def test_mean_and_median_equal_numpy(strategy, ref, use_jit):
    batch = _batch()
    fn = lambda b: jaxnan.impute(b, strategy=strategy)  # noqa: E731
    clean, report = (jax.jit(fn) if use_jit else fn)(batch)
    want_fill = ref(batch["x"], axis=0)
    np.testing.assert_allclose(report.fill["x"], want_fill, rtol=1e-6)
    want = np.where(np.isnan(batch["x"]), want_fill[None, :], batch["x"])
    np.testing.assert_allclose(clean["x"], want, rtol=1e-6)
    assert np.isfinite(np.asarray(clean["x"])).all()
    np.testing.assert_array_equal(report.replaced["x"], [4, 1, 3, 1, 2])
    assert int(report.per_leaf["x"]) == 11 and int(report.total) == 11
    assert report.replaced["label"] is None and report.fill["label"] is None
    np.testing.assert_array_equal(clean["label"], batch["label"])
    assert clean["label"].dtype == np.int32


def test_median_even_count_is_mean_of_middle_pair():
    x = np.array([[4.0], [1.0], [np.nan], [3.0], [10.0]], np.float32)
    clean, rep = jaxnan.impute(x, strategy="median")
    assert float(rep.fill[0]) == float(np.nanmedian(x)) == 3.5
    assert float(clean[2, 0]) == 3.5


def test_zero_constant_and_inf_counted():
    x = jnp.array([[1.0, jnp.inf], [-jnp.inf, 2.0], [jnp.nan, 3.0]])
    clean, rep = jaxnan.impute(x, strategy="zero")
    np.testing.assert_array_equal(clean, [[1, 0], [0, 2], [0, 3]])
    np.testing.assert_array_equal(rep.replaced, [2, 1])
    clean, _ = jaxnan.impute(x, strategy="constant", fill=-1.0)
    np.testing.assert_array_equal(clean, [[1, -1], [-1, 2], [-1, 3]])
    # mean ignores +-inf as well as NaN
    clean, rep = jaxnan.impute(x, strategy=jaxnan.Strategy.MEAN)
    np.testing.assert_array_equal(rep.fill, [1.0, 2.5])


def test_axis_and_float16_dtype_kept():
    x = np.array([[1.0, np.nan, 3.0], [np.nan, 5.0, 7.0]], np.float16)
    clean, rep = jaxnan.impute({"x": x}, strategy="mean", axis=1)
    assert clean["x"].dtype == jnp.float16
    np.testing.assert_array_equal(rep.fill["x"], np.array([2.0, 6.0], np.float16))
    np.testing.assert_array_equal(clean["x"], [[1, 2, 3], [6, 5, 7]])
    _, rep2 = jaxnan.impute({"x": x}, strategy="mean", axis=-1)
    np.testing.assert_array_equal(rep2.fill["x"], rep.fill["x"])


def test_frozen_stats_reused_on_another_batch():
    train = _batch()
    stats = jaxnan.impute_stats(train, strategy="mean")
    val = {"x": np.full((3, 5), np.nan, np.float32), "label": np.zeros(3, np.int32)}
    val["x"][0] = 1.0
    clean, rep = jax.jit(lambda b, s: jaxnan.impute(b, stats=s))(val, stats)
    np.testing.assert_allclose(clean["x"][1], np.nanmean(train["x"], 0), rtol=1e-6)
    np.testing.assert_array_equal(clean["x"][0], np.ones(5))
    assert int(rep.total) == 10
    # the report's fill is the same frozen statistic
    _, rep_train = jaxnan.impute(train, strategy="mean")
    np.testing.assert_array_equal(rep_train.fill["x"], stats["x"])
    with pytest.raises(ValueError, match=re.escape("stats of shape (5,)")):
        jaxnan.impute({"x": np.ones((3, 4), np.float32)}, stats={"x": stats["x"]})


def test_all_nan_column_filled_with_zero_and_reported():
    x = np.array([[np.nan, 1.0], [np.nan, np.nan], [np.nan, 3.0]], np.float32)
    for strategy in ("mean", "median"):
        clean, rep = jax.jit(lambda b, s=strategy: jaxnan.impute(b, strategy=s))(x)
        np.testing.assert_array_equal(clean, [[0, 1], [0, 2], [0, 3]])
        assert int(rep.empty_features) == 1
        np.testing.assert_array_equal(rep.replaced, [3, 1])


def test_bad_input_errors():
    with pytest.raises(ValueError, match="no floating-point leaf in batch"):
        jaxnan.impute({"ids": np.arange(3)})
    with pytest.raises(ValueError, match=re.escape("strategy='avg'; use one of")):
        jaxnan.impute(np.ones(3, np.float32), strategy="avg")
    with pytest.raises(ValueError, match=re.escape("axis=2, out of range for leaf")):
        jaxnan.impute({"x": np.ones((3, 2), np.float32)}, axis=2)
    with pytest.raises(ValueError, match="needs fill="):
        jaxnan.impute(np.ones(3, np.float32), strategy="constant")
    with pytest.raises(ValueError, match="fill is used only"):
        jaxnan.impute(np.ones(3, np.float32), strategy="mean", fill=1.0)
    with pytest.raises(ValueError, match="no floating-point leaf"):
        jaxnan.drop_nonfinite_rows([np.arange(3)])
    with pytest.raises(ValueError, match="both z=1.0 and quantiles"):
        jaxnan.clip_outliers(np.ones(3, np.float32), z=1.0, quantiles=(0.1, 0.9))
    with pytest.raises(ValueError, match="0 <= low < high <= 1"):
        jaxnan.clip_outliers(np.ones(3, np.float32), quantiles=(0.9, 0.1))
    with pytest.raises(ValueError, match="positive number"):
        jaxnan.clip_outliers(np.ones(3, np.float32), z=-1.0)


def test_sharded_batch_same_as_unsharded(mesh8):
    batch = _batch()
    # multiples of 1/64: every partial sum is exact, so the shards' summation
    # order cannot change a bit and the comparison can be exact
    batch["x"] = np.round(np.concatenate([batch["x"]] * 4) * 64) / 64
    batch["label"] = np.arange(64, dtype=np.int32)
    sharded = jax.device_put(batch, NamedSharding(mesh8, P("d")))
    assert len(sharded["x"].sharding.device_set) == 8
    for strategy in ("mean", "median", "zero"):
        fn = jax.jit(lambda b, s=strategy: jaxnan.impute(b, strategy=s))
        got, rep = fn(sharded)
        want, rep_u = fn(batch)
        np.testing.assert_array_equal(got["x"], want["x"])
        np.testing.assert_array_equal(rep.replaced["x"], rep_u.replaced["x"])
        if strategy != "zero":  # global statistics: equal numpy's on all rows
            ref = np.nanmean if strategy == "mean" else np.nanmedian
            np.testing.assert_allclose(rep.fill["x"], ref(batch["x"], 0), rtol=1e-6)
    mask, rep = jax.jit(jaxnan.drop_nonfinite_rows)(sharded)
    mask_u, _ = jaxnan.drop_nonfinite_rows(batch)
    np.testing.assert_array_equal(mask, mask_u)
    assert int(rep.dropped) == 4 * 7
    clipped, _ = jax.jit(lambda b: jaxnan.clip_outliers(b, z=1.0))(sharded)
    clipped_u, _ = jax.jit(lambda b: jaxnan.clip_outliers(b, z=1.0))(batch)
    np.testing.assert_allclose(clipped["x"], clipped_u["x"], rtol=1e-6)


def test_drop_rows_are_the_expected_ones():
    batch = _batch()
    batch["y"] = np.ones((16, 2, 2), np.float32)
    batch["y"][12, 1, 0] = np.inf
    w = np.linspace(1, 2, 16).astype(np.float32)
    mask, rep = jax.jit(jaxnan.drop_nonfinite_rows)(batch, w)
    bad = [1, 2, 3, 4, 7, 9, 10, 12]
    want = w.copy()
    want[bad] = 0
    np.testing.assert_array_equal(mask, want)
    assert int(rep.dropped) == len(bad)
    np.testing.assert_array_equal(np.flatnonzero(rep.bad_rows), bad)
    with pytest.raises(ValueError, match="leaf \\['z'\\] has 3 examples"):
        jaxnan.drop_nonfinite_rows({"x": batch["x"], "z": np.ones(3, np.float32)})
    with pytest.raises(ValueError, match=re.escape("weights of shape (3,)")):
        jaxnan.drop_nonfinite_rows(batch, np.ones(3))


def test_drop_rows_mask_makes_a_finite_loss():
    x = np.array([[1.0], [np.nan], [3.0]], np.float32)
    mask, _ = jaxnan.drop_nonfinite_rows(x)
    clean, _ = jaxnan.impute(x)
    loss = jnp.sum(mask * jnp.square(clean[:, 0])) / jnp.sum(mask)
    assert float(loss) == 5.0


def test_clip_outliers_z_and_quantiles_equal_numpy():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 3)).astype(np.float32)
    x[5, 0] = 50.0
    x[6, 1] = -np.inf
    x[7, 2] = np.nan
    clipped, rep = jax.jit(lambda b: jaxnan.clip_outliers(b, z=3.0))(x)
    fin = np.where(np.isfinite(x), x, np.nan).astype(np.float64)
    mean, std = np.nanmean(fin, 0), np.nanstd(fin, 0)
    np.testing.assert_allclose(rep.low, mean - 3 * std, rtol=1e-5)
    np.testing.assert_allclose(rep.high, mean + 3 * std, rtol=1e-5)
    want = np.clip(x, rep.low, rep.high)
    np.testing.assert_array_equal(clipped, want)
    assert np.isnan(clipped[7, 2])  # NaN is left for impute
    assert float(clipped[5, 0]) == float(rep.high[0])
    assert float(clipped[6, 1]) == float(rep.low[1])
    wanted_counts = ((x < np.asarray(rep.low)) | (x > np.asarray(rep.high))).sum(0)
    np.testing.assert_array_equal(rep.clipped, wanted_counts)
    qs = (0.01, 0.99)
    clipped, rep = jaxnan.clip_outliers(x, quantiles=qs)
    np.testing.assert_allclose(rep.low, np.nanquantile(fin, qs[0], 0), rtol=1e-5)
    np.testing.assert_allclose(rep.high, np.nanquantile(fin, qs[1], 0), rtol=1e-5)
    # frozen bounds reused
    again, rep2 = jaxnan.clip_outliers(x * 10, bounds=(rep.low, rep.high))
    np.testing.assert_array_equal(rep2.high, rep.high)
    assert float(np.nanmax(again)) <= float(np.max(rep.high))


def test_clip_outliers_rejects_bounds_of_another_feature_shape():
    # Bounds fitted on 2 features used on 1: broadcasting would silently
    # return a batch of another shape.
    x = np.arange(10, dtype=np.float32).reshape(5, 2)
    _, rep = jaxnan.clip_outliers(x)
    with pytest.raises(ValueError, match=re.escape("bounds of shape (2,)")):
        jaxnan.clip_outliers(x[:, :1], bounds=(rep.low, rep.high))
    with pytest.raises(ValueError, match="bounds of shape None"):
        jaxnan.clip_outliers({"x": x, "y": x}, bounds=({"x": rep.low, "y": None},) * 2)


def test_clip_outliers_all_nan_column_untouched():
    x = np.array([[np.nan, 1.0], [np.nan, 2.0]], np.float32)
    clipped, rep = jaxnan.clip_outliers(x)
    np.testing.assert_array_equal(np.isnan(clipped), np.isnan(x))
    assert float(rep.low[0]) == -np.inf and float(rep.high[0]) == np.inf
