import functools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxnan
from tests.helpers import (
    assert_no_host_callback,
    buffer_pointers,
    optax_train_step,
    replicate,
    shard_leading,
)

BAD_VALUES = {"nan": jnp.nan, "posinf": jnp.inf, "neginf": -jnp.inf}


def make_params():
    return {
        "dense": {
            "kernel": jnp.linspace(-1, 1, 12).reshape(4, 3),
            "bias": jnp.zeros(3),
        },
        "out": jnp.linspace(0.5, 1.5, 3),
    }


def grads_like(params, scale=1.0, seed=0):
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree_util.tree_unflatten(
        treedef, [scale * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]
    )


def poison(tree, value, path=("dense", "kernel"), index=(1, 2)):
    tree = jax.tree_util.tree_map(lambda x: x, tree)
    node = tree
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = node[path[-1]].at[index].set(value)
    return tree


# ----------------------------------------------------------------- zero_nonfinite


def test_zero_nonfinite_finite_passthrough_bit_exact(variant):
    tx = jaxnan.zero_nonfinite()
    params = make_params()
    g = grads_like(params)
    state = tx.init(params)
    u, state = variant(tx.update)(g, state)
    chex.assert_trees_all_equal(u, g)
    chex.assert_trees_all_equal(
        state.nonfinite_zeroed_total, jax.tree.map(lambda _: 0, params)
    )


@pytest.mark.parametrize("kind", list(BAD_VALUES))
def test_zero_nonfinite_each_kind(kind, variant):
    tx = jaxnan.zero_nonfinite()
    params = make_params()
    g = poison(grads_like(params), BAD_VALUES[kind])
    state = tx.init(params)
    u, state = variant(tx.update)(g, state)
    expected = poison(g, 0.0)
    chex.assert_trees_all_equal(u, expected)
    assert int(state.nonfinite_zeroed["dense"]["kernel"]) == 1
    assert int(state.nonfinite_zeroed["out"]) == 0


def test_zero_nonfinite_counts_over_sequence():
    tx = jaxnan.zero_nonfinite()
    params = make_params()
    state = tx.init(params)
    update = jax.jit(tx.update)
    g = grads_like(params)
    seq = [
        g,
        poison(poison(g, jnp.nan), jnp.inf, ("out",), (0,)),
        poison(g, -jnp.inf, ("dense", "bias"), (2,)),
        g,
    ]
    last = []
    for gi in seq:
        _, state = update(gi, state)
        last.append(int(sum(jax.tree_util.tree_leaves(state.nonfinite_zeroed))))
    assert last == [0, 2, 1, 0]
    assert int(state.nonfinite_zeroed_total["dense"]["kernel"]) == 1
    assert int(state.nonfinite_zeroed_total["dense"]["bias"]) == 1
    assert int(state.nonfinite_zeroed_total["out"]) == 1


def test_zero_nonfinite_then_optimizer_keeps_moments_finite():
    tx = optax.chain(jaxnan.zero_nonfinite(), optax.adam(1e-2))
    params = make_params()
    state = tx.init(params)
    u, state = jax.jit(tx.update)(poison(grads_like(params), jnp.inf), state, params)
    assert bool(jaxnan.all_finite((u, state)))


# ----------------------------------------------------------------- skip_nonfinite


@pytest.mark.default_compiler
def test_skip_finite_is_exactly_inner(variant):
    params = make_params()
    inner = optax.adamw(1e-2)
    tx = jaxnan.skip_nonfinite(inner)
    s_inner, s = inner.init(params), tx.init(params)
    # vmap changes optax's own bits, so the reference runs under the same
    # variant; eagerly, both run op by op.
    reference = variant(inner.update)
    for i in range(3):
        g = grads_like(params, seed=i)
        u_ref, s_inner = reference(g, s_inner, params)
        u, s = variant(functools.partial(tx.update, loss=jnp.float32(1.0)))(
            g, s, params
        )
        chex.assert_trees_all_equal(u, u_ref)
        chex.assert_trees_all_equal(s.inner_state, s_inner)
    assert int(s.nonfinite_total) == 0 and int(s.skip_step) == 3


@pytest.mark.parametrize("kind", list(BAD_VALUES))
def test_skip_bad_update_zero_and_state_untouched(kind, variant):
    params = make_params()
    tx = jaxnan.skip_nonfinite(optax.adam(1e-2))
    s0 = tx.init(params)
    u, s0 = variant(tx.update)(grads_like(params), s0, params)  # warm moments
    bad = poison(grads_like(params, seed=1), BAD_VALUES[kind])
    u, s1 = variant(tx.update)(bad, s0, params)
    chex.assert_trees_all_equal(u, jax.tree.map(jnp.zeros_like, params))
    chex.assert_trees_all_equal(s1.inner_state, s0.inner_state)  # bit for bit
    assert (int(s1.nonfinite_total), int(s1.nonfinite_streak)) == (1, 1)
    assert int(s1.last_nonfinite_step) == 1
    new_params = optax.apply_updates(params, u)
    chex.assert_trees_all_equal(new_params, params)


def test_skip_keeps_negative_zero_params_bit_for_bit(variant):
    # -0.0 + 0.0 is +0.0: a skip must hand back -0.0, the additive identity.
    params = {"w": jnp.array([-0.0, 0.0, 1.5, -2.0]), "b": jnp.array(-0.0)}
    tx = jaxnan.skip_nonfinite(optax.adam(1e-2))
    bad = {"w": jnp.array([1.0, jnp.nan, 0.0, 1.0]), "b": jnp.array(1.0)}
    u, _ = variant(tx.update)(bad, tx.init(params), params)
    new = optax.apply_updates(params, u)
    for k in params:
        np.testing.assert_array_equal(np.signbit(new[k]), np.signbit(params[k]))
        np.testing.assert_array_equal(new[k], params[k])


def _to_bf16():
    """An inner transform whose updates have another dtype than its input."""
    return optax.GradientTransformation(
        lambda params: optax.EmptyState(),
        lambda u, state, params=None: (
            jax.tree.map(lambda x: x.astype(jnp.bfloat16), u),
            state,
        ),
    )


def test_skip_inner_changing_dtype_gives_zeros_of_its_dtype(variant):
    params = make_params()
    tx = jaxnan.skip_nonfinite(_to_bf16())
    update = variant(tx.update)
    u, _ = update(grads_like(params), tx.init(params), params)
    chex.assert_trees_all_equal(
        u, jax.tree.map(lambda g: g.astype(jnp.bfloat16), grads_like(params))
    )
    u, s = update(poison(grads_like(params), jnp.nan), tx.init(params), params)
    chex.assert_trees_all_equal(
        u, jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.bfloat16), params)
    )
    assert int(s.nonfinite_total) == 1


@pytest.mark.parametrize(
    "inner",
    [
        optax.sgd(0.1, 0.9),
        optax.adamw(1e-2),
        optax.adam(optax.linear_schedule(1e-2, 0, 9)),
    ],
    ids=["sgd_momentum", "adamw", "adam_schedule"],
)
@pytest.mark.default_compiler
def test_skip_jitted_steps_bit_for_bit_and_skip_untouched(inner):
    # The step as tutorials write it: gradients, update and apply_updates in
    # one jit. XLA contracts optax's last multiply (by -lr) with
    # `params + updates` into one fused multiply-add; the guard must keep
    # that contraction (a select after the multiply rounds once more: with
    # sgd(0.1, 0.9), 26 of 64 params were 1 ulp off after 3 steps).
    tx = jaxnan.skip_nonfinite(inner)

    def make_step(opt):
        @jax.jit
        def step(p, s, x):
            g = jnp.sin(p * x)
            u, s = opt.update(g, s, p)
            return optax.apply_updates(p, u), s

        return step

    plain, guarded = make_step(inner), make_step(tx)
    p0 = jnp.asarray(np.random.default_rng(0).normal(size=64), jnp.float32)
    p0 = p0.at[3].set(-0.0)
    p_ref, s_ref, p, s = p0, inner.init(p0), p0, tx.init(p0)
    for i in range(9):
        x = jnp.float32(i + 1)
        if i == 4:  # a NaN step: params and state untouched, bit for bit
            before = (p, s.inner_state)
            p, s = guarded(p, s, x.at[()].set(jnp.nan))
            assert int(s.nonfinite_total) == 1
            np.testing.assert_array_equal(
                np.asarray(p).view(np.int32), np.asarray(before[0]).view(np.int32)
            )
            chex.assert_trees_all_equal(s.inner_state, before[1])
            continue
        p_ref, s_ref = plain(p_ref, s_ref, x)
        p, s = guarded(p, s, x)
        np.testing.assert_array_equal(
            np.asarray(p).view(np.int32), np.asarray(p_ref).view(np.int32)
        )
        chex.assert_trees_all_equal(s.inner_state, s_ref)


def test_skip_mixed_leaves():
    params = make_params()
    tx = jaxnan.skip_nonfinite(optax.sgd(0.1))
    g = poison(poison(grads_like(params), jnp.nan), -jnp.inf, ("out",), (1,))
    u, s = tx.update(g, tx.init(params), params)
    chex.assert_trees_all_equal(u, jax.tree.map(jnp.zeros_like, params))


@pytest.mark.parametrize("loss", [jnp.nan, jnp.inf, -jnp.inf])
def test_skip_nonfinite_loss_with_finite_grads(loss, variant):
    params = make_params()
    tx = jaxnan.skip_nonfinite(optax.adam(1e-2))
    s0 = tx.init(params)
    u, s1 = variant(functools.partial(tx.update, loss=jnp.float32(loss)))(
        grads_like(params), s0, params
    )
    chex.assert_trees_all_equal(u, jax.tree.map(jnp.zeros_like, params))
    chex.assert_trees_all_equal(s1.inner_state, s0.inner_state)
    assert int(s1.nonfinite_total) == 1


@pytest.mark.parametrize("loss", [jnp.nan, jnp.inf])
def test_skip_nonfinite_value_is_the_loss(loss, variant):
    # optax's loss-reading transforms take the loss as ``value=``
    # (reduce_on_plateau's example: ``update(grad, state, params, value=loss)``);
    # a NaN value counted as a plateau would cut the learning rate.
    params = make_params()
    inner = optax.chain(
        optax.sgd(0.1), optax.contrib.reduce_on_plateau(patience=0, factor=0.5)
    )
    tx = jaxnan.skip_nonfinite(inner)
    _, s0 = tx.update(grads_like(params), tx.init(params), params, value=1.0)
    u, s1 = variant(functools.partial(tx.update, value=jnp.float32(loss)))(
        grads_like(params), s0, params
    )
    chex.assert_trees_all_equal(u, jax.tree.map(jnp.zeros_like, params))
    chex.assert_trees_all_equal(s1.inner_state, s0.inner_state)
    assert int(s1.nonfinite_total) == 1


@pytest.mark.default_compiler
def test_skip_counters_over_sequence_match_inner_on_good_steps():
    params = make_params()
    inner = optax.adam(1e-2)
    tx = jaxnan.skip_nonfinite(inner)
    update = jax.jit(tx.update)
    ref_update = jax.jit(inner.update)
    s, s_ref = tx.init(params), inner.init(params)
    pattern = ["ok", "bad", "bad", "ok", "bad", "ok", "ok"]
    streaks, totals, lasts = [], [], []
    p, p_ref = params, params
    for i, kind in enumerate(pattern):
        g = grads_like(params, seed=i)
        if kind == "bad":
            g = poison(g, jnp.nan)
        u, s = update(g, s, p)
        p = optax.apply_updates(p, u)
        if kind == "ok":
            u_ref, s_ref = ref_update(g, s_ref, p_ref)
            p_ref = optax.apply_updates(p_ref, u_ref)
        streaks.append(int(s.nonfinite_streak))
        totals.append(int(s.nonfinite_total))
        lasts.append(int(s.last_nonfinite_step))
    assert streaks == [0, 1, 2, 0, 1, 0, 0]
    assert totals == [0, 1, 2, 2, 3, 3, 3]
    assert lasts == [-1, 1, 2, 2, 4, 4, 4]
    chex.assert_trees_all_equal(p, p_ref)
    chex.assert_trees_all_equal(s.inner_state, s_ref)
    assert not bool(s.gave_up)


def test_give_up_after_never_applies_bad_update_and_sets_gave_up():
    params = make_params()
    tx = jaxnan.skip_nonfinite(optax.adam(1e-2), give_up_after=2)
    update = jax.jit(tx.update)
    s = tx.init(params)
    _, s = update(grads_like(params), s, params)
    before = s.inner_state
    flags = []
    for i in range(4):
        u, s = update(poison(grads_like(params, seed=i), jnp.nan), s, params)
        chex.assert_trees_all_equal(u, jax.tree.map(jnp.zeros_like, params))
        chex.assert_trees_all_equal(s.inner_state, before)
        flags.append(bool(s.gave_up))
    assert flags == [False, True, True, True]
    _, s = update(grads_like(params), s, params)  # recovers; the flag stays set
    assert bool(s.gave_up) and int(s.nonfinite_streak) == 0
    assert bool(jaxnan.all_finite(s.inner_state))


def test_optax_apply_if_finite_poisons_moments_but_skip_nonfinite_does_not():
    params = make_params()
    bad = poison(grads_like(params), jnp.nan)
    theirs = optax.apply_if_finite(optax.adam(1e-2), max_consecutive_errors=2)
    ours = jaxnan.skip_nonfinite(optax.adam(1e-2), give_up_after=2)
    st_t, st_o = theirs.init(params), ours.init(params)
    for _ in range(3):
        _, st_t = theirs.update(bad, st_t, params)
        _, st_o = ours.update(bad, st_o, params)
    assert not bool(jaxnan.all_finite(st_t.inner_state))  # optax: poisoned for good
    assert bool(jaxnan.all_finite(st_o.inner_state))
    assert bool(st_o.gave_up)


def test_compose_chain_inject_hyperparams():
    params = make_params()
    inner = optax.inject_hyperparams(optax.adam)(learning_rate=1e-2)
    tx = optax.chain(jaxnan.zero_nonfinite(), jaxnan.skip_nonfinite(inner))
    s = tx.init(params)
    u, s = jax.jit(tx.update)(grads_like(params), s, params)
    ref_u, _ = inner.update(grads_like(params), inner.init(params), params)
    chex.assert_trees_all_close(u, ref_u, rtol=1e-6)  # eager vs fused: ulps
    # Skip around inject_hyperparams: a NaN loss keeps its count untouched.
    tx2 = jaxnan.skip_nonfinite(inner)
    s2 = tx2.init(params)
    _, s2b = tx2.update(grads_like(params), s2, params, loss=jnp.float32(jnp.nan))
    chex.assert_trees_all_equal(s2b.inner_state, s2.inner_state)
    assert float(s2b.inner_state.hyperparams["learning_rate"]) == pytest.approx(1e-2)


def test_compose_multisteps_skip_outside():
    # Recommended: skip around MultiSteps. A NaN micro-batch is skipped and
    # never enters MultiSteps' accumulator.
    params = make_params()
    tx = jaxnan.skip_nonfinite(optax.MultiSteps(optax.sgd(0.1), every_k_schedule=2))
    s = tx.init(params)
    update = jax.jit(tx.update)
    g = grads_like(params)
    s_before = s
    u1, s = update(poison(g, jnp.nan), s, params)
    chex.assert_trees_all_equal(s.inner_state, s_before.inner_state)
    u2, s = update(g, s, params)
    u3, s = update(g, s, params)  # second accepted micro-batch: emits the mean
    chex.assert_trees_all_equal(u2, jax.tree.map(jnp.zeros_like, params))
    chex.assert_trees_all_close(u3, jax.tree.map(lambda x: -0.1 * x, g))
    assert int(s.nonfinite_total) == 1


def test_compose_multisteps_skip_inside():
    # Inside MultiSteps the macro step holding a NaN micro-batch is skipped, but
    # optax resets its accumulator with `(1 - emit) * acc`, and 0 * NaN = NaN:
    # the accumulator stays poisoned, so every later macro step is skipped too.
    # This is why the docs recommend skip_nonfinite(MultiSteps(...)).
    params = make_params()
    tx = optax.MultiSteps(jaxnan.skip_nonfinite(optax.sgd(0.1)), every_k_schedule=2)
    s = tx.init(params)
    update = jax.jit(tx.update)
    g = grads_like(params)
    _, s = update(poison(g, jnp.nan), s, params)
    u2, s = update(g, s, params)
    chex.assert_trees_all_equal(u2, jax.tree.map(jnp.zeros_like, params))
    assert int(s.inner_opt_state.nonfinite_total) == 1
    assert bool(jnp.isnan(s.acc_grads["dense"]["kernel"]).any())


def test_flax_train_state():
    train_state = pytest.importorskip("flax.training.train_state")
    params = make_params()
    ts = train_state.TrainState.create(
        apply_fn=None, params=params, tx=jaxnan.skip_nonfinite(optax.adam(1e-2))
    )
    ts2 = jax.jit(lambda t, g: t.apply_gradients(grads=g))(
        ts, poison(grads_like(params), jnp.inf)
    )
    chex.assert_trees_all_equal(ts2.params, ts.params)
    chex.assert_trees_all_equal(ts2.opt_state.inner_state, ts.opt_state.inner_state)
    assert int(ts2.step) == 1 and int(ts2.opt_state.nonfinite_total) == 1


def _loss(params, batch):
    h = jnp.tanh(batch @ params["dense"]["kernel"] + params["dense"]["bias"])
    return jnp.mean((h @ params["out"]) ** 2)


def _train_step(tx):
    return optax_train_step(tx, _loss)


@pytest.mark.default_compiler
def test_no_host_callback_and_donation():
    params = make_params()
    tx = jaxnan.skip_nonfinite(
        optax.chain(jaxnan.clip_by_global_norm(1.0), optax.adamw(1e-2)), give_up_after=3
    )
    step = jax.jit(_train_step(tx), donate_argnums=(0, 1))
    ref_step = jax.jit(_train_step(tx))
    batches = [
        jnp.ones((2, 4)),
        jnp.ones((2, 4)).at[0, 0].set(jnp.nan),
        jnp.ones((2, 4)),
    ]
    p, s = make_params(), tx.init(params)
    p_ref, s_ref = make_params(), tx.init(params)
    for b in batches:
        p_ref, s_ref, _ = ref_step(p_ref, s_ref, b)
    assert_no_host_callback(_train_step(tx), p, s, batches[0])
    for b in batches:
        p, s, _ = step(p, s, b)
    chex.assert_trees_all_equal(p, p_ref)
    chex.assert_trees_all_equal(s, s_ref)
    assert int(s.nonfinite_total) == 1


def test_sharded_jit_one_shard_bad_skips(mesh8):
    params = {"w": jnp.linspace(-1, 1, 64).reshape(8, 8)}
    sharding = NamedSharding(mesh8, P("d"))
    params = jax.device_put(params, sharding)
    tx = jaxnan.skip_nonfinite(optax.adam(1e-2))
    s = tx.init(params)
    g = jax.device_put({"w": jnp.ones((8, 8)).at[5, 3].set(jnp.nan)}, sharding)
    u, s2 = jax.jit(tx.update)(g, s, params)
    assert u["w"].sharding.is_equivalent_to(sharding, 2)
    chex.assert_trees_all_equal(u, jax.tree.map(jnp.zeros_like, params))
    chex.assert_trees_all_equal(s2.inner_state, s.inner_state)


@pytest.mark.parametrize("agree", [True, False])
def test_shard_map_one_device_bad_all_skip(mesh8, agree):
    tx = jaxnan.skip_nonfinite(optax.sgd(1.0), axis_name="d" if agree else None)
    params = {"w": jnp.ones((8, 2))}

    def per_device(w, g):
        p = {"w": w}
        s = tx.init(p)
        u, s = tx.update({"w": g}, s, p)
        return u["w"], s.nonfinite_total[None]

    f = jax.jit(
        jax.shard_map(
            per_device,
            mesh=mesh8,
            in_specs=(P("d"), P("d")),
            out_specs=(P("d"), P("d")),
        )
    )
    g = jnp.ones((8, 2)).at[3, 0].set(jnp.nan)
    u, totals = f(params["w"], g)
    if agree:
        np.testing.assert_array_equal(u, np.zeros((8, 2)))
        np.testing.assert_array_equal(totals, np.ones(8))
    else:  # without axis_name only the device that saw the NaN skips
        np.testing.assert_array_equal(totals, np.eye(8)[3])


def test_pmap_one_device_bad_all_skip():
    tx = jaxnan.skip_nonfinite(optax.sgd(1.0), axis_name="i")

    def per_device(g):
        p = {"w": jnp.zeros(2)}
        u, s = tx.update({"w": g}, tx.init(p), p)
        return u["w"], s.nonfinite_total

    g = jnp.ones((8, 2)).at[6, 1].set(jnp.inf)
    u, totals = jax.pmap(per_device, axis_name="i")(g)
    np.testing.assert_array_equal(u, np.zeros((8, 2)))
    np.testing.assert_array_equal(totals, np.ones(8))


@st.composite
def tree_and_bad(draw):
    n = draw(st.integers(1, 4))
    shapes = [tuple(draw(st.lists(st.integers(1, 4), max_size=2))) for _ in range(n)]
    bad = draw(
        st.lists(
            st.tuples(st.integers(0, 50), st.sampled_from(list(BAD_VALUES))), max_size=3
        )
    )
    return shapes, bad


@settings(max_examples=25, deadline=None)
@given(tree_and_bad())
def test_property_skip_iff_nonfinite(case):
    shapes, bad = case
    rng = np.random.default_rng(0)
    params = {
        f"p{i}": jnp.asarray(rng.normal(size=s), jnp.float32)
        for i, s in enumerate(shapes)
    }
    grads = {
        k: np.asarray(rng.normal(size=v.shape), np.float32) for k, v in params.items()
    }
    for pos, kind in bad:
        leaf = grads[f"p{pos % len(shapes)}"].reshape(-1)
        leaf[pos % leaf.size] = float(BAD_VALUES[kind])
    grads = {k: jnp.asarray(v) for k, v in grads.items()}
    tx = jaxnan.skip_nonfinite(optax.adam(1e-3))
    s0 = tx.init(params)
    u, s1 = tx.update(grads, s0, params)
    expect_skip = bool(bad)
    assert int(s1.nonfinite_total) == int(expect_skip)
    if expect_skip:
        chex.assert_trees_all_equal(u, jax.tree.map(jnp.zeros_like, params))
        chex.assert_trees_all_equal(s1.inner_state, s0.inner_state)
    else:
        assert bool(jaxnan.all_finite(u))
    z = jaxnan.zero_nonfinite()
    uz, sz = z.update(grads, z.init(params))
    assert int(sum(jax.tree_util.tree_leaves(sz.nonfinite_zeroed))) == len(
        {
            (f"p{p % len(shapes)}", p % max(1, int(np.prod(shapes[p % len(shapes)]))))
            for p, _ in bad
        }
    )
    assert bool(jaxnan.all_finite(uz))


# ----------------------------------------------------------------- clip_by_global_norm


@pytest.mark.parametrize("max_norm", [0.5, 100.0])
@pytest.mark.default_compiler
def test_clip_finite_bit_exact_to_optax(max_norm, variant):
    params = make_params()
    g = grads_like(params, scale=3.0)
    ours, theirs = (
        jaxnan.clip_by_global_norm(max_norm),
        optax.clip_by_global_norm(max_norm),
    )
    u, s = variant(ours.update)(g, ours.init(params))
    u_ref, _ = variant(theirs.update)(g, theirs.init(params))
    chex.assert_trees_all_equal(u, u_ref)
    assert float(s.global_norm) == pytest.approx(float(optax.tree.norm(g)), rel=1e-6)
    assert bool(s.clip_input_finite)


@pytest.mark.parametrize("kind", list(BAD_VALUES))
def test_clip_nonfinite_entry_poisons_nothing_else(kind):
    params = make_params()
    g = grads_like(params, scale=3.0)
    bad = poison(g, BAD_VALUES[kind])
    tx = jaxnan.clip_by_global_norm(1.0)
    u, s = jax.jit(tx.update)(bad, tx.init(params))
    # Finite entries: exactly optax's clip of the tree with the bad entry at 0.
    ref, _ = jax.jit(optax.clip_by_global_norm(1.0).update)(poison(g, 0.0), None)
    expect = poison(ref, BAD_VALUES[kind])
    chex.assert_trees_all_equal(u, expect)
    assert float(s.global_norm) == pytest.approx(float(optax.tree.norm(poison(g, 0.0))))
    assert not bool(s.clip_input_finite)
    # optax: every entry of every leaf is lost (NaN, or 0 for an Inf norm).
    theirs, _ = optax.clip_by_global_norm(1.0).update(bad, None)
    kept = [bool((jnp.isfinite(x) & (x != 0)).any()) for x in jax.tree.leaves(theirs)]
    assert not any(kept)


def test_clip_overflowing_squares_and_float16():
    g = {"a": jnp.array([3e30, 4e30], jnp.float32)}
    tx = jaxnan.clip_by_global_norm(1.0)
    u, s = tx.update(g, tx.init(g))
    np.testing.assert_allclose(np.asarray(u["a"]), [0.6, 0.8], rtol=1e-6)
    assert bool(s.clip_input_finite)  # exact: all entries were finite
    h = {"a": jnp.array([300.0, 400.0], jnp.float16)}
    u, s = tx.update(h, tx.init(h))
    assert float(s.global_norm) == 500.0
    np.testing.assert_allclose(np.asarray(u["a"], np.float32), [0.6, 0.8], rtol=1e-3)


def _top_level_reductions(fn, *args):
    jaxpr = jax.make_jaxpr(fn)(*args)
    return sum(
        1
        for e in jaxpr.jaxpr.eqns
        if e.primitive.name in ("reduce", "reduce_sum", "reduce_max", "reduce_min")
        and e.invars[0].aval.ndim > 0
    )


def test_skip_reuses_leading_clip_norm_no_extra_pass():
    params = make_params()
    g = grads_like(params)
    n_leaves = len(jax.tree_util.tree_leaves(params))
    plain = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3))
    guarded = jaxnan.skip_nonfinite(
        optax.chain(jaxnan.clip_by_global_norm(1.0), optax.adam(1e-3))
    )
    skip_only = jaxnan.skip_nonfinite(optax.adam(1e-3))
    n_plain = _top_level_reductions(plain.update, g, plain.init(params), params)
    n_guarded = _top_level_reductions(guarded.update, g, guarded.init(params), params)
    n_skip = _top_level_reductions(skip_only.update, g, skip_only.init(params), params)
    assert n_plain == n_leaves
    # One fused reduction per shape: leaves of one shape share a reduction.
    n_shapes = len({x.shape for x in jax.tree_util.tree_leaves(params)})
    assert n_shapes < n_leaves
    # The clip's norm is reused (no second norm); the outgoing check adds one
    # reduction per shape.
    assert n_guarded == n_plain + n_shapes
    # The incoming check shares the outgoing check's loops.
    assert n_skip == n_shapes


def test_skip_with_leading_clip_skips_on_nonfinite_only():
    params = make_params()
    tx = jaxnan.skip_nonfinite(
        optax.chain(jaxnan.clip_by_global_norm(1.0), optax.adam(1e-2))
    )
    s0 = tx.init(params)
    u, s1 = jax.jit(tx.update)(poison(grads_like(params), jnp.nan), s0, params)
    chex.assert_trees_all_equal(s1.inner_state, s0.inner_state)
    assert int(s1.nonfinite_total) == 1
    huge = jax.tree.map(lambda x: x * 1e25, grads_like(params))  # squares overflow
    u, s2 = jax.jit(tx.update)(huge, s0, params)
    assert int(s2.nonfinite_total) == 0 and bool(jaxnan.all_finite(u))


# ----------------------------------------------------------------- bad input


def test_errors_name_the_argument():
    params = make_params()
    tx = jaxnan.skip_nonfinite(optax.adam(1e-2))
    with pytest.raises(ValueError, match=re.escape("empty params tree")):
        tx.init({})
    with pytest.raises(ValueError, match=re.escape("updates=None")):
        tx.update(None, tx.init(params), params)
    # None is an empty subtree (eqx.filter); an extra one changes the structure.
    with pytest.raises(ValueError, match=re.escape("different tree structures")):
        tx.update({**grads_like(params), "out": None}, tx.init(params), params)
    with pytest.raises(ValueError, match=re.escape("different tree structures")):
        tx.update({"dense": grads_like(params)["dense"]}, tx.init(params), params)
    with pytest.raises(TypeError, match=re.escape("expected SkipNonfiniteState")):
        tx.update(grads_like(params), optax.adam(1e-2).init(params), params)
    with pytest.raises(TypeError, match=re.escape("updates['out'] with dtype int32")):
        tx.update({**grads_like(params), "out": jnp.arange(3)}, tx.init(params), params)
    with pytest.raises(
        ValueError, match=re.escape("give_up_after must be an int >= 1, got 0")
    ):
        jaxnan.skip_nonfinite(optax.adam(1e-2), give_up_after=0)
    with pytest.raises(TypeError, match=re.escape("inner must be an optax")):
        jaxnan.skip_nonfinite(lambda g: g)
    with pytest.raises(ValueError, match=re.escape("max_norm must be > 0, got -1.0")):
        jaxnan.clip_by_global_norm(-1.0)
    z = jaxnan.zero_nonfinite()
    with pytest.raises(TypeError, match=re.escape("expected ZeroNonfiniteState")):
        z.update(grads_like(params), tx.init(params))
    with pytest.raises(
        ValueError, match=re.escape("updates and params have different")
    ):
        z.update({"out": jnp.ones(3)}, z.init(params))
    c = jaxnan.clip_by_global_norm(1.0)
    with pytest.raises(TypeError, match=re.escape("expected ClipByGlobalNormState")):
        c.update(grads_like(params), z.init(params))


# ------------------------------------------------ the promise (issue 13)
# No nonfinite value reaches the params or the optimizer state through a guard,
# whatever made it: the outgoing check catches what the inner optimizer makes.

INNER_POISON = {
    # adam with eps=0 divides 0 by 0 on a zero-gradient entry
    "adam_eps0": (
        lambda: optax.adam(1e-2, eps=0.0),
        lambda: {"w": jnp.ones(3)},
        lambda: {"w": jnp.array([1.0, 0.0, 1.0])},
    ),
    # float16 Adam, gradients near 1e-4: the second moment underflows to 0
    "f16_eps_underflow": (
        lambda: optax.adam(1e-2),
        lambda: {"w": jnp.ones(3, jnp.float16)},
        lambda: {"w": jnp.full(3, 1e-4, jnp.float16)},
    ),
    # float16 Adam, gradient 300: nu = g^2 overflows to Inf, the update is a
    # finite 0, and only the state holds the Inf
    "f16_nu_overflow": (
        lambda: optax.adam(1e-2),
        lambda: {"w": jnp.ones(3, jnp.float16)},
        lambda: {"w": jnp.full(3, 300.0, jnp.float16)},
    ),
    # a NaN param, AdamW weight decay: finite gradients, NaN update
    "nan_param_weight_decay": (
        lambda: optax.adamw(1e-2),
        lambda: {"w": jnp.array([1.0, jnp.nan, 1.0])},
        lambda: {"w": jnp.ones(3)},
    ),
}


@pytest.mark.parametrize("case", list(INNER_POISON))
def test_skip_nonfinite_skips_what_the_inner_optimizer_makes_nonfinite(case):
    make_inner, make_params_, make_grads = INNER_POISON[case]
    params, g = make_params_(), make_grads()
    tx = jaxnan.skip_nonfinite(make_inner())
    s0 = tx.init(params)
    u, s1 = jax.jit(tx.update)(g, s0, params)
    chex.assert_trees_all_equal(u, jax.tree.map(jnp.zeros_like, params))
    chex.assert_trees_all_equal(s1.inner_state, s0.inner_state)
    assert int(s1.nonfinite_total) == 1 and int(s1.inner_nonfinite_total) == 1
    assert int(s1.nonfinite_streak) == 1 and int(s1.last_nonfinite_step) == 0
    new_params = optax.apply_updates(params, u)
    chex.assert_trees_all_equal(new_params, params)


def test_poisoned_inner_state_never_applied_and_gives_up():
    params = {"w": jnp.ones(3)}
    tx = jaxnan.skip_nonfinite(optax.adam(1e-2), give_up_after=2)
    s = tx.init(params)
    mu = s.inner_state[0].mu
    s = s._replace(
        inner_state=(s.inner_state[0]._replace(mu={"w": mu["w"].at[1].set(jnp.nan)}),)
        + tuple(s.inner_state[1:])
    )
    step = jax.jit(tx.update)
    for _ in range(2):
        u, s = step({"w": jnp.ones(3)}, s, params)
        assert not np.asarray(u["w"]).any()
    assert bool(s.gave_up) and int(s.inner_nonfinite_total) == 2


@pytest.mark.default_compiler
def test_finite_step_with_outgoing_check_is_bit_exact_to_inner():
    params = make_params()
    g = grads_like(params)
    inner = optax.adamw(1e-2)
    tx = jaxnan.skip_nonfinite(inner)
    u, s = jax.jit(tx.update)(g, tx.init(params), params)
    u_ref, s_ref = jax.jit(inner.update)(g, inner.init(params), params)
    chex.assert_trees_all_equal(u, u_ref)
    chex.assert_trees_all_equal(s.inner_state, s_ref)
    assert int(s.nonfinite_total) == 0 and int(s.inner_nonfinite_total) == 0


def test_update_that_overflows_the_param_dtype_is_skipped():
    params = {"w": jnp.full(2, 6e4, jnp.float16)}
    tx = jaxnan.skip_nonfinite(optax.sgd(-1.0))  # finite update, p + u = inf
    u, s = tx.update({"w": jnp.full(2, 2e4, jnp.float16)}, tx.init(params), params)
    assert int(s.inner_nonfinite_total) == 1 and not np.asarray(u["w"]).any()


# ------------------------------------------- clip numerics (issue 13)


def _clip(g, max_norm=1.0):
    tx = jaxnan.clip_by_global_norm(max_norm)
    return tx.update(g, tx.init(g))


def test_clip_float64_squares_overflow_gives_finite_exact_result():
    with jax.enable_x64(True):
        u, s = _clip({"w": jnp.array([1e200, 1.0])})
        assert u["w"].dtype == jnp.float64
        np.testing.assert_array_equal(np.asarray(u["w"]), [1.0, 1e-200])
        assert float(s.global_norm) == 1e200
        u, s = _clip({"w": jnp.array([1e39, 0.0])})
        np.testing.assert_array_equal(np.asarray(u["w"]), [1.0, 0.0])
        params = {"w": jnp.zeros(2)}
        tx = jaxnan.skip_nonfinite(
            optax.chain(jaxnan.clip_by_global_norm(1.0), optax.sgd(1.0))
        )
        u, s = jax.jit(tx.update)({"w": jnp.array([1e200, 1.0])}, tx.init(params))
        np.testing.assert_array_equal(np.asarray(u["w"]), [-1.0, -1e-200])
        assert int(s.nonfinite_total) == 0


def test_clip_float16_norm_above_65504_is_not_zeroed():
    u, s = _clip({"w": jnp.full(2, 6e4, jnp.float16)})
    assert u["w"].dtype == jnp.float16
    np.testing.assert_allclose(np.asarray(u["w"], np.float32), 0.7071, rtol=1e-3)


@pytest.mark.parametrize("max_norm", [0.5, 1e3])
@pytest.mark.default_compiler
def test_clip_float64_bit_exact_to_optax(max_norm):
    with jax.enable_x64(True):
        g = {
            "a": jax.random.normal(jax.random.PRNGKey(0), (7, 5), jnp.float64),
            "b": jax.random.normal(jax.random.PRNGKey(1), (3,), jnp.float64) * 3,
        }
        ref, _ = optax.clip_by_global_norm(max_norm).update(g, optax.EmptyState())
        u, _ = _clip(g, max_norm)
        chex.assert_trees_all_equal(u, ref)


@pytest.mark.parametrize(
    "bad", [np.float32(-1.0), jnp.float32(-1.0), np.array(0.0), float("inf")]
)
def test_clip_rejects_bad_max_norm_of_any_type(bad):
    with pytest.raises(ValueError, match=re.escape("max_norm must be")):
        jaxnan.clip_by_global_norm(bad)


def test_clip_rejects_non_numbers():
    for bad in ("1.0", jnp.ones(2), True):
        with pytest.raises(TypeError, match=re.escape("max_norm must be")):
            jaxnan.clip_by_global_norm(bad)


def test_clip_accepts_array_max_norm_and_inject_hyperparams():
    g = {"w": jnp.array([3.0, 4.0])}
    u, _ = _clip(g, np.float32(1.0))
    np.testing.assert_allclose(np.asarray(u["w"]), [0.6, 0.8])
    tx = optax.inject_hyperparams(jaxnan.clip_by_global_norm)(max_norm=1.0)
    u, _ = jax.jit(tx.update)(g, tx.init(g))
    np.testing.assert_allclose(np.asarray(u["w"]), [0.6, 0.8])


# --------------------------------------- differentiation (issue 13)


def test_grad_jvp_vmap_through_clip_match_optax():
    g = {"w": jnp.array([3.0, 4.0, 0.5])}

    def through(tx):
        def f(g):
            u, _ = tx.update(g, tx.init(g))
            return jnp.sum(u["w"] * jnp.arange(1.0, 4.0))

        return f

    mine = through(jaxnan.clip_by_global_norm(1.0))
    ref = through(optax.clip_by_global_norm(1.0))
    chex.assert_trees_all_close(jax.grad(mine)(g), jax.grad(ref)(g), rtol=1e-6)
    t = {"w": jnp.array([1.0, -1.0, 2.0])}
    chex.assert_trees_all_close(
        jax.jvp(mine, (g,), (t,)), jax.jvp(ref, (g,), (t,)), rtol=1e-6
    )
    batch = {"w": jnp.stack([g["w"], 0.1 * g["w"], g["w"].at[0].set(jnp.nan)])}
    got = jax.vmap(mine)(batch)
    want = jnp.stack([mine({"w": batch["w"][i]}) for i in range(3)])
    chex.assert_trees_all_close(got, want)


def test_grad_through_the_overflow_safe_path():
    g = jnp.array([1e20, 1e20, 0.0])
    # norm = sqrt(2) * 1e20, d norm / d g = g / norm
    d = jax.grad(
        lambda x: (
            jaxnan.clip_by_global_norm(1.0)
            .update({"w": x}, jaxnan.clip_by_global_norm(1.0).init({"w": x}))[1]
            .global_norm
        )
    )(g)
    np.testing.assert_allclose(np.asarray(d), [0.70710677, 0.70710677, 0.0])


def test_grad_and_jvp_through_skip_nonfinite_of_chain_with_clip():
    params = {"w": jnp.ones(3)}
    tx = jaxnan.skip_nonfinite(
        optax.chain(jaxnan.clip_by_global_norm(1.0), optax.sgd(1.0))
    )
    s = tx.init(params)

    def f(g):
        u, _ = tx.update({"w": g}, s, params)
        return jnp.sum(u["w"] ** 2)

    g = jnp.array([3.0, 4.0, 0.0])
    ref = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(1.0))

    def f_ref(g):
        u, _ = ref.update({"w": g}, ref.init(params), params)
        return jnp.sum(u["w"] ** 2)

    chex.assert_trees_all_close(jax.grad(f)(g), jax.grad(f_ref)(g), atol=1e-7)
    # The tangent is 0 in exact arithmetic (a clipped norm does not move):
    # both sides give rounding noise of order 1e-7.
    chex.assert_trees_all_close(
        jax.jvp(f, (g,), (g,)), jax.jvp(f_ref, (g,), (g,)), rtol=1e-6, atol=1e-6
    )
    batch = jnp.stack([g, 0.1 * g, g.at[0].set(jnp.nan)])
    got = jax.vmap(f)(batch)
    np.testing.assert_allclose(
        np.asarray(got), [f_ref(g), f_ref(0.1 * g), 0.0], rtol=1e-6
    )  # the NaN row is skipped: zero updates


# ----------------------------------------- Python-float leaves (issue 13)


def test_python_float_leaves():
    g = {"a": 3.0, "b": jnp.array([4.0])}
    u, s = _clip(g)
    np.testing.assert_allclose(np.asarray(u["a"]), 0.6)
    np.testing.assert_allclose(np.asarray(u["b"]), [0.8])
    for tx in (jaxnan.zscore_clip(warmup=2), jaxnan.adagc(warmup=1)):
        u, _ = tx.update(g, tx.init(g))
        assert np.isfinite(np.asarray(u["a"]))


# ------------------------------------------- bad input (issue 13)


def test_loss_must_be_a_number():
    params = make_params()
    for tx in (
        jaxnan.skip_nonfinite(optax.sgd(1.0)),
        jaxnan.skip_spikes(optax.sgd(1.0)),
        jaxnan.dynamic_loss_scale(optax.sgd(1.0)),
    ):
        with pytest.raises(TypeError, match=re.escape("loss= must be the numeric")):
            tx.update(grads_like(params), tx.init(params), params, loss="nan")


def test_wrong_leaf_shape_names_the_leaf():
    params = make_params()
    g = {**grads_like(params), "out": jnp.ones(4)}
    msg = "updates['out'] has shape (4,), but params['out'] has shape (3,)"
    for tx in (
        jaxnan.skip_nonfinite(optax.adam(1e-2)),
        jaxnan.skip_spikes(optax.adam(1e-2)),
        jaxnan.dynamic_loss_scale(optax.adam(1e-2)),
    ):
        with pytest.raises(ValueError, match=re.escape(msg)):
            tx.update(g, tx.init(params), params)


def test_guards_validate_the_tree():
    params = make_params()
    g = {"dense": grads_like(params)["dense"]}
    for tx in (
        jaxnan.skip_spikes(optax.adam(1e-2)),
        jaxnan.dynamic_loss_scale(optax.adam(1e-2)),
    ):
        with pytest.raises(ValueError, match=re.escape("different tree structures")):
            tx.update(g, tx.init(params), params)


def test_give_up_after_of_any_int_type():
    tx = jaxnan.skip_nonfinite(optax.sgd(1.0), give_up_after=np.int64(2))
    params = {"w": jnp.ones(1)}
    s = tx.init(params)
    for _ in range(2):
        _, s = tx.update({"w": jnp.array([jnp.nan])}, s, params)
    assert bool(s.gave_up)
    for bad in (2.0, "2", True):
        with pytest.raises(TypeError, match=re.escape("give_up_after must be an int")):
            jaxnan.skip_nonfinite(optax.sgd(1.0), give_up_after=bad)


# ------------------------- every transform: donation, sharding, Equinox

EVERY_TRANSFORM = {
    "zero_nonfinite": lambda: jaxnan.zero_nonfinite(),
    "clip_by_global_norm": lambda: jaxnan.clip_by_global_norm(1.0),
    "skip_nonfinite": lambda: jaxnan.skip_nonfinite(
        optax.chain(jaxnan.clip_by_global_norm(1.0), optax.adamw(1e-2))
    ),
    "zscore_clip": lambda: jaxnan.zscore_clip(warmup=2),
    "skip_spikes": lambda: jaxnan.skip_spikes(optax.adam(1e-2), window=4),
    "adagc": lambda: jaxnan.adagc(warmup=1),
    "dynamic_loss_scale": lambda: jaxnan.dynamic_loss_scale(optax.adam(1e-2)),
    "monitor": lambda: jaxnan.monitor(optax.sgd(0.1)),
}


@pytest.mark.parametrize("name", list(EVERY_TRANSFORM))
def test_every_state_has_distinct_buffers_and_can_be_donated(name, mesh8):
    tx = EVERY_TRANSFORM[name]()
    params = {"w": jnp.linspace(-1.0, 1.0, 32).reshape(8, 4), "b": jnp.zeros(4)}
    g = grads_like(params)
    state = tx.init(params)
    ptrs = buffer_pointers(state)
    assert len(set(ptrs)) == len(ptrs), "two state fields share a buffer"
    step = jax.jit(lambda s, g: tx.update(g, s, params)[1], donate_argnums=0)
    ref = jax.jit(lambda s, g: tx.update(g, s, params)[1])(tx.init(params), g)
    chex.assert_trees_all_equal(step(state, g), ref)
    # sharded across the 8 devices (replicated state, sharded gradients)
    state = replicate(tx.init(params), mesh8)
    ptrs = buffer_pointers(state)
    assert len(set(ptrs)) == len(ptrs)
    chex.assert_trees_all_close(step(state, shard_leading(g, mesh8)), ref)


@pytest.mark.parametrize("name", list(EVERY_TRANSFORM))
def test_every_transform_takes_equinox_filtered_trees(name):
    eqx = pytest.importorskip("equinox")
    model = eqx.nn.MLP(3, 2, 4, 1, key=jax.random.PRNGKey(0))
    params = eqx.filter(model, eqx.is_array)
    assert None in jax.tree.leaves(params, is_leaf=lambda x: x is None)
    x = jnp.ones((5, 3))

    def loss(m):
        return jnp.mean(jax.vmap(m)(x) ** 2)

    grads = eqx.filter_grad(loss)(model)
    tx = EVERY_TRANSFORM[name]()
    state = tx.init(params)
    u, state = tx.update(grads, state, params)
    new = eqx.apply_updates(model, u)
    assert bool(jaxnan.all_finite(eqx.filter(new, eqx.is_array)))
    if name == "skip_nonfinite":
        ref_tx = optax.chain(jaxnan.clip_by_global_norm(1.0), optax.adamw(1e-2))
        ref_u, _ = ref_tx.update(grads, ref_tx.init(params), params)
        # the guard's norm is summed in another program: an ulp apart at most
        chex.assert_trees_all_close(u, ref_u, rtol=1e-6, atol=1e-9)
