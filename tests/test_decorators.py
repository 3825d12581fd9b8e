"""Tests of jaxnan.checked, checked_grad and checked_value_and_grad."""

import functools
import inspect
import re
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxnan

NAN, INF = jnp.nan, jnp.inf


class Recorder:
    """An on_nonfinite callable that keeps every record it gets."""

    def __init__(self):
        self.records = []

    def __call__(self, record):
        self.records.append(record)

    def take(self):
        # Reports arrive when a program runs (dispatch is asynchronous): wait
        # for every pending computation (one that failed has nothing to add).
        # Callers keep (or block on) the outputs: a discarded output is not a
        # live array, and its program may still be running.
        for a in jax.live_arrays():
            try:
                a.block_until_ready()
            except Exception:
                pass
        jax.effects_barrier()
        out, self.records = self.records, []
        return out


def plain_loss(params, batch):
    h = jnp.tanh(batch["x"] @ params["w"] + params["b"])
    return jnp.mean(jnp.sqrt(jnp.abs(h - batch["y"])) * params["s"])


@jaxnan.checked
def loss_fn(params, batch):
    h = jnp.tanh(batch["x"] @ params["w"] + params["b"])
    return jnp.mean(jnp.sqrt(jnp.abs(h - batch["y"])) * params["s"])


REC = Recorder()
rec_loss = jaxnan.checked(on_nonfinite=REC)(plain_loss)

VG_PLAIN = jax.jit(jax.value_and_grad(plain_loss))
VG_CHECKED = jax.jit(jax.value_and_grad(loss_fn))
VG_REC = jax.jit(jax.value_and_grad(rec_loss))


def make(n=4, seed=0):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    params = {
        "w": jax.random.normal(k1, (3, 2)),
        "b": jnp.zeros(2),
        "s": jnp.float32(1.5),
    }
    batch = {"x": jax.random.normal(k2, (n, 3)), "y": jax.random.normal(k3, (n, 2))}
    return params, batch


def msg(text):
    return re.escape(text)


# --------------------------------------------------------------------------
# Healthy path: transparent, bit for bit, no host traffic.


@pytest.mark.default_compiler
def test_healthy_outputs_and_grads_bit_exact_eager_and_jit():
    params, batch = make()
    want = VG_PLAIN(params, batch)
    chex.assert_trees_all_equal(VG_CHECKED(params, batch), want)
    chex.assert_trees_all_equal(VG_REC(params, batch), want)
    eager = jax.value_and_grad(loss_fn)(params, batch)
    chex.assert_trees_all_equal(eager, jax.value_and_grad(plain_loss)(params, batch))
    assert loss_fn(params, batch) == plain_loss(params, batch)
    assert REC.take() == []


def _tiny_lm_loss(params, tokens):
    """A one-layer causal attention LM with layer norm and learned positions."""
    t = tokens.shape[1]
    x = params["embed"][tokens] + params["pos"][:t]
    mu = x.mean(-1, keepdims=True)
    h = (x - mu) * lax.rsqrt(((x - mu) ** 2).mean(-1, keepdims=True) + 1e-5)
    q, k, v = jnp.split(h @ params["qkv"], 3, axis=-1)
    att = jnp.einsum("btd,bsd->bts", q, k) / 4.0
    att = jnp.where(jnp.tril(jnp.ones((t, t), bool)), att, -1e9)
    x = x + jax.nn.softmax(att, axis=-1) @ v @ params["proj"]
    logp = jax.nn.log_softmax((x @ params["out"])[:, :-1])
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))


@pytest.mark.default_compiler
def test_transformer_value_and_grad_bit_exact_jit():
    ks = jax.random.split(jax.random.PRNGKey(3), 6)
    d, vocab, seq = 16, 32, 8
    params = {
        "embed": jax.random.normal(ks[0], (vocab, d)),
        "pos": jax.random.normal(ks[1], (seq, d)),
        "qkv": jax.random.normal(ks[2], (d, 3 * d)) / 4,
        "proj": jax.random.normal(ks[3], (d, d)) / 4,
        "out": jax.random.normal(ks[4], (d, vocab)) / 4,
    }
    tokens = jax.random.randint(ks[5], (4, seq), 0, vocab)
    want = jax.jit(jax.value_and_grad(_tiny_lm_loss))(params, tokens)
    got = jax.jit(jax.value_and_grad(jaxnan.checked(_tiny_lm_loss)))(params, tokens)
    chex.assert_trees_all_equal(got, want)


def test_wraps_keeps_name_signature_and_doc():
    def f(params, batch, *, scale=1.0):
        """Doc of f."""
        return params * scale

    g = jaxnan.checked(f)
    assert g.__name__ == "f" and g.__doc__ == "Doc of f." and g.__wrapped__ is f
    assert inspect.signature(g) == inspect.signature(f)


def test_no_device_to_host_transfer_on_healthy_step():
    params, batch = make()
    params, batch = jax.device_put((params, batch))
    VG_REC(params, batch)  # compile outside the guard
    with jax.transfer_guard("disallow"):
        value, grads = VG_REC(params, batch)
        value, grads = VG_REC(params, batch)
    jax.block_until_ready((value, grads))
    assert REC.take() == []


def test_decorator_with_and_without_parentheses():
    def f(x):
        return jnp.log(x)

    for g in (
        jaxnan.checked(f),
        jaxnan.checked()(f),
        jaxnan.checked(on_nonfinite="raise")(f),
    ):
        assert g(jnp.float32(1.0)) == 0.0
        with pytest.raises(jaxnan.NonFiniteError, match=msg("output: 1 -inf")):
            g(jnp.float32(0.0))


# --------------------------------------------------------------------------
# The three findings: a NaN batch leaf, a nonfinite loss, a nonfinite gradient.


def test_nan_batch_leaf_raises_eagerly_and_under_jit():
    params, batch = make()
    batch["x"] = batch["x"].at[2, 1].set(NAN)
    want = (
        "jaxnan: nonfinite values in the inputs of `loss_fn` "
        "[phase input]:\n  batch['x']: 1 nan\n"
        "Clean or drop the bad input rows, or find where they were made.\n"
        "For a full diagnosis run:\n  jaxnan.locate(loss_fn)(params, batch)"
    )
    with pytest.raises(jaxnan.NonFiniteError, match=msg(want)) as info:
        jax.value_and_grad(loss_fn)(params, batch)
    assert info.value.details["phase"] == jaxnan.Phase.INPUT
    assert info.value.details["leaves"] == {"batch['x']": (1, 0, 0)}
    with pytest.raises(Exception, match=msg(want)):
        jax.block_until_ready(VG_CHECKED(params, batch))


def test_nan_batch_leaf_record_and_no_duplicate_output_report():
    params, batch = make()
    batch["x"] = batch["x"].at[2, 1].set(NAN).at[0, 0].set(-INF)
    jax.block_until_ready(VG_REC(params, batch))
    recs = REC.take()
    # One bad batch, one report: the outputs and the gradients it made are
    # not reported again.
    assert [r.phase for r in recs] == [jaxnan.Phase.INPUT]
    assert recs[0].function == "plain_loss"
    assert recs[0].leaves == {"batch['x']": (1, 0, 1)}
    assert recs[0].examples == (1, 1)
    assert recs[0].message.endswith("jaxnan.locate(plain_loss)(params, batch)")


def test_nonfinite_loss_with_finite_inputs():
    params, batch = make()
    params["s"] = jnp.float32(3e38)
    batch["y"] = batch["y"] + 1e3  # sqrt(|h - y|) * s overflows to +inf
    want = (
        "jaxnan: nonfinite values in the outputs of `loss_fn` (its inputs were "
        "finite) [phase forward]:\n  output: 1 +inf\n"
        "They were created inside the function.\n"
        "For a full diagnosis run:\n  jaxnan.locate(loss_fn)(params, batch)"
    )
    with pytest.raises(jaxnan.NonFiniteError, match=msg(want)):
        loss_fn(params, batch)
    with pytest.raises(Exception, match=msg(want)):
        jax.block_until_ready(VG_CHECKED(params, batch))
    jax.block_until_ready(VG_REC(params, batch))
    grads_ok = bool(jaxnan.all_finite(VG_PLAIN(params, batch)[1]))
    want_phases = [jaxnan.Phase.FORWARD] + ([] if grads_ok else ["backward"])
    assert [r.phase for r in REC.take()] == want_phases


def test_finite_loss_with_nonfinite_gradient():
    params, batch = make()
    # h == y for one entry: sqrt(|0|) is finite, its derivative is +inf.
    h = jnp.tanh(batch["x"] @ params["w"] + params["b"])
    batch["y"] = batch["y"].at[1, 0].set(h[1, 0])
    value, grads = VG_PLAIN(params, batch)
    assert jnp.isfinite(value) and not jnp.isfinite(grads["w"]).all()
    want = (
        "jaxnan: nonfinite values in the gradients flowing back to the arguments "
        "of `loss_fn` [phase backward]:\n  params['b']: "
    )
    hint = "For a full diagnosis run:\n  " + (
        "jaxnan.locate(jax.value_and_grad(loss_fn))(params, batch)"
    )
    with pytest.raises(jaxnan.NonFiniteError, match=msg(want)) as info:
        jax.grad(loss_fn)(params, batch)
    assert str(info.value).endswith(hint)
    assert info.value.details["phase"] == "backward"
    with pytest.raises(Exception, match=msg(want)):
        jax.block_until_ready(VG_CHECKED(params, batch))
    jax.block_until_ready(VG_REC(params, batch))
    (rec,) = REC.take()
    assert rec.phase == "backward"
    assert rec.leaves.keys() <= {"params['w']", "params['b']", "params['s']"}
    assert "params['w']" in rec.leaves
    want_counts = jaxnan.nonfinite_counts(grads)
    for path, key in (("params['w']", "w"), ("params['b']", "b")):
        c = want_counts[key]
        got = rec.leaves.get(path, (0, 0, 0))
        assert got == (int(c.nan), int(c.posinf), int(c.neginf))


def test_only_differentiated_arguments_are_checked():
    # The cotangent of the batch is never checked (nor computed under jit)
    # unless the batch is differentiated too.
    def f(w, x):
        return jnp.sum(w * jnp.sqrt(x))

    rec = Recorder()
    g = jaxnan.checked(f, on_nonfinite=rec)
    w, x = jnp.ones(2), jnp.array([0.0, 1.0])  # d/dx sqrt(0) = inf
    jax.block_until_ready(jax.grad(g)(w, x))
    assert rec.take() == []
    jax.grad(g, argnums=1)(w, x)
    (r,) = rec.take()
    assert r.leaves == {"x": (0, 1, 0)}
    assert r.message.endswith("jaxnan.locate(jax.value_and_grad(f, argnums=1))(w, x)")


# --------------------------------------------------------------------------
# Transformations: vmap, grad of grad, scan, remat, sharded jit.


def per_example(params, x, y):
    return rec_loss(params, {"x": x[None], "y": y[None]})


VMAPPED = jax.jit(jax.vmap(per_example, in_axes=(None, 0, 0)))
VMAPPED_GRAD = jax.jit(jax.vmap(jax.grad(per_example), in_axes=(None, 0, 0)))


def test_vmap_one_bad_example_reports_exactly_once():
    params, batch = make(n=6)
    out = VMAPPED(params, batch["x"], batch["y"])
    assert out.shape == (6,) and REC.take() == []
    x = batch["x"].at[4, 0].set(NAN)
    jax.block_until_ready(VMAPPED(params, x, batch["y"]))
    (rec,) = REC.take()
    assert rec.phase == jaxnan.Phase.INPUT
    assert rec.leaves == {"batch['x']": (1, 0, 0)}
    assert rec.examples == (1, 6)
    assert "in 1 of 6 examples of the vmapped batch" in rec.message


def test_vmap_of_grad_reports_each_phase_once():
    params, batch = make(n=6)
    g = VMAPPED_GRAD(params, batch["x"], batch["y"])
    assert g["w"].shape == (6, 3, 2) and REC.take() == []
    x = batch["x"].at[1, 2].set(INF)
    jax.block_until_ready(VMAPPED_GRAD(params, x, batch["y"]))
    recs = REC.take()
    # The bad example's gradients are not reported again (one report).
    assert [r.phase for r in recs] == [jaxnan.Phase.INPUT]
    assert recs[0].leaves == {"batch['x']": (0, 1, 0)}
    assert recs[0].examples == (1, 6)


def test_nested_vmap_folds_both_axes():
    params, batch = make(n=6)
    f = jax.vmap(jax.vmap(per_example, in_axes=(None, 0, 0)), in_axes=(None, 0, 0))
    x = batch["x"].reshape(2, 3, 3).at[1, 2, 0].set(NAN).at[0, 0, 0].set(NAN)
    out = f(params, x, batch["y"].reshape(2, 3, 2))
    assert out.shape == (2, 3)
    (rec,) = REC.take()
    assert rec.leaves == {"batch['x']": (2, 0, 0)} and rec.examples == (2, 6)


def test_grad_of_grad_is_exact_and_checked():
    params, batch = make()

    def outer(loss):
        return lambda s: jnp.sum(jax.grad(loss)({**params, "s": s}, batch)["w"])

    want = jax.grad(outer(plain_loss))(params["s"])
    got = jax.grad(outer(rec_loss))(params["s"])
    assert got == want and REC.take() == []
    h = jnp.tanh(batch["x"] @ params["w"] + params["b"])
    batch["y"] = batch["y"].at[0, 1].set(h[0, 1])
    jax.block_until_ready(jax.grad(outer(rec_loss))(params["s"]))
    recs = REC.take()
    assert recs and {r.phase for r in recs} == {"backward"}


def test_inside_lax_scan():
    params, batch = make(n=12)
    xs = batch["x"].reshape(3, 4, 3)
    ys = batch["y"].reshape(3, 4, 2)

    def run(loss):
        def body(p, xy):
            v, g = jax.value_and_grad(loss)(p, {"x": xy[0], "y": xy[1]})
            return jax.tree_util.tree_map(lambda a, b: a - 0.1 * b, p, g), v

        return jax.jit(lambda p, xs, ys: lax.scan(body, p, (xs, ys)))

    # Not bit for bit: XLA compiles a loop body that holds a conditional
    # differently (here the plain scan differs by 1 ulp from the plain jit).
    chex.assert_trees_all_close(
        run(rec_loss)(params, xs, ys), run(plain_loss)(params, xs, ys), rtol=1e-6
    )
    assert REC.take() == []
    jax.block_until_ready(run(rec_loss)(params, xs.at[1, 0, 0].set(NAN), ys))
    recs = REC.take()
    # Batch 1 is bad; its NaN gradient poisons the params of batch 2.
    # One report per bad step: the inputs of each.
    assert [r.phase for r in recs] == [jaxnan.Phase.INPUT] * 2
    assert recs[0].leaves == {"batch['x']": (1, 0, 0)}
    assert set(recs[1].leaves) == {"params['w']", "params['b']", "params['s']"}


@pytest.mark.default_compiler
def test_remat():
    params, batch = make()
    f = jax.jit(jax.value_and_grad(jax.checkpoint(rec_loss)))
    chex.assert_trees_all_equal(f(params, batch), VG_PLAIN(params, batch))
    assert REC.take() == []
    h = jnp.tanh(batch["x"] @ params["w"] + params["b"])
    batch["y"] = batch["y"].at[3, 1].set(h[3, 1])
    jax.block_until_ready(f(params, batch))
    assert [r.phase for r in REC.take()] == ["backward"]
    # A bad batch: value_and_grad under remat runs the forward pass (and its
    # report) again while differentiating, as JAX does with every callback:
    # two identical forward records (documented); the gradients of the bad
    # batch are not reported again.
    batch["x"] = batch["x"].at[2, 1].set(NAN)
    jax.block_until_ready(f(params, batch))
    recs = REC.take()
    assert [r.phase for r in recs] == [jaxnan.Phase.INPUT] * 2
    assert recs[0].leaves == recs[1].leaves == {"batch['x']": (1, 0, 0)}
    g = jax.jit(jax.grad(jax.checkpoint(rec_loss)))  # value dropped: once
    jax.block_until_ready(g(params, batch))
    assert [r.phase for r in REC.take()] == [jaxnan.Phase.INPUT]


@pytest.mark.default_compiler
def test_sharded_jit_reports_once(mesh8):
    del mesh8
    mesh = Mesh(jax.devices()[:8], ("d",))
    params, batch = make(n=8)
    batch = jax.device_put(batch, NamedSharding(mesh, P("d")))
    chex.assert_trees_all_equal(VG_REC(params, batch), VG_PLAIN(params, batch))
    assert REC.take() == []
    batch["x"] = batch["x"].at[5, 1].set(NAN)
    # Reports arrive when the program runs (dispatch is asynchronous).
    jax.block_until_ready(VG_REC(params, batch))
    assert [r.phase for r in REC.take()] == [jaxnan.Phase.INPUT]  # one report


# --------------------------------------------------------------------------
# The callbacks: effect-free, tied into the outputs and the gradients.


def test_grads_mode_has_no_effects_and_forward_mode_keeps_them():
    # grads=True: pure callbacks tied into the values, no JAX effect (so the
    # jitted step keeps the fast dispatch path). grads=False: debug callbacks.
    params, batch = make()
    assert jax.make_jaxpr(jax.value_and_grad(rec_loss))(params, batch).effects == set()
    assert jax.make_jaxpr(rec_loss)(params, batch).effects == set()
    fwd_only = jaxnan.checked(plain_loss, on_nonfinite=REC, grads=False)
    assert jax.make_jaxpr(fwd_only)(params, batch).effects != set()


@pytest.mark.default_compiler
def test_forward_checks_survive_grad_which_drops_the_loss():
    # jax.grad discards the loss, and with it the forward checks' tie into
    # the output; they live on through the loss cotangent.
    params, batch = make()
    g_plain = jax.jit(jax.grad(plain_loss))
    g_rec = jax.jit(jax.grad(rec_loss))
    chex.assert_trees_all_equal(g_rec(params, batch), g_plain(params, batch))
    batch["x"] = batch["x"].at[1, 2].set(NAN)
    jax.block_until_ready(g_rec(params, batch))
    recs = REC.take()
    assert [r.phase for r in recs] == [jaxnan.Phase.INPUT]  # one report per step
    assert recs[0].leaves == {"batch['x']": (1, 0, 0)}
    # A loss made nonfinite inside (finite inputs) is reported as such.
    params, batch = make()
    params["s"] = jnp.float32(3e38)
    batch["y"] = batch["y"] + 1e30
    jax.block_until_ready(g_rec(params, batch))
    assert [r.phase for r in REC.take()][:1] == [jaxnan.Phase.FORWARD]


def test_output_without_floating_leaves_still_reports_inputs():
    def count_positive(x):
        return jnp.sum(x > 0)

    f = jax.jit(jaxnan.checked(count_positive, on_nonfinite=REC))
    assert int(f(jnp.array([1.0, -1.0]))) == 1
    assert REC.take() == []
    jax.block_until_ready(f(jnp.array([1.0, NAN])))
    assert [(r.phase, r.leaves) for r in REC.take()] == [
        (jaxnan.Phase.INPUT, {"x": (1, 0, 0)})
    ]


# --------------------------------------------------------------------------
# Non-float, static and keyword arguments.


def loss_with_extras(params, batch, step, *, scale=2.0, train=True):
    y = batch["x"] @ params["w"]
    if train:
        y = y * scale
    return jnp.sum(jnp.sqrt(jnp.abs(y))) + step.astype(jnp.float32)


@pytest.mark.default_compiler
def test_integer_static_and_keyword_arguments():
    params, batch = make()
    step = jnp.int32(3)
    rec = Recorder()
    f = jaxnan.checked(loss_with_extras, on_nonfinite=rec)
    plain = jax.jit(jax.value_and_grad(loss_with_extras), static_argnames="train")
    fast = jax.jit(jax.value_and_grad(f), static_argnames="train")
    for train in (True, False):
        want = plain(params, batch, step, scale=jnp.float32(0.5), train=train)
        got = fast(params, batch, step, scale=jnp.float32(0.5), train=train)
        chex.assert_trees_all_equal(got, want)
    assert jax.grad(f)(params, batch, jnp.int32(1), train=False)["w"].shape == (3, 2)
    assert rec.take() == []
    fast(params, batch, step, scale=jnp.float32(NAN), train=True)
    recs = rec.take()
    assert [r.phase for r in recs] == [jaxnan.Phase.INPUT]  # one report per step
    assert recs[0].leaves == {"scale": (1, 0, 0)}
    assert recs[0].message.endswith(
        "jaxnan.locate(loss_with_extras)(params, batch, step, scale=scale, train=train)"
    )


# --------------------------------------------------------------------------
# Policies and drop-in grad functions.


def test_warn_at_the_user_line_once_per_bad_step():
    f = jaxnan.checked(lambda x: jnp.log(x), on_nonfinite="warn")
    step = jax.jit(jax.value_and_grad(f))
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        jax.block_until_ready(step(jnp.float32(0.0)))  # loss and gradient bad
        line = inspect.currentframe().f_lineno - 1
        jax.block_until_ready(step(jnp.float32(1.0)))
        jax.block_until_ready(step(jnp.float32(jnp.nan)))  # a bad input
        jax.effects_barrier()
    got = [w for w in got if "jaxnan" in str(w.message)]
    # One warning per bad step, at the user's line: the gradient of the
    # reported -inf loss is not reported again.
    assert [w.category for w in got] == [RuntimeWarning] * 2
    assert [w.filename for w in got] == [__file__] * 2
    assert got[0].lineno == line  # where `step` first traced `f`
    assert "[phase forward]:\n  output: 1 -inf" in str(got[0].message)
    assert "[phase input]:\n  x: 1 nan" in str(got[1].message)
    # Python's default filter shows a repeated message at one line once.
    g = jaxnan.checked(lambda x: jnp.log(x), on_nonfinite="warn")
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("default")
        for _ in range(3):
            g(jnp.array([0.0, 1.0]))
        jax.effects_barrier()
    assert len([w for w in got if "jaxnan" in str(w.message)]) == 1


def test_ignore_is_a_passthrough():
    f = jaxnan.checked(lambda x: jnp.log(x), on_nonfinite="ignore")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert jnp.isneginf(f(jnp.float32(0.0)))


@pytest.mark.default_compiler
def test_checked_grad_and_value_and_grad_are_drop_in():
    params, batch = make()
    want = jax.jit(jax.grad(plain_loss, argnums=(0, 1)))(params, batch)
    got = jax.jit(jaxnan.checked_grad(plain_loss, argnums=(0, 1)))(params, batch)
    chex.assert_trees_all_equal(got, want)

    def with_aux(params, batch):
        v = plain_loss(params, batch)
        return v, {"v2": v * 2}

    want = jax.value_and_grad(with_aux, has_aux=True)(params, batch)
    got = jaxnan.checked_value_and_grad(with_aux, has_aux=True)(params, batch)
    chex.assert_trees_all_equal(got, want)

    h = jnp.tanh(batch["x"] @ params["w"] + params["b"])
    batch["y"] = batch["y"].at[0, 0].set(h[0, 0])
    rec = Recorder()
    vg = jaxnan.checked_value_and_grad(plain_loss, argnums=1, on_nonfinite=rec)
    value, g = vg(params, batch)
    assert jnp.isfinite(value)
    (r,) = rec.take()
    assert r.phase == "backward" and set(r.leaves) == {"batch['x']", "batch['y']"}
    assert r.leaves["batch['y']"] == (0, 0, 1)
    assert r.message.endswith(
        "jax.value_and_grad(plain_loss, argnums=1))(params, batch)"
    )
    with pytest.raises(jaxnan.NonFiniteError, match=msg("batch['y']: 1 -inf")):
        jaxnan.checked_grad(plain_loss, argnums=1)(params, batch)


def test_forward_mode_needs_grads_false():
    f = jaxnan.checked(jnp.sin, grads=False)
    out, tangent = jax.jvp(f, (jnp.float32(0.0),), (jnp.float32(1.0),))
    assert (out, tangent) == (0.0, 1.0)


# --------------------------------------------------------------------------
# Misuse.


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match=msg("on_nonfinite='explode' is not")):
        jaxnan.checked(jnp.sin, on_nonfinite="explode")
    with pytest.raises(ValueError, match=msg("on_nonfinite='explode' is not")):
        jaxnan.checked(on_nonfinite="explode")
    with pytest.raises(TypeError, match=msg("jaxnan.checked: fn must be callable")):
        jaxnan.checked(3)
    with pytest.raises(TypeError, match=msg("jaxnan.checked: inputs='yes' must")):
        jaxnan.checked(jnp.sin, inputs="yes")
    with pytest.raises(TypeError, match=msg("jaxnan.checked_grad: fn must be")):
        jaxnan.checked_grad(None)
    with pytest.raises(TypeError, match=msg("checked_value_and_grad: fn must be")):
        jaxnan.checked_value_and_grad("loss")


def test_partial_function_name():
    f = jaxnan.checked(functools.partial(plain_loss), on_nonfinite="raise")
    params, batch = make()
    batch["y"] = batch["y"].at[0, 0].set(INF)
    with pytest.raises(jaxnan.NonFiniteError, match=msg("inputs of `plain_loss`")):
        f(params, batch)
    assert np.isfinite(np.asarray(plain_loss(*make())))


# --------------------------------------------------------------------------
# What a check counts; compiled errors; locate through checked.


def test_python_float_constants_count_only_when_nan():
    # A model may store -inf as a Python float (eqx.nn.MaxPool2d's init).
    f = jaxnan.checked(lambda p, c: jnp.sum(jnp.maximum(p["w"], c["init"])))
    assert f({"w": jnp.ones(2)}, {"init": -float("inf")}) == 2.0
    with pytest.raises(jaxnan.NonFiniteError, match=msg("c['init']: 1 nan")):
        f({"w": jnp.ones(2)}, {"init": float("nan")})
    with pytest.raises(jaxnan.NonFiniteError, match=msg("p['w']: 1 +inf")):
        f({"w": jnp.array([1.0, INF])}, {"init": 0.0})


def test_compiled_raise_surfaces_once_as_nonfinite_error(caplog):
    step = jax.jit(jax.value_and_grad(jaxnan.checked(lambda x: jnp.sum(jnp.log(x)))))
    with pytest.raises(jaxnan.NonFiniteError) as info:
        with jaxnan.nonfinite_errors():
            jax.block_until_ready(step(jnp.zeros(2)))
    assert info.value.details["phase"] == jaxnan.Phase.FORWARD
    assert info.value.details["leaves"] == {"output": (0, 0, 1)}
    # jax logs a failed callback; ours is not logged (the error carries it).
    assert not [r for r in caplog.records if "callback failed" in r.getMessage()]
    # Other runtime errors pass through unchanged.
    with pytest.raises(ZeroDivisionError):
        with jaxnan.nonfinite_errors():
            raise ZeroDivisionError


def test_locate_sees_through_checked():
    for policy in ("raise", "warn"):

        @jaxnan.checked(on_nonfinite=policy)
        def loss(w, x):
            return jnp.sum(jnp.log(w * x))

        line = loss.__wrapped__.__code__.co_firstlineno + 2
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the replay calls no report
            d = jaxnan.locate(jax.value_and_grad(loss))(
                jnp.ones(2), jnp.array([1.0, 0])
            )
        assert (d.primitive, d.line, d.phase) == ("log", line, "forward")
        assert d.cause == "unsafe_op"


def test_forward_mode_through_checked_names_grads_false():
    def loss(x):
        return jnp.sum(jnp.sin(x))

    x = jnp.ones(3)
    f = jaxnan.checked(loss, on_nonfinite="warn")
    for transform in (
        lambda g: jax.jvp(g, (x,), (x,)),
        lambda g: jax.jacfwd(g)(x),
        lambda g: jax.hessian(g)(x),
    ):
        with pytest.raises(TypeError, match=re.escape("checked(loss, grads=False)")):
            transform(f)
    # reverse mode is unchanged, and grads=False works in forward mode
    np.testing.assert_array_equal(jax.grad(f)(x), jax.grad(loss)(x))
    g = jaxnan.checked(loss, on_nonfinite="warn", grads=False)
    np.testing.assert_array_equal(
        jax.jvp(g, (x,), (x,))[1], jax.jvp(loss, (x,), (x,))[1]
    )
