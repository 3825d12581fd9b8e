"""The skip promise across optax's public API, against an independent reference.

For every optimizer and wrapper of optax and optax.contrib
(`tests/optax_catalogue.py`), a Hypothesis-drawn sequence of healthy and bad
steps (NaN, +Inf, -Inf gradients, a NaN loss, finite gradients so large that
the optimizer's own arithmetic overflows) runs through
``jit(skip_nonfinite(opt).update + optax.apply_updates)`` and, beside it,
through a reference loop: the unguarded jitted step, whose result is kept
only when the gradients, the loss, the new params and the new state are all
finite, else params and state are left as they were. Both start from
optax's init in the dtypes optax's update gives its state
(`_update_dtypes_init`: dog, dowg, prodigy, dadapt_adamw and the injected
hyperparameters widen a bfloat16 or real leaf of a mixed tree at their
first updates), which `skip_nonfinite`'s init must give, bit for bit.
Params and the inner state must be the reference's bit for bit, dtypes
included, after every step (the guard's own counters aside, checked against
the number of bad steps), and nothing nonfinite is ever applied.

Three dtype runs: float32 with bfloat16 and complex64 leaves in one tree,
float16, and float64 with complex128 (x64). Complex leaves where the
optimizer takes them (`optax_catalogue.REAL_ONLY`).

The default guard is compared with the unguarded step fused with
`optax.apply_updates` (the program users write); for the optimizers of
`optax_catalogue.FUSION_ULP`, where XLA:CPU rounds that 1 ulp apart, the
exact variant (``exact=True``) is compared with the update jitted on its
own, as it promises, and so is every optimizer in
`test_exact_variant_is_the_update_jitted_alone`.

Time: XLA compiling the two programs of each (optimizer, run) is nearly
all of it; they compile at once (the reference runs on a helper thread),
the init is checked once per case, and each case runs two examples. The
default profile runs every third optimizer, in one of the three runs in
turn, and every other optimizer of the exact-variant test, in one of its
two runs in turn (about 60 tests); ``JAXNAN_SKIP_MATRIX=full`` runs every
optimizer in all three runs with six examples each (about 440 tests; its
outcome and time are in benchmarks/RESULTS.md).
Known open cases are marked with their cause (`DTYPE_DRIFT`).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxnan
from tests import optax_catalogue as cat

pytestmark = pytest.mark.default_compiler

FULL = os.environ.get("JAXNAN_SKIP_MATRIX") == "full"
RUNS = ("f32_bf16_c64", "f16", "f64_c128")
KINDS = ("healthy", "healthy", "nan", "posinf", "neginf", "huge", "loss_nan")
CASES = {c.name: c for c in cat.cases()}
SHAPES = {"a": (3, 4), "b": (4,), "c": (2, 2), "d": (3,)}

settings.register_profile(
    "skip_matrix", max_examples=2, deadline=None, derandomize=True
)
settings.register_profile(
    "skip_matrix_full", max_examples=6, deadline=None, derandomize=True
)
PROFILE = settings.get_profile("skip_matrix_full" if FULL else "skip_matrix")


def _params_of_run(run: str, case: cat.Case) -> dict:
    real = case.real_only
    dtypes = {
        "f32_bf16_c64": (
            "float32",
            "bfloat16",
            "float32",
            "float32" if real else "complex64",
        ),
        "f16": ("float16",) * 4,
        "f64_c128": (
            "float64",
            "float64",
            "float64",
            "float64" if real else "complex128",
        ),
    }[run]
    rng = np.random.default_rng(0)
    out = {}
    for (k, shape), dt in zip(SHAPES.items(), dtypes):
        x = rng.normal(size=shape)
        if jnp.issubdtype(jnp.dtype(dt), jnp.complexfloating):
            x = x + 1j * rng.normal(size=shape)
        out[k] = jnp.asarray(x, dt)
    return out


def _x64(run: str):
    return jax.enable_x64(True) if run == "f64_c128" else contextlib.nullcontext()


# The guard's state takes the dtypes the update gives it at init
# (`_update_dtypes_init`), momo's and momo_adam's included (their update,
# traced with ``value=``). No known drift is left.
DTYPE_DRIFT: set[tuple[str, str]] = set()
# Optax's own update fails on the tree of that run: a complex128 leaf; a
# bfloat16 leaf, whose tangent in hutchinson's `jax.jvp` (sophia's too) is
# bfloat16 where the primal is float32, and which mechanize clamps between
# float32 bounds.
OPTAX_FAILS = {
    ("contrib.hutchinson_estimator_diag_hessian", "f64_c128"),
    ("contrib.hutchinson_estimator_diag_hessian", "f32_bf16_c64"),
    ("contrib.mechanize", "f32_bf16_c64"),
    ("contrib.sophia", "f32_bf16_c64"),
    # scale_by_muon built with no argument: its update's tree_map fails on
    # this dict of params in every run ("pytree structure error").
    ("contrib.scale_by_muon", "f16"),
    ("contrib.scale_by_muon", "f32_bf16_c64"),
    ("contrib.scale_by_muon", "f64_c128"),
}


def _marks(name: str, run: str) -> list:
    if (name, run) in DTYPE_DRIFT:
        return [
            pytest.mark.xfail(
                reason="update needs value= to trace at init (DTYPE_DRIFT)",
                strict=True,
            )
        ]
    if (name, run) in OPTAX_FAILS:
        return [pytest.mark.skip(reason="optax's own update fails on this tree")]
    return []


def _matrix() -> list:
    """Every (optimizer, run) in the full profile; by default every third
    optimizer, in one run each (the run rotates), to bound the suite's time."""
    out = []
    for i, name in enumerate(sorted(CASES)):
        if not FULL and i % 3:
            continue
        runs = RUNS if FULL else (RUNS[(i // 3) % len(RUNS)],)
        out += [
            pytest.param(name, run, id=f"{name}-{run}", marks=_marks(name, run))
            for run in runs
        ]
    return out


@functools.cache
def _steps(name: str, run: str, exact: bool):
    """(guarded step, reference step), each one jitted program."""
    case = CASES[name]
    opt = optax.with_extra_args_support(case.make())
    tx = jaxnan.skip_nonfinite(opt, exact=exact)

    def guarded(params, state, g, loss):
        extra = case.extra(params, loss, g)
        u, state = tx.update(g, state, params, loss=loss, **extra)
        return optax.apply_updates(params, u), state

    def plain(params, state, g, loss):
        u, state = opt.update(g, state, params, **case.extra(params, loss, g))
        return optax.apply_updates(params, u), state

    if exact:  # the update alone, then its application, as two programs
        update = jax.jit(
            lambda p, s, g, loss: opt.update(g, s, p, **case.extra(p, loss, g))
        )
        apply = jax.jit(optax.apply_updates)

        def reference(params, state, g, loss):
            u, state = update(params, state, g, loss)
            return apply(params, u), state

        return opt, tx, jax.jit(guarded), reference
    return opt, tx, jax.jit(guarded), jax.jit(plain)


def _grads(base: dict, step: int, kind: str, where: int) -> tuple[dict, np.ndarray]:
    """The gradients and loss of one step; `where` picks the bad entry."""
    rng = np.random.default_rng(step)
    g = {}
    for k, x in base.items():
        v = rng.normal(size=x.shape)
        if jnp.iscomplexobj(x):
            v = v + 1j * rng.normal(size=x.shape)
        g[k] = v
    names = sorted(g)
    leaf = names[where % len(names)]
    flat = g[leaf].reshape(-1)
    value = {
        "nan": np.nan,
        "posinf": np.inf,
        "neginf": -np.inf,
        "huge": float(jnp.finfo(base[leaf].dtype).max) / 2,
    }.get(kind)
    if value is not None:
        flat[where % flat.size] = value
    g = {k: jnp.asarray(v, base[k].dtype) for k, v in g.items()}
    return g, np.float32(np.nan if kind == "loss_nan" else 1.0)


def _host(tree):
    def leaf(x):
        if jnp.issubdtype(jnp.result_type(x), jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        return np.asarray(x)

    return jax.tree_util.tree_map(leaf, tree)


def _bits(tree) -> list[bytes]:
    return [x.tobytes() for x in jax.tree_util.tree_leaves(_host(tree))]


def _finite(tree) -> bool:
    for x in jax.tree_util.tree_leaves(_host(tree)):
        if np.issubdtype(x.dtype, np.inexact) or x.dtype == jnp.bfloat16:
            if not np.isfinite(x.astype(np.complex128)).all():
                return False
    return True


def _update_dtypes_init(opt, case: cat.Case, params, base) -> object:
    """``opt.init(params)`` widened to the dtypes ``opt.update`` gives its leaves.

    The reference's own account of what `skip_nonfinite`'s state starts
    from: optax's dog, dowg, prodigy, momo and dadapt_adamw change a state
    leaf's dtype at their first update (a bfloat16 scalar becomes float32,
    a real one complex, in a mixed tree), and prodigy's second update
    widens its moments too; the guard's state takes those dtypes from init
    on (a widening, exact), so that it is a fixed-type carry. Found here by
    casting until `jax.eval_shape` of one update changes no dtype.
    """
    state = opt.init(params)
    g, loss = _grads(base, 0, "healthy", 0)
    for _ in range(4):
        _, out = jax.eval_shape(
            lambda s: opt.update(g, s, params, **case.extra(params, loss, g)), state
        )
        new = jax.tree_util.tree_map(
            lambda x, t: (
                x.astype(t.dtype)
                if jnp.issubdtype(x.dtype, jnp.inexact)
                and jnp.promote_types(x.dtype, t.dtype) == t.dtype
                else x
            ),
            state,
            out,
        )
        if _dtypes(new) == _dtypes(state):
            return state
        state = new
    raise AssertionError(f"{case.name}: no fixed point of the update's dtypes")


def _dtypes(tree) -> list:
    return [jnp.result_type(x) for x in jax.tree_util.tree_leaves(tree)]


def _as_dtypes(state, like):
    def cast(x, k):
        return x.astype(k.dtype) if jnp.issubdtype(x.dtype, jnp.inexact) else x

    return jax.tree_util.tree_map(cast, state, like)


@functools.cache
def _start(name: str, run: str, exact: bool) -> tuple:
    """``(base, params, guard's state, reference's state)`` at init, checked."""
    opt, tx, _, _ = _steps(name, run, exact)
    case = CASES[name]
    base = _params_of_run(run, case)
    params = case.wrap(base)
    s_run = tx.init(params)
    s_ref = _update_dtypes_init(opt, case, params, base)
    # The widening keeps init's values: optax's own init, bit for bit.
    assert _bits(s_ref) == _bits(_as_dtypes(opt.init(params), s_ref))
    assert _dtypes(s_run.inner_state) == _dtypes(s_ref), (name, run, "init dtypes")
    assert _bits(s_run.inner_state) == _bits(s_ref), (name, run, "init")
    return base, params, s_run, s_ref


# The reference step runs beside the guarded one: XLA compiles the two
# programs of a case at once (it releases the GIL), on a second core if free.
_BESIDE = concurrent.futures.ThreadPoolExecutor(1)


def _beside(run: str, fn, *args):
    """``fn(*args)`` on the helper thread, in the run's x64 mode (thread-local)."""

    def call():
        with _x64(run):
            return fn(*args)

    return _BESIDE.submit(call)


def _run(name: str, run: str, events: list, exact: bool) -> None:
    _, _, guarded, reference = _steps(name, run, exact)
    base, params, s_run, s_ref = _start(name, run, exact)
    p_run, p_ref = params, params
    skipped = 0
    for i, (kind, where) in enumerate(events):
        g, loss = _grads(base, i, kind, where)
        # The reference loop drops a step with nonfinite gradients or loss
        # without running it: unguarded, galore's SVD of a +-Inf gradient
        # may never return (LAPACK's gesdd, lapack#1409).
        healthy = _finite((g, loss))
        if healthy:
            new = _beside(run, reference, p_ref, s_ref, g, loss)
        p_run, s_run = guarded(p_run, s_run, g, loss)
        p_new, s_new = new.result() if healthy else (None, None)
        if healthy and _finite((p_new, s_new)):
            p_ref, s_ref = p_new, s_new
        else:
            skipped += 1
        assert _finite(p_run), (name, run, i, kind)
        assert _bits(p_run) == _bits(p_ref), (name, run, i, kind, "params")
        assert _dtypes(s_run.inner_state) == _dtypes(s_ref), (name, run, i, kind)
        assert _bits(s_run.inner_state) == _bits(s_ref), (name, run, i, kind, "state")
    assert int(s_run.nonfinite_total) == skipped


@pytest.mark.parametrize(("name", "run"), _matrix())
@PROFILE
@given(
    events=st.lists(
        st.tuples(st.sampled_from(KINDS), st.integers(0, 63)), min_size=3, max_size=5
    )
)
def test_skip_equals_the_reference_loop(name, run, events):
    with _x64(run):
        _run(name, run, events, exact=name in cat.FUSION_ULP)


def _exact_cases() -> list:
    """The optimizers XLA rounds 1 ulp apart under the default guard, and
    three others, in the mixed and the float16 run: all in both in the full
    profile; by default every other one, in one of the two in turn (the
    matrix runs the others in the exact variant too, in its rotation)."""
    names = sorted(cat.FUSION_ULP) + ["optax.adam", "optax.rmsprop", "optax.chain"]
    runs = ("f32_bf16_c64", "f16")
    pairs = [(name, run) for name in names for run in runs]
    if not FULL:
        pairs = [(name, runs[(i // 2) % 2]) for i, name in enumerate(names[::2])]
    return [
        pytest.param(name, run, marks=_marks(name, run), id=f"{run}-{name}")
        for name, run in pairs
    ]


@pytest.mark.parametrize(("name", "run"), _exact_cases())
def test_exact_variant_is_the_update_jitted_alone(name, run):
    """``exact=True``: every update and state bit for bit ``jit(inner.update)``'s,
    the optimizers whose default guard XLA rounds 1 ulp apart included."""
    events = [("healthy", 0), ("nan", 1), ("healthy", 2), ("huge", 5), ("healthy", 3)]
    _run(name, run, events, exact=True)


def test_every_public_optimizer_is_classified():
    """An optimizer added to optax fails here until it is in the catalogue."""
    assert cat.unclassified() == []
    assert set(cat.FUSION_ULP) <= set(CASES)
    assert {"optax.MultiSteps", "optax.chain", "optax.inject_hyperparams"} <= set(CASES)
    assert {"optax.masked", "optax.multi_transform", "optax.lookahead"} <= set(CASES)
    assert sum(n.startswith("schedule.") for n in CASES) == len(cat.SCHEDULES)


@pytest.mark.parametrize(
    "name",
    [
        "optax.adafactor",  # factored moments of other shapes than the params
        "optax.lookahead",  # LookaheadParams, not the gradients' structure
        "contrib.galore",  # projected moments
        "optax.optimistic_gradient_descent",  # a literal among its outputs
    ],
)
def test_wrappers_the_preamble_once_rejected(name):
    """The update preamble accepts what the inner optimizer accepts (each of
    these raised a ValueError or a TypeError before)."""
    case = CASES[name]
    opt = optax.with_extra_args_support(case.make())
    tx = jaxnan.skip_nonfinite(opt)
    base = _params_of_run("f32_bf16_c64", case)
    params = case.wrap(base)
    g, loss = _grads(base, 0, "healthy", 0)
    ref = _beside("f32_bf16_c64", jax.jit(opt.update), g, opt.init(params), params)
    u, state = jax.jit(tx.update)(g, tx.init(params), params)
    u_ref, s_ref = ref.result()
    assert _bits(u) == _bits(u_ref)
    assert _bits(state.inner_state) == _bits(s_ref)
    assert int(state.nonfinite_total) == 0


@pytest.mark.parametrize("exact", [False, True])
def test_skipped_step_vjp_and_signed_zeros_both_variants(exact):
    """A skipped step is the identity under `jax.vjp` (zero through the
    gradients, never NaN) and keeps -0.0 of real and complex params, in the
    exact variant as in the default."""
    tx = jaxnan.skip_nonfinite(optax.adam(1e-2), exact=exact)
    p = {
        "w": jnp.array([-0.0, 0.5]),
        "c": jnp.array([complex(-0.0, -0.0), complex(1.0, -0.0)], jnp.complex64),
    }
    g = {"w": jnp.array([jnp.nan, 1.0]), "c": jnp.array([1j, 1.0], jnp.complex64)}

    def step(g, s, p):
        u, s2 = tx.update(g, s, p)
        return optax.apply_updates(p, u), s2.inner_state

    s = tx.init(p)
    (new, kept), vjp = jax.vjp(jax.jit(step), g, s, p)
    assert _bits(new) == _bits(p)
    assert _bits(kept) == _bits(s.inner_state)

    def ones(x):
        if jnp.issubdtype(x.dtype, jnp.inexact):
            return jnp.ones_like(x)
        return np.zeros(x.shape, jax.dtypes.float0)

    ct_g, _, ct_p = vjp(jax.tree_util.tree_map(ones, (new, kept)))
    for x in jax.tree_util.tree_leaves(ct_g):
        np.testing.assert_array_equal(x, np.zeros_like(x))
    for x in jax.tree_util.tree_leaves(ct_p):
        np.testing.assert_array_equal(x, np.ones_like(x))


def test_a_dtype_widening_optimizer_under_the_guard():
    """optax's prodigy widens bfloat16 and float32 scalars of a mixed tree
    (to float32, and its moments to the dtype of that scalar's arithmetic)
    at its first updates. `skip_nonfinite`'s init takes those dtypes, so
    that `jaxnan.guard`'s donated state keeps one type over the run, and
    every step, the one after a skipped step included, is bit for bit the
    unguarded optax step from the same state."""
    opt = optax.contrib.prodigy(1.0)
    tx = jaxnan.skip_nonfinite(opt)
    params = {"w": jnp.zeros(3), "b": jnp.zeros((), jnp.bfloat16)}

    def make_step(tx):
        def train_step(params, opt_state, batch):
            def loss_fn(p):
                pred = batch["x"] @ p["w"] + p["b"].astype(jnp.float32)
                return jnp.mean((pred - batch["y"]) ** 2)

            loss, grads = jax.value_and_grad(loss_fn)(params)
            updates, opt_state = tx.update(grads, opt_state, params, loss=loss)
            return optax.apply_updates(params, updates), opt_state, loss

        return train_step

    rng = np.random.default_rng(0)
    batches = []
    for i in range(6):
        x = rng.normal(size=(8, 3)).astype(np.float32)
        if i == 2:
            x[3, 1] = np.nan
        batches.append({"x": x, "y": x.sum(1)})
    # Independently: optax's init in the dtypes its own update gives.
    case = cat.Case("contrib.prodigy", lambda: opt)
    widened = _update_dtypes_init(opt, case, params, params)
    assert _dtypes(widened) != _dtypes(opt.init(params))  # it widens
    state0 = tx.init(params)
    assert _dtypes(state0.inner_state) == _dtypes(widened)
    assert _bits(state0.inner_state) == _bits(widened)

    plain = jax.jit(make_step(opt))  # the unguarded step, skipped by hand
    ref = (params, widened)
    for batch in batches:
        p, s, loss = plain(*ref, batch)
        if _finite((p, s, loss)):
            ref = (p, s)
        assert _dtypes(s) == _dtypes(widened)  # a fixed-type carry

    step = jaxnan.guard(make_step(tx), verbose=False)
    params_run, state_run = params, state0
    for batch in batches:
        params_run, state_run, _ = step(params_run, state_run, batch)
    assert step.summary()["skipped"] == 1
    run = (params_run, state_run.inner_state)
    assert _dtypes(run) == _dtypes(ref)
    assert _bits(run) == _bits(ref)
