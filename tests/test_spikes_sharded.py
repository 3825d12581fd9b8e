"""FSDP: `zscore_clip`, `adagc` and `skip_spikes` on sharded params and gradients.

Each transform runs the same steps (healthy, a norm spike, a NaN, a loss
spike) three ways over the 8 forced CPU devices: on one device with whole
tensors, under sharded `jit` (`NamedSharding`, FSDP: leaves split over the
mesh, a small one replicated), and inside `shard_map` with `shard_specs`.
With gradients of small integers every sum of squares is exact, whatever
the order XLA adds the blocks in, so the three runs agree bit for bit on the
norms, the decisions and the params. The float statistics (EMA means and
variances) may differ by an ulp inside `shard_map`: XLA compiles their scalar
arithmetic (``alpha * mean + (1 - alpha) * norm``) into other fusions in the
partitioned program (measured: 1 ulp of `zclip_mean`, 2 steps out of 9). With
random gradients the blocks' partial sums are added in another order than
one reduction over the whole tensor, so norms may differ by a few ulps (the
tolerance below), and every decision (clipped, skipped, why) is the same.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding

import jaxnan
from tests.helpers import P, mesh_of

SPECS = {"w": P("d"), "v": P(None, "d"), "b": P()}
SHAPES = {"w": (16, 4), "v": (3, 8), "b": (3,)}
SPIKE, NAN, LOSS_SPIKE = 5, 6, 7
STEPS = 9


def _grads(exact: bool):
    rng = np.random.default_rng(0)
    out = []
    for t in range(STEPS):
        g = {}
        for k, shape in SHAPES.items():
            if exact:
                x = rng.integers(-3, 4, size=shape).astype(np.float32)
            else:
                x = rng.normal(size=shape).astype(np.float32)
            if t == SPIKE:
                x = x * 64
            g[k] = x
        if t == NAN:
            g["w"][11, 2] = np.nan  # in the block of device 5 only
        out.append(g)
    return out


def _losses():
    return [1.0, 1.1, 0.9, 1.0, 1.05, 1.0, 1.0, 80.0, 1.0]


def _txs(**kw):
    return {
        "zscore_clip": optax.chain(
            jaxnan.zscore_clip(warmup=3, z_threshold=2.0, **kw), optax.sgd(0.1)
        ),
        "adagc": optax.chain(
            jaxnan.adagc(warmup=2, relative_threshold=1.05, **kw), optax.sgd(0.1)
        ),
        "skip_spikes": jaxnan.skip_spikes(
            optax.sgd(0.1), window=8, min_history=3, threshold=3.0, **kw
        ),
        "skip_spikes_clip": jaxnan.skip_spikes(
            optax.chain(jaxnan.clip_by_global_norm(20.0), optax.sgd(0.1)),
            window=8,
            min_history=3,
            threshold=3.0,
            **kw,
        ),
    }


def _step(tx):
    def step(params, state, g, loss):
        u, state = tx.update(g, state, params, loss=loss)
        return optax.apply_updates(params, u), state

    return step


def _run(name: str, how: str, grads):
    """(params, state) after each step, as numpy; for shard_map, the state
    of every device (leading axis 8)."""
    mesh = mesh_of(8)
    params = {k: jnp.zeros(s, jnp.float32) for k, s in SHAPES.items()}
    if how == "shard_map":
        tx = _txs(shard_specs=SPECS)[name]
    else:
        tx = _txs()[name]
    state = tx.init(params)
    step = _step(tx)
    if how == "jit_sharded":
        put = {k: NamedSharding(mesh, s) for k, s in SPECS.items()}
        params = jax.device_put(params, put)
        fn = jax.jit(step)
    elif how == "shard_map":
        state = jax.tree.map(lambda x: jnp.stack([x] * 8), state)

        def per_device(params, state, g, loss):
            state = jax.tree.map(lambda x: x[0], state)
            params, state = step(params, state, g, loss)
            return params, jax.tree.map(lambda x: x[None], state)

        fn = jax.jit(
            jax.shard_map(
                per_device,
                mesh=mesh,
                in_specs=(SPECS, P("d"), SPECS, P()),
                out_specs=(SPECS, P("d")),
                check_vma=False,
            )
        )
    else:
        fn = jax.jit(step)
    out = []
    for g, loss in zip(grads, _losses()):
        if how == "jit_sharded":
            g = jax.device_put(g, put)
        params, state = fn(params, state, g, jnp.float32(loss))
        out.append(jax.device_get((params, state)))
    return out


def _assert_states_match(single, other):
    """Integer and bool leaves and the norms bit for bit; float statistics
    within 2 ulps (the fusions of the EMA arithmetic, module docstring)."""

    def one(a, b):
        a, b = np.asarray(a), np.asarray(b)
        if a.dtype.kind in "biu":
            np.testing.assert_array_equal(a, b)
        else:
            np.testing.assert_allclose(a, b, rtol=2.5e-7, atol=0)

    jax.tree.map(one, single, other)
    for field in ("zclip_norm", "spike_norm_window", "spike_loss_window"):
        for leaf in optax.tree_utils.tree_get_all_with_path(single, field):
            got = optax.tree_utils.tree_get(other, field)
            np.testing.assert_array_equal(leaf[1], got)


def _decisions(name, state):
    if name == "zscore_clip":
        s = state[0]
        return bool(s.zclip_clipped), int(s.zclip_clipped_total)
    if name == "adagc":
        s = state[0]
        return jax.tree.map(bool, s.adagc_clipped), int(s.adagc_finite_steps)
    return int(state.spike_skips_total), int(state.last_skip_reason)


NAMES = ["zscore_clip", "adagc", "skip_spikes", "skip_spikes_clip"]


@pytest.mark.parametrize("name", NAMES)
def test_exact_gradients_sharded_equal_replicated_bit_for_bit(name):
    grads = _grads(exact=True)
    single = _run(name, "single", grads)
    jitted = _run(name, "jit_sharded", grads)
    mapped = _run(name, "shard_map", grads)
    for t in range(STEPS):
        chex.assert_trees_all_equal(single[t], jitted[t])
        params, states = mapped[t]
        chex.assert_trees_all_equal(single[t][0], params)
        _assert_states_match(single[t][1], jax.tree.map(lambda x: x[0], states))
        for d in range(1, 8):  # every device holds the same state, bit for bit
            chex.assert_trees_all_equal(
                jax.tree.map(lambda x: x[0], states),
                jax.tree.map(lambda x, d=d: x[d], states),
            )
    # The steps did what they are for: a clip or a skip at the spike and the NaN.
    final = single[-1][1]
    if name == "zscore_clip":
        assert int(final[0].zclip_clipped_total) >= 1
    elif name == "adagc":
        assert int(final[0].adagc_finite_steps) == STEPS - 1  # the NaN step
    else:
        assert int(final.spike_nonfinite_total) == 1
        assert int(final.norm_spike_total) + int(final.loss_spike_total) >= 2


@pytest.mark.parametrize("name", NAMES)
def test_random_gradients_same_decisions_within_ulps(name):
    # Summing the blocks' squares in another order than one reduction over
    # the whole tensor moves the norm by a few ulps, and so the clip factor.
    grads = _grads(exact=False)
    single = _run(name, "single", grads)
    mapped = _run(name, "shard_map", grads)
    jitted = _run(name, "jit_sharded", grads)
    for t in range(STEPS):
        for other in (mapped[t], jitted[t]):
            params, state = other
            if other is mapped[t]:
                state = jax.tree.map(lambda x: x[0], state)
            chex.assert_trees_all_close(single[t][0], params, rtol=4e-6, atol=1e-7)
            assert _decisions(name, single[t][1]) == _decisions(name, state), t
        states = mapped[t][1]
        jax.tree.map(lambda x: np.testing.assert_array_equal(x, x[:1] + 0 * x), states)


def test_without_shard_specs_each_device_sees_its_block_norm():
    # The failure shard_specs fixes: inside shard_map the plain transform
    # takes the norm of the device's block.
    grads = _grads(exact=True)
    mesh = mesh_of(8)
    tx = jaxnan.zscore_clip(warmup=3)
    whole = tx.update(grads[0], tx.init(grads[0]))[1].zclip_norm

    def norm_of(tx):
        def per_device(g):
            return tx.update(g, tx.init(g))[1].zclip_norm[None]

        mapped = jax.shard_map(
            per_device, mesh=mesh, in_specs=(SPECS,), out_specs=P("d"), check_vma=False
        )
        return np.asarray(jax.jit(mapped)(grads[0]))

    assert not np.any(norm_of(tx) == whole)
    np.testing.assert_array_equal(
        norm_of(jaxnan.zscore_clip(warmup=3, shard_specs=SPECS)), np.full(8, whole)
    )


def test_overflowing_block_gives_the_overflow_safe_whole_norm():
    g = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
    g["w"][3, 0] = 1e20  # squares overflow float32 in device 1's block
    g["w"][12, 1] = 3e19
    g["v"][0, 0] = 4.0
    mesh = mesh_of(8)
    for make in (jaxnan.zscore_clip, jaxnan.adagc):
        single = jax.jit(lambda g, make=make: make().update(g, make().init(g)))(g)
        tx = make(shard_specs=SPECS)
        mapped = jax.jit(
            jax.shard_map(
                lambda g, tx=tx: tx.update(g, tx.init(g)),
                mesh=mesh,
                in_specs=(SPECS,),
                out_specs=(SPECS, P()),
                check_vma=False,
            )
        )(g)
        chex.assert_trees_all_close(single, mapped, rtol=1e-6)
    tx = jaxnan.zscore_clip(shard_specs=SPECS)
    state = jax.jit(
        jax.shard_map(
            lambda g: tx.update(g, tx.init(g))[1],
            mesh=mesh,
            in_specs=(SPECS,),
            out_specs=P(),
            check_vma=False,
        )
    )(g)
    np.testing.assert_allclose(float(state.zclip_norm), np.hypot(1e20, 3e19), 1e-6)


def test_shard_specs_outside_shard_map_is_a_clear_error():
    g = {k: jnp.zeros(s) for k, s in SHAPES.items()}
    tx = jaxnan.adagc(shard_specs=SPECS)
    with pytest.raises(ValueError, match="shard_specs names the mesh axis 'd'"):
        tx.update(g, tx.init(g))


def test_shard_specs_not_a_prefix_is_a_clear_error():
    g = {k: jnp.zeros(s) for k, s in SHAPES.items()}
    tx = jaxnan.zscore_clip(shard_specs={"w": P("d")})
    with pytest.raises(ValueError, match="shard_specs must be a tree prefix"):
        tx.update(g, tx.init(g))


def test_two_axis_mesh_data_and_fsdp():
    # Gradients averaged over 'data' (replicas) and split over 'fsdp': the
    # replicas agree over axis_name, the blocks are summed over shard_specs.
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "fsdp"))
    specs = {"w": P("fsdp"), "v": P(None, "fsdp"), "b": P()}
    grads = _grads(exact=True)
    tx1 = jaxnan.zscore_clip(warmup=3, z_threshold=2.0)
    txm = jaxnan.zscore_clip(
        warmup=3, z_threshold=2.0, axis_name="data", shard_specs=specs
    )
    mapped = jax.jit(
        jax.shard_map(
            lambda g, s: txm.update(g, s),
            mesh=mesh,
            in_specs=(specs, P()),
            out_specs=(specs, P()),
            check_vma=False,
        )
    )
    s1 = sm = tx1.init(grads[0])
    for g in grads:
        u1, s1 = jax.jit(tx1.update)(g, s1)
        um, sm = mapped(g, sm)
        chex.assert_trees_all_equal(u1, um)
        assert float(s1.zclip_norm) == float(sm.zclip_norm)
        assert bool(s1.zclip_clipped) == bool(sm.zclip_clipped)


def test_skip_spikes_with_adam_moments_sharded_like_the_params():
    # The inner state (Adam's moments) is split like the params; the
    # outgoing check agrees over the shard axes, so every device skips the
    # NaN step and takes the one-device run's decisions. Adam's elementwise
    # arithmetic is fused differently in the partitioned program (1 ulp of a
    # few entries per step, measured, compounding over the 9 steps), hence
    # the tolerance of a few ulps of the terms on params and moments
    # (absolute near 0, where the moments cancel).
    grads = _grads(exact=True)
    mesh = mesh_of(8)

    def make(**kw):
        return jaxnan.skip_spikes(optax.adam(0.1), window=8, min_history=3, **kw)

    params = {k: jnp.zeros(s, jnp.float32) for k, s in SHAPES.items()}
    tx1, txm = make(), make(shard_specs=SPECS)
    state_specs = jax.tree.map(
        lambda _: P(), txm.init(params), is_leaf=lambda x: isinstance(x, jax.Array)
    )
    state_specs = state_specs._replace(
        spike_inner_state=(
            optax.ScaleByAdamState(P(), SPECS, SPECS),
            optax.EmptyState(),
        )
    )
    mapped = jax.jit(
        jax.shard_map(
            _step(txm),
            mesh=mesh,
            in_specs=(SPECS, state_specs, SPECS, P()),
            out_specs=(SPECS, state_specs),
            check_vma=False,
        )
    )
    p1, s1, pm, sm = params, tx1.init(params), params, txm.init(params)
    for g, loss in zip(grads, _losses()):
        p1, s1 = jax.jit(_step(tx1))(p1, s1, g, jnp.float32(loss))
        pm, sm = mapped(pm, sm, g, jnp.float32(loss))
        chex.assert_trees_all_close(p1, pm, rtol=2e-6, atol=1e-7)
        chex.assert_trees_all_close(
            s1.spike_inner_state, sm.spike_inner_state, rtol=2e-6, atol=1e-7
        )
        assert int(s1.spike_skips_total) == int(sm.spike_skips_total)
        assert int(s1.last_skip_reason) == int(sm.last_skip_reason)
    assert int(sm.spike_nonfinite_total) == 1
