"""Where the guard keeps the states it may roll back to: host memory.

A snapshot of the state after step ``s`` is a *candidate* until step
``s + 1``, which ran on it, is read healthy (and nothing was growing); it
then becomes a *good* snapshot a rollback may restore. A store holds at
most two candidates (with ``every=1`` the candidate of step ``s + 1`` is
taken before step ``s + 1`` is read) and the good snapshots a rollback
``back`` steps back may still need: the newest one at least ``back`` steps
before the newest step read, and every one after it (with ``back=0``, the
newest only).

Every snapshot is a host copy (`host_snapshots.to_host`: this process's
distinct shards, copied asynchronously): device memory with rollback is
device memory without (`benchmarks/rollback_memory.py`). A rollback puts
the chosen copy back with one `jax.device_put`, in the original sharding.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend import source_info_util

from jaxnan._src.guard import host_snapshots

source_info_util.register_exclusion(__file__)


@functools.partial(jax.jit)
def copy_leaves(leaves: list) -> list:
    """Fresh device buffers holding the same values (safe from donation)."""
    return [jnp.copy(x) for x in leaves]


class Snapshots:
    """The candidates and the good snapshots of a guarded run, on the host.

    Args:
        every: a candidate is taken after every `every`-th step.
        back: a rollback at step ``b`` restores the newest good snapshot of
            a step ``<= b - back`` (the oldest kept when none is that old);
            0: the newest good snapshot.
        max_restores: the most rollbacks the store serves (`spent` after
            that); None: no limit.

    Examples:
        >>> import jax.numpy as jnp
        >>> from jaxnan._src.guard.snapshots import Snapshots
        >>> store = Snapshots(every=2)
        >>> store.offer(2, [jnp.ones(2)])
        >>> store.good() is None
        True
        >>> store.confirm(3, growing=False)
        >>> store.good()
        2
        >>> step, leaves = store.restore(5)
        >>> step, leaves[0].tolist()
        (2, [1.0, 1.0])
    """

    def __init__(self, every: int, back: int = 0, max_restores: int | None = None):
        self.every = every
        self.back = back
        self.max_restores = max_restores
        self.restores = 0  # rollbacks served
        self._candidates: dict[int, list] = {}  # at most the two latest
        self._good: dict[int, list] = {}  # step -> host copy, oldest first
        self._rolled_back_at: int | None = None  # the bad step of the last rollback

    def offer(self, step: int, state: list) -> None:
        """Takes a candidate of `state`, the state after `step`, when due.

        The copy to host memory is started and not waited for.
        """
        if step % self.every == 0:
            self._candidates[step] = host_snapshots.to_host(state)
            for old in sorted(self._candidates)[:-2]:
                del self._candidates[old]

    def confirm(self, step: int, *, growing: bool) -> None:
        """Step `step` was healthy: the candidate before it becomes good.

        With ``every=1`` the candidate after step ``s + 1`` is taken before
        step ``s + 1`` is read, so up to two candidates wait at a time.
        Good snapshots no later rollback can choose are dropped.
        """
        leaves = self._candidates.pop(step - 1, None)
        if leaves is not None and not growing:
            self._good[step - 1] = leaves
        for old in [s for s in self._candidates if s < step - 1]:
            del self._candidates[old]
        # A later rollback is at step >= step + 1: it picks at least the
        # newest snapshot of a step <= step + 1 - back.
        enough = [s for s in self._good if s <= step + 1 - self.back]
        for old in [s for s in self._good if enough and s < max(enough)]:
            del self._good[old]

    def good(self) -> int | None:
        """The step of the newest good snapshot, or None (none yet)."""
        return max(self._good) if self._good else None

    def kept(self) -> dict[int, list]:
        """``{step: host copy}`` of every snapshot held (candidates and good)."""
        return {**self._candidates, **self._good}

    def choose(self, bad_step: int) -> int:
        """The step of the snapshot a rollback at `bad_step` restores.

        Raises:
            LookupError: when there is no good snapshot yet.
        """
        if not self._good:
            raise LookupError("no good snapshot yet")
        old_enough = [s for s in self._good if s <= bad_step - self.back]
        return max(old_enough) if old_enough else min(self._good)

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

    def spent(self) -> bool:
        """Whether `max_restores` rollbacks were served (the next one is refused)."""
        return self.max_restores is not None and self.restores >= self.max_restores

    def peek(self, bad_step: int) -> tuple[int, list[Any]]:
        """``(step, device leaves)`` of the snapshot `choose` picks; nothing dropped."""
        step = self.choose(bad_step)
        return step, host_snapshots.to_device(self._good[step])

    def restore(self, bad_step: int) -> tuple[int, list[Any]]:
        """``(step, device leaves)`` of the snapshot a rollback at `bad_step` restores.

        One `jax.device_put` into the original sharding. The candidates and
        the good snapshots after the restored one, of steps now undone, are
        dropped; the restored one stays (host memory) for a later rollback.

        Raises:
            LookupError: when there is no good snapshot yet.
        """
        step, leaves = self.peek(bad_step)
        self.restores += 1
        self._candidates.clear()  # states of the steps now undone
        for later in [s for s in self._good if s > step]:
            del self._good[later]
        return step, leaves
