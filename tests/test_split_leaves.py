"""The checks' reductions over leaves split over devices (8 CPU devices).

`core.split_leaves` says which leaves are split (by their type, or by the
shapes of the state `jaxnan.guard` was called with); `tree.split_sums` are
the sums they are reduced with. The guard's decisions and figures are the same
whichever form is taken (`tests/test_collectives.py` counts the collectives).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding

import jaxnan
from jaxnan._src.core import split_leaves, tree
from tests.helpers import P, mesh_of
from tests.test_collectives import collectives


@pytest.mark.parametrize("n", [1, 2, 3])
def test_split_sums_are_the_float32_sums(n):
    rows = [np.arange(12, dtype=np.float32).reshape(3, 4) * (k - 1.5) for k in range(n)]
    got = tree.split_sums([jnp.asarray(r) for r in rows])
    assert [g.dtype for g in got] == [jnp.float32] * n
    np.testing.assert_array_equal(got, [np.sum(r) for r in rows])


def test_split_sums_keep_nonfinite_sums():
    inf, nan, ok = tree.split_sums(
        [jnp.array([1.0, jnp.inf]), jnp.array([jnp.nan, 0.0]), jnp.array([2.0, 3.0])]
    )
    assert inf == jnp.inf and jnp.isnan(nan) and ok == 5.0


def test_split_shapes_names_the_sharded_leaves_only():
    mesh = mesh_of(8)
    split = jax.device_put(jnp.ones((8, 4)), NamedSharding(mesh, P("d")))
    whole = jax.device_put(jnp.ones((16, 2)), NamedSharding(mesh, P()))
    shapes = split_leaves.split_shapes([split, whole, np.ones((8, 8)), 1.0])
    assert shapes == frozenset({(8, 4)})


def test_assume_split_holds_inside_the_block_only():
    x = jnp.ones((8, 4))
    with split_leaves.assume_split(frozenset({(8, 4)})):
        assert split_leaves.is_split(x)
        assert not split_leaves.is_split(jnp.ones((4, 8)))
        with split_leaves.assume_split(frozenset({(4, 8)})):
            assert split_leaves.is_split(x) and split_leaves.is_split(x.T)
    assert not split_leaves.is_split(x)


def _loss(params, batch):
    h = jnp.tanh(batch["x"] @ params["w1"] + params["b1"])
    return jnp.mean((h @ params["w2"] - batch["y"]) ** 2)


def _figures(specs):
    """The guard's (loss, gradient norm, update ratio, bad) over 5 steps."""
    mesh = mesh_of(8)
    rng = np.random.default_rng(3)
    params = {
        "w1": rng.normal(size=(16, 64)).astype(np.float32),
        "b1": rng.normal(size=(64,)).astype(np.float32),
        "w2": rng.normal(size=(64,)).astype(np.float32),
    }
    params = jax.device_put(
        params, {k: NamedSharding(mesh, s) for k, s in specs.items()}
    )
    tx = jaxnan.skip_nonfinite(optax.adam(0.1))

    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(_loss)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params, loss=loss)
        return optax.apply_updates(params, updates), opt_state, loss

    guarded = jaxnan.guard(step, verbose=False)
    state = tx.init(params)
    for k in range(5):
        x = rng.normal(size=(32, 16)).astype(np.float32)
        if k == 2:
            x[4, 1] = np.nan
        batch = jax.device_put(
            {"x": x, "y": rng.normal(size=(32,)).astype(np.float32)},
            NamedSharding(mesh, P("d")),
        )
        params, state, _ = guarded(params, state, batch)
    guarded.finish()
    return [f[1:] for f in guarded.figures], int(state.nonfinite_total)


def test_fsdp_guard_reports_the_figures_of_the_replicated_step():
    fsdp, skipped = _figures({"w1": P(None, "d"), "b1": P("d"), "w2": P("d")})
    dp, dp_skipped = _figures({"w1": P(), "b1": P(), "w2": P()})
    assert skipped == dp_skipped == 1
    assert [f[3] for f in fsdp] == [f[3] for f in dp] == [0, 0, 1, 0, 0]
    np.testing.assert_allclose(
        [f[:3] for f in fsdp if not f[3]], [f[:3] for f in dp if not f[3]], rtol=2e-5
    )
    ratios = [f[2] for f in fsdp]
    assert ratios[2] == 0.0  # the skipped step moved nothing
    assert all(r > 0 for k, r in enumerate(ratios) if k != 2)


def _update_collectives(mesh, sharded_params=False):
    """The collectives of `skip_nonfinite(adam).update` on FSDP-split leaves."""
    rng = np.random.default_rng(0)
    shapes = {"w1": (16, 64), "b1": (64,), "w2": (64,)}
    specs = {"w1": P(None, "d"), "b1": P("d"), "w2": P("d")}
    params = {
        k: jax.device_put(
            rng.normal(size=s).astype(np.float32), NamedSharding(mesh, specs[k])
        )
        for k, s in shapes.items()
    }
    tx = jaxnan.skip_nonfinite(optax.adam(1e-3), sharded_params=sharded_params)
    update = jax.jit(lambda g, s, p: tx.update(g, s, p))
    text = update.lower(params, tx.init(params), params).compile().as_text()
    return [op for op, _ in collectives(text)]


def test_leaves_split_by_their_type_take_the_partitioned_form():
    explicit = jax.make_mesh((8,), ("d",), axis_types=(AxisType.Explicit,))
    assert _update_collectives(explicit) == ["all-reduce"]


def test_under_plain_jit_on_an_auto_mesh_sharded_params_chooses_the_form():
    auto = mesh_of(8)
    assert set(_update_collectives(auto)) == {"all-gather"}  # nothing says split
    assert _update_collectives(auto, sharded_params=True) == ["all-reduce"]
