"""activation_stats: numpy-exact statistics and layer names in NNX, linen, Equinox."""

import inspect as pyinspect

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.extend import core as jex_core

import jaxnan


def _here(fn, text):
    """`test_inspect_activations.py:LINE (qualname)` of the line holding `text`."""
    lines, start = pyinspect.getsourcelines(fn)
    k = next(i for i, line in enumerate(lines) if text in line)
    return f"test_inspect_activations.py:{start + k} ({fn.__qualname__})"


def _np_stats(*values, out):
    m = max(float(np.abs(v).max()) for v in values)
    out = np.asarray(out, np.float64)
    return m, out.mean(), out.std(), float((out == 0).mean())


def mlp(params, x):
    with jax.named_scope("hidden"):
        h = jax.nn.relu(x @ params["w1"])
    with jax.named_scope("out"):
        return h @ params["w2"] + params["b2"]


def _mlp_params():
    rng = np.random.default_rng(0)
    return {
        "w1": rng.normal(size=(5, 8)).astype(np.float32),
        "w2": rng.normal(size=(8, 3)).astype(np.float32),
        "b2": rng.normal(size=(3,)).astype(np.float32),
    }


@pytest.mark.parametrize("outer_jit", [False, True])
def test_statistics_equal_numpy_on_the_intermediates(outer_jit):
    p = _mlp_params()
    x = np.random.default_rng(1).normal(size=(4, 5)).astype(np.float32)
    run = jaxnan.activation_stats(mlp)
    stats = jax.jit(run)(p, x) if outer_jit else run(p, x)
    assert list(stats) == ["hidden", "out"]
    pre = x @ p["w1"]
    h = np.maximum(pre, 0)
    dot2 = h @ p["w2"]
    out = dot2 + p["b2"]
    for name, values, last in [("hidden", [pre, h], h), ("out", [dot2, out], out)]:
        s = stats[name]
        m, mean, std, zeros = _np_stats(*values, out=last)
        np.testing.assert_allclose(s.max_abs, m, rtol=1e-6)
        np.testing.assert_allclose(s.mean, mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(s.std, std, rtol=1e-5)
        assert float(s.zero_fraction) == zeros
        assert int(s.nonfinite) == 0
        top = np.finfo(np.float32).max
        # m / top is a float32 denormal here, flushed to 0 on CPU.
        np.testing.assert_allclose(s.range_used, m / top, rtol=1e-5, atol=1e-37)
        np.testing.assert_allclose(s.headroom, np.log2(top / m), rtol=1e-6)
        assert s.dtype == "float32" and s.phase == "forward"
        assert s.equations == 2 and not bool(s.near_overflow)
    assert 0 < float(stats["hidden"].zero_fraction) < 1


def test_an_output_with_no_finite_entry_has_no_mean():
    p = _mlp_params()
    x = np.full((4, 5), np.nan, np.float32)
    x[0] = 1.0  # the hidden output keeps one finite row, "out" has none
    p["b2"] = np.full((3,), np.nan, np.float32)
    stats = jaxnan.activation_stats(mlp)(p, x)
    out = stats["out"]
    assert np.isnan(float(out.mean)) and np.isnan(float(out.std))
    assert "no finite output entry" in str(out) and "mean" not in str(out)
    assert int(out.nonfinite) == 9 + 12  # h @ w2: rows 1-3; + b2: every entry
    hidden = stats["hidden"]
    assert np.isfinite(float(hidden.mean)) and "mean" in str(hidden)


class NNXMLP(nnx.Module):
    def __init__(self, rngs):
        self.linear1 = nnx.Linear(5, 8, rngs=rngs)
        self.bn = nnx.BatchNorm(8, rngs=rngs)
        self.linear2 = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(self.bn(self.linear1(x)))
        return self.linear2(h)


def test_flax_nnx_layer_names_and_state_untouched():
    model = NNXMLP(nnx.Rngs(0))
    before = jax.tree_util.tree_map(np.asarray, nnx.state(model))
    x = np.random.default_rng(1).normal(size=(4, 5)).astype(np.float32)
    stats = jaxnan.activation_stats(lambda m, x: m(x))(model, x)
    relu = _here(NNXMLP.__call__, "nnx.relu")
    assert list(stats) == ["linear1", "bn", relu, "linear2"]
    k, b = np.asarray(model.linear1.kernel[...]), np.asarray(model.linear1.bias[...])
    want = x @ k + b
    s = stats["linear1"]
    np.testing.assert_allclose(s.max_abs, np.abs(want).max(), rtol=1e-6)
    np.testing.assert_allclose(s.mean, want.mean(), rtol=1e-5, atol=1e-6)
    # the batch statistics are exactly what they were (no state leaked out)
    after = jax.tree_util.tree_map(np.asarray, nnx.state(model))
    jax.tree_util.tree_map(np.testing.assert_array_equal, before, after)


def test_flax_linen_module_paths_and_gradients():
    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.relu(nn.Dense(8, name="mlp")(x))

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = Block(name="layer_0")(x)
            return nn.Dense(2, name="head")(x)

    net = Net()
    x = jnp.ones((4, 5))
    variables = net.init(jax.random.key(0), x)

    def loss(v, x):
        return jnp.mean(net.apply(v, x) ** 2)

    stats = jaxnan.activation_stats(jax.value_and_grad(loss))(variables, x)
    assert {"Net/layer_0/mlp", "Net/layer_0", "Net/head"} <= set(stats)
    assert {"Net/head (grad)", "Net/layer_0/mlp (grad)"} <= set(stats)
    assert stats["Net/head (grad)"].phase == "backward"
    keys = list(stats)
    assert all(stats[k].phase == "forward" for k in keys[: keys.index("Net/head")])


def test_equinox_field_paths():
    class Net(eqx.Module):
        mlp: eqx.nn.MLP
        head: eqx.nn.Linear

        def __init__(self, key):
            k1, k2 = jax.random.split(key)
            self.mlp = eqx.nn.MLP(5, 8, 8, 2, key=k1)
            self.head = eqx.nn.Linear(8, 3, key=k2)

        def __call__(self, x):
            return self.head(jax.nn.tanh(self.mlp(x)))

    net = Net(jax.random.key(0))
    x = jnp.ones((4, 5))
    stats = jaxnan.activation_stats(lambda m, x: jax.vmap(m)(x))(net, x)
    for name in ("mlp/layers/0", "mlp/layers/1", "mlp/layers/2", "head"):
        assert name in stats
    tanh = _here(Net.__call__, "jax.nn.tanh")
    assert tanh in stats
    w, b = net.head.weight, net.head.bias
    h = jax.vmap(lambda v: jnp.tanh(net.mlp(v)))(x)
    want = np.asarray(h @ w.T + b)
    np.testing.assert_allclose(stats["head"].mean, want.mean(), rtol=1e-5)


def test_float16_model_close_to_overflow_is_flagged():
    def model(p, x):
        with jax.named_scope("small"):
            h = x * p["a"]
        with jax.named_scope("big"):
            return h * p["b"]

    p = {"a": jnp.float16(2.0), "b": jnp.float16(5000.0)}
    x = jnp.full((8,), 3.0, jnp.float16)
    stats = jax.jit(jaxnan.activation_stats(model))(p, x)
    big, small = stats["big"], stats["small"]
    assert big.dtype == "float16" and bool(big.near_overflow)
    assert float(big.max_abs) == 30000.0
    np.testing.assert_allclose(big.range_used, 30000 / 65504, rtol=1e-6)
    np.testing.assert_allclose(big.headroom, np.log2(65504 / 30000), rtol=1e-5)
    assert not bool(small.near_overflow)
    assert "46% of the float16 range" in str(big)
    # one step further overflows: counted, and max_abs stays finite
    stats = jaxnan.activation_stats(model)({"a": p["a"], "b": jnp.float16(2e4)}, x)
    assert int(stats["big"].nonfinite) == 8 and float(stats["big"].max_abs) == 0.0
    assert "8 nonfinite" in str(stats["big"])


def test_a_layer_mixing_dtypes_takes_each_intermediate_against_its_own_dtype():
    def model(p, x):
        with jax.named_scope("mixed"):
            h = (x * p["a"]).astype(jnp.float32)  # float16 6000: 9% of its range
            g = h * p["b"]  # float32 6e6: far from its range
            return (g - 1e5).astype(jnp.float16) * jnp.float16(0)  # 5.9e6 -> inf

    p = {"a": jnp.float16(2000.0), "b": jnp.float32(1000.0)}
    x = jnp.full((4,), 3.0, jnp.float16)
    s = jax.jit(jaxnan.activation_stats(model))(p, x)["mixed"]
    f16, f32 = np.finfo(np.float16).max, np.finfo(np.float32).max
    # Per intermediate: log2(top of its dtype) - log2(its largest finite |x|);
    # the layer's headroom is the smallest, its range used 2 ** -headroom.
    rooms = [
        np.log2(np.float32(f16)) - np.log2(np.float32(6000.0)),  # x * a
        np.log2(np.float32(f32)) - np.log2(np.float32(6000.0)),  # its cast
        np.log2(np.float32(f32)) - np.log2(np.float32(6e6)),  # h * b
        np.log2(np.float32(f32)) - np.log2(np.float32(5.9e6)),  # g - 1e5
    ]
    assert s.dtype == "float16" and float(s.max_abs) == 6e6
    assert min(rooms) == rooms[0]  # the float16 product, not the largest |x|
    # (XLA's log2 and numpy's can differ by an ulp.)
    np.testing.assert_allclose(s.headroom, rooms[0], rtol=1e-6)
    np.testing.assert_allclose(s.range_used, 6000.0 / float(f16), rtol=1e-6)
    assert int(s.nonfinite) == 8  # the float16 cast and the product: 4 inf, 4 nan


def test_each_intermediate_adds_one_reduction_to_the_measuring_program():
    # Ten layers of x @ w and tanh inside one scope: one layer of 20
    # intermediates. Each adds its reduction; the headroom and range used are
    # computed once for the layer (one exp2), not once per intermediate.
    def model(ws, x):
        with jax.named_scope("deep"):
            for w in ws:
                x = jnp.tanh(x @ w)
        return x

    def count(jaxpr, name):
        return sum(
            (e.primitive.name == name)
            + sum(count(sub, name) for sub in jex_core.jaxprs_in_params(e.params))
            for e in jaxpr.eqns
        )

    ws, x = [jnp.eye(4)] * 10, jnp.ones((2, 4))
    closed = jax.make_jaxpr(jaxnan.activation_stats(model))(ws, x)
    assert count(closed.jaxpr, "reduce") == 20  # max |x| and nonfinite, fused
    assert count(closed.jaxpr, "exp2") == 1


def test_bad_arguments():
    with pytest.raises(TypeError, match="needs a callable"):
        jaxnan.activation_stats(3)
    with pytest.raises(ValueError, match="near_overflow=2"):
        jaxnan.activation_stats(mlp, near_overflow=2)
    with pytest.raises(ValueError, match="params_argnums"):
        jaxnan.activation_stats(mlp, params_argnums=(-1,))


def test_program_order_survives_an_outer_jit():
    def f(p, x):
        with jax.named_scope("zz"):
            h = x * p
        with jax.named_scope("aa"):
            return h * 2

    stats = jax.jit(jaxnan.activation_stats(f))(2.0, jnp.ones(3))
    assert isinstance(stats, jaxnan.ActivationStats)
    assert list(stats) == ["zz", "aa"]
    assert float(stats["aa"].max_abs) == 4.0


def test_plot_stats_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    stats = jaxnan.activation_stats(mlp)(_mlp_params(), jnp.ones((4, 5)))
    path = jaxnan.plot_stats(stats, tmp_path / "stats.png", title="mlp")
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no layers"):
        jaxnan.plot_stats({}, tmp_path / "empty.png")


def test_plot_stats_log_axis_shows_every_bar_and_labels_only_decades():
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    from jaxnan._src.inspect import plot

    ax = Figure().subplots()
    values = np.array([4.1e3, 4.7e4])  # less than two decades: minor labels
    ax.barh([0, 1], values)
    plot._log_axis(ax, values)
    assert ax.get_xlim() == (1e2, 1e5)  # a decade below the smallest bar
    assert isinstance(ax.xaxis.get_minor_formatter(), NullFormatter)


def _ln(p, x):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / jnp.sqrt(var + 1e-5) * p["scale"] + p["bias"]


def plain_net(params, x):
    for blk in params["blocks"]:
        x = _ln(blk["ln"], x)
        h = x @ blk["w"]
        x = x + jax.nn.relu(h)  # after the block's last parameter
    return x


def test_plain_jax_helpers_belong_to_the_parameter_they_feed():
    d = 4
    blk = {"ln": {"scale": jnp.ones(d), "bias": jnp.zeros(d)}, "w": jnp.eye(d)}
    params = {"blocks": [blk, blk]}
    x = jnp.arange(8.0).reshape(2, d)
    stats = jaxnan.activation_stats(plain_net)(params, x)
    relu = _here(plain_net, "jax.nn.relu")
    # The relu line runs once per block: one layer per call, in program order.
    assert list(stats) == [
        "blocks/0/ln",
        "blocks/0",
        f"{relu}/1",
        "blocks/1/ln",
        "blocks/1",
        f"{relu}/2",
    ]
    # the mean and variance of _ln are measured with its layer
    assert stats["blocks/0/ln"].equations == 12  # mean, var, normalize, affine


def test_range_used_of_large_float32_activations():
    # 4e37 is 12% of the float32 range; `max_abs / dtype max` compiled into a
    # multiply by a denormal reciprocal, flushed to 0 on CPU ("0% of the
    # float32 range" beside "max |x| = 4e+37").
    def f(w, x):
        return jnp.sum(jnp.tanh(x @ w))

    stats = jaxnan.activation_stats(f)(jnp.full((4, 4), 1e37), jnp.ones((2, 4)))
    (s,) = stats.values()
    np.testing.assert_allclose(s.range_used, 4e37 / np.finfo(np.float32).max, rtol=1e-5)
    assert "max |x| = 4e+37, 12% of the float32 range" in str(s)
