"""The collectives `jaxnan.guard` adds to a sharded train step (8 CPU devices).

Counted in XLA's optimized program (``lower(...).compile().as_text()``), the
guarded step against the same step under plain `jax.jit` with plain optax.
The target: at most one extra collective, and it an all-reduce of scalars.
Data parallel meets it with none. FSDP (parameters sharded) meets it by
default: the guard names the shapes of its split state leaves, whose checks
then take the form XLA partitions into all-reduces (a variadic `lax.reduce`
is partitioned into an all-gather of per-device partials per operand), and
the checks' sums (and the update ratio's) are complex64, so that XLA's
all-reduce combiner, which merges one element type at a time, makes them
one all-reduce instead of splitting the step's gradient all-reduce around
them (`benchmarks/RESULTS.md`, "The guard on sharded steps").
"""

import collections
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding

import jaxnan
from tests.helpers import P, mesh_of

_OP = re.compile(
    r"=\s*(?P<shape>.*?)\s(?P<op>all-reduce|all-gather|reduce-scatter|all-to-all|"
    r"collective-permute)(-start)?\("
)


def collectives(text: str) -> list[tuple[str, str]]:
    """``(op, result shape)`` of every collective of an optimized HLO module."""
    out = []
    for line in text.splitlines():
        m = _OP.search(line)
        if m:
            out.append((m.group("op"), m.group("shape")))
    return out


def _is_scalar_all_reduce(op: str, shape: str) -> bool:
    """An all-reduce whose result is a scalar or a tuple of scalars."""
    dims = re.findall(r"\[([^\]]*)\]", shape)
    return op == "all-reduce" and bool(dims) and all(d == "" for d in dims)


def _elements(shape: str) -> collections.Counter:
    """The arrays of a result shape (a tuple's elements), layouts left out."""
    return collections.Counter(re.findall(r"[a-z]+[0-9]*\[[^\]]*\]", shape))


def extra_collectives(plain: str, guarded: str) -> list[tuple[str, str]]:
    """The collectives of `guarded` that have no counterpart in `plain`.

    Matched by op and result shape; a plain collective left unmatched (XLA
    merged it with the guard's scalars into one tuple all-reduce, or put its
    elements in another order) is matched to a left-over one of the same op
    whose result holds all its arrays.
    """
    left = collections.Counter(collectives(guarded))
    left.subtract(collections.Counter(collectives(plain)))
    unmatched_plain = [k for k, n in left.items() if n < 0 for _ in range(-n)]
    extra = [k for k, n in left.items() if n > 0 for _ in range(n)]
    for op, shape in unmatched_plain:
        need = _elements(shape)
        for k in extra:
            if k[0] == op and not need - _elements(k[1]):
                extra.remove(k)
                break
    return extra


def test_collective_counter_counts():
    mesh = mesh_of(8)
    x = jax.device_put(jnp.ones((8, 4)), NamedSharding(mesh, P("d")))
    summed = jax.jit(jnp.sum).lower(x).compile().as_text()
    (found,) = collectives(summed)
    assert found[0] == "all-reduce" and _is_scalar_all_reduce(*found)
    gathered = (
        jax.jit(lambda x: x * 2, out_shardings=NamedSharding(mesh, P()))
        .lower(x)
        .compile()
        .as_text()
    )
    assert [op for op, _ in collectives(gathered)] == ["all-gather"]
    assert not _is_scalar_all_reduce("all-gather", "f32[]")
    assert not _is_scalar_all_reduce("all-reduce", "f32[64]{0}")
    assert _is_scalar_all_reduce("all-reduce", "(c64[], f32[])")
    assert _is_scalar_all_reduce("all-reduce", "(f32[], s32[])")
    local = jax.jit(lambda x: x * 2).lower(x).compile().as_text()
    assert collectives(local) == []


def _loss(params, batch):
    h = jnp.tanh(batch["x"] @ params["w1"] + params["b1"])
    return jnp.mean((h @ params["w2"] - batch["y"]) ** 2)


def _deep_loss(params, batch):
    """The MLP of `benchmarks/models.py` (three dense layers, softmax)."""
    x = batch["x"]
    for i in range(3):
        layer = params[f"dense{i}"]
        x = x @ layer["kernel"] + layer["bias"]
        if i < 2:
            x = jax.nn.relu(x)
    logp = jax.nn.log_softmax(x)
    return -jnp.mean(jnp.take_along_axis(logp, batch["y"][:, None], axis=1))


def _step(tx, loss_fn=_loss):
    def train_step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params, loss=loss)
        return optax.apply_updates(params, updates), opt_state, loss

    return train_step


def _mlp(rng):
    params = {
        "w1": rng.normal(size=(16, 64)).astype(np.float32),
        "b1": np.zeros(64, np.float32),
        "w2": rng.normal(size=(64,)).astype(np.float32),
    }
    batch = {
        "x": rng.normal(size=(32, 16)).astype(np.float32),
        "y": rng.normal(size=(32,)).astype(np.float32),
    }
    return params, batch


def _deep_mlp(rng, sizes=(64, 128, 64, 10)):
    params = {
        f"dense{i}": {
            "kernel": rng.normal(size=(m, n)).astype(np.float32) / np.sqrt(m),
            "bias": np.zeros(n, np.float32),
        }
        for i, (m, n) in enumerate(zip(sizes[:-1], sizes[1:]))
    }
    batch = {
        "x": rng.normal(size=(64, sizes[0])).astype(np.float32),
        "y": rng.integers(0, sizes[-1], size=(64,)).astype(np.int32),
    }
    return params, batch


def _fsdp_specs(params):
    """Each leaf split over the mesh on its largest axis 8 divides (else whole).

    As `benchmarks/sharded_guard.py` lays out the MLP: the kernels and two
    biases split, the last bias (10 entries) replicated.
    """

    def one(x):
        for a in sorted(range(x.ndim), key=lambda a: -x.shape[a]):
            if x.shape[a] % 8 == 0:
                return P(*[("d" if b == a else None) for b in range(x.ndim)])
        return P()

    return jax.tree.map(one, params)


def _programs(param_specs, sharded_params=False, model=_mlp, loss_fn=_loss):
    mesh = mesh_of(8)
    params, batch = model(np.random.default_rng(0))
    if param_specs is None:
        param_specs = _fsdp_specs(params)
    params = jax.device_put(
        params, jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs)
    )
    batch = jax.device_put(batch, NamedSharding(mesh, P("d")))
    plain_tx = optax.adam(1e-3)

    def plain_step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = plain_tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    plain = jax.jit(plain_step).lower(params, plain_tx.init(params), batch)
    tx = jaxnan.skip_nonfinite(optax.adam(1e-3), sharded_params=sharded_params)
    guarded = jaxnan.guard(_step(tx, loss_fn), verbose=False)
    lowered = guarded.lower(params, tx.init(params), batch)
    return plain.compile().as_text(), lowered.compile().as_text()


def _assert_at_most_one_scalar_all_reduce(plain, guarded):
    extra = extra_collectives(plain, guarded)
    assert len(extra) <= 1 and all(_is_scalar_all_reduce(*e) for e in extra), (
        f"the guard adds {extra}\nplain: {collectives(plain)}\n"
        f"guarded: {collectives(guarded)}"
    )


def test_data_parallel_guard_adds_at_most_one_scalar_all_reduce():
    plain, guarded = _programs({"w1": P(), "b1": P(), "w2": P()})
    assert collectives(plain)  # the gradients' all-reduce: the count is real
    _assert_at_most_one_scalar_all_reduce(plain, guarded)


FSDP = {"w1": P(None, "d"), "b1": P("d"), "w2": P("d")}


def test_fsdp_guard_with_sharded_params_adds_one_scalar_all_reduce():
    plain, guarded = _programs(FSDP, sharded_params=True)
    extra = extra_collectives(plain, guarded)
    assert len(extra) == 1 and _is_scalar_all_reduce(*extra[0]), extra
    _assert_at_most_one_scalar_all_reduce(plain, guarded)


def test_fsdp_guard_adds_at_most_one_scalar_all_reduce():
    plain, guarded = _programs(FSDP)  # sharded_params left at its default
    assert collectives(plain)
    extra = extra_collectives(plain, guarded)
    assert len(extra) == 1 and _is_scalar_all_reduce(*extra[0]), extra


@pytest.mark.parametrize("sharded_params", [False, True])
def test_fsdp_guard_on_a_deeper_mlp_adds_one_scalar_all_reduce(sharded_params):
    # Six leaves of six shapes, one of them replicated: the checks' sums
    # depend on several of the step's gradient all-reduces. In float32 XLA's
    # combiner split the step's tuple all-reduce around them (+3 on the
    # benchmark's MLP); the update ratio's sums came after the decision (+1).
    plain, guarded = _programs(None, sharded_params, _deep_mlp, _deep_loss)
    (plain_tuple,) = [
        s for op, s in collectives(plain) if op == "all-reduce" and s[0] == "("
    ]
    assert len(_elements(plain_tuple)) == 4  # 3 gradients and the loss
    extra = extra_collectives(plain, guarded)
    assert len(extra) == 1 and _is_scalar_all_reduce(*extra[0]), extra
    assert "c64" in extra[0][1]


def test_the_default_form_stays_variadic_where_nothing_is_split():
    # Data parallel: no state leaf is split, so the guard's checks keep the
    # variadic reductions (int32 counts), the ones cheaper on one device.
    _, guarded = _programs({"w1": P(), "b1": P(), "w2": P()})
    _, forced = _programs({"w1": P(), "b1": P(), "w2": P()}, sharded_params=True)
    assert _variadic_reduces(guarded) > 0
    assert _variadic_reduces(forced) == 0


def _variadic_reduces(text: str) -> int:
    """Reductions whose result is a tuple holding an int32 (the counts)."""
    return len(re.findall(r"= \([^)]*s32\[\][^)]*\) reduce\(", text))


def test_extra_collectives_matches_a_tuple_in_another_order():
    plain = "  %a = (f32[512]{0}, f32[10]{0}, f32[]) all-reduce(%x, %y, %z)"
    moved = "  %b = (f32[10]{0}, f32[]) all-reduce(%y, %z)\n" + (
        "  %c = (f32[], f32[512]{0}, f32[10]{0}, c64[2]{0}) all-reduce(%z, %x, %y, %w)"
    )
    assert extra_collectives(plain, moved) == [("all-reduce", "(f32[10]{0}, f32[])")]
    same = "  %d = (f32[10]{0}, f32[], f32[512]{0}) all-reduce(%y, %z, %x)"
    assert extra_collectives(plain, same) == []


def test_extra_collectives_finds_an_added_gather():
    mesh = mesh_of(8)
    x = jax.device_put(jnp.ones((8, 4)), NamedSharding(mesh, P("d")))
    plain = jax.jit(jnp.sum).lower(x).compile().as_text()
    more = (
        jax.jit(
            lambda x: (jnp.sum(x), x * 2),
            out_shardings=(None, NamedSharding(mesh, P())),
        )
        .lower(x)
        .compile()
        .as_text()
    )
    extra = extra_collectives(plain, more)
    assert [op for op, _ in extra] == ["all-gather"]
    with pytest.raises(AssertionError, match="the guard adds"):
        _assert_at_most_one_scalar_all_reduce(plain, more)


def test_sharded_params_takes_the_same_decisions_bit_for_bit():
    mesh = mesh_of(8)
    put = {k: NamedSharding(mesh, s) for k, s in FSDP.items()}
    rng = np.random.default_rng(1)
    grads = [
        {
            "w1": rng.normal(size=(16, 64)).astype(np.float32),
            "b1": rng.normal(size=(64,)).astype(np.float32),
            "w2": rng.normal(size=(64,)).astype(np.float32),
        }
        for _ in range(6)
    ]
    grads[2]["w1"][3, 40] = np.nan
    grads[4]["b1"][9] = -np.inf
    runs = []
    for flag in (False, True):
        tx = jaxnan.skip_nonfinite(optax.adam(0.1), sharded_params=flag)
        params = jax.device_put(jax.tree.map(np.zeros_like, grads[0]), put)
        state = tx.init(params)

        @jax.jit
        def step(params, state, g, tx=tx):
            u, state = tx.update(g, state, params)
            return optax.apply_updates(params, u), state

        for g in grads:
            params, state = step(params, state, jax.device_put(g, put))
        runs.append(jax.device_get((params, state)))
    np.testing.assert_array_equal(runs[0][1].nonfinite_total, 2)
    jax.tree.map(np.testing.assert_array_equal, runs[0], runs[1])


def test_sharded_params_must_be_a_bool():
    with pytest.raises(TypeError, match="sharded_params must be True or False"):
        jaxnan.skip_nonfinite(optax.sgd(0.1), sharded_params="yes")
