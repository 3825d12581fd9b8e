"""Device side of `jaxnan.checked`: the checks, and how they stay alive.

Each checked tree costs one fused reduction (`tree.all_finite`) and a
`lax.cond` whose reporting branch is not taken on a healthy step. Only when a
tree is nonfinite does the reporting branch count NaN/+Inf/-Inf per leaf and
call the host. With ``tie=True`` that is a `jax.pure_callback` whose float32
result (always 0) is tied into the outputs and, through `jax.custom_vjp`
identities, into the output cotangent and the gradients (`tie`,
`tie_outputs`, `probe`): the program has no JAX effect, so a jitted step keeps
the fast C++ dispatch path, and JAX keeps each callback exactly as long as a
value it is tied to is used. With ``tie=False`` (forward-mode AD, where
`custom_vjp` is undefined) the host is called by `jax.debug.callback`.

The vmap trap: under `vmap` a `lax.cond` with a batched predicate becomes a
`select` that runs both branches, so a callback inside would fire on every
example. The predicate and the counts are therefore reduced over the batch by
two tiny `jax.custom_batching.custom_vmap` functions (`fold_all`, `fold_sum`)
whose batching rule reduces the batch axis and returns an unbatched value;
the cond stays a cond and reports once per vmapped call.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_batching import custom_vmap
from jax.custom_derivatives import SymbolicZero
from jax.extend import source_info_util

from jaxnan._src.checks import host, processes
from jaxnan._src.core import dtypes, errors, sharding, tree, validation

source_info_util.register_exclusion(__file__)


# --------------------------------------------------------------------------
# Batch folding: keeps the report predicate unbatched under vmap.


@custom_vmap
def fold_all(ok: jax.Array) -> jax.Array:
    """Identity outside `vmap`; under `vmap`, all over the batch (unbatched)."""
    return ok


@fold_all.def_vmap
def _fold_all_rule(axis_size, in_batched, ok):
    del axis_size
    if in_batched[0]:
        # Calling fold_all again folds the next vmap level out, if any.
        return fold_all(jnp.all(ok, axis=0)), False
    return ok, False


@custom_vmap
def fold_sum(c: jax.Array) -> jax.Array:
    """Identity outside `vmap`; under `vmap`, the sum over the batch."""
    return c


@fold_sum.def_vmap
def _fold_sum_rule(axis_size, in_batched, c):
    # Runs only for a batched input; nested vmaps fold one level each.
    del axis_size
    if in_batched[0]:
        return fold_sum(jnp.sum(c, axis=0)), False
    return c, False


# --------------------------------------------------------------------------
# What a check counts.


def counted(leaf: Any) -> bool:
    """Whether a check looks at `leaf`.

    Floating and complex arrays count (NaN, +Inf and -Inf). A Python float
    stored in a model is a constant of the program, not data: ``-inf`` as
    the initial value of `eqx.nn.MaxPool2d`, a mask fill value. Such a
    scalar counts only when it is NaN, which no healthy program stores.
    """
    if not dtypes.is_checked_leaf(leaf):
        return False
    if isinstance(leaf, (float, complex)):
        return leaf != leaf  # NaN only (complex NaN included)
    return True


def _read(pairs: list, phase: errors.Phase) -> list[jax.Array]:
    """The values a check reads: (leaf, is a stored constant) pairs.

    A constant's +-Inf entries are intentional (only its NaN entries count).
    Gradients are read through a view of another rank: XLA folds it into
    the gradient's own reshape (say of a bias gradient summed over
    [1, 1, 1, C]), which then keeps the optimizer as its only reader and
    moves past its arithmetic as it does without the check (the fused
    update, and the rounding of its multiply-adds, stay those of the plain
    step; `tests/frameworks/test_bit_exact.py`).
    """
    xs = []
    for x, constant in pairs:
        x = lax.stop_gradient(jnp.asarray(x))
        if constant:
            x = jnp.where(jnp.isinf(x), jnp.zeros_like(x), x)
        if phase is errors.Phase.BACKWARD:
            x = x.reshape((1, *x.shape))
        xs.append(x)
    return xs


def check(
    leaves: list,
    paths: Sequence[str],
    phase: errors.Phase,
    reporter: host.Reporter,
    hint: str,
    *,
    tie: bool,
    skip: jax.Array | None = None,
    site: host.CallSite | None = None,
    constants: Sequence[bool] = (),
    mesh: Any = None,
) -> tuple[jax.Array | None, jax.Array | None]:
    """Reports the nonfinite leaves of `leaves`: ``(all-finite flag, token)``.

    `constants` (one flag per leaf, `state.constant_leaves`) marks the arrays
    a model stores as constants: their +-Inf entries are intentional (an
    attention mask), so only their NaN entries count.

    `skip` (a bool, per example under vmap) suppresses the report where it is
    True (used to report outputs and gradients only when the inputs were
    finite: one bad batch, one report).

    With ``tie=False`` the host is called by `jax.debug.callback`, an effect
    that JAX never removes; the token is None. With ``tie=True`` it is called
    by `jax.pure_callback`, which has no effect, so the program keeps JAX's
    fast dispatch path and XLA schedules it freely (measured on the MLP step:
    an untaken `debug.callback` branch cost 1.33x, a `pure_callback` one
    1.17x, against 1.14x for the check alone). Its float32 result (always 0)
    is the token: the caller must tie it into values the user consumes
    (`tie`), or JAX would delete the unused callback.

    `mesh` (`processes.mesh_of`, for values sharded over a mesh): the
    callback runs on every device of that mesh, so that every device raises
    at the same point and every process reports (`processes.report`).
    """
    constants = list(constants) or [False] * len(leaves)
    pairs = [(p, x, c) for p, x, c in zip(paths, leaves, constants) if counted(x)]
    if not pairs:
        return None, None
    paths = [p for p, _, _ in pairs]
    xs = _read([(x, c) for _, x, c in pairs], phase)
    # Arguments are all ready at once: their small leaves share a reduction.
    ok = (
        tree.all_finite_packed(xs)
        if phase is errors.Phase.INPUT
        else tree.all_finite(xs)
    )
    quiet = ok if skip is None else ok | lax.stop_gradient(skip)
    box: list = []
    host_fn = reporter.host_fn(phase, paths, hint, box, site)

    def no_report(operands):
        del operands
        return jnp.zeros((), jnp.float32) if tie else None

    def do_report(operands):
        xs, quiet = operands
        counts = fold_sum(tree.counts_matrix(xs, pack=True))
        # Batched exactly when `quiet` is, so that vmap sees (and folds) it.
        bad = fold_sum((~quiet).astype(jnp.int32))
        total = fold_sum((quiet | True).astype(jnp.int32))
        if mesh is not None:  # sharded: a report on every device
            raises = reporter.policy == "raise"
            return processes.report(mesh, host_fn, raises, tie, counts, bad, total)
        if not tie:
            jax.debug.callback(host_fn, counts, bad, total)
            return None
        return jax.pure_callback(
            host_fn,
            jax.ShapeDtypeStruct((), jnp.float32),
            counts,
            bad,
            total,
            vmap_method="sequential",
        )

    eager = not any(validation.is_traced(x) for x in xs) and not validation.is_traced(
        quiet
    )
    try:
        token = lax.cond(fold_all(quiet), no_report, do_report, (xs, quiet))
        if eager:
            # A program over several devices runs asynchronously: its
            # callback's error would surface later, at some other read.
            if token is None:
                jax.effects_barrier()
            else:
                jax.block_until_ready(token)
    except Exception:
        if eager and box:  # our own NonFiniteError, wrapped by the runtime
            raise box[0] from None
        raise
    return ok, token


def add_tokens(*tokens: jax.Array | None) -> jax.Array | None:
    """The sum of the live tokens, or None."""
    live = [t for t in tokens if t is not None]
    return sum(live[1:], live[0]) if live else None


def tie(leaves: list, token: jax.Array | None, groups: Sequence[Any] = ()) -> list:
    """`leaves`, with `token` (a float32 0) tied into the largest floating one.

    ``x - token * 0`` is `x` bit for bit (also -0.0, Inf and NaN), and XLA
    cannot fold ``token * 0`` (it would be NaN for a NaN token), so the
    computation of `token`, and the callback in it, stays alive exactly as
    long as `x` is used. Only the first element of `x` is rewritten so
    (``x.at[0].set(x[0] - token * 0)``, `_tie_one`), in the largest leaf: an
    update in place of a buffer that exists anyway (a weight gradient is
    the output of a matmul or a convolution), which leaves the code that
    reads `x` as it is without the tie. An elementwise ``x - token * 0``
    fused into an optimizer's ``b1 * mu + (1 - b1) * g``, or an update in
    place of a small gradient whose last reshape XLA would otherwise move
    into the optimizer, changed which of its products XLA's CPU code
    contracts into a fused multiply-add: 1 ulp in Adam's moments from the
    second step on (`tests/frameworks/test_bit_exact.py`). With `groups`
    (one label per leaf), one leaf per label is tied, so that each
    differentiated argument carries it. None leaves (symbolic zeros) are
    skipped.
    """
    if token is None:
        return leaves
    labels = list(groups) if groups else [0] * len(leaves)
    best: dict[Any, int] = {}
    for i, (x, g) in enumerate(zip(leaves, labels)):
        if x is None or not isinstance(x, jax.Array) or not dtypes.is_checked_leaf(x):
            continue
        if g not in best or math.prod(x.shape) > math.prod(leaves[best[g]].shape):
            best[g] = i
    out = list(leaves)
    for i in best.values():
        out[i] = _tie_one(out[i], token)
    return out


def _tie_one(x: jax.Array, token: jax.Array) -> jax.Array:
    zero = (token * 0).astype(x.dtype)
    if not x.size or not x.ndim or sharding.sharded_in_type(x):
        # An explicitly sharded dim cannot be sliced to one element.
        return x - zero
    first = (0,) * x.ndim
    return x.at[first].set(x[first] - zero)


def tie_outputs(
    leaves: list,
    token: jax.Array,
    quiet: jax.Array | None = None,
    seen: list | None = None,
) -> list:
    """Ties `token` into the outputs and, under reverse-mode AD, their cotangents.

    `jax.grad` drops the outputs themselves; tied into the cotangent that
    flows back through `fn`, the forward checks survive it. `quiet` (True
    when the forward checks did not report) rides along as a residual and is
    appended to `seen` when the cotangents pass on their way back, before
    they reach the arguments' `probe`, which reads it: the gradients of a
    step whose loss was reported are not reported a second time.
    """
    idx = [
        i
        for i, x in enumerate(leaves)
        if isinstance(x, jax.Array) and dtypes.is_checked_leaf(x)
    ]
    if not idx:
        return leaves

    quiet = jnp.ones((), bool) if quiet is None else lax.stop_gradient(quiet)

    @jax.custom_vjp
    def tied(xs, token, quiet):
        del quiet
        return tuple(tie(list(xs), token))

    def fwd(xs, token, quiet):
        values = [p.value for p in xs]
        return tuple(tie(values, token.value)), (token.value, quiet.value)

    def bwd(res, cts):
        token, quiet = res
        if seen is not None:
            seen.append(quiet)
        live = [None if isinstance(c, SymbolicZero) else c for c in cts]
        return tuple(tie(live, token)), None, None

    tied.defvjp(fwd, bwd, symbolic_zeros=True)
    out = list(leaves)
    for i, x in zip(idx, tied(tuple(leaves[i] for i in idx), token, quiet)):
        out[i] = x
    return out


def probe(
    leaves: list,
    on_cotangents: Callable,
    groups: Sequence[Any],
    inputs_ok: jax.Array | None,
) -> list:
    """Identity on `leaves` whose VJP hands the cotangents to `on_cotangents`.

    Only the leaves that are being differentiated (perturbed) are passed on,
    as ``on_cotangents(index_list, cotangent_list, inputs_ok)``, which returns
    a token (or None). `inputs_ok` (the forward check of the arguments, or
    None) rides along as a residual, so that gradients made from a reported
    bad batch are not reported a second time. The cotangents are returned
    unchanged, bit for bit, with the token tied into one of them per label of
    `groups` (per argument).
    """
    flag = jnp.ones((), bool) if inputs_ok is None else inputs_ok

    @jax.custom_vjp
    def ident(xs, flag):
        del flag
        return xs

    def fwd(xs, flag):
        values = tuple(p.value for p in xs)
        # The mask has no leaves: its tree structure says what was perturbed.
        mask = tuple(() if p.perturbed else None for p in xs)
        return values, (mask, flag.value)

    def bwd(res, cts):
        mask, ok = res
        live = [
            i
            for i, (m, ct) in enumerate(zip(mask, cts))
            if m is not None and not isinstance(ct, SymbolicZero)
        ]
        out = [cts[i] if i in live else None for i in range(len(cts))]
        if live:
            token = on_cotangents(live, [cts[i] for i in live], ok)
            out = tie(out, token, groups)
        return tuple(out), None

    ident.defvjp(fwd, bwd, symbolic_zeros=True)
    return list(ident(tuple(leaves), flag))
