"""activation_stats on a stack of layers under scan, one layer per iteration.

The models are written as the Flax NNX guide ("Scan over layers": a stack
made by `nnx.vmap`, run by `nnx.scan`), Flax linen (`nn.scan`), Equinox
(`eqx.filter_vmap` plus `lax.scan`) and plain JAX write them. Each test
computes every layer by hand and compares the statistics of each iteration.
"""

import dataclasses
import inspect as pyinspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.extend import core as jex_core

import jaxnan

nnx = pytest.importorskip("flax.nnx")
nn = pytest.importorskip("flax.linen")
eqx = pytest.importorskip("equinox")

from tests import nnx_stack  # noqa: E402

L, D = 4, 5
X = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3)), jnp.float32)


def _here(fn, text, inner=""):
    """`test_inspect_activation_scan.py:LINE (qualname)` of the line with `text`.

    `inner`: the name of the function inside `fn` that holds the line.
    """
    lines, start = pyinspect.getsourcelines(fn)
    k = next(i for i, line in enumerate(lines) if text in line)
    name = f"{fn.__qualname__}.<locals>.{inner}" if inner else fn.__qualname__
    return f"test_inspect_activation_scan.py:{start + k} ({name})"


def _host(tree):
    """A pytree's arrays on the host (PRNG keys as their key data)."""

    def get(a):
        if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
            a = jax.random.key_data(a)
        return np.asarray(a)

    return jax.tree_util.tree_map(get, tree)


def _max_abs(*xs):
    return max(float(jnp.max(jnp.abs(x))) for x in xs)


def _check(s, intermediates, out):
    """A layer's statistics are those of its intermediates and its output."""
    assert float(s.max_abs) == _max_abs(*intermediates)
    np.testing.assert_allclose(s.mean, np.mean(out), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(s.std, np.std(out), rtol=1e-5)
    # (XLA may divide the zero count as a product by 1 / size: one ulp.)
    np.testing.assert_allclose(
        s.zero_fraction, np.mean(np.asarray(out) == 0), rtol=1e-7
    )
    assert int(s.nonfinite) == 0 and s.equations == len(intermediates)


# -- Flax NNX: nnx.vmap builds the stack, nnx.scan runs it ---------------------
# (as flax/examples/nnx_toy_examples/06_scan_over_layers.py writes it)


class Block(nnx.Module):
    def __init__(self, dim, *, rngs):
        self.linear = nnx.Linear(dim, dim, rngs=rngs)
        self.bn = nnx.BatchNorm(dim, rngs=rngs)
        self.dropout = nnx.Dropout(0.5, rngs=rngs)

    def __call__(self, x):
        return jax.nn.gelu(self.dropout(self.bn(self.linear(x))))


class ScanMLP(nnx.Module):
    def __init__(self, *, rngs):
        self.embed = nnx.Linear(3, D, rngs=rngs)

        self.layers = nnx_stack.stack(lambda r: Block(D, rngs=r), L, rngs)

    def __call__(self, x):
        return nnx_stack.run(self.layers, self.embed(x))


def _fields(s):
    """A LayerStats' array fields, then its static ones."""
    values = [getattr(s, f.name) for f in dataclasses.fields(s)]
    arrays = [np.asarray(v) for v in values if not isinstance(v, (str, int))]
    return arrays, [v for v in values if isinstance(v, (str, int))]


def test_nnx_scan_over_an_nnx_vmap_stack_gives_one_layer_per_iteration():
    model = ScanMLP(rngs=nnx.Rngs(0))
    model.eval()  # deterministic dropout and batch norm
    before = _host(nnx.state(model))
    stats = jaxnan.activation_stats(model)(X)
    gelu = _here(Block.__call__, "jax.nn.gelu")
    per_block = ["linear", "bn", gelu]
    want = ["embed"] + [f"layers/{i}/{n}" for i in range(L) for n in per_block]
    assert list(stats) == want
    graphdef, state = nnx.split(model.layers)
    h = model.embed(X)
    for i in range(L):
        block = nnx.merge(graphdef, jax.tree_util.tree_map(lambda a, i=i: a[i], state))
        # iteration i measures exactly what block i measures alone
        alone = jaxnan.activation_stats(block)(h)
        assert list(alone) == per_block
        for n in per_block:
            (got, got_static), (ref, ref_static) = (
                _fields(stats[f"layers/{i}/{n}"]),
                _fields(alone[n]),
            )
            assert got_static == ref_static
            for g, r in zip(got, ref):
                np.testing.assert_allclose(g, r, rtol=1e-6)
        dot = h @ block.linear.kernel[...]
        z = dot + block.linear.bias[...]
        _check(stats[f"layers/{i}/linear"], [dot, z], z)
        h = block(h)
    np.testing.assert_allclose(h, model(X), rtol=1e-6)  # eager vs scanned: ulps
    jax.tree_util.tree_map(
        np.testing.assert_array_equal, before, _host(nnx.state(model))
    )
    # In training mode the loop updates batch statistics and RNG counts: the
    # model keeps its own.
    model.train()
    before = _host(nnx.state(model))
    assert len(jaxnan.activation_stats(model)(X)) == len(want)
    jax.tree_util.tree_map(
        np.testing.assert_array_equal, before, _host(nnx.state(model))
    )


# -- Flax linen: nn.scan ---------------------------------------------------


class LinenBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        x = nn.Dense(D)(x)
        return nn.relu(x), None


class LinenStack(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(D, name="embed")(x)
        scanned = nn.scan(
            LinenBlock,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=L,
        )
        x, _ = scanned(name="layers")(x, None)
        return x


def test_linen_nn_scan_gives_one_layer_per_iteration():
    model = LinenStack()
    variables = model.init(jax.random.key(0), X)
    stats = jax.jit(jaxnan.activation_stats(model.apply, variables))(X)
    layer = [f"LinenStack/layers/{i}" for i in range(L)]
    want = ["LinenStack/embed"] + [n for p in layer for n in (f"{p}/Dense_0", p)]
    assert list(stats) == want
    p = variables["params"]
    h = X @ p["embed"]["kernel"] + p["embed"]["bias"]
    dense = p["layers"]["Dense_0"]
    for i in range(L):
        dot = h @ dense["kernel"][i]
        z = dot + dense["bias"][i]
        h = jax.nn.relu(z)
        _check(stats[f"{layer[i]}/Dense_0"], [dot, z], z)
        _check(stats[layer[i]], [h], h)
    np.testing.assert_allclose(h, model.apply(variables, X), rtol=1e-6)


# -- Equinox: eqx.filter_vmap builds the stack, lax.scan runs it -------------


class EqxStack(eqx.Module):
    layers: eqx.nn.Linear
    head: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        make = lambda k: eqx.nn.Linear(D, D, key=k)  # noqa: E731
        self.layers = eqx.filter_vmap(make)(jax.random.split(k1, L))
        self.head = eqx.nn.Linear(D, 2, key=k2)

    def __call__(self, x):
        dynamic, static = eqx.partition(self.layers, eqx.is_array)

        def f(x, dynamic_layer):
            layer = eqx.combine(dynamic_layer, static)
            return jnp.tanh(layer(x)), None

        x, _ = lax.scan(f, x, dynamic)
        return self.head(x)


def test_equinox_filter_vmap_stack_under_lax_scan():
    model = EqxStack(jax.random.key(0))
    x = jnp.linspace(-1.0, 1.0, D)
    stats = jaxnan.activation_stats(model)(x)
    tanh = _here(EqxStack.__call__, "jnp.tanh", "f")
    layers = [n for i in range(L) for n in (f"layers/{i}", f"layers/{i}/{tanh}")]
    assert list(stats) == [*layers, "head"]
    h = x
    w, b = model.layers.weight, model.layers.bias
    for i in range(L):
        dot = w[i] @ h
        z = dot + b[i]
        h = jnp.tanh(z)
        _check(stats[f"layers/{i}"], [dot, z], z)
        _check(stats[f"layers/{i}/{tanh}"], [h], h)
    np.testing.assert_allclose(model.head(h), model(x), rtol=1e-6)


# -- plain lax.scan over stacked parameters ---------------------------------


def stack_net(params, x, reverse=False):
    def body(h, p):
        with jax.named_scope("dense"):
            z = h @ p["w"] + p["b"]
        return jnp.tanh(z), None

    h, _ = lax.scan(body, x, params["layers"], reverse=reverse)
    with jax.named_scope("out"):
        return h @ params["out"]


def _stack_params(scale=0.5):
    rng = np.random.default_rng(1)
    w = rng.normal(size=(L, 3, 3)).astype(np.float32) * scale
    b = rng.normal(size=(L, 3)).astype(np.float32)
    return {"layers": {"w": w, "b": b}, "out": np.ones((3, 1), np.float32)}


def _by_hand(params, x, order):
    """Per layer index: (x @ w, its + b, its tanh)."""
    h, out = x, {}
    for i in order:
        dot = h @ params["layers"]["w"][i]
        z = dot + params["layers"]["b"][i]
        h = jnp.tanh(z)
        out[i] = (dot, z, h)
    return out


@pytest.mark.parametrize("reverse", [False, True])
def test_plain_lax_scan_layers_in_the_order_they_run(reverse):
    params = _stack_params()
    stats = jaxnan.activation_stats(lambda p, x: stack_net(p, x, reverse))(params, X)
    tanh = _here(stack_net, "jnp.tanh", "body")
    order = list(range(L))[::-1] if reverse else list(range(L))
    want = [n for i in order for n in (f"layers/{i}/dense", f"layers/{i}/{tanh}")]
    assert list(stats) == [*want, "out"]
    for i, (dot, z, h) in _by_hand(params, X, order).items():
        _check(stats[f"layers/{i}/dense"], [dot, z], z)
        _check(stats[f"layers/{i}/{tanh}"], [h], h)


def test_gradients_of_a_scan_over_layers_are_per_iteration_too():
    params = _stack_params()

    def loss(p, x):
        return jnp.sum(stack_net(p, x) ** 2)

    stats = jaxnan.activation_stats(jax.grad(loss))(params, X)
    forward = [k for k in stats if stats[k].phase == "forward"]
    backward = [k for k in stats if stats[k].phase == "backward"]
    assert forward[: 2 * L : 2] == [f"layers/{i}/dense" for i in range(L)]
    # the transposed scan runs from the last layer to the first
    dense_grads = [k for k in backward if k.endswith("/dense (grad)")]
    assert dense_grads == [f"layers/{i}/dense (grad)" for i in reversed(range(L))]
    assert backward.index("out (grad)") < backward.index(dense_grads[0])


def test_the_iteration_where_a_nonfinite_activation_first_appears_is_named():
    params = _stack_params()
    params["layers"]["w"][2, 0, 0] = np.inf  # layer 2's matmul: inf, then nan
    stats = jaxnan.activation_stats(stack_net)(params, X)
    assert stats.first_nonfinite() == "layers/2/dense"
    assert [int(stats[f"layers/{i}/dense"].nonfinite) for i in range(2)] == [0, 0]
    by_hand = _by_hand(params, X, range(L))
    dot, z, _ = by_hand[2]
    bad = int(jnp.sum(~jnp.isfinite(dot)) + jnp.sum(~jnp.isfinite(z)))
    assert bad > 0 and int(stats["layers/2/dense"].nonfinite) == bad
    assert float(stats["layers/1/dense"].max_abs) == _max_abs(*by_hand[1][:2])


def test_a_scan_over_time_without_stacked_parameters_stays_one_equation():
    def rnn(params, xs):
        def cell(h, x):
            return jnp.tanh(h @ params["w"] + x), h

        h, _ = lax.scan(cell, jnp.zeros(3), xs)
        return h

    xs = jnp.ones((6, 3))
    stats = jaxnan.activation_stats(rnn)({"w": jnp.eye(3)}, xs)
    scan = _here(rnn, "lax.scan(cell")
    assert list(stats) == [scan]
    assert stats[scan].equations == 1


def test_a_stack_called_twice_keeps_each_call_apart():
    params = _stack_params(scale=0.1)

    def twice(p, x):
        with jax.named_scope("a"):
            x = stack_net(p, x)[:, :1] * jnp.ones((1, 3))
        with jax.named_scope("b"):
            return stack_net(p, x)

    stats = jaxnan.activation_stats(twice)(params, X)
    assert "a/layers/0/dense" not in stats  # the scan's scope is the stack's
    assert [k for k in stats if k.endswith("/0/dense")] == ["a/0/dense", "b/0/dense"]


def test_a_stack_that_is_the_whole_parameter_tree():
    # Top-level stacked arrays name no layer: still a scan over layers.
    def net(stack, x):
        def body(h, p):
            return jnp.tanh(h @ p["w"]), None

        return lax.scan(body, x, stack)[0]

    stack = {"w": _stack_params()["layers"]["w"]}
    stats = jaxnan.activation_stats(net)(stack, X)
    line = _here(net, "jnp.tanh", "body")
    assert list(stats) == [f"{i}/{line}" for i in range(L)]
    h = X
    for i in range(L):
        dot = h @ stack["w"][i]
        h = jnp.tanh(dot)
        assert float(stats[f"{i}/{line}"].max_abs) == _max_abs(dot, h)


def test_a_scan_body_computes_the_moments_of_each_layer_output_only():
    # One layer of three intermediates per iteration: three fused max/count
    # reductions in the loop body, and the four sums of the output's moments
    # (finite count, sum, squared deviations, zeros) once, for its last
    # value: XLA does not drop unused loop outputs' work.
    def net(params, x):
        def body(h, p):
            with jax.named_scope("block"):
                return jnp.tanh(h @ p["w"] + p["b"]), None

        return lax.scan(body, x, params)[0]

    params = _stack_params()["layers"]
    closed = jax.make_jaxpr(jaxnan.activation_stats(net))(params, X)

    def eqns(jaxpr):
        for e in jaxpr.eqns:
            yield e
            for sub in jex_core.jaxprs_in_params(e.params):
                yield from eqns(sub)

    def count(jaxpr, name):
        return sum(e.primitive.name == name for e in eqns(jaxpr))

    (scan,) = [e for e in eqns(closed.jaxpr) if e.primitive.name == "scan"]
    body = scan.params["jaxpr"].jaxpr

    assert count(body, "reduce") == 3
    assert count(body, "reduce_sum") == 4
    stats = jaxnan.activation_stats(net)(params, X)
    assert list(stats) == [f"block/{i}" for i in range(L)]
