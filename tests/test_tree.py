import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxnan
from jaxnan._src.core import tree
from tests.helpers import assert_no_host_callback

BAD = {"nan": jnp.nan, "posinf": jnp.inf, "neginf": -jnp.inf}


def _tree(dtype=jnp.float32):
    return {
        "a": jnp.arange(6, dtype=dtype).reshape(2, 3),
        "b": [jnp.ones(4, dtype), jnp.int32(3)],
        "c": jnp.array([True, False]),
    }


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32])
def test_all_finite_true_and_each_kind_of_bad(dtype):
    t = _tree(dtype)
    assert bool(jaxnan.all_finite(t))
    for value in BAD.values():
        bad = jax.tree_util.tree_map(lambda x: x, t)
        bad["b"][0] = bad["b"][0].at[2].set(value)
        assert not bool(jaxnan.all_finite(bad))
        assert not bool(jax.jit(jaxnan.all_finite)(bad))


def test_all_finite_ignores_integer_and_bool_leaves_and_empty():
    assert bool(jaxnan.all_finite({"i": jnp.int32(-1), "b": jnp.bool_(True)}))
    assert bool(jaxnan.all_finite({}))
    assert jaxnan.all_finite({}).dtype == jnp.bool_


def test_all_finite_large_array_nan_not_hidden_by_max():
    # jnp.max ignores NaN on CPU for >= 4096 elements; all_finite must not.
    x = jnp.ones(1 << 16).at[1].set(jnp.nan)
    assert not bool(jax.jit(jaxnan.all_finite)(x))


def test_complex_both_parts():
    z = jnp.array([1 + 1j, 2 + 0j], jnp.complex64)
    assert bool(jaxnan.all_finite(z))
    assert not bool(jaxnan.all_finite(z.at[1].set(complex(1.0, np.inf))))
    assert not bool(jaxnan.all_finite(z.at[0].set(complex(np.nan, 0.0))))
    c = jaxnan.nonfinite_counts(
        jnp.array([complex(np.nan, np.inf), complex(1, np.inf), complex(-np.inf, 0)])
    )
    assert (int(c.nan), int(c.posinf), int(c.neginf)) == (1, 1, 1)


def test_nonfinite_counts_exact():
    x = jnp.array([0.0, jnp.nan, jnp.nan, jnp.inf, -jnp.inf, -jnp.inf, -jnp.inf])
    c = jax.jit(jaxnan.nonfinite_counts)({"x": x, "i": jnp.arange(3)})
    assert (int(c["x"].nan), int(c["x"].posinf), int(c["x"].neginf)) == (2, 1, 3)
    assert (int(c["i"].nan), int(c["i"].posinf), int(c["i"].neginf)) == (0, 0, 0)
    assert c["x"].nan.dtype == jnp.int32


def test_vmap_and_scan_and_grad():
    xs = jnp.ones((4, 3)).at[2, 1].set(jnp.nan)
    flags = jax.vmap(jaxnan.all_finite)(xs)
    np.testing.assert_array_equal(flags, [True, True, False, True])
    counts = jax.vmap(jaxnan.nonfinite_counts)(xs)
    np.testing.assert_array_equal(counts.nan, [0, 0, 1, 0])

    def body(carry, x):
        return carry + (~jaxnan.all_finite(x)).astype(jnp.int32), None

    n, _ = jax.lax.scan(body, jnp.int32(0), xs)
    assert int(n) == 1
    # The check has a zero gradient and does not break differentiation.
    g = jax.grad(lambda x: jnp.sum(x**2) + jaxnan.all_finite(x).astype(jnp.float32))(
        jnp.ones(3)
    )
    chex.assert_trees_all_equal(g, 2 * jnp.ones(3))


def test_no_host_transfer():
    x = {"w": jnp.ones((8, 8)), "b": jnp.zeros(8)}
    assert_no_host_callback(
        lambda t: (jaxnan.all_finite(t), jaxnan.nonfinite_counts(t)), x
    )


def test_one_pass_in_hlo():
    # The finiteness flag is one fused reduction that reads the array once: no
    # intermediate array of the input's shape is materialized.
    x = jnp.ones((512, 512))
    hlo = jax.jit(jaxnan.all_finite).lower(x).compile().as_text()
    entry = hlo[hlo.index("ENTRY") :].splitlines()
    big = [ln for ln in entry if re.search(r"\[512,512\]", ln.split("(")[0])]
    assert [ln for ln in big if "parameter(" not in ln] == []


def test_one_variadic_reduction_per_leaf_in_hlo():
    # NaN and Inf are counted by one variadic reduction (a tuple-shaped
    # result) in a single fusion that reads the array: the form XLA's CPU
    # backend compiles into one vectorized loop.
    x = jnp.ones((512, 512))
    hlo = jax.jit(jaxnan.all_finite).lower(x).compile().as_text()
    entry = hlo[hlo.index("ENTRY") :].splitlines()
    readers = [
        ln for ln in entry if "fusion(" in ln and re.search(r"fusion\(%\S+\)", ln)
    ]
    assert len(readers) == 1, readers
    assert re.search(r"= \(s32\[\], s32\[\]\) fusion", readers[0]), readers[0]


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32])
def test_squares_and_finite_exact(dtype):
    x = jnp.arange(-6, 6, dtype=dtype).reshape(3, 4)
    sq, ok = jax.jit(tree.squares_and_finite)(x)
    assert sq.dtype == jnp.float32 and bool(ok)
    assert float(sq) == float(np.sum(np.square(np.asarray(x, np.float32))))
    for bad in BAD.values():
        sq, ok = jax.jit(tree.squares_and_finite)(x.at[1, 2].set(bad))
        assert not bool(ok) and not np.isfinite(float(sq))
    big = jnp.full((4,), 1e30, jnp.float32)  # the squares overflow, x is finite
    sq, ok = tree.squares_and_finite(big)
    assert bool(ok) and float(sq) == np.inf


def test_squares_and_finite_complex():
    z = jnp.array([3 + 4j, 1e30 + 0j], jnp.complex64)  # finite, |z|^2 overflows
    sq, ok = jax.jit(tree.squares_and_finite)(z)
    assert bool(ok) and float(sq) == np.inf
    sq, ok = jax.jit(tree.squares_and_finite)(z.at[0].set(1 + 1j * np.inf))
    assert not bool(ok)
    sq, ok = tree.squares_and_finite(z[:1])
    assert bool(ok) and float(sq) == 25.0


def test_leaves_of_one_shape_share_reductions_exactly():
    # 20 leaves of one shape: 3 shared reductions (8 + 8 + 4 leaves), counts
    # still exact per leaf, in every chunk. A leaf of another shape (here the
    # transpose, same size) keeps a reduction of its own.
    leaves = [jnp.full((5, 3), float(i)) for i in range(20)] + [jnp.ones((3, 5))]
    leaves[13] = leaves[13].at[0, 0].set(jnp.nan).at[4, 2].set(-jnp.inf)
    leaves[2] = leaves[2].at[1, 1].set(jnp.inf)
    leaves[19] = leaves[19].at[:, 0].set(jnp.nan)
    leaves[20] = leaves[20].at[2, 4].set(jnp.nan)
    assert not bool(jaxnan.all_finite(leaves))
    counts = jaxnan.nonfinite_counts(leaves)
    got = {i: tuple(map(int, c)) for i, c in enumerate(counts) if any(map(int, c))}
    assert got == {2: (0, 1, 0), 13: (1, 0, 1), 19: (5, 0, 0), 20: (1, 0, 0)}
    for fn in (jaxnan.all_finite, jaxnan.nonfinite_counts):
        jaxpr = jax.make_jaxpr(fn)(leaves)
        assert [e.primitive.name for e in jaxpr.eqns].count("reduce") == 4
    clean = [jnp.full((5, 3), 1.0) for _ in range(20)]
    assert bool(jaxnan.all_finite(clean))


def test_packed_counts_of_small_leaves_are_exact():
    # Reporting branches stack small leaves (zero-padded to a power-of-two
    # width, per dtype): few reductions, every count still exact per leaf
    # (the padding zeros count nothing), also under vmap.
    sizes = [1, 3, 10, 128, 128, 100, 4096, 7, 2, 64, 5000]
    leaves = [jnp.linspace(-1.0, 1.0, n) for n in sizes]
    leaves[0] = jnp.float32(jnp.nan)  # a 0-d leaf, such as a loss
    leaves[4] = leaves[4].at[5].set(jnp.inf).at[6].set(-jnp.inf)
    leaves[6] = leaves[6].at[4095].set(jnp.nan)
    leaves[10] = leaves[10].at[0].set(-jnp.inf)  # large: counted on its own
    leaves += [
        jnp.ones(5, jnp.bfloat16).at[1].set(jnp.inf),
        jnp.ones(6, jnp.bfloat16).at[5].set(jnp.nan),
        jnp.ones((0, 3)),  # empty: nothing to count
        jnp.arange(3),  # integer: not checked
    ]
    want = {0: (1, 0, 0), 4: (0, 1, 1), 6: (1, 0, 0), 10: (0, 0, 1)}
    want.update({11: (0, 1, 0), 12: (1, 0, 0)})

    def table(counts):
        return {i: tuple(map(int, c)) for i, c in enumerate(counts) if any(map(int, c))}

    packed = jax.jit(lambda t: tree.counts_list(t, pack=True))(leaves)
    assert table(packed) == want
    assert table(tree.counts_list(leaves)) == want
    jaxpr = jax.make_jaxpr(lambda t: tree.counts_list(t, pack=True))(leaves)
    n_packed = [e.primitive.name for e in jaxpr.eqns].count("reduce")
    jaxpr = jax.make_jaxpr(tree.counts_list)(leaves)
    assert n_packed < [e.primitive.name for e in jaxpr.eqns].count("reduce")
    # Per example under vmap, with one unbatched leaf in a pack.
    a = jnp.ones((4, 3)).at[2, 1].set(jnp.nan)
    f = jax.vmap(lambda a, b: tree.counts_list([a, b], pack=True), in_axes=(0, None))
    ca, cb = f(a, jnp.ones(2).at[0].set(jnp.inf))
    np.testing.assert_array_equal(ca.nan, [0, 0, 1, 0])
    np.testing.assert_array_equal(cb.posinf, [1, 1, 1, 1])


def test_packed_flag_sees_every_leaf():
    # all_finite_packed (function arguments): small leaves of one dtype share
    # one concatenated reduction, large ones keep theirs; a single bad
    # element anywhere flips it, also per example under vmap.
    leaves = [jnp.ones(n) for n in (1, 3, 10, 128, 4096, 5000)]
    leaves += [jnp.ones(7, jnp.bfloat16), jnp.float32(2.0), jnp.arange(4)]
    jaxpr = jax.make_jaxpr(tree.all_finite_packed)(leaves)
    assert [e.primitive.name for e in jaxpr.eqns].count("reduce") == 3
    assert bool(tree.all_finite_packed(leaves))
    for i in range(8):
        for bad in (jnp.nan, jnp.inf, -jnp.inf):
            one = list(leaves)
            one[i] = jnp.asarray(one[i]).reshape(-1).at[-1].set(bad)
            assert not bool(jax.jit(tree.all_finite_packed)(one)), (i, bad)
    a = jnp.ones((4, 3)).at[1, 2].set(jnp.inf)
    f = jax.vmap(tree.all_finite_packed, in_axes=([0, None],))
    np.testing.assert_array_equal(f([a, jnp.ones(2)]), [True, False, True, True])


def test_shared_reduction_under_vmap_with_unbatched_leaf():
    # One batched and one unbatched leaf of the same per-example shape share
    # a reduction; the flag is per example, and the unbatched NaN is seen by
    # every example.
    a = jnp.ones((4, 3)).at[2, 1].set(jnp.nan)
    b = jnp.ones(3)
    f = jax.vmap(lambda t: jaxnan.all_finite(t), in_axes=({"a": 0, "b": None},))
    np.testing.assert_array_equal(f({"a": a, "b": b}), [True, True, False, True])
    f_counts = jax.vmap(jaxnan.nonfinite_counts, in_axes=({"a": 0, "b": None},))
    c = f_counts({"a": a, "b": b.at[0].set(jnp.inf)})
    np.testing.assert_array_equal(c["a"].nan, [0, 0, 1, 0])
    np.testing.assert_array_equal(c["b"].posinf, [1, 1, 1, 1])
    assert not bool(f({"a": jnp.ones((4, 3)), "b": b.at[0].set(jnp.inf)}).any())


def test_finite_global_norm_overflow_safe():
    big = jnp.array([3e30, 4e30, jnp.nan], jnp.float32)
    n, finite = tree.finite_norm_and_flag([big])
    np.testing.assert_allclose(float(n), 5e30, rtol=1e-6)
    assert not bool(finite)
    assert float(tree.finite_norm_and_flag([jnp.array([jnp.nan])])[0]) == 0.0


def test_finite_norm_and_flag_against_float64(variant):
    rng = np.random.default_rng(0)
    a = rng.normal(size=(5, 7)).astype(np.float32) * 1e30  # squares overflow
    b = rng.normal(size=(300,)).astype(np.float16)
    c = (rng.normal(size=(4,)) + 1j * rng.normal(size=(4,))).astype(np.complex64)
    a[1, 2], b[7] = np.nan, -np.inf
    fn = variant(tree.finite_norm_and_flag)
    norm, finite = fn([jnp.asarray(a), jnp.asarray(b), jnp.asarray(c)])
    parts = [x.astype(np.complex128).ravel() for x in (a, b, c)]
    ref = np.sqrt(sum(np.sum(np.abs(p[np.isfinite(p)]) ** 2) for p in parts))
    np.testing.assert_allclose(float(norm), ref, rtol=1e-5)
    assert not bool(finite)
    # No overflow: exactly the one-pass norm of the tree with the bad entries
    # at 0; and the flag is True for a finite tree.
    small = [jnp.asarray(a / 1e30), jnp.asarray(b)]
    zeroed = [jnp.where(jnp.isfinite(x), x, 0) for x in small]
    norm, finite = fn(small)
    assert float(norm) == float(
        jnp.sqrt(sum(tree.sum_of_squares(x) for x in zeroed)).astype(jnp.float32)
    )
    assert not bool(finite)
    assert bool(fn([jnp.asarray(a / 1e30).at[1, 2].set(0.0)])[1])
    assert float(fn([jnp.zeros(3)])[0]) == 0.0


@settings(max_examples=30, deadline=None)
@given(
    shapes=st.lists(st.integers(1, 7), min_size=1, max_size=4),
    bad=st.lists(
        st.tuples(st.integers(0, 100), st.sampled_from(["nan", "posinf", "neginf"])),
        max_size=5,
    ),
)
def test_property_counts_match_numpy(shapes, bad):
    leaves = [np.linspace(-3, 3, n).astype(np.float32) for n in shapes]
    for pos, kind in bad:
        leaf = leaves[pos % len(leaves)]
        leaf[pos % leaf.size] = float(BAD[kind])
    t = {f"l{i}": jnp.asarray(v) for i, v in enumerate(leaves)}
    flag = bool(jaxnan.all_finite(t))
    assert flag == all(np.isfinite(v).all() for v in leaves)
    counts = jaxnan.nonfinite_counts(t)
    for i, v in enumerate(leaves):
        c = counts[f"l{i}"]
        assert int(c.nan) == int(np.isnan(v).sum())
        assert int(c.posinf) == int(np.isposinf(v).sum())
        assert int(c.neginf) == int(np.isneginf(v).sum())
