"""The loss term that went nonfinite first, and the gradient bracket.

A loss summed from terms (in the loss function, or returned as a dict of aux
metrics) names the term whose computation made the first nonfinite value,
in `jaxnan.locate`'s report and in the guard's incident and JSONL record.
Each guard incident lists, in model order, the parameters whose gradients
are nonfinite and the nearest ones that stayed finite. The steps are written
as Equinox, Flax NNX and optax tutorials write them.
"""

import json

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jaxnan
from jaxnan._src.guard.gradients import bracket_of
from tests import helpers

HERE = __file__


def line(tag):
    return helpers.tagged_line(HERE, tag)


def test_equinox_summed_loss_names_the_term_that_went_nonfinite():
    generator = eqx.nn.MLP(4, 4, 16, 2, key=jax.random.key(0))
    discriminator = eqx.nn.Linear(4, 1, key=jax.random.key(1))

    def loss_fn(generator, x, target):
        fake = jax.vmap(generator)(x)
        pixel = jnp.mean(jnp.abs(fake - target))  # <- pixel
        perceptual = jnp.mean(jnp.square(jnp.tanh(fake) - jnp.tanh(target)))
        d_out = jax.vmap(discriminator)(fake)
        gan = -jnp.mean(jnp.log(jax.nn.sigmoid(d_out)))  # <- gan
        return pixel + 0.1 * perceptual + 0.01 * gan

    x = jnp.full((2, 4), -1e3)  # the discriminator saturates: sigmoid is 0.0
    d = jaxnan.locate(eqx.filter_value_and_grad(loss_fn))(generator, x, x)
    assert (d.primitive, d.phase) == ("log", "forward")
    term = d.loss_term
    assert (term["name"], term["file"], term["line"]) == ("gan", HERE, line("gan"))
    assert term["terms"] == ["pixel", "perceptual", "gan"]
    shown = jaxnan._src.core.errors.shown_where(HERE, line("gan"))
    code = "gan = -jnp.mean(jnp.log(jax.nn.sigmoid(d_out)))  # <- gan"
    assert (
        "  term:    `gan` went nonfinite first, of the loss terms pixel, "
        f"perceptual, gan (at {shown}: {code})"
    ) in str(d).splitlines()
    assert d.to_dict()["loss_term"]["name"] == "gan"
    # A finite pixel term with a NaN gan term: the term is the gan's.
    healthy = jaxnan.locate(eqx.filter_value_and_grad(loss_fn))(generator, x * 0, x)
    assert not healthy.found and healthy.loss_term is None


def test_a_loss_that_is_no_sum_has_no_term():
    d = jaxnan.locate(lambda w: jnp.mean(jnp.log(w)))(jnp.zeros(2))
    assert d.found and d.loss_term is None


class TwoTower(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.left = nnx.Linear(4, 8, rngs=rngs)
        self.right = nnx.Linear(4, 8, use_bias=False, rngs=rngs)
        self.head = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        # sqrt(|z|) has no finite derivative at z = 0: a zero row of x
        h = nnx.relu(self.left(x)) + jnp.sqrt(jnp.abs(self.right(x)))
        return self.head(h)


def _nnx_run(tmp_path, aux_reg):
    model = TwoTower(nnx.Rngs(0))
    tx = jaxnan.skip_nonfinite(optax.adam(1e-3))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    def train_step(model, optimizer, x, y):
        def loss_fn(model):
            logits = model(x)
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            energy = jnp.sum(jnp.square(model.right(x)), axis=-1)
            reg = 1e-3 * jnp.mean(jnp.log(energy)) if aux_reg else 0.0
            return ce + reg, {"ce": ce, "reg": reg}

        (loss, aux), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        optimizer.update(model, grads, loss=loss)
        return loss, aux

    log = tmp_path / "incidents.jsonl"
    step = jaxnan.guard(train_step, verbose=False, log=log)
    rng = np.random.default_rng(0)
    for k in range(4):
        x = rng.normal(size=(8, 4)).astype(np.float32)
        if k == 2:
            x[3] = 0.0
        step(model, optimizer, x, np.zeros(8, np.int32))
    step.finish()
    (incident,) = step.incidents
    (record,) = [json.loads(r) for r in log.read_text().splitlines()]
    return incident, record


def test_nnx_guard_incident_names_the_aux_term(tmp_path):
    incident, record = _nnx_run(tmp_path, aux_reg=True)
    assert (incident.step, incident.phase, incident.loss_term) == (2, "forward", "reg")
    assert incident.diagnosis.loss_term["terms"] == ["ce", "reg"]
    assert record["loss_term"] == "reg"
    assert record["diagnosis"]["loss_term"]["name"] == "reg"
    assert "  term:    `reg` went nonfinite first" in incident.message


def test_nnx_guard_incident_brackets_the_nonfinite_gradients(tmp_path):
    incident, record = _nnx_run(tmp_path, aux_reg=False)
    assert (incident.step, incident.phase, incident.cause) == (
        2,
        "backward",
        "unsafe_op",
    )
    expected = {
        "nonfinite": {"['right']['kernel']": 32},
        "finite_before": "['left']['bias']",
        "finite_after": "['head']['kernel']",
        "leaves": 5,
    }
    assert incident.gradients == expected and record["gradients"] == expected
    assert incident.loss_term is None
    assert (
        "  gradients: nonfinite in ['right']['kernel'] (1 of 5 leaves, model "
        "order); nearest finite: ['left']['bias'] before, ['head']['kernel'] after"
    ) in incident.message.splitlines()


def test_optax_layers_bracket_in_model_order():
    # The optax tutorial's MLP: a list of layers, the third one at fault.
    sizes = [3, 8, 8, 8, 2]
    keys = jax.random.split(jax.random.key(0), len(sizes))
    params = [
        {"w": jax.random.normal(k, (m, n)) / np.sqrt(m), "b": jnp.zeros(n)}
        for k, m, n in zip(keys, sizes[:-1], sizes[1:])
    ]
    tx = jaxnan.skip_nonfinite(optax.sgd(1e-2))

    def loss_fn(params, batch):
        h = batch["x"]
        for i, layer in enumerate(params):
            z = h @ layer["w"] + layer["b"]
            h = jnp.sqrt(jnp.abs(z)) if i == 2 else jnp.tanh(z)
        return jnp.mean(jnp.square(h - batch["y"]))

    train_step = helpers.optax_train_step(tx, loss_fn)
    step = jaxnan.guard(train_step, verbose=False)
    opt_state = tx.init(params)
    batch = {"x": np.ones((4, 3), np.float32), "y": np.zeros((4, 2), np.float32)}
    params, opt_state, _ = step(params, opt_state, batch)
    params = [dict(p) for p in params]
    params[2]["b"] = jnp.zeros(8)  # z = 0 in layer 2 for a zero hidden row
    params[2]["w"] = jnp.zeros((8, 8))
    params, opt_state, _ = step(params, opt_state, batch)
    step.finish()
    (incident,) = step.incidents
    # Layer 2's derivative is NaN; the layers before it receive NaN through
    # the chain rule, the last layer's gradients stay finite (its input is 0).
    assert incident.gradients == {
        "nonfinite": {
            "[0]['w']": 24,
            "[0]['b']": 8,
            "[1]['w']": 64,
            "[1]['b']": 8,
            "[2]['w']": 64,
            "[2]['b']": 8,
        },
        "finite_before": None,
        "finite_after": "[3]['w']",
        "leaves": 8,
    }


def test_bracket_of_separated_runs():
    b = bracket_of(["a", "b", "c", "d", "e", "f"], [0, 2, 0, 1, 0, 0])
    assert b.nonfinite == {"b": 2, "d": 1}
    assert (b.finite_before, b.finite_after, b.leaves) == ("a", "e", 6)
    assert str(bracket_of(["a"], [0])) == "gradients: all 1 leaves finite"
    assert str(bracket_of(["a"], [1])) == (
        "gradients: nonfinite in a (1 of 1 leaves, model order); none finite"
    )


def test_aux_keys_name_the_terms_without_source():
    # Compiled from a string: no line to read, the aux keys name the terms
    # (a mean is a division of a sum: the key is found through the scaling).
    src = (
        "def loss(params, x):\n"
        "    fit = jnp.mean(jnp.square(jnp.log(x * params['w'])))\n"
        "    l2 = 1e-4 * jnp.sum(params['w'] ** 2)\n"
        "    return fit + l2, {'fit': fit, 'l2': l2}\n"
    )
    namespace = {"jnp": jnp}
    exec(compile(src, "<notebook cell>", "exec"), namespace)
    vg = jax.value_and_grad(namespace["loss"], has_aux=True)
    d = jaxnan.locate(vg)({"w": jnp.ones(3)}, jnp.array([1.0, 0.0, 2.0]))
    assert d.loss_term == {
        "name": "fit",
        "file": "<notebook cell>",
        "line": 2,
        "code": None,
        "terms": ["fit", "l2"],
    }
