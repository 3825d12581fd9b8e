"""Every optimizer and wrapper of optax's public API, built for a test.

`cases()` enumerates optax's namespace and ``optax.contrib``'s: each public
function whose return annotation names a ``GradientTransformation`` (and the
few unannotated ones that build one), and ``optax.MultiSteps``. A factory that
builds with a learning rate, or with no argument, is built that way; one that
needs arguments (a wrapper, a clip) has them in `BUILD`; each schedule of
``optax.schedules`` drives one of ``optax.sgd``, ``optax.adam`` and an
injected ``optax.adamw``, in turn; `VARIANTS` adds optimizers with other
options. What cannot take part in a run of steps is in `EXCLUDED`, with
the reason. `tests/test_skip_matrix.py` checks that every enumerated
name is one of those three, so an optimizer added to optax fails the test
until it is classified.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax import contrib

LR = 1e-2


def objective(params: Any) -> jax.Array:
    """A quadratic objective of the params, for the optimizers that call one."""
    return sum(
        0.5 * jnp.sum(jnp.abs(x.astype(jnp.float32)) ** 2)
        for x in jax.tree_util.tree_leaves(params)
    )


class Case(NamedTuple):
    """One optimizer of the matrix.

    Attributes:
        name: ``optax.NAME``, ``contrib.NAME``, or a schedule's
            ``schedule.NAME/optimizer``.
        make: builds the transformation.
        extra: the extra arguments its update needs, as a function of
            ``(params, loss, grads)``.
        real_only: whether it rejects or mishandles complex params.
        wrap: makes its params from a params tree (``optax.lookahead``
            takes ``LookaheadParams``).
    """

    name: str
    make: Callable[[], optax.GradientTransformation]
    extra: Callable[..., dict] = lambda params, loss, grads: {}
    real_only: bool = False
    wrap: Callable[[Any], Any] = lambda params: params


def _value(params, loss, grads):
    return {"value": loss}


def _obj(params, loss, grads):
    return {"obj_fn": objective}


def _line_objective(params: Any, loss: Any = None) -> jax.Array:
    """`objective` as a line search's ``value_fn``: optax's zoom line search
    hands the extra arguments of the update it does not consume itself
    (``loss=``, `skip_nonfinite`'s, included) to the parameters of
    ``value_fn`` of those names, and raises TypeError for any left over."""
    del loss
    return objective(params)


def _linesearch(params, loss, grads):
    return {"value": loss, "grad": grads, "value_fn": _line_objective}


def _adam():
    return optax.adam(LR)


# Factories that need arguments, built with an Adam inside where they wrap one.
BUILD: dict[str, Callable[[], optax.GradientTransformation]] = {
    "optax.adaptive_grad_clip": lambda: optax.adaptive_grad_clip(0.1),
    "optax.add_noise": lambda: optax.add_noise(0.01, 0.55, 0),
    "optax.apply_if_finite": lambda: optax.apply_if_finite(_adam(), 3),
    "optax.chain": lambda: optax.chain(optax.clip_by_global_norm(1.0), _adam()),
    "optax.clip": lambda: optax.clip(0.5),
    "optax.clip_by_block_rms": lambda: optax.clip_by_block_rms(0.5),
    "optax.clip_by_global_norm": lambda: optax.clip_by_global_norm(1.0),
    "optax.conditionally_mask": lambda: optax.conditionally_mask(
        _adam(), lambda step: step % 2 == 0
    ),
    "optax.conditionally_transform": lambda: optax.conditionally_transform(
        _adam(), lambda step: step % 2 == 0
    ),
    "optax.ema": lambda: optax.ema(0.9),
    "optax.flatten": lambda: optax.flatten(_adam()),
    "optax.freeze": lambda: optax.chain(
        optax.freeze({"a": True, "b": False, "c": False, "d": False}), _adam()
    ),
    "optax.inject_hyperparams": lambda: optax.inject_hyperparams(optax.adamw)(
        learning_rate=LR, weight_decay=0.1
    ),
    "optax.inject_stateful_hyperparams": lambda: optax.inject_stateful_hyperparams(
        optax.adam
    )(learning_rate=optax.linear_schedule(LR, 0.0, 4)),
    "optax.lookahead": lambda: optax.lookahead(
        _adam(), sync_period=2, slow_step_size=0.5
    ),
    "optax.masked": lambda: optax.masked(
        _adam(), {"a": True, "b": False, "c": True, "d": False}
    ),
    "optax.multi_transform": lambda: optax.multi_transform(
        {"adam": _adam(), "sgd": optax.sgd(0.1, momentum=0.9)},
        {"a": "adam", "b": "sgd", "c": "adam", "d": "sgd"},
    ),
    "optax.named_chain": lambda: optax.named_chain(
        ("clip", optax.clip(1.0)), ("adam", _adam())
    ),
    "optax.partition": lambda: optax.partition(
        {"adam": _adam(), "zero": optax.set_to_zero()},
        {"a": "adam", "b": "zero", "c": "adam", "d": "adam"},
    ),
    "optax.scale": lambda: optax.scale(-LR),
    "optax.scale_by_schedule": lambda: optax.scale_by_schedule(
        optax.exponential_decay(-LR, 2, 0.5)
    ),
    "optax.selective_transform": lambda: optax.selective_transform(
        _adam(), freeze_mask={"a": False, "b": True, "c": False, "d": False}
    ),
    "optax.stateless": lambda: optax.stateless(
        lambda g, p: jax.tree_util.tree_map(lambda x: -LR * x, g)
    ),
    "optax.stateless_with_tree_map": lambda: optax.stateless_with_tree_map(
        lambda g, p: -LR * g
    ),
    "optax.trace": lambda: optax.trace(0.9, nesterov=True),
    "optax.with_extra_args_support": lambda: optax.with_extra_args_support(_adam()),
    "optax.MultiSteps": lambda: optax.MultiSteps(_adam(), every_k_schedule=2),
    "contrib.differentially_private_aggregate": None,  # see EXCLUDED
    "contrib.mechanize": lambda: contrib.mechanize(_adam()),
    "contrib.schedule_free": lambda: contrib.schedule_free(optax.sgd(1.0), LR),
    "contrib.split_real_and_imaginary": lambda: contrib.split_real_and_imaginary(
        _adam()
    ),
}
BUILD = {k: v for k, v in BUILD.items() if v is not None}

EXCLUDED: dict[str, str] = {
    "optax.scale_by_backtracking_linesearch": (
        "a line search of a value_fn inside optax.lbfgs-like chains; "
        "its own (while-loop) state is covered by optax.lbfgs"
    ),
    "optax.scale_by_zoom_linesearch": "covered by optax.lbfgs, which ends with it",
    "optax.snapshot": "a measurement wrapper that needs a measure of the params",
    "optax.measure_with_ema": (
        "a measurement wrapper that needs a measure of the params"
    ),
    "contrib.differentially_private_aggregate": (
        "takes per-example gradients (a leading batch axis), not gradients"
    ),
    "contrib.dpsgd": "takes per-example gradients (a leading batch axis)",
    "contrib.sam": (
        "its update alternates adversarial and real steps on the params it is "
        "given; a skip of an adversarial step is not a step of the reference loop"
    ),
}

# The extra arguments an update needs, by name.
EXTRA: dict[str, Callable[..., dict]] = {
    "optax.polyak_sgd": _value,
    "optax.scale_by_polyak": _value,
    "contrib.momo": _value,
    "contrib.momo_adam": _value,
    "contrib.reduce_on_plateau": _value,
    "optax.lbfgs": _linesearch,
    "contrib.sophia": _obj,
    "contrib.hutchinson_estimator_diag_hessian": _obj,
}

WRAP: dict[str, Callable[[Any], Any]] = {
    "optax.lookahead": optax.LookaheadParams.init_synced,
}

# Names whose update rejects or mishandles complex params (found by running
# them: a comparison of complex numbers, a sign, a real-only lax primitive).
REAL_ONLY = frozenset(
    {
        "contrib.adopt",
        "contrib.madgrad",
        "contrib.mechanize",  # a lax.clamp with a complex bound, in optax itself
        "contrib.muon",
        "contrib.scale_by_adopt",
        "contrib.scale_by_madgrad",
        "contrib.scale_by_muon",
        "contrib.sophia",
        "optax.clip",
        "optax.keep_params_nonnegative",
        "optax.lbfgs",
        "optax.named_chain",
        "optax.rprop",
        "optax.scale_by_lbfgs",
        "optax.scale_by_rprop",
        "optax.scale_by_sm3",
        "optax.sm3",
    }
)

# XLA:CPU rounds the default guard's healthy step 1 ulp away from the
# unguarded one for these (a select in a kernel changes LLVM's FMA
# contraction in it; benchmarks/RESULTS.md), an ulp that the optimizer's
# recurrence can grow over the next steps; in float16 also where a fusion
# boundary moves the rounding of a float32 intermediate back to float16
# (adaptive_grad_clip: exact with ``--xla_allow_excess_precision=false``).
# `skip_nonfinite(exact=True)` is bit for bit `jax.jit(inner.update)` for
# them, as for every optimizer. Found by the full profile, in the runs named.
FUSION_ULP = frozenset(
    {
        "contrib.dadapt_adamw",
        "contrib.mechanize",  # float64
        "contrib.momo",
        "contrib.momo_adam",
        "contrib.muon",
        "contrib.galore",  # float16, since its gradients pass a select
        "contrib.scale_by_galore",  # float16, the same
        "contrib.schedule_free",  # mixed tree, float64
        "optax.adaptive_grad_clip",  # float16
        "optax.noisy_sgd",  # float16, mixed tree
        "optax.scale_by_radam",  # float16
        "optax.scale_by_rms",  # float16
        "optax.scale_by_stddev",  # float16
        "optax.rmsprop(centered=True, momentum=0.9)",
    }
)

# Optimizers with other options than their defaults.
VARIANTS: dict[str, Callable[[], optax.GradientTransformation]] = {
    "optax.rmsprop(centered=True, momentum=0.9)": lambda: optax.rmsprop(
        LR, centered=True, momentum=0.9
    ),
    "optax.sgd(momentum=0.9, nesterov=True)": lambda: optax.sgd(
        LR, momentum=0.9, nesterov=True
    ),
}

SCHEDULES: dict[str, Callable[[float], Any]] = {
    "constant_schedule": lambda v: optax.constant_schedule(v),
    "cosine_decay_schedule": lambda v: optax.cosine_decay_schedule(v, 4),
    "cosine_onecycle_schedule": lambda v: optax.cosine_onecycle_schedule(4, v),
    "exponential_decay": lambda v: optax.exponential_decay(v, 2, 0.5),
    "join_schedules": lambda v: optax.join_schedules(
        [optax.constant_schedule(v), optax.linear_schedule(v, 0.0, 3)], [2]
    ),
    "linear_onecycle_schedule": lambda v: optax.linear_onecycle_schedule(4, v),
    "linear_schedule": lambda v: optax.linear_schedule(v, 0.0, 4),
    "piecewise_constant_schedule": lambda v: optax.piecewise_constant_schedule(
        v, {2: 0.5}
    ),
    "piecewise_interpolate_schedule": lambda v: optax.piecewise_interpolate_schedule(
        "linear", v, {2: 0.5}
    ),
    "polynomial_schedule": lambda v: optax.polynomial_schedule(v, 0.0, 2, 4),
    "sgdr_schedule": lambda v: optax.sgdr_schedule(
        [{"init_value": v, "peak_value": 2 * v, "decay_steps": 3, "warmup_steps": 1}]
    ),
    "warmup_constant_schedule": lambda v: optax.warmup_constant_schedule(0.0, v, 2),
    "warmup_cosine_decay_schedule": lambda v: optax.warmup_cosine_decay_schedule(
        0.0, v, 1, 4
    ),
    "warmup_exponential_decay_schedule": (
        lambda v: optax.warmup_exponential_decay_schedule(0.0, v, 1, 2, 0.5)
    ),
}


def _schedule_names() -> set[str]:
    return {
        n
        for n in dir(optax.schedules)
        if not n.startswith("_")
        and not n.startswith("inject")
        and inspect.isfunction(getattr(optax.schedules, n))
    }


def _builds(f: Callable) -> Callable | None:
    """A maker for `f` with a learning rate or no argument, or None."""
    for kwargs in ({"learning_rate": LR}, {}):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tx = f(**kwargs)
        except TypeError:
            continue
        if isinstance(tx, optax.GradientTransformation):
            return lambda: f(**kwargs)
    return None


def public_names() -> dict[str, Callable]:
    """The transformation factories of optax's and optax.contrib's namespaces."""
    out: dict[str, Callable] = {"optax.MultiSteps": optax.MultiSteps}
    for prefix, module in (("optax", optax), ("contrib", contrib)):
        for n in dir(module):
            f = getattr(module, n)
            if n.startswith("_") or not inspect.isfunction(f):
                continue
            try:
                annotation = str(inspect.signature(f).return_annotation)
            except (TypeError, ValueError):
                continue
            if "GradientTransformation" in annotation or (
                annotation == str(inspect.Signature.empty) and _builds(f)
            ):
                out[f"{prefix}.{n}"] = f
    return out


def cases() -> list[Case]:
    """Every case of the matrix, sorted by name (schedules last)."""
    out = []
    for name, f in sorted(public_names().items()):
        if name in EXCLUDED:
            continue
        make = BUILD.get(name) or _builds(f)
        if make is None:
            continue  # unclassified: test_every_public_optimizer_is_classified
        if name == "optax.MultiSteps":
            make = _multisteps(make)
        out.append(
            Case(
                name,
                make,
                EXTRA.get(name, lambda p, loss, g: {}),
                name in REAL_ONLY,
                WRAP.get(name, lambda p: p),
            )
        )
    out += [Case(name, make) for name, make in sorted(VARIANTS.items())]
    inner = (
        ("sgd", lambda s: optax.sgd(s(0.1), momentum=0.9)),
        ("adam", lambda s: optax.adam(s(LR))),
        (
            "inject_adamw",
            lambda s: optax.inject_hyperparams(optax.adamw)(learning_rate=s(LR)),
        ),
    )
    for i, s in enumerate(sorted(_schedule_names() & set(SCHEDULES))):
        label, build = inner[i % len(inner)]
        out.append(Case(f"schedule.{s}/{label}", lambda b=build, s=SCHEDULES[s]: b(s)))
    return out


def _multisteps(make):
    return lambda: make().gradient_transformation()


def unclassified() -> list[str]:
    """Enumerated names that are neither built nor excluded."""
    names = public_names()
    missing = [
        n
        for n, f in names.items()
        if n not in EXCLUDED and n not in BUILD and _builds(f) is None
    ]
    missing += sorted(_schedule_names() - set(SCHEDULES))
    return sorted(missing)
