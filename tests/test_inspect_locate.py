"""locate's report shows the statistics of the layer that made the first Inf."""

import jax
import jax.numpy as jnp
import numpy as np

import jaxnan


def model(params, x):
    with jax.named_scope("decoder"):
        with jax.named_scope("mlp"):
            h = x * params["w"]
            h = h * params["v"]
    return jnp.sum(h.astype(jnp.float32) ** 2)


PARAMS = {"w": jnp.float16(2.0), "v": jnp.float16(4.0)}
X = jnp.array([1.0, 2.0, 1e4], jnp.float16)


def test_report_names_the_layer_with_its_float16_range():
    d = jaxnan.locate(model)(PARAMS, X)
    assert d.primitive == "mul" and d.name_stack.endswith("decoder/mlp")
    # 2e4 is the largest finite value the layer made: 31% of 65504
    want = "activations of `decoder/mlp`: max |x| = 2e+04, 31% of the float16 range; "
    assert d.layer_stats.startswith(want), d.layer_stats
    assert "1 nonfinite" in d.layer_stats
    assert want in str(d)


def test_report_adds_the_gradients_of_the_layer():
    d = jaxnan.locate(jax.value_and_grad(model))(PARAMS, X)
    lines = d.layer_stats.splitlines()
    assert lines[0].startswith("activations of `decoder/mlp`: max |x| = 2e+04")
    assert lines[1].startswith("gradients of `decoder/mlp`: max |g| = ")


def test_healthy_and_input_diagnoses_have_no_layer_stats():
    assert jaxnan.locate(model)(PARAMS, X / 10).layer_stats is None
    d = jaxnan.locate(model)(PARAMS, X.at[0].set(np.nan))
    assert d.phase == "input" and d.layer_stats is None
