"""locate names the layer and iteration of an event inside a scan over layers.

The models are written as the Flax NNX guide ("Scan over layers": a stack
made by `nnx.vmap`, run by `nnx.scan`), Flax linen (`nn.scan`) and Equinox
(`eqx.filter_vmap` plus `lax.scan`) write them. Block 3 of each stack takes
the square root of its activations: made negative there, the forward pass
makes a NaN; made exactly zero, the forward pass is finite and the gradient
(``0.5 / sqrt(0)``) is not. The Diagnosis names the layer as
`jaxnan.activation_stats` does (``layers/3/...``), with the iteration, and
its report measures that iteration alone.
"""

import inspect as pyinspect
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jaxnan

nnx = pytest.importorskip("flax.nnx")
nn = pytest.importorskip("flax.linen")
eqx = pytest.importorskip("equinox")

from tests import nnx_stack  # noqa: E402

L, D, BAD = 5, 4, 3
X = jnp.asarray(np.random.default_rng(0).uniform(0.5, 1.0, size=(2, D)), jnp.float32)
FILE = os.path.basename(__file__)


def _line(fn, text):
    """The line number in this file of the line of `fn` holding `text`."""
    lines, start = pyinspect.getsourcelines(fn)
    return start + next(i for i, line in enumerate(lines) if text in line)


def _site(fn, text, inner=""):
    """`test_locate_scan_layers.py:LINE (qualname)`, a layer named by its line."""
    name = f"{fn.__qualname__}.<locals>.{inner}" if inner else fn.__qualname__
    return f"{FILE}:{_line(fn, text)} ({name})"


def _biases(kind):
    """Per layer: 2.0 (positive activations); layer BAD: -5 or 0 (`kind`)."""
    b = np.full((L, D), 2.0, np.float32)
    b[BAD] = {"negative": -5.0, "zero": 0.0}[kind]
    return b


def _kernels(kind, transpose=False):
    """0.1 * identity per layer; zero in layer BAD for exactly-zero activations."""
    k = np.broadcast_to(0.1 * np.eye(D, dtype=np.float32), (L, D, D)).copy()
    if kind == "zero":
        k[BAD] = 0.0
    return np.swapaxes(k, 1, 2) if transpose else k


def _check(d, stats, layer, fn, text, phase, first=None):
    """The Diagnosis names `layer` at `fn`'s `text` line, in iteration BAD.

    Its report's layer line is the statistics `activation_stats` gives that
    layer (and, under a gradient, its gradients); `first` is the layer key
    `activation_stats` finds nonfinite first (default: `layer`).
    """
    assert d.found and d.phase == phase
    assert (d.file, d.line) == (__file__, _line(fn, text))
    assert d.iteration == (BAD,)
    assert d.layer == layer
    assert stats.first_nonfinite() == (first or layer)
    lines = [f"activations of `{layer}`: {stats[layer]}"]
    grad = stats.get(layer + " (grad)")
    if grad is not None:
        lines.append(f"gradients of `{layer}`: {str(grad).replace('|x|', '|g|')}")
    assert d.layer_stats == "\n".join(lines)
    assert f"  iteration: ({BAD},)\n" in str(d)
    assert f"  {lines[0]}\n" in str(d)
    return grad


# -- Flax NNX: nnx.vmap builds the stack, nnx.scan runs it ---------------------
# (as flax/examples/nnx_toy_examples/06_scan_over_layers.py writes it)


class Block(nnx.Module):
    def __init__(self, dim, *, rngs):
        self.linear = nnx.Linear(dim, dim, rngs=rngs)
        self.bn = nnx.BatchNorm(dim, rngs=rngs)
        self.dropout = nnx.Dropout(0.5, rngs=rngs)

    def __call__(self, x):
        h = self.dropout(self.bn(self.linear(x)))
        return jnp.sqrt(h)


class ScanMLP(nnx.Module):
    def __init__(self, *, rngs):
        self.layers = nnx_stack.stack(lambda r: Block(D, rngs=r), L, rngs)

    def __call__(self, x):
        return nnx_stack.run(self.layers, x)


def _nnx_model(kind):
    model = ScanMLP(rngs=nnx.Rngs(0))
    model.eval()  # batch norm on its (0, 1) running statistics, no dropout
    model.layers.linear.kernel[...] = jnp.asarray(_kernels(kind))
    model.layers.linear.bias[...] = jnp.asarray(_biases(kind))
    return model


def nnx_loss(model, x):
    return jnp.mean(model(x))


def test_nnx_forward_nan_in_block_3():
    model = _nnx_model("negative")
    d = jaxnan.locate(nnx_loss)(model, X)
    stats = jaxnan.activation_stats(model)(X)
    layer = f"layers/{BAD}/{_site(Block.__call__, 'jnp.sqrt')}"
    _check(d, stats, layer, Block.__call__, "jnp.sqrt", "forward")
    assert d.primitive == "sqrt"
    assert int(stats[layer].nonfinite) == X.size


def test_nnx_backward_nan_in_block_3():
    model = _nnx_model("zero")
    grad_fn = nnx.value_and_grad(nnx_loss)
    d = jaxnan.locate(grad_fn)(model, X)
    stats = jaxnan.activation_stats(grad_fn)(model, X)
    layer = f"layers/{BAD}/{_site(Block.__call__, 'jnp.sqrt')}"
    grad = _check(d, stats, layer, Block.__call__, "jnp.sqrt", "backward")
    assert grad is not None and int(grad.nonfinite) > 0
    assert f"gradients of `{layer}`: " in str(d)


# -- Flax linen: nn.scan -----------------------------------------------------


class LinenBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        x = nn.Dense(D)(x)
        return jnp.sqrt(x), None


class LinenStack(nn.Module):
    @nn.compact
    def __call__(self, x):
        scanned = nn.scan(
            LinenBlock,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=L,
        )
        x, _ = scanned(name="layers")(x, None)
        return jnp.mean(x)


def _linen_variables(kind):
    variables = LinenStack().init(jax.random.key(0), X)
    dense = variables["params"]["layers"]["Dense_0"]
    dense["kernel"] = jnp.asarray(_kernels(kind))
    dense["bias"] = jnp.asarray(_biases(kind))
    return variables


@pytest.mark.parametrize("kind", ["negative", "zero"])
def test_linen_nan_in_layer_3(kind):
    variables = _linen_variables(kind)
    apply = LinenStack().apply
    fn = apply if kind == "negative" else jax.value_and_grad(apply)
    d = jaxnan.locate(fn)(variables, X)
    stats = jaxnan.activation_stats(fn)(variables, X)
    # the sqrt is the scanned module's own code: named by its scope
    layer = f"LinenStack/layers/{BAD}"
    phase = "forward" if kind == "negative" else "backward"
    grad = _check(d, stats, layer, LinenBlock.__call__, "jnp.sqrt", phase)
    assert (grad is None) == (kind == "negative")


# -- Equinox: eqx.filter_vmap builds the stack, lax.scan runs it -------------


class EqxStack(eqx.Module):
    layers: eqx.nn.Linear

    def __init__(self, key):
        make = lambda k: eqx.nn.Linear(D, D, key=k)  # noqa: E731
        self.layers = eqx.filter_vmap(make)(jax.random.split(key, L))

    def __call__(self, x):
        dynamic, static = eqx.partition(self.layers, eqx.is_array)

        def f(x, dynamic_layer):
            layer = eqx.combine(dynamic_layer, static)
            return jnp.sqrt(layer(x)), None

        x, _ = lax.scan(f, x, dynamic)
        return jnp.mean(x)


def _eqx_model(kind):
    model = EqxStack(jax.random.key(0))
    model = eqx.tree_at(lambda m: m.layers.weight, model, jnp.asarray(_kernels(kind)))
    return eqx.tree_at(lambda m: m.layers.bias, model, jnp.asarray(_biases(kind)))


@pytest.mark.parametrize("kind", ["negative", "zero"])
def test_equinox_nan_in_layer_3(kind):
    model = _eqx_model(kind)
    x = X[0]
    if kind == "negative":
        d = jaxnan.locate(lambda m, x: m(x))(model, x)
        stats = jaxnan.activation_stats(model)(x)
    else:
        grad_fn = eqx.filter_value_and_grad(lambda m, x: m(x))
        d = jaxnan.locate(grad_fn)(model, x)
        stats = jaxnan.activation_stats(grad_fn)(model, x)
    layer = f"layers/{BAD}/{_site(EqxStack.__call__, 'jnp.sqrt', 'f')}"
    phase = "forward" if kind == "negative" else "backward"
    grad = _check(d, stats, layer, EqxStack.__call__, "jnp.sqrt", phase)
    assert (grad is None) == (kind == "negative")


# -- plain lax.scan, run from the last layer to the first --------------------


def reversed_stack(params, x):
    def body(h, p):
        with jax.named_scope("dense"):
            z = h @ p["w"] + p["b"]
        return jnp.sqrt(z), None

    return jnp.mean(lax.scan(body, x, params, reverse=True)[0])


def test_a_reversed_scan_names_the_layer_by_its_index():
    # iteration is the index into the stacked parameters, as the name's is
    params = {"w": _kernels("negative"), "b": _biases("negative")}
    d = jaxnan.locate(reversed_stack)(params, X)
    stats = jaxnan.activation_stats(reversed_stack)(params, X)
    sqrt = _site(reversed_stack, "jnp.sqrt", "body")
    _check(d, stats, f"{BAD}/{sqrt}", reversed_stack, "jnp.sqrt", "forward")
    # layer 4 runs first, healthy: layer 3 made the NaN
    assert list(stats)[:2] == ["4/dense", f"4/{sqrt}"]
    assert int(stats[f"4/{sqrt}"].nonfinite) == 0


def relu_stack(params, x):
    def body(h, p):
        return jax.nn.relu(h @ p["w"]), None

    h, _ = lax.scan(body, x, params["layers"])
    return jnp.sum(h.astype(jnp.float32))


def test_a_gradient_that_overflows_in_layer_3s_backward():
    # float16: layer 3 maps [1, 1] to [1, 6e4] and layer 4 that to [6e4,
    # 6e4] (finite); layer 4's transpose takes the cotangent [1, 1] to [0,
    # 2], which layer 3's takes to [1.2e5, 0]: +inf, made in the transposed
    # scan (the backward pass of the stack), in iteration 3.
    w = np.broadcast_to(np.eye(2, dtype=np.float16), (L, 2, 2)).copy()
    w[BAD] = [[1.0, 6e4], [0.0, 0.0]]
    w[BAD + 1] = [[0.0, 0.0], [1.0, 1.0]]
    params = {"layers": {"w": jnp.asarray(w)}}
    x = jnp.ones(2, jnp.float16)
    grad_fn = jax.grad(relu_stack)
    d = jaxnan.locate(grad_fn)(params, x)
    stats = jaxnan.activation_stats(grad_fn)(params, x)
    layer = f"layers/{BAD}"
    grad = _check(
        d, stats, layer, relu_stack, 'h @ p["w"]', "backward", first=layer + " (grad)"
    )
    assert d.primitive == "dot_general" and d.created == (0, 1, 0)
    assert int(stats[layer].nonfinite) == 0 and float(stats[layer].max_abs) == 6e4
    assert int(grad.nonfinite) == 1
    assert int(stats[f"layers/{L - 1} (grad)"].nonfinite) == 0


# -- outside a scan: the layer as before, no iteration ------------------------


def two_layers(params, x):
    with jax.named_scope("hidden"):
        h = x @ params["w"]
    with jax.named_scope("out"):
        return jnp.sum(jnp.log(h))


def test_outside_a_scan_the_layer_is_its_activation_stats_key():
    params = {"w": -jnp.eye(D)}
    d = jaxnan.locate(two_layers)(params, X)
    stats = jaxnan.activation_stats(two_layers)(params, X)
    assert (d.primitive, d.iteration, d.layer) == ("log", None, "out")
    assert stats.first_nonfinite() == "out"
    assert d.layer_stats == f"activations of `out`: {stats['out']}"


# -- a scan over time keeps its report ------------------------------------


def rnn(params, xs):
    def cell(h, x):
        h = jnp.tanh(h @ params["w"] + x)
        return h, jnp.log(h)

    return jnp.sum(lax.scan(cell, jnp.full(D, 0.5), xs)[1])


def test_a_scan_over_time_names_the_iteration_and_no_layer():
    xs = np.ones((6, D), np.float32)
    xs[4] = -3.0  # step 4: tanh < 0, then log of a negative
    d = jaxnan.locate(rnn)({"w": jnp.eye(D)}, jnp.asarray(xs))
    assert (d.primitive, d.line) == ("log", _line(rnn, "jnp.log(h)"))
    assert d.iteration == (4,)
    assert d.layer is None and d.layer_stats is None
    assert "activations of" not in str(d) and "  iteration: (4,)\n" in str(d)
