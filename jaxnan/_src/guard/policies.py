"""What the guard does with a bad step: one registered rule per `Policy`.

A policy rule says whether it keeps snapshots and whether it raises, and
resolves an incident into the state the run goes on from. A new policy is
a member of `jaxnan.Policy` and one class here, decorated with
`register_policy`; `jaxnan.guard` reads nothing else.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar, Protocol

from jax.extend import source_info_util

from jaxnan._src.guard import incidents
from jaxnan._src.guard.snapshots import Snapshots

source_info_util.register_exclusion(__file__)


@dataclasses.dataclass(frozen=True)
class Resolution:
    """The outcome of a bad step under a policy.

    Attributes:
        incident: the incident, its action and action line filled in.
        state: the state leaves the run goes on from.
        stop: when set, the guard raises `jaxnan.NonFiniteError` headed by
            this line, carrying `state` (a spent rollback budget).
    """

    incident: incidents.Incident
    state: list[Any]
    stop: str | None = None


class PolicyRule(Protocol):
    """One policy of `jaxnan.guard`.

    Attributes:
        snapshots: the guard keeps rollback snapshots for it.
        raises: a bad step raises `jaxnan.NonFiniteError` (the guard builds
            the error; `resolve` is not called).
    """

    snapshots: ClassVar[bool]
    raises: ClassVar[bool]

    def resolve(
        self,
        incident: incidents.Incident,
        bad_step: int,
        state: list[Any],
        store: Snapshots,
    ) -> Resolution:
        """The state to go on from after bad step `bad_step`.

        Args:
            incident: the bad step's incident (action still unset).
            bad_step: the number of the bad step.
            state: the state leaves before the bad step.
            store: the run's snapshots (empty unless `snapshots`).
        """
        ...


POLICY_RULES: dict[incidents.Policy, PolicyRule] = {}
"""The rule of each `jaxnan.Policy`, filled by `register_policy`."""


def register_policy(
    policy: incidents.Policy,
) -> Callable[[type], type]:
    """Registers a class as the rule of `policy` (one instance is kept).

    Examples:
        >>> from jaxnan._src.guard import incidents, policies
        >>> policies.POLICY_RULES[incidents.Policy.ROLLBACK].snapshots
        True
    """

    def register(cls: type) -> type:
        if policy in POLICY_RULES:
            raise ValueError(f"policy {policy.value!r} already has a rule")
        POLICY_RULES[policy] = cls()
        return cls

    return register


def rule_of(policy: incidents.Policy) -> PolicyRule:
    """The registered rule of `policy`."""
    return POLICY_RULES[policy]


def with_action(
    incident: incidents.Incident, action: incidents.Action, line: str, **changes: Any
) -> incidents.Incident:
    """`incident` with its action and its ``action:`` line."""
    return dataclasses.replace(
        incident,
        action=action,
        message=f"{incident.message}\n  action:  {line}",
        **changes,
    )


@register_policy(incidents.Policy.SKIP)
class Skip:
    """Leave the state as it was before the bad step; go on."""

    snapshots = False
    raises = False

    def resolve(self, incident, bad_step, state, store):  # noqa: D102
        del bad_step, store
        line = "skipped; state unchanged."
        return Resolution(with_action(incident, incidents.Action.SKIPPED, line), state)


@register_policy(incidents.Policy.RAISE)
class Raise:
    """Raise `jaxnan.NonFiniteError` with the state before the bad step."""

    snapshots = False
    raises = True

    def resolve(self, incident, bad_step, state, store):  # noqa: D102
        raise AssertionError("the guard raises itself for a raising policy")


@register_policy(incidents.Policy.ROLLBACK)
class Rollback:
    """Restore a good snapshot (the store picks which); skip when there is none.

    When the store's rollback budget is spent (``max_rollbacks``), stop:
    the guard raises, carrying the snapshot this rollback would restore.
    """

    snapshots = True
    raises = False

    def resolve(self, incident, bad_step, state, store):  # noqa: D102
        if store.good() is None:
            line = "skipped (no good snapshot yet to roll back to)."
            return Resolution(
                with_action(incident, incidents.Action.SKIPPED, line), state
            )
        if store.spent():
            restored, leaves = store.peek(bad_step)
            head = (
                f"jaxnan.guard: gave up after {store.restores} rollbacks "
                f"(max_rollbacks={store.max_restores}); details['state'] is the "
                f"last good state, after step {restored}. Resume from it with "
                "the bad-batch record, or raise max_rollbacks.\n"
            )
            line = f"raised (rollback budget spent); last good state: step {restored}."
            done = with_action(
                incident, incidents.Action.RAISED, line, restored_step=restored
            )
            return Resolution(done, leaves, stop=head)
        restored, leaves = store.restore(bad_step)
        undone = store.undone(restored, bad_step)
        short = (
            f" (the oldest snapshot kept: none {store.back} steps back yet)"
            if restored > bad_step - store.back
            else ""
        )
        line = (
            f"rolled back to the state after step {restored}{short}; "
            f"{incidents.undone_text(undone)}"
        )
        incident = with_action(
            incident,
            incidents.Action.ROLLED_BACK,
            line,
            restored_step=restored,
            undone=undone,
        )
        return Resolution(incident, leaves)
