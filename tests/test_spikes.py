"""zscore_clip (ZClip), skip_spikes and adagc against their reference rules."""

import math
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

import jaxnan
from tests.helpers import P, assert_no_host_callback, shard_map_over

NAN = float("nan")


def run_scan(tx, params, grads_seq, losses=None):
    """Applies tx.update over a sequence under jit + lax.scan.

    Returns (updates per step, state after each step).
    """

    @jax.jit
    def go(grads_seq, losses):
        def body(state, xs):
            g, loss = xs
            kw = {} if losses is None else {"loss": loss}
            u, state = tx.update(g, state, params, **kw)
            return state, (u, state)

        n = jax.tree_util.tree_leaves(grads_seq)[0].shape[0]
        xs = (grads_seq, jnp.zeros(n) if losses is None else losses)
        _, out = lax.scan(body, tx.init(params), xs)
        return out

    return go(grads_seq, losses)


# --------------------------------------------------------------------------
# ZClip


def zclip_reference(norms, *, warmup, z_thr, alpha, eps, mode, max_norm=None):
    """The ZClip update rule, step by step, in float64 (bluorion-com/ZClip).

    A nonfinite norm changes nothing and is not clipped (jaxnan's rule).
    Returns the clipped norms and the (mean, var) after each step.
    """
    buf, mean, var = [], None, None
    outs, stats = [], []
    cap = math.inf if max_norm is None else max_norm
    for g in norms:
        if not math.isfinite(g):
            outs.append(g)
        elif mean is None:
            buf.append(g)
            outs.append(min(g, cap))
            if len(buf) == warmup:
                mean = sum(buf) / warmup
                var = sum((x - mean) ** 2 for x in buf) / warmup
        else:
            std = math.sqrt(var)
            z = (g - mean) / (std + eps)
            c = g
            if z > z_thr:
                c = mean + (z_thr**2 / z) * std if mode == "zscore" else mean
            outs.append(min(c, cap))
            mean = alpha * mean + (1 - alpha) * c
            var = alpha * var + (1 - alpha) * (c - mean) ** 2
        stats.append((mean or 0.0, var or 0.0))
    return outs, stats


def synthetic_norms(n=40, seed=0):
    rng = np.random.default_rng(seed)
    norms = list(1.0 + 0.1 * rng.standard_normal(n))
    norms[12] *= 10.0
    norms[18] = NAN
    norms[25] *= 50.0
    norms[30] *= 1.4
    return norms


@pytest.mark.parametrize("mode", ["zscore", "mean"])
def test_zscore_clip_follows_the_zclip_equations_step_by_step(mode):
    norms = synthetic_norms()
    kw = dict(warmup=5, alpha=0.9, eps=1e-6)
    tx = jaxnan.zscore_clip(z_threshold=2.5, mode=mode, **kw)
    # one leaf [g, 0]: its norm is g; a NaN step is [nan, 0]
    grads = {"w": jnp.array([[g, 0.0] for g in norms], jnp.float32)}
    updates, states = run_scan(tx, {"w": jnp.zeros(2)}, grads)
    want, stats = zclip_reference(norms, z_thr=2.5, mode=mode, **kw)
    got = np.asarray(updates["w"][:, 0])
    np.testing.assert_allclose(got, want, rtol=2e-5)
    np.testing.assert_allclose(
        np.asarray(states.zclip_mean), [s[0] for s in stats], rtol=2e-5
    )
    np.testing.assert_allclose(
        np.asarray(states.zclip_var), [s[1] for s in stats], rtol=5e-5
    )
    clipped = [i for i, c in enumerate(np.asarray(states.zclip_clipped)) if c]
    assert 12 in clipped and 25 in clipped
    # the NaN step: passed through, counted as no step, statistics untouched
    assert math.isnan(float(updates["w"][18, 0]))
    assert int(states.zclip_finite_steps[18]) == int(states.zclip_finite_steps[17])
    assert float(states.zclip_mean[18]) == float(states.zclip_mean[17])
    assert int(states.zclip_clipped_total[-1]) == len(clipped)


def test_zscore_clip_reciprocal_formula_on_one_spike():
    # warm-up 1, 2, 3: mean 2, population var 2/3; then a norm of 1000.
    tx = jaxnan.zscore_clip(warmup=3, z_threshold=2.5, eps=0.0)
    state = tx.init({"w": jnp.zeros(1)})
    for g in [1.0, 2.0, 3.0]:
        u, state = tx.update({"w": jnp.array([g])}, state)
        assert float(u["w"][0]) == g  # warm-up: never clipped without max_norm
    assert float(state.zclip_mean) == 2.0
    np.testing.assert_allclose(float(state.zclip_var), 2 / 3, rtol=1e-6)
    u, state = tx.update({"w": jnp.array([-1000.0])}, state)
    std = math.sqrt(2 / 3)
    z = 998 / std
    np.testing.assert_allclose(float(u["w"][0]), -(2 + 6.25 / z * std), rtol=1e-6)


def test_zscore_clip_max_norm_caps_warmup_and_mixed_nonfinite_leaves():
    tx = jaxnan.zscore_clip(warmup=2, max_norm=1.0)
    params = {"a": jnp.zeros(2), "b": jnp.zeros(1)}
    state = tx.init(params)
    u, state = tx.update({"a": jnp.array([3.0, NAN]), "b": jnp.array([4.0])}, state)
    # finite entries clipped by the finite-entry norm 5; NaN passes through
    chex.assert_trees_all_close(
        u, {"a": jnp.array([0.6, NAN]), "b": jnp.array([0.8])}, rtol=1e-6
    )
    assert int(state.zclip_finite_steps) == 0 and float(state.zclip_norm) == 5.0
    g = {"a": jnp.array([0.3, 0.0]), "b": jnp.array([0.4])}
    u, state = tx.update(g, state)
    chex.assert_trees_all_equal(u, g)  # below the cap: bit for bit
    assert int(state.zclip_finite_steps) == 1


def test_zscore_clip_max_norm_holds_for_a_norm_beyond_float32():
    # Entries near float32's max: the norm (about 1.2 * max) saturates at
    # float32's max in the statistics; the scaling divided by that, not by
    # the norm, and the result's norm was 1.2, above max_norm.
    big = float(jnp.finfo(jnp.float32).max)
    tx = jaxnan.zscore_clip(warmup=2, max_norm=1.0)
    g = {"a": jnp.array([0.9, -0.8]) * big, "b": jnp.array([0.3])}
    u, state = jax.jit(tx.update)(g, tx.init(g))
    np.testing.assert_allclose(np.asarray(u["a"]), [0.7474, -0.6644], rtol=1e-3)
    assert float(state.zclip_norm) == np.float32(big)


@pytest.mark.parametrize(
    ("kwargs", "msg"),
    [
        ({"mode": "median"}, "jaxnan.zscore_clip: mode must be 'zscore' or 'mean'"),
        ({"alpha": 1.0}, "jaxnan.zscore_clip: alpha must be > 0 and < 1, got 1.0."),
        ({"warmup": 1}, "jaxnan.zscore_clip: warmup must be an int >= 2, got 1."),
    ],
)
def test_zscore_clip_rejects_bad_hyperparameters(kwargs, msg):
    with pytest.raises(ValueError, match=re.escape(msg)):
        jaxnan.zscore_clip(**kwargs)


# --------------------------------------------------------------------------
# skip_spikes


def spike_sequence(n=40, seed=1):
    """Losses and gradient rows with one NaN loss (step 10), one norm spike (20)."""
    rng = np.random.default_rng(seed)
    losses = 2.0 + 0.05 * rng.standard_normal(n)
    grads = 0.1 * (1.0 + 0.05 * rng.standard_normal((n, 3)))
    losses[10] = NAN
    grads[20] *= 100.0
    return jnp.asarray(losses, jnp.float32), {"w": jnp.asarray(grads, jnp.float32)}


@pytest.fixture(scope="module")
def spike_run():
    losses, grads = spike_sequence()
    tx = jaxnan.skip_spikes(optax.adam(1e-2), window=16, threshold=6.0, min_history=4)
    params = {"w": jnp.zeros(3)}
    updates, states = run_scan(tx, params, grads, losses)
    return losses, grads, updates, states


def test_skip_spikes_one_nan_and_one_spike_skip_exactly_two_steps(spike_run):
    losses, grads, updates, states = spike_run
    zero_rows = np.all(np.asarray(updates["w"]) == 0, axis=1)
    assert list(np.flatnonzero(zero_rows)) == [10, 20]
    assert int(states.spike_nonfinite_total[-1]) == 1
    assert int(states.norm_spike_total[-1]) == 1
    assert int(states.loss_spike_total[-1]) == 0
    np.testing.assert_array_equal(
        np.asarray(states.spike_skips_total), np.cumsum(zero_rows)
    )
    assert int(states.last_skip_reason[15]) == jaxnan.SkipReason.NONFINITE
    assert int(states.last_skip_reason[-1]) == jaxnan.SkipReason.NORM_SPIKE
    assert int(states.last_skip_step[-1]) == 20
    # neither bad step entered the window
    fill = np.asarray(states.spike_window_fill)
    assert fill[9] == 10 and fill[10] == 10 and fill[19] == 16 and fill[20] == 16
    assert not np.isnan(np.asarray(states.spike_loss_window)).any()
    assert np.asarray(states.spike_norm_window).max() < 1.0


def test_skip_spikes_skipped_step_keeps_inner_state_bit_exact(spike_run):
    _, _, _, states = spike_run
    inner = states.spike_inner_state
    for t in (10, 20):
        before = jax.tree_util.tree_map(lambda x, t=t: x[t - 1], inner)
        after = jax.tree_util.tree_map(lambda x, t=t: x[t], inner)
        chex.assert_trees_all_equal(before, after)
    moved = jax.tree_util.tree_map(lambda x: x[11], inner)
    assert not np.array_equal(
        np.asarray(moved[0].mu["w"]), np.asarray(inner[0].mu["w"][10])
    )


def test_skip_spikes_matches_mean_plus_threshold_std_of_accepted_history():
    # accepted losses 1, 2, 3, 4: mean 2.5, sample std sqrt(5/3)
    tx = jaxnan.skip_spikes(optax.sgd(1.0), window=8, threshold=2.0, min_history=4)
    params = {"w": jnp.zeros(1)}
    g = {"w": jnp.array([1.0])}
    state = tx.init(params)
    update = jax.jit(tx.update)
    for loss in [1.0, 2.0, 3.0, 4.0]:
        _, state = update(g, state, params, loss=jnp.float32(loss))
    limit = 2.5 + 2.0 * math.sqrt(5 / 3)
    below = float(np.nextafter(np.float32(limit), np.float32(0)))
    above = float(np.nextafter(np.float32(limit), np.float32(10)))
    u, s1 = update(g, state, params, loss=jnp.float32(below))
    assert float(u["w"][0]) == -1.0 and int(s1.loss_spike_total) == 0
    u, s2 = update(g, state, params, loss=jnp.float32(above))
    assert float(u["w"][0]) == 0.0 and int(s2.loss_spike_total) == 1
    assert int(s2.last_skip_reason) == jaxnan.SkipReason.LOSS_SPIKE


def test_skip_spikes_before_min_history_only_nonfinite_skips():
    tx = jaxnan.skip_spikes(optax.sgd(1.0), window=8, min_history=3)
    params = {"w": jnp.zeros(1)}
    state = tx.init(params)
    for g in [1.0, 1e6, -jnp.inf]:
        u, state = tx.update({"w": jnp.array([g])}, state, params)
    assert int(state.spike_window_fill) == 2
    assert int(state.spike_nonfinite_total) == 1 and int(state.norm_spike_total) == 0


def test_skip_spikes_overflowing_squares_never_enter_the_window():
    # Finite entries whose float32 squares overflow: the one-pass norm is +Inf.
    huge = {"w": jnp.array([3e25, 4e25], jnp.float32)}
    ok = {"w": jnp.array([0.3, 0.4], jnp.float32)}
    params = {"w": jnp.zeros(2)}
    tx = jaxnan.skip_spikes(optax.sgd(1.0), window=8, min_history=3)
    state = tx.init(params)
    for g in [ok, huge, ok]:
        u, state = tx.update(g, state, params)
    assert int(state.spike_window_fill) == 2  # the huge step was skipped
    assert int(state.spike_nonfinite_total) == 1
    np.testing.assert_array_equal(np.asarray(state.spike_norm_window[:2]), [0.5, 0.5])
    # A leading clip supplies its overflow-safe norm (5e25): finite, accepted
    # before min_history (not a spike yet), and then clipped to norm 1.
    inner = optax.chain(jaxnan.clip_by_global_norm(1.0), optax.sgd(1.0))
    tx = jaxnan.skip_spikes(inner, window=8, min_history=3)
    state = tx.init(params)
    u, state = tx.update(huge, state, params)
    assert int(state.spike_window_fill) == 1 and int(state.spike_skips_total) == 0
    np.testing.assert_allclose(float(state.spike_norm_window[0]), 5e25, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(u["w"]), [-0.6, -0.8], rtol=1e-6)


def test_skip_spikes_reuses_a_leading_clip_norm():
    losses, grads = spike_sequence()
    inner = optax.chain(jaxnan.clip_by_global_norm(1e9), optax.sgd(0.1))
    tx = jaxnan.skip_spikes(inner, window=16, min_history=4)
    updates, states = run_scan(tx, {"w": jnp.zeros(3)}, grads, losses)
    zero_rows = np.all(np.asarray(updates["w"]) == 0, axis=1)
    assert list(np.flatnonzero(zero_rows)) == [10, 20]


def test_skip_spikes_jit_has_no_host_sync():
    tx = jaxnan.skip_spikes(optax.sgd(1.0), window=4, min_history=2)
    params = {"w": jnp.zeros(2)}
    state = tx.init(params)
    step = jax.jit(lambda g, s, loss: tx.update(g, s, params, loss=loss))
    g, loss = jnp.ones(2), jnp.float32(1.0)
    assert_no_host_callback(step, {"w": g}, state, loss)
    u, state = step({"w": g}, state, loss)
    u, state = step({"w": g}, state, loss)
    assert int(state.spike_window_fill) == 2


def test_skip_spikes_errors():
    with pytest.raises(TypeError, match=re.escape("jaxnan.skip_spikes: inner must")):
        jaxnan.skip_spikes(lambda g: g)
    with pytest.raises(
        ValueError, match=re.escape("min_history must be <= window (4)")
    ):
        jaxnan.skip_spikes(optax.sgd(1.0), window=4, min_history=5)
    tx = jaxnan.skip_spikes(optax.sgd(1.0))
    params = {"w": jnp.zeros(2)}
    with pytest.raises(
        ValueError, match=re.escape("loss must be a scalar, got shape (2,)")
    ):
        tx.update(params, tx.init(params), params, loss=jnp.ones(2))


@pytest.mark.parametrize("bad", ["spike", "nan"])
def test_skip_spikes_shard_map_one_device_sees_it_all_skip(mesh8, bad):
    n, t_bad = 12, 9
    rng = np.random.default_rng(3)
    g = 1.0 + 0.01 * rng.standard_normal((8, n, 2))
    g[5, t_bad] = NAN if bad == "nan" else 1e3  # only device 5
    losses = jnp.ones((8, n), jnp.float32)
    tx = jaxnan.skip_spikes(optax.sgd(1.0), window=8, min_history=4, axis_name="d")
    params = {"w": jnp.zeros(2)}

    def per_device(g, losses):
        def body(state, xs):
            gi, li = xs
            u, state = tx.update({"w": gi}, state, params, loss=li)
            return state, jnp.all(u["w"] == 0)

        state, skipped = lax.scan(body, tx.init(params), (g[0], losses[0]))
        return skipped[None], jax.tree_util.tree_map(lambda x: x[None], state)

    f = shard_map_over(mesh8, per_device, (P("d"), P("d")), (P("d"), P("d")))
    skipped, states = f(jnp.asarray(g, jnp.float32), losses)
    skipped = np.asarray(skipped)
    assert skipped[:, t_bad].all() and skipped.sum() == 8
    for leaf in jax.tree_util.tree_leaves(states):
        leaf = np.asarray(leaf)
        assert (leaf == leaf[:1]).all()  # identical state on every replica
    reason = (
        jaxnan.SkipReason.NONFINITE if bad == "nan" else jaxnan.SkipReason.NORM_SPIKE
    )
    assert int(states.last_skip_reason[0]) == reason


# --------------------------------------------------------------------------
# AdaGC


def adagc_reference(seq, *, warmup, lam_rel, beta, lam_abs):
    """AdaGC's per-tensor rule (arXiv 2502.11034, Algorithm 1) in float64.

    `seq[t][i]` is the norm of tensor i at step t. Returns clipped norms.
    A step with a nonfinite norm changes no gamma and is not counted.
    """
    k = len(seq[0])
    gamma, steps, outs = [0.0] * k, 0, []
    for norms in seq:
        ok = [math.isfinite(n) for n in norms]
        if steps < warmup:
            gn = math.sqrt(sum(n * n for n, o in zip(norms, ok) if o))
            f = min(1.0, lam_abs / gn) if gn > 0 else 1.0
            hat = [n * f if o else n for n, o in zip(norms, ok)]
            new = hat if steps == 0 else [min(g, h) for g, h in zip(gamma, hat)]
        else:
            hat = [min(n, lam_rel * g) if o else n for n, o, g in zip(norms, ok, gamma)]
            new = [beta * g + (1 - beta) * h for g, h in zip(gamma, hat)]
        if all(ok):
            gamma, steps = new, steps + 1
        outs.append(hat)
    return outs


def test_adagc_follows_the_per_tensor_rule_step_by_step():
    rng = np.random.default_rng(2)
    n = 30
    norms = np.array([0.5, 1.0, 0.2]) * np.ones((n, 3))
    norms = norms * (1.0 + 0.1 * rng.standard_normal((n, 3)))
    norms[8, 1] *= 20.0  # a spike in one tensor only
    norms[15, 2] = NAN
    norms[21] *= 5.0  # all tensors
    direction = jnp.array([0.6, 0.8])
    grads = {
        f"t{i}": jnp.asarray(norms[:, i : i + 1], jnp.float32) * direction
        for i in range(3)
    }
    tx = jaxnan.adagc(relative_threshold=1.05, beta=0.9, warmup=4, warmup_max_norm=1.0)
    updates, states = run_scan(tx, {f"t{i}": jnp.zeros(2) for i in range(3)}, grads)
    want = np.array(
        adagc_reference(list(norms), warmup=4, lam_rel=1.05, beta=0.9, lam_abs=1.0)
    )
    got = np.stack(
        [np.linalg.norm(np.asarray(updates[f"t{i}"]), axis=1) for i in range(3)], 1
    )
    np.testing.assert_allclose(got, want, rtol=2e-5)
    # direction kept, the NaN tensor passed through, only it
    np.testing.assert_allclose(
        np.asarray(updates["t1"][8]) / want[8, 1], [0.6, 0.8], rtol=1e-5
    )
    assert np.isnan(np.asarray(updates["t2"][15])).all()
    assert int(states.adagc_finite_steps[15]) == int(states.adagc_finite_steps[14])
    clipped = np.asarray(states.adagc_clipped["t1"])
    assert clipped[8] and not clipped[:4].any()  # warm-up: global clipping only
    np.testing.assert_array_equal(clipped[4:], want[4:, 1] < norms[4:, 1] * (1 - 1e-6))


def test_adagc_warmup_is_global_clipping():
    tx = jaxnan.adagc(warmup=2, warmup_max_norm=1.0)
    params = {"a": jnp.zeros(1), "b": jnp.zeros(1)}
    state = tx.init(params)
    u, state = tx.update({"a": jnp.array([3.0]), "b": jnp.array([-4.0])}, state)
    chex.assert_trees_all_close(u, {"a": jnp.array([0.6]), "b": jnp.array([-0.8])})
    chex.assert_trees_all_close(
        state.adagc_gamma, {"a": jnp.float32(0.6), "b": jnp.float32(0.8)}
    )


def test_adagc_shard_map_agrees_per_tensor(mesh8):
    tx = jaxnan.adagc(warmup=1, beta=0.5, relative_threshold=1.0, axis_name="d")
    params = {"v": jnp.zeros(1), "w": jnp.zeros(1)}

    def per_device(g):
        state = tx.init(params)
        _, state = tx.update({"v": jnp.array([0.5]), "w": jnp.array([0.5])}, state)
        u, state = tx.update({"v": g[0, :1], "w": g[0, 1:]}, state)
        out = (u["v"], u["w"], state.adagc_gamma["v"], state.adagc_finite_steps)
        return tuple(x[None] for x in out)

    f = shard_map_over(mesh8, per_device, P("d"), (P("d"),) * 4)
    g = jnp.full((8, 2), 0.4).at[3].set(2.0)  # device 3 sees a spike
    want = [0.1] * 3 + [0.5] + [0.1] * 4
    # every replica clips by the agreed (largest) norm 2.0 down to 0.5
    v, w, gamma, steps = f(g)
    np.testing.assert_allclose(np.asarray(v)[:, 0], want, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(w)[:, 0], want, rtol=1e-6)
    assert (np.asarray(gamma) == 0.5).all() and (np.asarray(steps) == 2).all()
    # w NaN on device 5 only: w passes through on every replica, v is still
    # clipped by its agreed norm, and no replica counts the step
    v, w, gamma, steps = f(g.at[5, 1].set(jnp.nan))
    np.testing.assert_allclose(np.asarray(v)[:, 0], want, rtol=1e-6)
    w = np.asarray(w)[:, 0]
    assert np.isnan(w[5]) and w[3] == 2.0 and w[0] == np.float32(0.4)
    assert (np.asarray(gamma) == 0.5).all() and (np.asarray(steps) == 1).all()


def test_zscore_clip_shard_map_one_device_nan_no_replica_updates_stats(mesh8):
    tx = jaxnan.zscore_clip(warmup=2, axis_name="d")
    params = {"w": jnp.zeros(1)}

    def per_device(g):
        def body(state, gi):
            u, state = tx.update({"w": gi}, state)
            return state, u["w"]

        state, u = lax.scan(body, tx.init(params), g[0])
        return u[None], jax.tree_util.tree_map(lambda x: x[None], state)

    g = np.ones((8, 4, 1), np.float32)
    g[:, 1] = 2.0
    g[6, 2] = NAN  # only device 6, step 2
    f = shard_map_over(mesh8, per_device, P("d"), (P("d"), P("d")))
    u, states = f(jnp.asarray(g))
    assert (np.asarray(states.zclip_finite_steps) == 3).all()
    # warm-up on steps 0 and 1 (mean 1.5), step 2 skipped, EMA on step 3
    np.testing.assert_allclose(np.asarray(states.zclip_mean), 0.97 * 1.5 + 0.03)
    assert np.isnan(np.asarray(u)[6, 2]).all() and not np.isnan(np.asarray(u)[5]).any()
    for leaf in jax.tree_util.tree_leaves(states):
        assert (np.asarray(leaf) == np.asarray(leaf)[:1]).all()


def test_zscore_clip_and_adagc_jit_have_no_host_sync():
    params = {"w": jnp.zeros(3)}
    g = {"w": jnp.ones(3)}
    for tx in (jaxnan.zscore_clip(warmup=2), jaxnan.adagc(warmup=1)):
        update = jax.jit(tx.update)
        state = tx.init(params)
        assert_no_host_callback(tx.update, g, state)
        for _ in range(3):
            u, state = update(g, state)
        assert u["w"].shape == (3,)


def test_skip_spikes_loss_and_norm_spike_together_record_both_bits():
    tx = jaxnan.skip_spikes(optax.sgd(1.0), window=8, threshold=3.0, min_history=3)
    params = {"w": jnp.zeros(1)}
    state = tx.init(params)
    for v in [1.0, 1.1, 0.9]:
        _, state = tx.update({"w": jnp.array([v])}, state, params, loss=jnp.float32(v))
    u, state = tx.update({"w": jnp.array([9.0])}, state, params, loss=jnp.float32(9.0))
    both = jaxnan.SkipReason.LOSS_SPIKE | jaxnan.SkipReason.NORM_SPIKE
    assert int(state.last_skip_reason) == both == 3
    assert int(state.loss_spike_total) == 1 and int(state.norm_spike_total) == 1
    assert int(state.last_skip_step) == 3 and float(u["w"][0]) == 0.0
    assert int(state.spike_skips_total) == 1


# ------------------------------------------------------------ issue 13


def test_adagc_clips_a_spike_whose_squares_overflow_float32():
    spike = {"w": jnp.array([1e20, 0.0, 0.0, 0.0])}
    # during warm-up: global clipping to warmup_max_norm
    tx = jaxnan.adagc(warmup=2, warmup_max_norm=1.0)
    u, s = tx.update(spike, tx.init(spike))
    np.testing.assert_allclose(np.asarray(u["w"]), [1.0, 0.0, 0.0, 0.0])
    assert int(s.adagc_finite_steps) == 1
    # after warm-up: relative clipping against gamma
    tx = jaxnan.adagc(warmup=1, relative_threshold=1.0, beta=0.5)
    s = tx.init(spike)
    _, s = tx.update({"w": jnp.array([0.5, 0.0, 0.0, 0.0])}, s)
    u, s = tx.update(spike, s)
    np.testing.assert_allclose(np.asarray(u["w"]), [0.5, 0.0, 0.0, 0.0])
    assert bool(s.adagc_clipped["w"])


def test_adagc_clips_a_tensor_whose_norm_is_beyond_float32():
    # Finite entries near float32's max: the tensor's norm (about 1.4 * max)
    # is +Inf in float32. Before, the update was zeroed after warm-up and
    # gamma became NaN for good (no later spike of that tensor was clipped);
    # during warm-up the global norm was NaN and nothing was clipped.
    big = float(jnp.finfo(jnp.float32).max)
    huge = {"w": jnp.array([0.9, -0.8, 0.0]) * big, "b": jnp.array([0.3])}
    tx = jaxnan.adagc(warmup=2, warmup_max_norm=1.0)
    u, s = jax.jit(tx.update)(huge, tx.init(huge))
    np.testing.assert_allclose(np.asarray(u["w"]), [0.7474, -0.6644, 0.0], rtol=1e-3)
    np.testing.assert_allclose(np.asarray(u["b"]), [0.0], atol=1e-30)
    assert np.isfinite(float(s.adagc_gamma["w"]))
    tx = jaxnan.adagc(warmup=1, relative_threshold=1.0, beta=0.5, warmup_max_norm=10.0)
    step = jax.jit(tx.update)
    _, s = step({"w": jnp.array([0.6, 0.8, 0.0]), "b": jnp.array([0.3])}, tx.init(huge))
    u, s = step(huge, s)
    np.testing.assert_allclose(np.asarray(u["w"]), [0.7474, -0.6644, 0.0], rtol=1e-3)
    assert bool(s.adagc_clipped["w"])
    assert float(s.adagc_gamma["w"]) == pytest.approx(1.0)
    # gamma is intact: a later spike of 100 is clipped to it.
    u, s = step({"w": jnp.array([100.0, 0.0, 0.0]), "b": jnp.array([0.3])}, s)
    np.testing.assert_allclose(np.asarray(u["w"]), [1.0, 0.0, 0.0], rtol=1e-6)


def test_skip_spikes_skips_what_the_inner_optimizer_makes_nonfinite():
    tx = jaxnan.skip_spikes(optax.adam(1e-2, eps=0.0), window=4, min_history=2)
    params = {"w": jnp.ones(3)}
    s0 = tx.init(params)
    u, s1 = tx.update({"w": jnp.array([1.0, 0.0, 1.0])}, s0, params)
    assert not np.asarray(u["w"]).any()
    chex.assert_trees_all_equal(s1.spike_inner_state, s0.spike_inner_state)
    assert int(s1.last_skip_reason) == jaxnan.SkipReason.INNER_NONFINITE == 8
    assert int(s1.spike_inner_nonfinite_total) == 1
    assert int(s1.spike_nonfinite_total) == 0 and int(s1.spike_window_fill) == 0


def test_spike_hyperparameters_of_any_type():
    tx = jaxnan.skip_spikes(optax.sgd(1.0), window=np.int64(8), threshold=np.float32(3))
    assert tx.init({"w": jnp.zeros(1)}).spike_loss_window.shape == (8,)
    jaxnan.zscore_clip(alpha=jnp.float32(0.9), warmup=np.int32(3))
    cases = [
        (
            lambda: jaxnan.skip_spikes(optax.sgd(1.0), threshold=np.float32(-1)),
            ValueError,
            "threshold must be > 0",
        ),
        (
            lambda: jaxnan.skip_spikes(optax.sgd(1.0), window=8.0),
            TypeError,
            "window must be an int",
        ),
        (
            lambda: jaxnan.zscore_clip(alpha=np.float64(1.5)),
            ValueError,
            "alpha must be > 0 and < 1",
        ),
        (
            lambda: jaxnan.zscore_clip(z_threshold=jnp.inf),
            ValueError,
            "z_threshold must be finite",
        ),
        (
            lambda: jaxnan.adagc(beta=jnp.array(0.5), warmup_max_norm=-1.0),
            ValueError,
            "warmup_max_norm must be > 0",
        ),
        (
            lambda: jaxnan.adagc(relative_threshold="1"),
            TypeError,
            "relative_threshold must be a real number",
        ),
    ]
    for make, err, msg in cases:
        with pytest.raises(err, match=re.escape(msg)):
            make()


def test_grad_jvp_vmap_through_zscore_clip():
    tx = jaxnan.zscore_clip(warmup=2, max_norm=1.0)
    s = tx.init({"w": jnp.zeros(2)})

    def f(g):
        u, _ = tx.update({"w": g}, s)
        return jnp.sum(u["w"] * jnp.array([1.0, 2.0]))

    g = jnp.array([3.0, 4.0])
    # clipped to norm 1: u = g / |g|, d/dg of <u, c> = (c - u <u, c>) / |g|
    u = g / 5.0
    c = jnp.array([1.0, 2.0])
    np.testing.assert_allclose(
        np.asarray(jax.jit(jax.grad(f))(g)),
        np.asarray((c - u * (u @ c)) / 5.0),
        rtol=1e-6,
    )
    _, tangent = jax.jit(lambda t: jax.jvp(f, (g,), (t,)))(jnp.array([1.0, 0.0]))
    np.testing.assert_allclose(
        float(tangent), float((c - u * (u @ c))[0] / 5.0), rtol=1e-6
    )
    got = jax.jit(jax.vmap(f))(jnp.stack([g, g / 10]))
    one = jax.jit(f)
    np.testing.assert_allclose(np.asarray(got), [one(g), one(g / 10)], rtol=1e-6)


@pytest.mark.parametrize("name", ["clip_by_global_norm", "zscore_clip", "adagc"])
def test_grad_through_a_clip_with_a_nan_entry_is_finite(name):
    # The nonfinite entry passes through unchanged (as documented), and a
    # caller that drops it must get the derivative of the rest: before, the
    # select's zero cotangent met t * factor at t = NaN (0 * NaN).
    tx = {
        "clip_by_global_norm": lambda: jaxnan.clip_by_global_norm(1.0),
        "zscore_clip": lambda: jaxnan.zscore_clip(warmup=2, max_norm=1.0),
        "adagc": lambda: jaxnan.adagc(warmup=1, warmup_max_norm=1.0),
    }[name]()

    def outer(scale):
        g = {
            "w": (jnp.array([1.0, 3.0, 4.0]) * scale).at[0].set(NAN),
            "b": jnp.array([3.0, 4.0]) * scale**2,
        }
        u, _ = tx.update(g, tx.init(g))
        return sum(jnp.sum(jnp.where(jnp.isfinite(x), x, 0.0)) for x in u.values())

    grad = float(jax.grad(outer)(2.0))
    h = 1e-2
    assert grad == pytest.approx(
        float(outer(2.0 + h) - outer(2.0 - h)) / (2 * h), rel=1e-2
    )
