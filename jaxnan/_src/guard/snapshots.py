"""Where the guard keeps the states it may roll back to.

A snapshot of the state after step ``s`` is a *candidate* until step
``s + 1``, which ran on it, is read healthy (and nothing was growing); it
then becomes the *good* snapshot a rollback restores. A store holds at most
two candidates (with ``every=1`` the candidate of step ``s + 1`` is taken
before step ``s + 1`` is read) and one good snapshot.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend import source_info_util

source_info_util.register_exclusion(__file__)


@functools.partial(jax.jit)
def copy_leaves(leaves: list) -> list:
    """Fresh device buffers holding the same values (safe from donation)."""
    return [jnp.copy(x) for x in leaves]


class Snapshots:
    """The candidate and the good snapshot of a guarded run.

    Args:
        every: a candidate is taken after every `every`-th step.

    Examples:
        >>> import jax.numpy as jnp
        >>> from jaxnan._src.guard.snapshots import Snapshots
        >>> store = Snapshots(every=2)
        >>> store.offer(2, [jnp.ones(2)])
        >>> store.good() is None
        True
        >>> store.confirm(3, growing=False)
        >>> step, leaves = store.good()
        >>> step, leaves[0].tolist()
        (2, [1.0, 1.0])
    """

    def __init__(self, every: int):
        self.every = every
        self._candidates: dict[int, list] = {}  # at most the two latest
        self._good: tuple[int, list] | None = None
        self._rolled_back_at: int | None = None  # the bad step of the last rollback

    def offer(self, step: int, state: list) -> None:
        """Takes a candidate of `state`, the state after `step`, when due."""
        if step % self.every == 0:
            self._candidates[step] = copy_leaves(state)
            for old in sorted(self._candidates)[:-2]:
                del self._candidates[old]

    def confirm(self, step: int, *, growing: bool) -> None:
        """Step `step` was healthy: the candidate before it becomes good.

        With ``every=1`` the candidate after step ``s + 1`` is taken before
        step ``s + 1`` is read, so up to two candidates wait at a time.
        """
        leaves = self._candidates.pop(step - 1, None)
        if leaves is not None and not growing:
            self._good = (step - 1, leaves)
        for old in [s for s in self._candidates if s < step - 1]:
            del self._candidates[old]

    def good(self) -> tuple[int, list] | None:
        """``(step, leaves)`` of the good snapshot, or None (none yet)."""
        return self._good

    def undone(self, restored: int, bad_step: int) -> tuple[int, ...]:
        """The steps a rollback at `bad_step` to the state after `restored` undoes.

        Steps up to an earlier rollback were undone by it already: the run
        went on from its restored state.

        Examples:
            >>> from jaxnan._src.guard.snapshots import Snapshots
            >>> store = Snapshots(every=5)
            >>> store.undone(35, 41), store.undone(35, 43)
            ((36, 37, 38, 39, 40, 41), (42, 43))
        """
        since = max(
            restored, -1 if self._rolled_back_at is None else self._rolled_back_at
        )
        self._rolled_back_at = bad_step
        return tuple(range(since + 1, bad_step + 1))

    def restore(self) -> tuple[int, list[Any]]:
        """``(step, fresh copy of its leaves)`` of the good snapshot.

        The candidates, taken after steps that are now undone, are dropped.

        Raises:
            LookupError: when there is no good snapshot yet.
        """
        if self._good is None:
            raise LookupError("no good snapshot yet")
        self._candidates.clear()  # states of the steps now undone
        step, leaves = self._good
        return step, copy_leaves(leaves)
