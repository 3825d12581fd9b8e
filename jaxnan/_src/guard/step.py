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
    examples,
    history,
    incidents,
    multihost,
    policies,
    program,
)
from jaxnan._src.guard.snapshots import Snapshots, copy_leaves
from jaxnan._src.locate import causes
from jaxnan._src.locate.api import Diagnosis, locate

source_info_util.register_exclusion(__file__)

_FIXES = {
    "growth": (
        "lower the learning rate, or guard the optimizer with "
        "jaxnan.skip_spikes / jaxnan.zscore_clip / jaxnan.clip_by_global_norm"
    ),
    "nondeterministic": (
        "the same step on the same state, batch and RNG was finite on replay: "
        "suspect hardware, an unseeded random op or a race (a host callback, "
        "asynchronous data loading writing into the batch)"
    ),
}


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
        incidents: every `jaxnan.Incident` so far (bad steps and warnings).
        figures: one ``(step, loss, grad_norm, update_ratio, bad)`` tuple
            per step whose health was read (for plots).
        steps: the number of calls so far.
    """

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
        donate: bool,
        verbose: bool,
    ):
        self.fn = program.unwrap_jit(fn)
        self.name = check.function_name(self.fn)
        self.policy = policy
        self._rule = policies.rule_of(policy)
        self.loss = loss
        self.max_streak = max_streak
        self.snapshot_every = snapshot_every
        self.donate = donate
        self.history = history.History(window, growth)
        self.log = incidents.IncidentLog(log, verbose)
        self.figures: list[tuple[int, float, float, float, bool]] = []
        self.steps = 0
        self._entries: dict[program.Layout, _Entry] = {}
        self._by_treedef: dict[Any, _Entry] = {}  # fast path, see `_flatten`
        self._notes: list[str] = []  # found while tracing, warned once
        self._warned: set[str] = set()
        self._pending: _Pending | None = None
        self._streak = 0
        self._last: tuple[list, list[Any]] | None = None  # (state leaves, args)
        self._snapshots = Snapshots(snapshot_every)
        self._zeros = jnp.zeros((program.HEALTH_SIZE,), jnp.float32)
        functools.update_wrapper(self, self.fn)

    @property
    def incidents(self) -> list[incidents.Incident]:
        return self.log.incidents

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
                outs.append(program.output_structure(out))

            jax.eval_shape(shapes, program.flatten(probe, args)[1])
            state_args = program.infer_state_args(args, outs[0])
            out_len = len(outs[0]) if state_args else 0
        layout = program.make_layout(args, state_args)
        names = validation.argument_names(self.fn, len(args))
        paths = []
        for i in layout.input_args:
            flat, _ = jax.tree_util.tree_flatten_with_path(args[i])
            for p, x in flat:
                where = f"{names[i]}{jax.tree_util.keystr(p)}"
                if not program.is_array(x):
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
            self.fn, layout, self.loss, self.name, self._notes
        )
        compiled = jax.jit(body, donate_argnums=(1,) if self.donate else ())
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
        entry, state, inputs = self._flatten(args)
        before = self._zeros if self._pending is None else self._pending.health
        new_state, metrics, health = entry.compiled(before, state, inputs)
        if self._notes:
            self._warn_notes()
        if incidents.LOGGER.isEnabledFor(logging.DEBUG):
            incidents.LOGGER.debug("dispatched step %d", self.steps)
        current = _Pending(self.steps, entry, inputs, health)
        self.steps += 1
        previous, self._pending = self._pending, current
        if previous is not None:
            new_state, metrics = self._settle(previous, current, new_state, metrics)
        self._last = (new_state, list(args))
        self._snapshot(current.step, new_state)
        return self._outputs(entry, args, new_state, metrics)

    def _warn_notes(self) -> None:
        """Warns, at the user's call, what tracing the step found (once each)."""
        for note in dict.fromkeys(self._notes):
            if note not in self._warned:
                self._warned.add(note)
                warnings.warn(note, UserWarning, stacklevel=3)
                incidents.LOGGER.warning(note)
        self._notes.clear()

    def lower(self, *args: Any) -> jax.stages.Lowered:
        """The guarded program for `args`, lowered (nothing runs or is donated).

        ``"callback" in step.lower(*args).as_text()`` is False for a step
        without callbacks of its own: the guard adds no host callback.
        """
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
        h = np.asarray(previous.health)
        bad = bool(h[program.BAD] > 0)
        figures = (h[program.LOSS], h[program.GRAD_NORM], h[program.RATIO])
        self.figures.append((previous.step, *map(float, figures), bad))
        if not bad:
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
        new_state, metrics, health = current.entry.compiled(
            self._zeros, state, current.inputs
        )
        current.health = health
        return new_state, metrics

    def _healthy(self, step: int, h: np.ndarray) -> None:
        self._streak = 0
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
                incidents.Incident(
                    step=step,
                    action=incidents.Action.WARNED,
                    cause=incidents.Cause.GROWTH.value,
                    message=(
                        f"jaxnan.guard: warning at step {step}, before any NaN: "
                        f"{figures}. Training is diverging: {_FIXES['growth']}."
                    ),
                    loss=float(h[program.LOSS]),
                    grad_norm=float(h[program.GRAD_NORM]),
                )
            )
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
        state, args = self._last
        incident = self._incident(previous, state, h, last=True)
        if self._rule.raises:
            self._raise(incident, previous.entry, args, state)
        self.log.add(incident)

    def summary(self) -> dict[str, Any]:
        """Counts for loggers: steps, bad steps, skipped, rolled back, causes.

        Reads the last step's health first (`finish`).
        """
        self.finish()
        return self.log.summary(self.steps)

    # -- an incident ----------------------------------------------------

    def _incident(
        self, previous: _Pending, state: list, h: np.ndarray, last: bool = False
    ) -> incidents.Incident:
        step = previous.step
        loss, gnorm = float(h[program.LOSS]), float(h[program.GRAD_NORM])
        _, _, again = previous.entry.compiled(
            self._zeros, copy_leaves(state), previous.inputs
        )
        if not bool(np.asarray(again)[program.BAD] > 0):
            return self._nondeterministic(step, loss, gnorm)
        counts = examples.input_counts(previous.inputs, previous.entry.input_paths)
        repeat = self._repeat(previous, state, loss, gnorm, counts)
        if repeat is not None:
            return repeat
        return self._diagnosed(previous, state, loss, gnorm, counts)

    def _nondeterministic(self, step: int, loss: float, gnorm: float):
        """The incident of a bad step whose replay was finite."""
        return incidents.Incident(
            step=step,
            action=incidents.Action.SKIPPED,
            cause=incidents.Cause.NONDETERMINISTIC.value,
            message=(
                f"jaxnan.guard: step {step} was nonfinite (loss {loss:.4g}) but "
                f"its replay was finite: nondeterministic. "
                f"{_FIXES['nondeterministic']}."
            ),
            loss=loss,
            grad_norm=gnorm,
            deterministic=False,
        )

    def _repeat(
        self, previous: _Pending, state: list, loss: float, gnorm: float, counts: dict
    ):
        """The last diagnosis again, for a bad step within a window of it.

        Only when the step fails the same way: a nonfinite batch again after
        an `input_data` incident (then with this step's own leaves and rows,
        read on the host), or a finite batch again after any other (a
        poisoned state stays poisoned: it is not located on every step).
        Otherwise None: the step is diagnosed afresh.
        """
        step = previous.step
        last_bad = self._last_bad(step, counts)
        if last_bad is None:
            return None
        diagnosis, leaf, rows, seen = last_bad.diagnosis, None, (), ""
        if counts and diagnosis is not None:
            diagnosis = dataclasses.replace(diagnosis, nonfinite_inputs=counts)
            line, leaf, rows = self._examples(previous, state, diagnosis)
            seen = f"\n{line}" if line else ""
        streak = f", {self._streak} in a row" if self._streak > 1 else ""
        origin = last_bad.step if last_bad.repeat_of is None else last_bad.repeat_of
        return dataclasses.replace(
            last_bad,
            step=step,
            repeat_of=origin,
            message=(
                f"jaxnan.guard: step {step} nonfinite again (loss {loss:.4g}"
                f"{streak}): as at step {origin}, {last_bad.cause} at "
                f"{last_bad.where or 'the same place'}.{seen}"
            ),
            rows=rows,
            leaf=leaf,
            loss=loss,
            grad_norm=gnorm,
            restored_step=None,
            diagnosis=diagnosis,
        )

    def _last_bad(self, step: int, counts: dict) -> incidents.Incident | None:
        """The last located incident, if `step` repeats it (see `_repeat`)."""
        last_bad = next(
            (
                i
                for i in reversed(self.incidents)
                if i.action is not incidents.Action.WARNED and i.deterministic
            ),
            None,
        )
        if last_bad is None or step - last_bad.step > self.history.window:
            return None
        if bool(counts) != (last_bad.cause == causes.Cause.INPUT_DATA.value):
            return None  # it fails another way
        return last_bad

    def _diagnosed(
        self, previous: _Pending, state: list, loss: float, gnorm: float, counts: dict
    ):
        """The incident of a new bad step: replayed, its examples, its cause."""
        entry, step = previous.entry, previous.step
        diagnosis, failure = self._diagnose(entry, state, previous.inputs, counts)
        line, leaf, rows = self._examples(previous, state, diagnosis)
        grown = self.history.recent(step)
        cause = diagnosis.cause if diagnosis is not None else None
        lines = [f"jaxnan.guard: step {step} went nonfinite (loss {loss:.4g})."]
        if line:
            lines.append(line)
        if grown and cause not in ("input_data", "poisoned_state"):
            cause = causes.Cause.LEARNING_RATE.value
            figures = "; ".join(str(g) for g in grown)
            lines.append(
                f"  cause:   learning rate too high / exploding gradients: {figures} "
                f"before the NaN. Fix: {_FIXES['growth']}."
            )
        if diagnosis is not None:
            lines.append(_indent(str(diagnosis)))
        elif failure:
            lines.append(f"  {failure}")
        return incidents.Incident(
            step=step,
            action=incidents.Action.SKIPPED,
            cause=cause or "unknown",
            message="\n".join(lines),
            leaf=leaf,
            rows=tuple(rows),
            primitive=diagnosis.primitive if diagnosis else None,
            where=diagnosis.where if diagnosis else None,
            phase=diagnosis.phase if diagnosis else None,
            loss=loss,
            grad_norm=gnorm,
            diagnosis=diagnosis,
        )

    def _diagnose(
        self, entry: _Entry, state: list, inputs: list, counts: dict
    ) -> tuple[Diagnosis | None, str]:
        """What `jaxnan.locate` says about the step (its input check on the host).

        A batch that already holds NaN/Inf (`counts`, from
        `examples.input_counts`) is the root cause whatever the step does
        with it; that is read on the host without compiling the instrumented
        replay.
        """
        if counts:
            found = causes.classify_inputs(counts)
            return (
                Diagnosis(
                    found=True,
                    phase=causes.Phase.INPUT,
                    cause=found.cause,
                    fix=found.fix,
                    inputs_seen=found.seen,
                    nonfinite_inputs=counts,
                    fn_name=self.name,
                ),
                "",
            )
        return self._locate(entry, state, inputs)

    def _locate(
        self, entry: _Entry, state: list, inputs: list
    ) -> tuple[Diagnosis | None, str]:
        """`jaxnan.locate` on the step, as a pure function of its arguments.

        Framework objects (NNX) are passed as their state and merged inside;
        non-array leaves (Equinox functions) are closed over.
        """
        layout, fn = entry.layout, self.fn
        args = program.rebuild(layout, state, inputs)
        graphdefs, located = {}, []
        for i, a in enumerate(args):
            if i in layout.graph_args:
                graphdefs[i], pure = program.adapter(layout).split(a)
                located.append(pure)
            else:
                leaves, treedef = jax.tree_util.tree_flatten(a)
                keep = [x if program.is_array(x) else None for x in leaves]
                located.append(jax.tree_util.tree_unflatten(treedef, keep))

        def replay(*pure):
            full = list(args)
            for i in layout.graph_args:
                full[i] = program.adapter(layout).merge(graphdefs[i], pure[i])
            for pos, i in enumerate(layout.tree_args):
                it = iter(jax.tree_util.tree_leaves(pure[i]))
                filled = [
                    next(it) if s is None else s.value for s in layout.statics[pos]
                ]
                full[i] = jax.tree_util.tree_unflatten(layout.treedefs[pos], filled)
            return fn(*full)

        functools.update_wrapper(replay, fn)
        try:
            # No `check_compiled`: the guard has just re-run its own compiled
            # step on these arguments (`_incident`), which went nonfinite
            # again; a plain compile of the step would only repeat that, at
            # the cost of one more whole-program compile per incident.
            return locate(replay, check_compiled=False)(*located), ""
        except Exception as e:  # noqa: BLE001 - the replay is ours, not the user's
            return None, f"jaxnan.locate could not replay the step: {e!r}"

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
        done = self._rule.resolve(incident, previous.step, state, self._snapshots)
        self.log.add(done.incident)
        return done.state

    def _raise(self, incident, entry, args, state):
        incident = dataclasses.replace(incident, action=incidents.Action.RAISED)
        gave_up = self._streak > self.max_streak
        head = (
            f"jaxnan.guard: gave up after {self._streak} nonfinite steps in a row "
            f"(max_streak={self.max_streak}).\n"
            if gave_up
            else ""
        )
        self.log.add(incident)
        outputs = None
        if args is not None:
            outputs = self._outputs(entry, args, state, None)
        raise errors.NonFiniteError(
            head + incident.message,
            errors.Details(
                function=self.name,
                phase=incident.phase,
                leaves=_nonfinite_leaves(incident.diagnosis),
                incident=incident,
                diagnosis=incident.diagnosis,
                state=outputs,
            ),
        )


def _nonfinite_leaves(diagnosis: Diagnosis | None) -> dict[str, tuple[int, int, int]]:
    """The nonfinite leaves of a bad step's phase (`errors.CommonDetails`).

    Its arguments for `Phase.INPUT`, else its outputs; empty when the replay
    failed.
    """
    if diagnosis is None:
        return {}
    if diagnosis.phase is causes.Phase.INPUT:
        found = diagnosis.nonfinite_inputs
    else:
        found = diagnosis.nonfinite_outputs
    return dict(found)  # already int counts (`replay.rows`)


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())
