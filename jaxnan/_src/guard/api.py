"""`jaxnan.guard`: the public entry point, its arguments checked once.

The step it returns, `GuardedStep`, lives in `host` (the host half) and
compiles `graph.guarded_body` (the in-graph half).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np
from jax.extend import source_info_util

from jaxnan._src.core.validation import check_int, check_number
from jaxnan._src.guard import incidents, policies, rollback
from jaxnan._src.guard.step import GuardedStep

source_info_util.register_exclusion(__file__)


def guard(
    step_fn: Callable | None = None,
    *,
    policy: str | incidents.Policy = "skip",
    loss: str | Callable | None = None,
    max_streak: int = 10,
    snapshot_every: int = 100,
    log: str | os.PathLike | None = None,
    window: int = 8,
    growth: float = 100.0,
    donate: bool | None = None,
    verbose: bool = True,
    steps_back: int = 0,
    skip_batches: int = 0,
    max_rollbacks: int | None = None,
    bad_batches: str | os.PathLike | None = None,
    start_step: int = 0,
    schedule: Callable[[Any], Any] | None = None,
    underflow: float | None = None,
) -> GuardedStep:
    """Wraps a train step once: every bad step is skipped, replayed and explained.

    ``step = jaxnan.guard(train_step)`` compiles `train_step` (with or
    without its own `jax.jit`/`nnx.jit`/`eqx.filter_jit`) into one program
    and is called exactly like it. It reads the steps users write:

    * plain optax: ``(params, opt_state, batch[, rng]) -> (params, opt_state,
      metrics...)``; Equinox: ``(model, opt_state, batch) -> (model,
      opt_state, loss)`` (with ``eqx.nn.State``: ``(model, state, opt_state,
      ...)``; a module's Python bool/float fields stay static, as under
      `eqx.filter_jit`); linen: ``(state, batch) -> (state, metrics)``, or
      the tutorials' ``(state, batch) -> state``. The new state is the
      leading outputs that repeat the tree structure and leaf shapes of the
      argument at the same position; the outputs after it are the metrics
      (so ``(params, opt, x, y) -> (params, opt, loss, acc)`` has metrics
      ``(loss, acc)``).
    * Flax NNX: ``(model, optimizer, batch) -> metrics``, mutating `model`
      and `optimizer` in place (the guard updates them after each call);
      also the tutorials' ``(model, optimizer, metrics, batch) -> None``,
      whose loss goes to an ``nnx.MultiMetric``.

    The loss is found in the metrics: `loss` (a dict key or a function of
    the metrics) when given, else the metrics themselves when a scalar,
    ``metrics["loss"]``, or the first metric when a scalar (the first
    output after the state). A step that returns nothing (or its state
    alone) has the loss it hands to its optimizer (``optimizer.update(model,
    grads, loss=loss)``); handing none, it has no loss: it is bad when
    `skip_nonfinite` skips it or it writes a nonfinite value into its state
    (a metric averaging a nonfinite loss), its loss figure is NaN, its
    incidents' ``loss`` is None ("the step returns no loss"), and the guard
    warns once.

    Several optimizer steps per call (a `lax.scan` over `skip_nonfinite`
    updates) are one guarded step: the call is bad when any of its updates
    was skipped, and then all of it is undone.

    The optimizer must be wrapped in `jaxnan.skip_nonfinite`. In the
    compiled step, a step is bad when `skip_nonfinite` skipped the update (a
    NaN/Inf gradient, or loss given as ``loss=``), the loss is not finite, or
    the step wrote a nonfinite value into state that `skip_nonfinite` does
    not guard (a BatchNorm running variance overflowing). A bad step then
    changes nothing: every state leaf the step wrote (parameters, optimizer
    state, BatchNorm statistics, RNG counters, step counters) is as before,
    bit for bit, while `skip_nonfinite`'s own counters advance. A healthy
    step is the step unchanged: no host callback, and no copy of the
    parameters when the optimizer is handed the loss and the step writes no
    other float state; otherwise the parameters and optimizer state go
    through one `lax.cond` that puts them back on a step bad for a reason
    `skip_nonfinite` did not see.

    Donation follows the wrapped step: the guard donates exactly the
    arguments the wrapped `jax.jit`/`nnx.jit` donates (``donate_argnums``/
    ``donate_argnames``) or `eqx.filter_jit`'s ``donate=`` names, and
    nothing for an unjitted step; `donate` overrides. Without donation the
    caller's arrays stay valid after the call and the device holds the old
    and the new state at once (about twice the state's bytes at the peak,
    as under the wrapped jit); with it the new state reuses the old buffers
    and the arguments passed in are deleted. The batch is never donated
    (it is kept for the replay), and host numpy batches are copied before
    dispatch, so a loader may reuse its buffers.
    Static arguments follow the wrapped jit too: `jax.jit`/`nnx.jit`
    ``static_argnums``/``static_argnames`` and `eqx.filter_jit`'s Python
    scalars stay static (a new value compiles anew).

    No state is lost on an exception, Ctrl-C included: `GuardedStep.last_state`
    is the state to go on from (the last dispatched step's, or after a bad
    step the state before it), and NNX objects are left holding it.

    On the host the flag is read one step late, after the next step has been
    dispatched, so the device never waits. The step dispatched right after a
    bad one is held in the graph, the bad step is replayed once on a copy of
    its exact inputs (a finite replay is reported as nondeterministic),
    `jaxnan.locate` names the operation, line and cause, the examples at
    fault are found (``row 6 of batch['x'] (batch 12)``), the incident is
    printed once, and `policy` is applied; the held batch then runs again.
    A bad step within `window` steps of the last one that fails the same way
    (its batch nonfinite again, or finite again) is not located again: its
    incident repeats that diagnosis (with its own bad rows and leaves when
    the batch is the cause); one that fails another way is diagnosed afresh.
    Every healthy step also records loss, gradient norm and update-to-state
    ratio; when one grows `growth`-fold over `window` steps the guard warns
    before the first NaN. The cause of a bad step is decided by history-aware
    rules (`jaxnan.register_history_rule`) on locate's diagnosis, the
    figures of the steps before (a loss or update ratio that climbed: the
    learning rate; a gradient norm that grew geometrically while the loss
    did not: exploding gradients), the learning rate of the step (from an
    `optax.inject_hyperparams` state or `schedule`: nonfinite or surging)
    and the Adam moments (``nu`` at 0, ``mu`` near its dtype's range, for an
    update that is nonfinite from finite gradients); each incident lists
    the `jaxnan.Evidence` its cause rests on (``why:`` lines, ``evidence``
    in the JSONL log).

    Memory on the host stays bounded: ``step.figures`` keeps the last
    `GuardedStep.FIGURES_KEPT` steps and ``step.incidents`` the last
    `GuardedStep.INCIDENTS_KEPT` incidents (``summary`` counts all).

    Cost per healthy step: the loss check and a few scalars in the graph, the
    gradient norm from `skip_nonfinite`'s own pass, a select fused into each
    state write, and one read of a 5-float health vector on the host
    (`benchmarks/guard_loop.py`).

    Args:
        step_fn: the train step (required; None is rejected, see Raises).
        policy: ``"skip"`` (default), ``"raise"`` (a `jaxnan.NonFiniteError`
            whose ``details`` hold the ``incident``, the ``diagnosis`` and
            the ``state`` as it was before the bad step: the state
            arguments, or for Flax NNX the objects, which hold it) or
            ``"rollback"``
            (restore the last good snapshot; a rollback also forgets the
            undone steps' early-warning figures); a `jaxnan.Policy`.
        loss: where the loss is in the metrics: a dict key or a function of
            the metrics. None: the metrics themselves, ``metrics["loss"]`` or
            ``metrics[0]``; for a step returning nothing, the ``loss=``
            handed to `jaxnan.skip_nonfinite`, or none.
        max_streak: the most bad steps in a row the run survives; one
            more raises `jaxnan.NonFiniteError`, whatever the policy.
            (`jaxnan.skip_nonfinite`'s ``give_up_after`` only sets a flag.)
        snapshot_every: with ``"rollback"``, copy the state (on device, in
            its sharding) after every this many steps.
        log: a file to append one JSON object per incident to (created at
            the first incident; its directory must exist and be writable,
            checked here).
        window: healthy steps kept for the early warning.
        growth: growth factor over `window` steps that triggers a warning.
        donate: None (default): donate exactly what the wrapped jit donates
            (`jax.jit`/`nnx.jit` ``donate_argnums``/``donate_argnames``,
            `eqx.filter_jit` ``donate=``), nothing for an unjitted step.
            True: donate the whole state (every argument the step returns
            again, and NNX objects); False: nothing. Donated arguments are
            consumed (``Array has been deleted`` on their next use), as
            under the wrapped jit.
        verbose: print each incident once (they always go to the
            ``jaxnan.guard`` logger at WARNING too).
        steps_back: with ``"rollback"``, restore the newest good snapshot
            at least this many steps before the bad step (PaLM went back
            about 100); the guard keeps the host snapshots that needs
            (about ``steps_back / snapshot_every + 1``). 0: the newest.
        skip_batches: with ``"rollback"``, skip the next this many batches
            after the bad one (PaLM skipped 200-500): each such call runs
            held (the state comes back as it went in, bit for bit, with the
            step's metrics) and goes into the bad-batch record.
        max_rollbacks: with ``"rollback"``, the most rollbacks of the run;
            the next bad step raises `jaxnan.NonFiniteError` whose
            ``details["state"]`` is the last good state (also `last_state`).
            None: no limit.
        bad_batches: a JSON-lines file of the batches the run took out of
            training (`jaxnan.BadBatches`: step, data position, reason,
            cause, rows): read when it exists, so a resumed run skips those
            positions itself, and appended to (by process 0). None: the
            record is kept in memory (``step.bad_batches``).
        start_step: the global step number of the first call (a run resumed
            after step ``s`` passes ``s + 1``); the data position of a call
            is its step unless the loop sets ``step.position``.
        schedule: the learning-rate schedule of the optimizer (an optax
            schedule: optimizer step count -> learning rate), evaluated on
            the host only at an incident, at the optimizer's ``count``
            and the `window` counts before it. None: the learning rate is
            read from an `optax.inject_hyperparams` state, if any.
        underflow: None (default): off. A number in (0, 1): the compiled
            step also computes the fraction of exact zeros in the gradients
            `jaxnan.skip_nonfinite` receives (with `jaxnan.dynamic_loss_scale`
            inside it, the loss-scaled gradients), kept for every healthy step
            in ``step.underflow.figures``; when it rises by this much or more
            above its median over `window` steps, the guard warns once
            (cause ``underflow``), before anything goes nonfinite
            (marin-community/marin#7279). Cost: one fused reduction over the
            gradients per step (`benchmarks/RESULTS.md`).

    Returns:
        A `jaxnan.GuardedStep`, called like `step_fn`; ``.summary()``,
        ``.incidents`` and ``.figures`` tell what happened.

    Raises:
        TypeError: when `step_fn` is missing or not callable.
        TypeError: for a `log` that is not a path, a `donate` or `verbose`
            not a bool (`donate` None too),
            a `schedule` that is not callable, an int option (`snapshot_every`,
            `max_streak`, `window`, `steps_back`, `skip_batches`,
            `max_rollbacks`, `start_step`) that is not an int, a `growth` or
            `underflow` that is not a real number.
        ValueError: for an unknown `policy`, `snapshot_every` or `max_streak`
            below 1, `window` below 3, `growth` not above 1 or not finite,
            `underflow` outside (0, 1), a `log` path that cannot be written (a
            directory, a missing directory), `steps_back`, `skip_batches` or
            `start_step` below 0, `max_rollbacks` below 1, a rollback option
            with a policy that does not roll back, a `bad_batches` path in no
            directory or a record file that does not parse, and at the first call, for a
            step whose outputs, loss or optimizer state the guard cannot
            read.

    Examples:
        >>> import jax, jax.numpy as jnp, optax, jaxnan
        >>> tx = jaxnan.skip_nonfinite(optax.sgd(0.1))
        >>> def train_step(params, opt_state, batch):
        ...     loss, g = jax.value_and_grad(
        ...         lambda p: jnp.mean((batch["x"] * p["w"]) ** 2))(params)
        ...     updates, opt_state = tx.update(g, opt_state, params, loss=loss)
        ...     return optax.apply_updates(params, updates), opt_state, loss
        >>> step = jaxnan.guard(train_step, verbose=False)
        >>> params = {"w": jnp.ones(2)}
        >>> opt_state = tx.init(params)
        >>> for x in ([1.0, 2.0], [jnp.nan, 1.0], [1.0, 1.0]):
        ...     params, opt_state, loss = step(params, opt_state, {"x": jnp.array(x)})
        >>> s = step.summary()
        >>> s["steps"], s["skipped"], s["causes"]
        (3, 1, {'input_data': 1})
        >>> step.incidents[0].rows, step.incidents[0].leaf
        ((0,), "batch['x']")

    .. versionadded:: 0.2.0
    """
    if step_fn is None:  # also `@jaxnan.guard(verbose=False)`: no step
        raise TypeError(
            "jaxnan.guard needs a callable train step `step_fn`, got None. Use "
            "it as step = jaxnan.guard(train_step, ...), or as a decorator with "
            "options: @functools.partial(jaxnan.guard, verbose=False)."
        )
    if not callable(step_fn):
        raise TypeError(
            f"jaxnan.guard(step_fn) needs a callable train step, got "
            f"{type(step_fn).__name__}. Use it as step = jaxnan.guard(train_step)."
        )
    try:
        policy = incidents.Policy(policy)
    except ValueError:
        raise ValueError(
            f"jaxnan.guard: unknown policy={policy!r}; use one of "
            f"{[p.value for p in incidents.Policy]}."
        ) from None
    snapshot_every = check_int("guard", "snapshot_every", snapshot_every, low=1)
    max_streak = check_int("guard", "max_streak", max_streak, low=1)
    window = check_int("guard", "window", window, low=3)
    check_number("guard", "growth", growth, low=1, fix="Such as 100 (the default).")
    if loss is not None and not (isinstance(loss, str) or callable(loss)):
        raise TypeError(
            f"jaxnan.guard: loss must be a metrics key or a function of the "
            f"metrics, got {type(loss).__name__}."
        )
    if donate is not None and not isinstance(donate, bool):
        raise TypeError(
            f"jaxnan.guard: donate must be None (follow the wrapped jit), True or "
            f"False, got {donate!r}."
        )
    if not isinstance(verbose, bool | np.bool_):
        raise TypeError(
            f"jaxnan.guard: verbose must be True or False, got {verbose!r}."
        )
    _check_diagnosis_options(schedule, underflow)
    incidents.check_log_path(log)
    plan = rollback.RunPlan(
        policy,
        rolls_back=policies.rule_of(policy).snapshots,
        snapshot_every=snapshot_every,
        steps_back=steps_back,
        skip_batches=skip_batches,
        max_rollbacks=max_rollbacks,
        bad_batches=bad_batches,
        start_step=start_step,
    )
    return GuardedStep(
        step_fn,
        policy=policy,
        loss=loss,
        max_streak=max_streak,
        snapshot_every=snapshot_every,
        log=log,
        window=window,
        growth=growth,
        donate=donate,
        verbose=verbose,
        plan=plan,
        schedule=schedule,
        underflow=underflow,
    )


def _check_diagnosis_options(schedule: Any, underflow: Any) -> None:
    """Rejects a `schedule` that is not callable and an `underflow` outside (0, 1)."""
    if schedule is not None and not callable(schedule):
        raise TypeError(
            f"jaxnan.guard: schedule must be an optax schedule (a function of the "
            f"step count) or None, got {type(schedule).__name__}."
        )
    if underflow is not None:
        check_number(
            "guard",
            "underflow",
            underflow,
            low=0,
            high=1,
            fix="Pass None (off) or the rise of the zero fraction that warns, "
            "such as 0.1.",
        )
