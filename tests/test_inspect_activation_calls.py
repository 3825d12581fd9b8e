"""`activation_stats` read the way models are called, and through remat.

Models as the Flax NNX, linen and Equinox tutorials write them; each test
names the exact layers and checks a value against the model's own output.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnan

nnx = pytest.importorskip("flax.nnx")
nn = pytest.importorskip("flax.linen")
eqx = pytest.importorskip("equinox")

X = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3)), jnp.float32)


class MLP(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs):
        self.linear1 = nnx.Linear(3, 4, rngs=rngs)
        self.linear2 = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
        return self.linear2(nnx.relu(self.linear1(x)))


RELU_LINE = MLP.__call__.__code__.co_firstlineno + 1


class RematMLP(MLP):
    @nnx.remat
    def __call__(self, x):
        return self.linear2(nnx.relu(self.linear1(x)))  # under remat


REMAT_LINE = next(
    i + 1
    for i, line in enumerate(open(__file__).read().splitlines())
    if line.endswith("# under remat")
)


def max_abs(x):
    return float(jnp.max(jnp.abs(x)))


def test_nnx_module_called_as_written():
    model = MLP(rngs=nnx.Rngs(0))
    stats = jaxnan.activation_stats(model)(X)
    relu = f"test_inspect_activation_calls.py:{RELU_LINE} (MLP.__call__)"
    assert list(stats) == ["linear1", relu, "linear2"]
    assert float(stats["linear1"].max_abs) == max_abs(model.linear1(X))
    assert float(stats["linear2"].max_abs) == max_abs(model(X))
    # The same as the explicit form.
    explicit = jaxnan.activation_stats(lambda m, x: m(x))(model, X)
    assert list(explicit) == list(stats)


def test_layers_under_nnx_remat_and_jax_checkpoint():
    model = RematMLP(rngs=nnx.Rngs(0))
    stats = jaxnan.activation_stats(model)(X)
    relu = f"test_inspect_activation_calls.py:{REMAT_LINE} (RematMLP.__call__)"
    assert list(stats) == ["linear1", relu, "linear2"]
    assert float(stats[relu].max_abs) == max_abs(nnx.relu(model.linear1(X)))

    def mlp(params, x):
        h = jax.checkpoint(lambda x: jnp.tanh(x @ params["w"]))(x)
        with jax.named_scope("out"):
            return h @ params["v"]

    params = {"w": jnp.ones((3, 4)), "v": jnp.ones((4, 2))}
    got = jaxnan.activation_stats(mlp)(params, X)
    line = mlp.__code__.co_firstlineno + 1
    inner = (
        f"test_inspect_activation_calls.py:{line} "
        "(test_layers_under_nnx_remat_and_jax_checkpoint.<locals>.mlp.<locals>.<lambda>)"
    )
    assert list(got) == [inner, "out"]
    assert int(got[inner].equations) == 2  # the matmul and the tanh, inside
    # The largest |x| over what the layer computes: the matmul's output.
    assert float(got[inner].max_abs) == max_abs(X @ params["w"])
    assert float(got["out"].max_abs) == max_abs(mlp(params, X))


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(features=4)(x)
        x = nn.relu(x)
        return nn.Dense(features=2)(x)


def test_linen_apply_with_params():
    model = LinenMLP()
    variables = model.init(jax.random.key(0), X)
    stats = jaxnan.activation_stats(model.apply, variables)(X)
    # The module's own relu runs once between its Dense layers: named by it.
    assert list(stats) == ["LinenMLP/Dense_0", "LinenMLP", "LinenMLP/Dense_1"]
    out = model.apply(variables, X)
    assert float(stats["LinenMLP/Dense_1"].max_abs) == max_abs(out)


def test_equinox_module_called_as_written():
    model = eqx.nn.MLP(3, 2, 4, 1, key=jax.random.key(0))
    x = X[0]
    stats = jaxnan.activation_stats(model)(x)
    assert list(stats) == ["layers/0", "eqx.nn.MLP", "layers/1"]
    assert float(stats["layers/1"].max_abs) == max_abs(model(x))


def test_batch_taken_for_parameters_is_an_error_not_an_empty_result():
    model = MLP(rngs=nnx.Rngs(0))
    with pytest.raises(
        ValueError, match=r"params_argnums=\(0, 1\).*activation_stats\(model\)\(x\)"
    ):
        jaxnan.activation_stats(lambda m, x: m(x), params_argnums=(0, 1))(model, X)
    with pytest.raises(ValueError, match="Pass the input batch"):
        jaxnan.activation_stats(lambda p: jnp.sum(p["w"] ** 2), {"w": X})()
    with pytest.raises(ValueError, match="module and params="):
        jaxnan.activation_stats(model, {"w": X})
    # A model with no layer on the data: an empty result, no error.
    assert jaxnan.activation_stats(lambda p, x: x)({"w": X}, X) == {}


class LinenSetupOrder(nn.Module):
    """Submodules defined in another order than they are called."""

    def setup(self):
        self.head = nn.Dense(2)
        self.mid = nn.Dense(4)
        self.first = nn.Dense(4)

    def __call__(self, x):
        x = nn.relu(self.first(x))  # first's output, then the module's relu
        x = jnp.tanh(self.mid(x))  # mid's, then the module's tanh
        return self.head(x)


def _line(text):
    lines = open(__file__).read().splitlines()
    return next(i + 1 for i, line in enumerate(lines) if line.endswith(text))


def test_linen_layers_in_the_order_they_run():
    model = LinenSetupOrder()
    variables = model.init(jax.random.key(0), X)
    stats = jaxnan.activation_stats(model.apply, variables)(X)
    where = "test_inspect_activation_calls.py:{} (LinenSetupOrder.__call__)"
    relu = "LinenSetupOrder/" + where.format(_line("then the module's relu"))
    tanh = "LinenSetupOrder/" + where.format(_line("then the module's tanh"))
    names = ["LinenSetupOrder/first", relu, "LinenSetupOrder/mid", tanh]
    assert list(stats) == [*names, "LinenSetupOrder/head"]
    p = variables["params"]
    h = jax.nn.relu(X @ p["first"]["kernel"] + p["first"]["bias"])
    assert float(stats[relu].max_abs) == max_abs(h)
    t = jnp.tanh(h @ p["mid"]["kernel"] + p["mid"]["bias"])
    assert float(stats[tanh].max_abs) == max_abs(t)
    assert stats[relu].equations == stats[tanh].equations == 1


class LoopMLP(nnx.Module):
    """The NNX tutorials' loop over a list of layers, one activation line."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.layers = nnx.List([nnx.Linear(3, 3, rngs=rngs) for _ in range(3)])

    def __call__(self, x):
        for layer in self.layers:
            x = nnx.relu(layer(x))  # one line, three calls
        return x


def test_an_activation_line_run_in_a_loop_is_one_layer_per_call():
    model = LoopMLP(rngs=nnx.Rngs(0))
    model.layers[1].bias.value = jnp.full(3, jnp.inf)
    stats = jaxnan.activation_stats(model)(X)
    line = "test_inspect_activation_calls.py:{} (LoopMLP.__call__)".format(
        _line("# one line, three calls")
    )
    relus = [f"{line}/{k}" for k in (1, 2, 3)]
    assert list(stats) == [
        "layers/0",
        relus[0],
        "layers/1",
        relus[1],
        "layers/2",
        relus[2],
    ]
    # layers/1 made the Inf; the relu before it is finite.
    assert stats.first_nonfinite() == "layers/1"
    assert int(stats[relus[0]].nonfinite) == 0
    h = nnx.relu(model.layers[0](X))
    assert float(stats[relus[0]].max_abs) == max_abs(h)


def test_library_code_between_layers_is_named_by_the_module():
    # nnx.Sequential calls the activations itself: no line of the user's.
    seq = nnx.Sequential(
        nnx.Linear(3, 4, rngs=nnx.Rngs(0)),
        nnx.relu,
        nnx.Linear(4, 4, rngs=nnx.Rngs(1)),
        nnx.tanh,
        nnx.Linear(4, 2, rngs=nnx.Rngs(2)),
    )
    stats = jaxnan.activation_stats(seq)(X)
    assert list(stats) == [
        "layers/0",
        "Sequential/1",
        "layers/2",
        "Sequential/2",
        "layers/4",
    ]
    h = nnx.relu(seq.layers[0](X))
    assert float(stats["Sequential/1"].max_abs) == max_abs(h)
    # A bare layer: its parameters are top-level leaves, named by its class.
    linear = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
    assert list(jaxnan.activation_stats(linear)(X)) == ["Linear"]


class NoParams(nnx.Module):
    def __call__(self, x):
        return jnp.tanh(x)  # no parameters


def test_a_module_without_arrays_is_still_the_model():
    stats = jaxnan.activation_stats(NoParams())(X)
    line = _line("# no parameters")
    assert list(stats) == [
        f"test_inspect_activation_calls.py:{line} (NoParams.__call__)"
    ]
    # A module that computes nothing on the data: truly no layers.
    assert jaxnan.activation_stats(eqx.nn.Identity())(X) == {}


def test_a_batch_given_as_python_numbers_is_named_in_the_error():
    with pytest.raises(ValueError, match=r"no array.*jnp\.asarray"):
        jaxnan.activation_stats(lambda p, x: jnp.tanh(p * x))(jnp.ones(2), 3.0)


class LoopTanh(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs):
        self.layers = nnx.List([nnx.Linear(3, 3, rngs=rngs) for _ in range(3)])

    def __call__(self, x):
        for layer in self.layers:
            x = jnp.tanh(layer(x))  # a tanh per layer
        return x


def test_the_gradients_of_a_line_in_a_loop_carry_the_number_of_their_call():
    model = LoopTanh(rngs=nnx.Rngs(0))

    def grads(m, x):
        return jax.grad(lambda m: jnp.sum(m(x)))(m)

    stats = jaxnan.activation_stats(grads)(model, X)
    line = "test_inspect_activation_calls.py:{} (LoopTanh.__call__)".format(
        _line("# a tanh per layer")
    )
    backward = [k for k in stats if k.endswith(" (grad)")]
    # The backward pass runs the calls in reverse: the last tanh's first.
    assert backward == [
        f"{line}/3 (grad)",
        "layers/2 (grad)",
        f"{line}/2 (grad)",
        "layers/1 (grad)",
        f"{line}/1 (grad)",
    ]
    # The last call's run: tanh's derivative (1 - u) + (1 - u) u, and the
    # gradients of layers/2's bias and kernel it feeds.
    p = jnp.tanh(model.layers[1](jnp.tanh(model.layers[0](X))))
    u = jnp.tanh(model.layers[2](p))
    z = (1 - u) + (1 - u) * u
    want = max(max_abs(z), max_abs(z.sum(0)), max_abs(z.T @ p))
    assert float(stats[f"{line}/3 (grad)"].max_abs) == pytest.approx(want, rel=1e-6)


def test_the_bound_module_passed_again_is_a_clear_error():
    model = MLP(rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"activation_stats\(model\)\(x\)"):
        jaxnan.activation_stats(model)(model, X)
    linen = LinenMLP()
    variables = linen.init(jax.random.key(0), X)
    with pytest.raises(ValueError, match=r"apply_fn, params\)\(x\)"):
        jaxnan.activation_stats(linen.apply, variables)(variables, X)


class LinenBlock(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.relu(nn.Dense(3)(x))


class LinenRematNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        for i in range(2):
            x = nn.remat(LinenBlock)(name=f"b{i}")(x)
        return nn.Dense(2)(x)


def test_gradients_of_linen_remat_blocks_keep_the_module_path():
    model = LinenRematNet()
    variables = model.init(jax.random.key(0), X)

    def grads(v, x):
        return jax.grad(lambda v: jnp.sum(model.apply(v, x)))(v)

    stats = jaxnan.activation_stats(grads, variables)(X)
    backward = [k for k in stats if k.endswith(" (grad)")]
    # jax repeats the outer scopes after the transposition of a remat:
    # the path is the module's once, as in the forward pass.
    assert backward == [
        "LinenRematNet/Dense_0 (grad)",
        "LinenRematNet/b1/Dense_0 (grad)",
        "LinenRematNet/b0/Dense_0 (grad)",
    ]
    forward = [k for k in stats if not k.endswith(" (grad)")]
    assert "LinenRematNet/b1/Dense_0" in forward


def test_an_equinox_transform_of_a_function_is_the_function_not_a_model():
    # eqx.filter_jit and friends return Modules wrapping the function.
    model = eqx.nn.MLP(3, 2, 4, 1, key=jax.random.key(0))
    for wrap in (eqx.filter_jit, eqx.filter_checkpoint):
        stats = jaxnan.activation_stats(wrap(lambda m, x: m(x)))(model, X[0])
        assert list(stats) == ["layers/0", "eqx.nn.MLP", "layers/1"]
