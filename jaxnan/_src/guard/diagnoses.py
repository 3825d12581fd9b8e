"""How the guard words and locates a bad step: its fixes, `jaxnan.locate` replay.

The host half (`step`) decides when a step is diagnosed; this module holds
what does not depend on the run: the fix texts, the incident of a step whose
replay was finite, and `jaxnan.locate` run on a step's exact arguments.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
from jax.extend import source_info_util

from jaxnan._src.core import validation
from jaxnan._src.guard import evidence, history_rules, incidents, program, replayed
from jaxnan._src.locate import causes
from jaxnan._src.locate.api import Diagnosis, locate
from jaxnan._src.transforms import inject

source_info_util.register_exclusion(__file__)

FIXES = {
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


def nondeterministic(step: int, loss: float | None, gnorm: float) -> incidents.Incident:
    """The incident of a bad step whose replay was finite."""
    return incidents.Incident(
        step=step,
        action=incidents.Action.SKIPPED,
        cause=incidents.Cause.NONDETERMINISTIC.value,
        message=(
            f"jaxnan.guard: step {step} was nonfinite ({incidents.loss_text(loss)}) "
            f"but its replay was finite: nondeterministic. "
            f"{FIXES['nondeterministic']}."
        ),
        loss=loss,
        grad_norm=gnorm,
        deterministic=False,
        evidence=(
            evidence.Evidence(
                "nondeterministic",
                evidence.Figure.REPLAY,
                f"the replay of step {step} on the same state, batch and RNG "
                "was finite",
            ),
        ),
    )


def diagnose_step(
    fn: Callable, layout: program.Layout, state: list, inputs: list, counts: dict, name
) -> tuple[Diagnosis | None, str, tuple[inject.Planted, ...]]:
    """What `jaxnan.locate` says about a bad step (its input check on the host).

    A batch that already holds NaN/Inf (`counts`, from
    `examples.input_counts`) is the root cause whatever the step does with
    it; that is read on the host without compiling the instrumented replay.
    Returns ``(diagnosis, why the replay failed, the injectors that fired
    on the step)``: the replay's trace notes the step's injectors
    (`inject.noted`), read against its clock (`state` is the step's input,
    `replayed.as_it_ran`).
    """
    if counts:
        found = causes.classify_inputs(counts)
        diagnosis = Diagnosis(
            found=True,
            phase=causes.Phase.INPUT,
            cause=found.cause,
            fix=found.fix,
            inputs_seen=found.seen,
            nonfinite_inputs=counts,
            fn_name=name,
        )
        return diagnosis, "", ()
    with inject.noted() as planted:
        diagnosis, failure = locate_step(fn, layout, state, inputs)
    return diagnosis, failure, replayed.fired(planted, layout, state)


def locate_step(
    fn: Callable, layout: program.Layout, state: list, inputs: list
) -> tuple[Diagnosis | None, str]:
    """`jaxnan.locate` on the step, as a pure function of its arguments.

    Framework objects (NNX) are passed as their state and merged inside;
    non-array leaves (Equinox functions) are closed over. Returns
    ``(diagnosis, "")``, or ``(None, why)`` when the replay failed.
    """
    args = program.rebuild(layout, state, inputs)
    graphdefs, located = {}, []
    for i, a in enumerate(args):
        if i in layout.graph_args:
            graphdefs[i], pure = program.adapter(layout).split(a)
            located.append(pure)
        else:
            leaves, treedef, arrays = program.flatten_tree(a)
            keep = [x if k else None for x, k in zip(leaves, arrays)]
            located.append(jax.tree_util.tree_unflatten(treedef, keep))

    names = validation.argument_names(fn, len(args))

    def replay(*pure):
        full = list(args)
        for i in layout.graph_args:
            full[i] = program.adapter(layout).merge(graphdefs[i], pure[i])
        for pos, i in enumerate(layout.tree_args):
            it = iter(jax.tree_util.tree_leaves(pure[i]))
            filled = [next(it) if s is None else s.value for s in layout.statics[pos]]
            full[i] = jax.tree_util.tree_unflatten(layout.treedefs[pos], filled)
        # Only the arrays of the outputs: an Equinox model returned as new
        # state holds its functions (`jax.nn.relu`) as leaves.
        out = fn(*full)
        if out is None and layout.graph_args:  # NNX: what it wrote is its output
            out = {
                names[i]: program.adapter(layout).split(full[i])[1]
                for i in layout.graph_args
            }
        leaves, treedef = jax.tree_util.tree_flatten(out)
        return jax.tree_util.tree_unflatten(
            treedef, [x if program.is_array(x) else None for x in leaves]
        )

    functools.update_wrapper(replay, fn)
    try:
        # No `check_compiled`: the guard has just re-run its own compiled
        # step on these arguments, which went nonfinite again; a plain
        # compile of the step would only repeat that, at the cost of one
        # more whole-program compile per incident.
        return locate(replay, check_compiled=False)(*located), ""
    except Exception as e:  # noqa: BLE001 - the replay is ours, not the user's
        return None, f"jaxnan.locate could not replay the step: {e!r}"


def nonfinite_leaves(diagnosis: Diagnosis | None) -> dict[str, tuple[int, int, int]]:
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


def probe_step(
    fn: Callable,
    layout: program.Layout,
    state: list,
    schedule: Callable | None,
    step: int,
    window: int,
) -> evidence.Probe:
    """`evidence.probe` of the state a bad step ran on, leaves named by argument.

    Pytree state arguments by their parameter names (``params['w']``,
    ``opt_state[0].mu['w']``); Flax NNX objects by theirs, through their
    framework state.
    """
    names = validation.argument_names(fn, layout.nargs)
    graph, _ = program.split_state(layout, state)
    trees, labels = [], []
    if layout.graph_args:
        pure = jax.tree_util.tree_unflatten(layout.graph_treedef, graph)
        for k, i in enumerate(layout.graph_args):  # one state per object
            trees.append(pure[k])
            labels.append(names[i])
    trees += program.rebuild_state_args(layout, state)
    labels += [names[i] for i in layout.state_args]
    try:
        return evidence.probe(
            evidence.named_leaves(trees, labels),
            schedule=schedule,
            step=step,
            window=window,
        )
    except Exception:  # noqa: BLE001 - a user schedule that fails, say
        # The probe only adds evidence: without it the cause rests on the
        # replay and the run's figures.
        return evidence.Probe()


def verdict_text(
    step: int,
    loss: float | None,
    examples_line: str,
    ctx: history_rules.Context,
    verdict: history_rules.Verdict | None,
) -> tuple[Diagnosis | None, str, str, tuple[evidence.Evidence, ...]]:
    """``(diagnosis, message, cause, evidence)`` of a bad step's incident.

    The diagnosis carries the verdict's cause and fix (one cause per
    incident, the final one); the message has one ``why:`` line per piece
    of evidence under its ``cause:`` line.
    """
    diagnosis = ctx.located
    if verdict is None:
        cited = (evidence.Evidence("located", evidence.Figure.REPLAY, ctx.failure),)
        cause = "unknown"
    else:
        cited, cause = verdict.evidence, verdict.cause.value
    lines = [f"jaxnan.guard: step {step} went nonfinite ({incidents.loss_text(loss)})."]
    if examples_line:
        lines.append(examples_line)
    why = [e.text for e in cited if e.text]
    if diagnosis is not None and verdict is not None and diagnosis.cause is None:
        # The replay stayed finite or found nothing to blame: the verdict
        # rests on the history alone.
        lines.append(indent(str(diagnosis)))
        lines.append(indent(with_evidence(f"  cause:   {cause}", why)))
        lines.append(f"    fix:     {verdict.fix}")
    elif diagnosis is not None and verdict is not None:
        if verdict.cause != diagnosis.cause or verdict.fix != diagnosis.fix:
            diagnosis = dataclasses.replace(
                diagnosis, cause=verdict.cause, fix=verdict.fix
            )
        lines.append(indent(with_evidence(str(diagnosis), why)))
    elif verdict is not None:
        lines.append(indent(with_evidence(f"cause:   {cause}", why)))
        lines.append(f"  fix:     {verdict.fix}")
        if ctx.failure:
            lines.append(f"  {ctx.failure}")
    elif ctx.failure:
        lines.append(f"  {ctx.failure}")
    return diagnosis, "\n".join(lines), cause, cited


def with_evidence(text: str, why: list[str]) -> str:
    """A diagnosis's text with one ``why:`` line per evidence under ``cause:``."""
    if not why:
        return text
    lines = text.splitlines()
    at = next(
        (i + 1 for i, line in enumerate(lines) if line.lstrip().startswith("cause:")),
        len(lines),
    )
    pad = (
        lines[at - 1][: len(lines[at - 1]) - len(lines[at - 1].lstrip())] if at else ""
    )
    added = [f"{pad}why:     {w}" for w in why]
    return "\n".join([*lines[:at], *added, *lines[at:]])


def indent(text: str) -> str:
    """`text` indented by two spaces (a diagnosis inside an incident)."""
    return "\n".join("  " + line for line in text.splitlines())
