"""`jaxnan.guard`: wrap a train step once; every bad step is skipped and explained.

The host half. Each call dispatches the compiled step (`program.guarded_body`)
and only then reads the health of the *previous* step, which has finished or
is about to: the device always has the step in flight queued behind it. When
the previous step was bad, the step just dispatched was held in the graph
(its state is the bad step's input, bit for bit), so the guard:

1. replays the bad step once on a copy of that state with the same batch
   and RNG (a failure that does not come back is reported as
   nondeterministic);
2. runs `jaxnan.locate` on it and finds the examples at fault;
3. applies the policy (skip, raise, roll back to the last good snapshot),
   records the incident, and dispatches the held batch again.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import source_info_util

from jaxnan._src.checks import check
from jaxnan._src.core import errors, validation
from jaxnan._src.guard import (
    diagnoses,
    donation,
    evidence,
    examples,
    gradients,
    history,
    history_rules,
    incidents,
    losses,
    multihost,
    policies,
    program,
    replayed,
    rollback,
    split_state,
    statics,
)
from jaxnan._src.guard.snapshots import copy_leaves
from jaxnan._src.guard.underflow import Watch

source_info_util.register_exclusion(__file__)


@dataclasses.dataclass
class _Entry:
    """A compiled step for one argument layout."""

    layout: program.Layout
    compiled: Callable
    run: Callable
    out_len: int
    input_paths: list[str]
    per_example: Callable | None = None
    split: program.Split | None = None


@dataclasses.dataclass
class _Pending:
    """A dispatched step whose health the host has not read yet."""

    step: int
    entry: _Entry
    inputs: list[Any]
    health: jax.Array


class GuardedStep:
    """A train step wrapped by `jaxnan.guard`; call it as the step itself.

    Attributes:
        incidents: the latest `INCIDENTS_KEPT` incidents (`jaxnan.Incident`: bad
            steps and warnings; `summary` counts all of them).
        figures: one ``(step, loss, grad_norm, update_ratio, bad)`` tuple
            per step whose health was read, the latest `FIGURES_KEPT` (for
            plots; a ring buffer, `collections.deque`).
        last_state, last_good, position: see the properties.
        bad_batches: the run's bad-batch record (`jaxnan.BadBatches`).
        steps: the number of calls so far.
        underflow: with ``underflow=``, the `underflow.Watch` whose ``figures``
            hold ``(step, zero fraction of the gradients)``; else None.

    Memory stays bounded over any number of steps: `figures` and
    `incidents` are ring buffers, the early-warning history holds `window`
    steps (measured over 1e6 steps by `benchmarks/guard_memory.py`).

    Raises:
        TypeError: when called with keyword arguments, or with a batch
            argument holding a str or another non-array Python object
            (naming the argument and the leaf; bind constants with
            `functools.partial` before `jaxnan.guard`).
        NonFiniteError: on a bad step under ``policy="raise"``.
    """

    FIGURES_KEPT = 10_000
    """Steps whose figures `figures` keeps (about 1.5 MB of tuples)."""
    INCIDENTS_KEPT = 1_000
    """Incidents `incidents` keeps (each holds its diagnosis)."""

    def __init__(
        self,
        fn: Callable,
        *,
        policy: incidents.Policy,
        loss: str | Callable | None,
        max_streak: int,
        snapshot_every: int,
        log: str | os.PathLike | None,
        window: int,
        growth: float,
        donate: bool | None,
        verbose: bool,
        plan: rollback.RunPlan | None = None,
        schedule: Callable[[Any], Any] | None = None,
        underflow: float | None = None,
    ):
        self.schedule = schedule
        self._static = statics.static_rule(fn)  # None: no static argument
        self.fn = statics.unheld(program.unwrap_jit(fn), self._static)
        if donate is None:
            self._donates = donation.donated_positions(fn)
        else:
            self._donates = lambda i: donate
        self.name = check.function_name(self.fn)
        self.policy = policy
        self._rule = policies.rule_of(policy)
        self.loss = loss
        self.max_streak = max_streak
        self.snapshot_every = snapshot_every
        self.history = history.History(window, growth)
        self.underflow = Watch(underflow, window) if underflow else None
        self.log = incidents.IncidentLog(log, verbose, keep=self.INCIDENTS_KEPT)
        self.figures: collections.deque[tuple[int, float, float, float, bool]] = (
            collections.deque(maxlen=self.FIGURES_KEPT)
        )
        self.steps = 0
        self._entries: dict[program.Layout, _Entry] = {}
        self._by_treedef: dict[Any, _Entry] = {}  # fast path, see `_flatten`
        self._notes: list[str] = []  # found while tracing, warned once
        self._warned: set[str] = set()
        self._pending: _Pending | None = None
        self._streak = 0
        # (state leaves, args, entry) to go on from: see `_step`.
        self._last: tuple[list, list[Any], _Entry] | None = None
        self._plan = plan or rollback.RunPlan(policy, rolls_back=self._rule.snapshots)
        self._snapshots = self._plan.snapshots(snapshot_every)
        self.bad_batches = self._plan.record  # a `jaxnan.BadBatches`
        self._zeros = jnp.zeros((program.HEALTH_SIZE,), jnp.float32)
        functools.update_wrapper(self, self.fn)

    @property
    def incidents(self) -> collections.deque[incidents.Incident]:
        return self.log.incidents

    @property
    def last_good(self) -> tuple[int, Any] | None:
        """``(step, state)``: the newest state verified healthy, or None (`rollback`).

        It waits for the last call's step: call it to save a checkpoint.
        """
        last = self._plan.step_of(self.steps - 1)
        return rollback.last_good(self._pending, last, self._plan, self.last_state)

    @property
    def position(self) -> int:
        """The data position of the next call; set it to a loop's own position."""
        return self._plan.position

    @position.setter
    def position(self, value: int) -> None:
        self._plan.position = rollback.checked_position(value)

    # -- compiling ------------------------------------------------------

    def _entry(self, args: Sequence[Any]) -> _Entry:
        probe = program.make_layout(args, ())
        entry = self._entries.get(probe)
        if entry is not None:
            return entry
        state_args: tuple[int, ...] = ()
        out_len = 0
        if not probe.graph_args:
            outs: list[Any] = []

            def shapes(inputs):
                out = self.fn(*program.rebuild(probe, [], inputs))
                outs.append((program.output_structure(out), program.signature(out)))

            jax.eval_shape(shapes, program.flatten(probe, args)[1])
            state_args = program.infer_state_args(args, *outs[0])
            out_len = len(outs[0][0] or ()) if state_args else 0
        layout = program.make_layout(args, state_args)
        names = validation.argument_names(self.fn, len(args))
        paths = []
        for i in layout.input_args:
            flat, _ = jax.tree_util.tree_flatten_with_path(args[i])
            statics = layout.statics[layout.positions[i]]
            for (p, x), s in zip(flat, statics):
                where = f"{names[i]}{jax.tree_util.keystr(p)}"
                if s is not None:
                    raise TypeError(
                        f"jaxnan.guard: argument `{names[i]}` of `{self.name}` "
                        f"holds a {type(x).__name__} at {where} ({x!r}). The "
                        "guard compiles the step once and keeps the batch for "
                        "replay: pass arrays (numpy or jax), or bind constants "
                        "with functools.partial before jaxnan.guard."
                    )
                paths.append(where)
        multihost.check_global(program.flatten(layout, args)[1], paths, self.name)
        body, run = program.guarded_body(
            self.fn, layout, self.loss, self.name, self._notes, bool(self.underflow)
        )
        graph_state = None
        if layout.graph_args:
            objs = tuple(args[i] for i in layout.graph_args)
            graph_state = program.adapter(layout).split(objs)[1]
        mask = donation.state_mask(layout, graph_state, self._donates)
        state = program.flatten(layout, args)[0]
        compiled = donation.Donating(split_state.traced_with_split(body, state), mask)
        entry = _Entry(layout, compiled, run, out_len, paths)
        entry.split = program.make_split(layout)
        self._entries[probe] = entry
        return entry

    def _flatten(self, args: Sequence[Any]) -> tuple[_Entry, list, list]:
        """``(entry, state, inputs)`` for a call: by tree structure when known.

        The usual call repeats the last one's tree structure: one flatten in
        C++ and a split by index (`program.Split`). Anything else (a first
        call, NNX objects, a new structure or static leaf) takes the full
        layout.
        """
        leaves, treedef = jax.tree_util.tree_flatten(tuple(args))
        entry = self._by_treedef.get(treedef)
        if entry is not None:
            split = entry.split(leaves)
            if split is not None:
                return entry, *split
        entry = self._entry(args)
        state, inputs = program.flatten(entry.layout, args)
        if entry.split is not None:
            self._by_treedef[treedef] = entry
        return entry, state, inputs

    # -- the call -------------------------------------------------------

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Runs one guarded step; returns what the step returns."""
        if kwargs:
            raise TypeError(
                f"jaxnan.guard: pass the arguments of `{self.name}` positionally "
                f"(got keywords {sorted(kwargs)})."
            )
        entry, state, inputs = self._flatten(statics.held(args, self._static))
        inputs = donation.owned(inputs)
        before = self._zeros if self._pending is None else self._pending.health
        try:
            new_state, metrics = self._step(entry, args, state, inputs, before)
        except BaseException:
            self._restore_objects()
            raise
        return self._outputs(entry, args, new_state, metrics)

    def _step(self, entry, args, state, inputs, before):
        """Dispatches one step and settles the one before; ``(state, metrics)``.

        `_last` always holds a consistent state to go on from (the caller's
        arguments until this step is dispatched, then its new state, then
        the state after the bad step's policy), so an exception anywhere,
        Ctrl-C included, loses nothing (`last_state`).
        """
        step = self._plan.step_of(self.steps)
        before = self._plan.held if self._plan.place(step) else before
        new_state, metrics, health = entry.compiled(before, state, inputs)
        self._last = (new_state, list(args), entry)
        if self._notes:
            self._warn_notes()
        if incidents.LOGGER.isEnabledFor(logging.DEBUG):
            incidents.LOGGER.debug("dispatched step %d", self.steps)
        current = _Pending(step, entry, inputs, health)
        self.steps += 1
        previous, self._pending = self._pending, current
        if previous is not None:
            new_state, metrics = self._settle(previous, current, new_state, metrics)
            self._last = (new_state, list(args), entry)
        self._snapshot(current.step, new_state)
        return new_state, metrics

    @property
    def last_state(self) -> Any:
        """The state to go on from after the last call, even one that raised.

        A call interrupted (Ctrl-C) or failing after its step was dispatched
        has consumed its donated arguments; this is the state that step made
        (or, after a bad step, the state before it): the same tuple of
        state arguments the step returns first (``(params, opt_state)``), or
        for Flax NNX the objects themselves, which hold it already. None
        before the first call.

        Examples:
            >>> import jax, jax.numpy as jnp, optax, jaxnan
            >>> tx = jaxnan.skip_nonfinite(optax.sgd(0.1))
            >>> def train_step(params, opt_state, x):
            ...     loss, g = jax.value_and_grad(lambda p: jnp.sum(p * x))(params)
            ...     updates, opt_state = tx.update(g, opt_state, params, loss=loss)
            ...     return optax.apply_updates(params, updates), opt_state, loss
            >>> step = jaxnan.guard(train_step, verbose=False)
            >>> params, opt_state = jnp.ones(2), tx.init(jnp.ones(2))
            >>> _ = step(params, opt_state, jnp.ones(2))
            >>> step.last_state[0].tolist()
            [0.8999999761581421, 0.8999999761581421]
        """
        if self._last is None:
            return None
        state, args, entry = self._last
        layout = entry.layout
        if layout.graph_args:
            self._restore_objects()
            return program.graph_objects(layout, args)
        return tuple(program.rebuild_state_args(layout, state))

    def _restore_objects(self) -> None:
        """NNX objects of the last call hold `_last`'s state (never deleted)."""
        if self._last is None:
            return
        state, args, entry = self._last
        layout = entry.layout
        if layout.graph_args:
            graph_leaves, _ = program.split_state(layout, state)
            new = jax.tree_util.tree_unflatten(layout.graph_treedef, graph_leaves)
            objs = tuple(args[i] for i in layout.graph_args)
            program.adapter(layout).update(objs, new)

    def _warn_notes(self) -> None:
        """Warns, at the user's call, what tracing the step found (once each)."""
        for note in dict.fromkeys(self._notes):
            if note not in self._warned:
                self._warned.add(note)
                warnings.warn(note, UserWarning, stacklevel=4)  # _step, __call__
                incidents.LOGGER.warning(note)
        self._notes.clear()

    def lower(self, *args: Any) -> jax.stages.Lowered:
        """The guarded program for `args`, lowered (nothing runs or is donated).

        ``"callback" in step.lower(*args).as_text()`` is False for a step
        without callbacks of its own: the guard adds no host callback.
        """
        args = statics.held(args, self._static)
        entry = self._entry(args)
        state, inputs = program.flatten(entry.layout, args)
        return entry.compiled.lower(self._zeros, state, inputs)

    def _outputs(self, entry: _Entry, args: Sequence[Any], state: list, metrics):
        layout = entry.layout
        graph_leaves, per_arg = program.split_state(layout, state)
        if layout.graph_args:
            new = jax.tree_util.tree_unflatten(layout.graph_treedef, graph_leaves)
            objs = tuple(args[i] for i in layout.graph_args)
            program.adapter(layout).update(objs, new)
            return metrics
        outs = program.rebuild_state_args(layout, state)
        if not entry.out_len:  # `(state, batch) -> state`: the state alone
            return outs[0]
        if entry.out_len == len(outs) + 1:
            return (*outs, metrics)
        return (*outs, *metrics)

    def _snapshot(self, step: int, state: list) -> None:
        if self._rule.snapshots:
            self._snapshots.offer(step, state)

    # -- reading health one step late -----------------------------------

    def _read(self, previous: _Pending) -> tuple[np.ndarray, bool]:
        """Reads a step's health vector, records its figures; (health, bad).

        A healthy step also goes through `_healthy` (history, snapshots).
        """
        if incidents.LOGGER.isEnabledFor(logging.DEBUG):
            incidents.LOGGER.debug("reading health of step %d", previous.step)
        h = np.asarray(previous.health)
        bad = bool(h[program.BAD] > 0)
        figures = (h[program.LOSS], h[program.GRAD_NORM], h[program.RATIO])
        self.figures.append((previous.step, *map(float, figures), bad))
        if not bad and not h[program.HELD] > 0:  # a skipped batch verifies nothing
            self._healthy(previous.step, h)
        return h, bad

    def _settle(self, previous: _Pending, current: _Pending, state, metrics):
        h, bad = self._read(previous)
        if not bad:
            return state, metrics
        # `current` was held in the graph: `state` is `previous`'s input.
        self._streak += 1
        incident = self._incident(previous, state, h)
        state = self._apply(incident, previous, current, state)
        self._keep(state)
        held = self._plan.held if self._plan.holds(current.step) else self._zeros
        new_state, metrics, health = current.entry.compiled(held, state, current.inputs)
        self._keep(new_state)
        current.health = health
        return new_state, metrics

    def _keep(self, state: list) -> None:
        """`state` is now the one to go on from (`last_state`)."""
        if self._last is not None:
            self._last = (state, *self._last[1:])

    def _healthy(self, step: int, h: np.ndarray) -> None:
        self._streak = 0
        self._plan.verified = step
        self.history.add(
            step,
            float(h[program.LOSS]),
            float(h[program.GRAD_NORM]),
            float(h[program.RATIO]),
        )
        grown = self.history.check(step)
        if grown:
            figures = "; ".join(str(g) for g in grown)
            self.log.add(
                incidents.warning(
                    step,
                    incidents.Cause.GROWTH,
                    figures,
                    f"Training is diverging: {diagnoses.FIXES['growth']}.",
                    loss=float(h[program.LOSS]),
                    grad_norm=float(h[program.GRAD_NORM]),
                    evidence=tuple(g.evidence() for g in grown),
                )
            )
        if self.underflow is not None:
            self.underflow.observe(step, float(h[program.ZEROS]), self.log)
        # A snapshot of the state after step s is good once step s + 1, which
        # ran on it, was healthy (and nothing was growing).
        self._snapshots.confirm(step, growing=self.history.growing_at(step))

    def finish(self) -> None:
        """Reads the health of the last step (blocking) and handles it.

        Call it after the loop (`summary` calls it). A bad last step is
        diagnosed and recorded; with policy ``"raise"`` it raises.
        """
        previous, self._pending = self._pending, None
        if previous is None or self._last is None:
            return
        h, bad = self._read(previous)
        if not bad:
            return
        self._streak += 1
        state, args, entry = self._last
        incident = self._incident(previous, state, h, last=True)
        if self._rule.raises:
            self._raise(incident, previous.entry, args, state)
        done = self._resolve(incident, previous.step, state)
        if done.state is not state:
            self._keep(done.state)
            self._restore_objects()
            if not entry.layout.mutates:
                done = dataclasses.replace(
                    done,
                    incident=dataclasses.replace(
                        done.incident,
                        message=(
                            f"{done.incident.message} The state the last call "
                            "returned is the one before this step: go on "
                            "from step.last_state."
                        ),
                    ),
                )
        self.log.add(done.incident)

    def summary(self) -> dict[str, Any]:
        """Counts for loggers: steps, bad steps, skipped, rolled back, causes.

        Reads the last step's health first (`finish`).
        """
        self.finish()
        return {**self.log.summary(self.steps), **self._plan.summary()}

    # -- an incident ----------------------------------------------------

    def _incident(
        self, previous: _Pending, state: list, h: np.ndarray, last: bool = False
    ) -> incidents.Incident:
        step = previous.step
        loss = losses.figure(float(h[program.LOSS]), self._warned, self.name)
        gnorm = float(h[program.GRAD_NORM])
        state = replayed.as_it_ran(previous.entry.layout, state)  # its clock
        _, _, again = previous.entry.compiled(
            self._zeros, copy_leaves(state), previous.inputs
        )
        if not bool(np.asarray(again)[program.BAD] > 0):
            return diagnoses.nondeterministic(step, loss, gnorm)
        counts = examples.input_counts(previous.inputs, previous.entry.input_paths)
        repeat = self._repeat(previous, state, loss, gnorm, counts)
        if repeat is not None:
            return repeat
        return self._diagnosed(previous, state, loss, gnorm, counts)

    def _repeat(
        self,
        previous: _Pending,
        state: list,
        loss: float | None,
        gnorm: float,
        counts: dict,
    ):
        """The last diagnosis again, for a bad step within a window of it.

        Only when the step fails the same way: a nonfinite batch again after
        an `input_data` incident (then with this step's own leaves and rows,
        read on the host), or a finite batch again after any other (a
        poisoned state stays poisoned: it is not located on every step).
        Otherwise None: the step is diagnosed afresh.
        """
        step = previous.step
        last_bad = incidents.last_located(
            self.incidents, step, self.history.window, bad_batch=bool(counts)
        )
        if last_bad is None:
            return None
        diagnosis, examples = last_bad.diagnosis, ("", None, ())
        if counts and diagnosis is not None:
            diagnosis = dataclasses.replace(diagnosis, nonfinite_inputs=counts)
            examples = self._examples(previous, state, diagnosis)
        return incidents.repeat(
            last_bad, step, loss, gnorm, self._streak, examples, diagnosis
        )

    def _diagnosed(
        self,
        previous: _Pending,
        state: list,
        loss: float | None,
        gnorm: float,
        counts: dict,
    ):
        """The incident of a new bad step: replayed, its examples, its cause."""
        entry, step = previous.entry, previous.step
        diagnosis, failure, planted = diagnoses.diagnose_step(
            self.fn, entry.layout, state, previous.inputs, counts, self.name
        )
        line, leaf, rows = self._examples(previous, state, diagnosis)
        ctx = history_rules.Context(
            step,
            diagnosis,
            evidence.Trace.before(
                self.figures, step, (u for i in self.incidents for u in i.undone)
            ),
            tuple(self.history.recent(step)),
            diagnoses.probe_step(
                self.fn, entry.layout, state, self.schedule, step, self.history.window
            ),
            self.history.growth,
            failure,
            planted,
        )
        verdict = history_rules.decide(ctx)
        diagnosis, message, cause, cited = diagnoses.verdict_text(
            step, loss, line, ctx, verdict
        )
        bracket = gradients.safe_bracket(self.fn, entry.layout, state, previous.inputs)
        if bracket is not None:
            message += f"\n  {bracket}"
        return incidents.Incident(
            step=step,
            action=incidents.Action.SKIPPED,
            cause=cause,
            message=message,
            leaf=leaf,
            rows=tuple(rows),
            primitive=diagnosis.primitive if diagnosis else None,
            where=diagnosis.where if diagnosis else None,
            phase=diagnosis.phase if diagnosis else None,
            loss=loss,
            grad_norm=gnorm,
            diagnosis=diagnosis,
            evidence=cited,
            loss_term=gradients.term_name(diagnosis),
            gradients=bracket.to_dict() if bracket is not None else None,
        )

    def _examples(self, previous: _Pending, state: list, diagnosis):
        """``(line, leaf, rows)``: the bad examples of a step and their text.

        The line is empty when no example or leaf stands out; leaf and rows
        are dropped when every example is bad (not a property of some).
        """
        leaf, rows = self._rows(previous.entry, state, previous.inputs, diagnosis)
        size, axes = examples.batch_axes(previous.inputs)
        owners = multihost.owners_of(previous.inputs, axes, rows)
        line = ""
        if rows or leaf:
            step = previous.step
            text = examples.describe(rows, leaf, step, size, owners)
            line = f"  examples: {text}"
        if size and len(rows) == size:
            leaf, rows = None, ()
        return line, leaf, rows

    def _rows(self, entry, state, inputs, diagnosis):
        size, axes = examples.batch_axes(inputs)
        if size == 0:
            return None, ()
        if diagnosis is not None and diagnosis.phase == "input":
            leaf, rows = examples.nonfinite_rows(inputs, entry.input_paths, axes)
            if rows:
                return leaf, rows
        if entry.per_example is None:
            entry.per_example = jax.jit(program.per_example_body(entry.run, axes))
        bad = multihost.host_value(entry.per_example(state, inputs))
        rows = tuple(int(i) for i in np.flatnonzero(bad))
        return examples.standout_leaf(inputs, entry.input_paths, axes, rows), rows

    # -- policy ---------------------------------------------------------

    def _apply(self, incident, previous, current, state):
        args = self._last[1] if self._last is not None else None
        if self._rule.raises or self._streak > self.max_streak:
            self._raise(incident, current.entry, args, state)
        done = self._resolve(incident, previous.step, state)
        self.log.add(done.incident)
        return done.state

    def _resolve(self, incident, bad_step: int, state: list) -> policies.Resolution:
        """The policy's resolution; a rollback forgets the undone steps' figures."""
        done = self._rule.resolve(incident, bad_step, state, self._snapshots)
        if done.stop is not None:  # a spent budget: raise with the last good state
            self._keep(done.state)
            self._raise(done.incident, *self._last[2:0:-1], done.state, done.stop)
        self._plan.resolved(done.incident)
        restored = done.incident.restored_step
        if restored is not None:
            self.history.drop_after(restored)
            if self.underflow is not None:
                self.underflow.drop_after(restored)
        return done

    def _raise(self, incident, entry, args, state, head=""):
        incident = dataclasses.replace(incident, action=incidents.Action.RAISED)
        self._plan.resolved(incident)
        gave_up = self._streak > self.max_streak
        head = (
            f"jaxnan.guard: gave up after {self._streak} nonfinite steps in a row "
            f"(max_streak={self.max_streak}).\n"
            if gave_up
            else head
        )
        self.log.add(incident)
        outputs = None if args is None else self._outputs(entry, args, state, None)
        if args is not None and entry.layout.graph_args:  # NNX: the objects
            outputs = program.graph_objects(entry.layout, args)
        raise errors.NonFiniteError(
            head + incident.message,
            errors.Details(
                function=self.name,
                phase=incident.phase,
                leaves=diagnoses.nonfinite_leaves(incident.diagnosis),
                incident=incident,
                diagnosis=incident.diagnosis,
                state=outputs,
            ),
        )
