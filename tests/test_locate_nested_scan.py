"""A scan over layers nested inside another loop: locate and activation_stats.

Gradient accumulation runs `jax.value_and_grad` of a scan-over-layers model
inside a `lax.scan` (or `nnx.scan`) over microbatches, the parameters closed
over; Flax linen nests an `nn.scan` of sublayers inside an `nn.scan` of
blocks. Layer 3 of the stack takes the square root of its activations: made
negative there, the forward pass makes a NaN; made exactly zero, the forward
pass is finite and the gradient (``0.5 / sqrt(0)``) is not. The Diagnosis
names the layer as `jaxnan.activation_stats` does (``3/...``, the inner
iteration in the name), and its report measures that microbatch and that
layer: the statistics `activation_stats` gives the same model on that one
microbatch.
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

from tests import nnx_stack  # noqa: E402

L, D, BAD, M = 5, 4, 3, 3
FILE = os.path.basename(__file__)
# microbatch k holds values in (k + 1) * [0.5, 1): each one's statistics differ
XS = jnp.asarray(
    np.random.default_rng(0).uniform(0.5, 1.0, size=(M, 2, D))
    * np.arange(1, M + 1, dtype=np.float32)[:, None, None],
    jnp.float32,
)


def _line(fn, text):
    """The line number in this file of the line of `fn` holding `text`."""
    lines, start = pyinspect.getsourcelines(fn)
    return start + next(i for i, line in enumerate(lines) if text in line)


def _site(fn, text, inner=""):
    """`test_locate_nested_scan.py:LINE (qualname)`, a layer named by its line."""
    name = f"{fn.__qualname__}.<locals>.{inner}" if inner else fn.__qualname__
    return f"{FILE}:{_line(fn, text)} ({name})"


def _kernels(kind):
    """0.1 * identity per layer; zero in layer BAD for exactly-zero activations."""
    k = np.broadcast_to(0.1 * np.eye(D, dtype=np.float32), (L, D, D)).copy()
    if kind == "zero":
        k[BAD] = 0.0
    return k


def _biases(kind):
    """Per layer: 2.0 (positive activations); layer BAD: -5 or 0 (`kind`)."""
    b = np.full((L, D), 2.0, np.float32)
    b[BAD] = {"negative": -5.0, "zero": 0.0}[kind]
    return b


def _lines(stats, layer):
    """The report's layer lines for `layer` of an `activation_stats` result."""
    lines = [f"activations of `{layer}`: {stats[layer]}"]
    grad = stats.get(layer + " (grad)")
    if grad is not None:
        lines.append(f"gradients of `{layer}`: {str(grad).replace('|x|', '|g|')}")
    return "\n".join(lines)


def _check(d, layer, fn, text, phase, single, iteration=(0, BAD)):
    """The Diagnosis names `layer` at `fn`'s `text` line in `iteration`.

    Its layer lines are those of `single`, the `activation_stats` of the
    same model on the one microbatch (or block) of the event.
    """
    assert d.found and d.phase == phase
    assert (d.file, d.line) == (__file__, _line(fn, text))
    assert d.iteration == iteration
    assert d.layer == layer
    assert d.layer_stats == _lines(single, layer)
    assert f"  iteration: {iteration}\n" in str(d)


# -- plain JAX: lax.scan over microbatches around lax.scan over layers ------


def model(params, x):
    def body(h, p):
        w, bb = p
        return jnp.sqrt(h @ w + bb), None

    h, _ = lax.scan(body, x, params)
    return h.sum()


def accum(params, xs):
    def micro(acc, x):
        loss, g = jax.value_and_grad(model)(params, x)
        return jax.tree_util.tree_map(jnp.add, acc, g), loss

    g, losses = lax.scan(micro, jax.tree_util.tree_map(jnp.zeros_like, params), xs)
    return losses.mean(), g


def _params(kind):
    return jnp.asarray(_kernels(kind)), jnp.asarray(_biases(kind))


@pytest.mark.parametrize("kind", ["negative", "zero"])
def test_gradient_accumulation_names_the_microbatch_and_the_layer(kind):
    params = _params(kind)
    d = jaxnan.locate(accum)(params, XS)
    single = jaxnan.activation_stats(jax.value_and_grad(model))(params, XS[0])
    layer = f"{BAD}/{_site(model, 'jnp.sqrt', 'body')}"
    phase = "forward" if kind == "negative" else "backward"
    _check(d, layer, model, "jnp.sqrt", phase, single)
    assert single.get(layer + " (grad)") is not None
    if kind == "zero":
        # sqrt(0) is 0: only its derivative 0.5 / sqrt(0), computed forward
        assert int(single[layer].nonfinite) == XS[0].size
        assert int(single[layer + " (grad)"].nonfinite) > 0


def test_activation_stats_reduces_each_layer_over_the_microbatches():
    params = _params("negative")
    stats = jaxnan.activation_stats(accum)(params, XS)
    per = [
        jaxnan.activation_stats(jax.value_and_grad(model))(params, XS[k])
        for k in range(M)
    ]
    sqrt = _site(model, "jnp.sqrt", "body")
    layers = [f"{i}/{sqrt}" for i in range(L)]
    grads = [f"{i}/{sqrt} (grad)" for i in reversed(range(L))]
    inner = [*layers, _site(model, "h.sum()"), *grads]
    assert [k for k in stats if k in inner] == inner == list(per[0])
    assert stats.first_nonfinite() == f"{BAD}/{sqrt}"
    for key in inner:
        s, ones = stats[key], [p[key] for p in per]
        # the largest of the maxima, the sum of the counts
        assert float(s.max_abs) == max(float(o.max_abs) for o in ones)
        assert float(s.headroom) == min(float(o.headroom) for o in ones)
        assert int(s.nonfinite) == sum(int(o.nonfinite) for o in ones)
        assert s.equations == ones[0].equations and s.phase == ones[0].phase
        # the moments of the layer's last output: the last microbatch's
        last = ones[-1]
        for f in ("mean", "std", "zero_fraction"):
            np.testing.assert_array_equal(getattr(s, f), getattr(last, f))
    # every entry of the sqrt and of its derivative 0.5 / sqrt, per microbatch
    assert int(stats[f"{BAD}/{sqrt}"].nonfinite) == 2 * XS.size


def test_a_gradient_nan_in_a_microbatch_is_backward():
    """Only the accumulated gradients go nonfinite (the losses stay finite):
    the loop over microbatches gives both, and the report is the backward
    pass's, as for `jax.value_and_grad(model)` on one microbatch."""
    d = jaxnan.locate(accum)(_params("zero"), XS)
    single = jaxnan.locate(jax.value_and_grad(model))(_params("zero"), XS[0])
    assert d.phase == single.phase == "backward"
    assert (
        (d.primitive, d.cause)
        == (single.primitive, single.cause)
        == ("div", "unsafe_op")
    )
    line = _line(model, "jnp.sqrt")
    where = str(d).split("\n")[1]
    assert where.startswith("  where:   gradient of `jnp.sqrt` at ")
    assert where.endswith(f"{FILE}:{line}") and d.line == line
    assert d.nonfinite_outputs.keys() == {"output[1][0]", "output[1][1]"}


def test_a_reversed_loop_over_microbatches_takes_the_moments_of_the_first():
    def rev_accum(params, xs):
        def micro(acc, x):
            return acc + model(params, x), None

        return lax.scan(micro, 0.0, xs, reverse=True)[0]

    params = _params("negative")
    stats = jaxnan.activation_stats(rev_accum)(params, XS)
    first = jaxnan.activation_stats(model)(params, XS[0])
    key = f"0/{_site(model, 'jnp.sqrt', 'body')}"
    np.testing.assert_array_equal(stats[key].mean, first[key].mean)


def log_accum(params, xs, c):
    def micro(acc, x):
        return acc + model(params, x) + jnp.log(c - jnp.sum(x)), None

    return lax.scan(micro, 0.0, xs)[0]


def test_an_event_outside_the_stack_measures_its_own_microbatch():
    # the sums grow with the microbatch: c - sum < 0 from microbatch 1 on
    params = _params("negative")
    params = (params[0], jnp.abs(params[1]))  # a finite stack
    c = (jnp.sum(XS[0]) + jnp.sum(XS[1])) / 2
    d = jaxnan.locate(log_accum)(params, XS, c)
    site = _site(log_accum, "jnp.log(c", "micro")
    assert (d.primitive, d.iteration, d.layer) == ("log", (1,), site)
    stats = jaxnan.activation_stats(log_accum)(params, XS, c)
    # microbatch 1: the log and the add of it; microbatch 2 starts from a
    # NaN total: its conversion (of the weakly typed carry) and both adds too
    assert int(stats[site].nonfinite) == 2 + 4
    # the report's line: microbatch 1 alone; its finite values are the sum,
    # c - sum and acc + loss (acc: microbatch 0's total)
    acc = model(params, XS[0]) + jnp.log(c - jnp.sum(XS[0]))
    finite = [jnp.sum(XS[1]), c - jnp.sum(XS[1]), acc + model(params, XS[1])]
    mag = max(abs(float(v)) for v in finite)
    assert d.layer_stats.startswith(f"activations of `{site}`: max |x| = {mag:.3g}")
    assert d.layer_stats.endswith(", 2 nonfinite")


def fori_accum(params, xs):
    def micro(k, acc):
        return acc + model(params, xs[k])

    return lax.fori_loop(0, M, micro, 0.0)  # static bounds: a scan


def test_a_fori_loop_over_microbatches_names_the_layer():
    params = _params("negative")
    d = jaxnan.locate(fori_accum)(params, XS)
    single = jaxnan.activation_stats(model)(params, XS[0])
    layer = f"{BAD}/{_site(model, 'jnp.sqrt', 'body')}"
    _check(d, layer, model, "jnp.sqrt", "forward", single)


def remat_model(params, x):
    @jax.checkpoint
    def body(h, p):
        w, bb = p
        return jnp.sqrt(h @ w + bb), None

    h, _ = lax.scan(body, x, params)
    return h.sum()


def remat_accum(params, xs):
    def micro(acc, x):
        return acc + jax.grad(remat_model)(params, x)[1], None

    return lax.scan(micro, jnp.zeros((L, D)), xs)[0]


@pytest.mark.parametrize("kind", ["negative", "zero"])
def test_a_checkpointed_stack_recomputes_its_layer_in_its_gradients(kind):
    # jax.checkpoint's recomputation in the backward pass runs in a scope
    # `rematted_computation`: no layer of the model's, the layer's gradients
    params = _params(kind)
    d = jaxnan.locate(remat_accum)(params, XS)
    single = jaxnan.activation_stats(jax.grad(remat_model))(params, XS[0])
    layer = f"{BAD}/{_site(remat_model, 'jnp.sqrt', 'body')}"
    assert (d.iteration, d.layer) == ((0, BAD), layer)
    assert d.layer_stats == _lines(single, layer)
    stats = jaxnan.activation_stats(remat_accum)(params, XS)
    assert not [k for k in stats if "rematted" in k]
    grads = [f"{i}/{_site(remat_model, 'jnp.sqrt', 'body')} (grad)" for i in range(L)]
    assert sorted(k for k in stats if k.endswith(" (grad)")) == grads


# -- a scan over layers inside a scan over layers, by hand --------------------

S = 2  # sublayers per block


def nested(params, x):
    def block(h, p):
        def sub(h, q):
            with jax.named_scope("dense"):
                z = h @ q["w"] + q["b"]
            return jnp.tanh(z), None

        with jax.named_scope("sub"):
            h, _ = lax.scan(sub, h, p)
        return h, None

    with jax.named_scope("blocks"):
        h, _ = lax.scan(block, x, params)
    return h


def test_a_stack_in_a_stack_names_both_indices_with_their_own_values():
    rng = np.random.default_rng(1)
    params = {
        "w": jnp.asarray(rng.normal(size=(L, S, D, D)), jnp.float32),
        "b": jnp.asarray(rng.normal(size=(L, S, D)), jnp.float32),
    }
    stats = jaxnan.activation_stats(nested)(params, XS[0])
    want, h = [], XS[0]
    for i in range(L):
        for j in range(S):
            mm = h @ params["w"][i, j]
            z = mm + params["b"][i, j]
            h = jnp.tanh(z)
            dense, act = f"blocks/{i}/sub/{j}/dense", f"blocks/{i}/sub/{j}"
            want += [dense, act]
            mag = max(float(jnp.max(jnp.abs(mm))), float(jnp.max(jnp.abs(z))))
            assert float(stats[dense].max_abs) == mag
            assert float(stats[act].max_abs) == float(jnp.max(jnp.abs(h)))
            np.testing.assert_array_equal(stats[act].mean, jnp.mean(h))
    assert list(stats) == want


# -- a loop over time without a stack keeps its report -----------------------


def rnn_accum(params, xs):
    def micro(acc, x):
        def cell(h, xt):
            h = jnp.tanh(h @ params["w"] + xt)
            return h, jnp.log(h)

        return acc + jnp.sum(lax.scan(cell, jnp.full(D, 0.5), x)[1]), None

    return lax.scan(micro, 0.0, xs)[0]


def test_a_loop_over_time_inside_a_loop_keeps_its_report():
    xs = np.ones((M, 6, D), np.float32)
    xs[1, 4] = -3.0  # microbatch 1, step 4: tanh < 0, then log of a negative
    params = {"w": jnp.eye(D)}
    d = jaxnan.locate(rnn_accum)(params, jnp.asarray(xs))
    assert (d.primitive, d.line) == ("log", _line(rnn_accum, "jnp.log(h)"))
    assert d.iteration == (1, 4)
    assert d.layer is None and d.layer_stats is None
    stats = jaxnan.activation_stats(rnn_accum)(params, jnp.asarray(xs))
    # both loops measured on their outputs, as one equation each
    assert list(stats) == [_site(rnn_accum, "lax.scan(micro")]
    assert stats[list(stats)[0]].equations == 1


# -- Flax NNX: nnx.scan over microbatches around nnx.scan over layers --------
# (the stack as flax/examples/nnx_toy_examples/06_scan_over_layers.py writes it)


class Block(nnx.Module):
    def __init__(self, dim, *, rngs):
        self.linear = nnx.Linear(dim, dim, rngs=rngs)

    def __call__(self, x):
        return jnp.sqrt(self.linear(x))


class ScanMLP(nnx.Module):
    def __init__(self, *, rngs):
        self.layers = nnx_stack.stack(lambda r: Block(D, rngs=r), L, rngs)

    def __call__(self, x):
        return nnx_stack.run(self.layers, x)


def nnx_loss(model, x):
    return jnp.mean(model(x))


def nnx_accum(model, xs):
    grad_fn = nnx.value_and_grad(nnx_loss)

    @nnx.scan(in_axes=(None, nnx.Carry, 0), out_axes=(nnx.Carry, 0))
    def micro(model, acc, x):
        loss, g = grad_fn(model, x)
        return jax.tree_util.tree_map(jnp.add, acc, g), loss

    zeros = jax.tree_util.tree_map(jnp.zeros_like, nnx.state(model, nnx.Param))
    g, losses = micro(model, zeros, xs)
    return losses.mean(), g


def _nnx_model(kind):
    model = ScanMLP(rngs=nnx.Rngs(0))
    model.layers.linear.kernel[...] = jnp.asarray(_kernels(kind))
    model.layers.linear.bias[...] = jnp.asarray(_biases(kind))
    return model


@pytest.mark.parametrize("kind", ["negative", "zero"])
def test_nnx_gradient_accumulation_names_the_microbatch_and_the_layer(kind):
    model = _nnx_model(kind)
    d = jaxnan.locate(nnx_accum)(model, XS)
    single = jaxnan.activation_stats(nnx.value_and_grad(nnx_loss))(model, XS[0])
    layer = f"layers/{BAD}/{_site(Block.__call__, 'jnp.sqrt')}"
    phase = "forward" if kind == "negative" else "backward"
    _check(d, layer, Block.__call__, "jnp.sqrt", phase, single)
    stats = jaxnan.activation_stats(nnx_accum)(model, XS)
    per = [
        jaxnan.activation_stats(nnx.value_and_grad(nnx_loss))(model, XS[k])
        for k in range(M)
    ]
    for key in (layer, layer + " (grad)"):
        assert int(stats[key].nonfinite) == sum(int(p[key].nonfinite) for p in per)
        assert float(stats[key].max_abs) == max(float(p[key].max_abs) for p in per)
    first = layer if kind == "negative" else layer + " (grad)"
    assert int(stats[first].nonfinite) > 0


# -- Flax linen: nn.scan of blocks, each an nn.scan of sublayers -------------


class LinenSub(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        x = nn.Dense(D)(x)
        return jnp.sqrt(x), None


class LinenBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        sub = nn.scan(
            LinenSub, variable_axes={"params": 0}, split_rngs={"params": True}, length=S
        )
        x, _ = sub(name="sub")(x, None)
        return x, None


class LinenStack(nn.Module):
    @nn.compact
    def __call__(self, x):
        blocks = nn.scan(
            LinenBlock,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=L,
        )
        x, _ = blocks(name="blocks")(x, None)
        return jnp.mean(x)


def _linen_variables(kind):
    variables = LinenStack().init(jax.random.key(0), XS[0])
    dense = variables["params"]["blocks"]["sub"]["Dense_0"]
    k = np.broadcast_to(0.1 * np.eye(D, dtype=np.float32), (L, S, D, D)).copy()
    b = np.full((L, S, D), 2.0, np.float32)
    b[BAD, 1] = {"negative": -5.0, "zero": 0.0}[kind]
    if kind == "zero":
        k[BAD, 1] = 0.0
    dense["kernel"], dense["bias"] = jnp.asarray(k), jnp.asarray(b)
    return variables


@pytest.mark.parametrize("kind", ["negative", "zero"])
def test_linen_nested_nn_scan_names_block_and_sublayer(kind):
    variables = _linen_variables(kind)
    apply = LinenStack().apply
    fn = apply if kind == "negative" else jax.value_and_grad(apply)
    d = jaxnan.locate(fn)(variables, XS[0])
    stats = jaxnan.activation_stats(fn)(variables, XS[0])
    # the sqrt is the scanned sublayer's own code: named by its scope
    layer = f"LinenStack/blocks/{BAD}/sub/1"
    phase = "forward" if kind == "negative" else "backward"
    _check(d, layer, LinenSub.__call__, "jnp.sqrt", phase, stats, (BAD, 1))
    names = [f"LinenStack/blocks/{i}/sub/{j}" for i in range(L) for j in range(S)]
    assert [k for k in stats if " (grad)" not in k and "Dense" not in k][
        : L * S
    ] == names
    expect = f"{layer} (grad)" if kind == "zero" else layer
    if kind == "negative":
        assert stats.first_nonfinite() == expect
    assert int(stats[expect].nonfinite) > 0
    assert int(stats[f"LinenStack/blocks/{BAD}/sub/0"].nonfinite) == 0
