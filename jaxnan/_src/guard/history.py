"""Early warning of `jaxnan.guard`: figures that grow by orders of magnitude.

The compiled step computes, every step, the loss, the global gradient norm
(from `skip_nonfinite`'s finiteness pass) and the update-to-state norm ratio
(on a fixed sample of each leaf). The host reads them one step late with the
health flag and keeps the last `window` healthy steps here. When one of them
grows by `growth` times or more across the window, rising on most steps, the
guard warns once, before any NaN; when a NaN follows such growth, the
incident is put down to the learning rate / exploding gradients, with the
figures.
"""

from __future__ import annotations

import collections
import dataclasses
import math

from jax.extend import source_info_util

from jaxnan._src.guard import evidence

source_info_util.register_exclusion(__file__)

FIGURES = ("loss", "grad_norm", "update_ratio")


@dataclasses.dataclass(frozen=True)
class Growth:
    """A figure that grew: its last value against its median over the window."""

    figure: str
    median: float
    last: float
    steps: int

    @property
    def factor(self) -> float:
        return self.last / self.median

    def __str__(self) -> str:
        return (
            f"{self.figure} {self.last:.3g}, x{self.factor:.3g} its median "
            f"{self.median:.3g} over the {self.steps} steps before"
        )

    def evidence(self) -> evidence.Evidence:
        """This growth as the evidence of an early warning."""
        figure = evidence.HISTORY_FIGURES[self.figure]
        return evidence.Evidence(
            "growth", figure, str(self), self.median, self.last, self.steps
        )


class History:
    """The last `window` healthy steps' figures, and the growth test on them."""

    def __init__(self, window: int, growth: float):
        self.window = window
        self.growth = growth
        # One column per figure of `FIGURES`, the last `window` healthy steps.
        self.columns = [collections.deque(maxlen=window) for _ in FIGURES]
        self.steps: collections.deque[int] = collections.deque(maxlen=window)
        self.warned_at: int | None = None  # step of the active warning
        self.warned: list[Growth] = []  # what it said

    def add(self, step: int, loss: float, grad_norm: float, ratio: float) -> None:
        """Appends a healthy step's figures."""
        self.steps.append(step)
        for column, value in zip(self.columns, (abs(loss), grad_norm, ratio)):
            column.append(value)

    def drop_after(self, step: int) -> None:
        """Forgets the figures of the steps after `step` (a rollback undid them).

        An active warning raised on an undone step is withdrawn too.
        """
        while self.steps and self.steps[-1] > step:
            self.steps.pop()
            for column in self.columns:
                column.pop()
        if self.warned_at is not None and self.warned_at > step:
            self.warned_at = None
            self.warned = []

    def reset(self) -> None:
        """Forgets the figures (after a rollback: they describe undone steps)."""
        self.steps.clear()
        for column in self.columns:
            column.clear()
        self.warned_at = None
        self.warned = []

    def growing(self) -> list[Growth]:
        """Figures whose last value is `growth` times their window median or more.

        That catches a steady climb over the window (loss x10 per step) and a
        sudden jump (an update ratio x1000 from a learning-rate surge).
        """
        if len(self.columns[0]) < 3:
            return []
        found = []
        for name, column in zip(FIGURES, self.columns):
            last = column[-1]
            # The median of the earlier values is at least their minimum:
            # a last value under `growth` times the minimum cannot pass (the
            # usual healthy step, decided without sorting).
            if not last >= self.growth * min(column):
                continue
            values = list(column)
            if not all(map(math.isfinite, values)):
                continue
            earlier = sorted(values[:-1])
            base = earlier[len(earlier) // 2]
            last = values[-1]
            if base <= 0 or last < self.growth * base:
                continue
            found.append(Growth(name, base, last, len(values) - 1))
        return found

    def check(self, step: int) -> list[Growth]:
        """Growth to warn about now (once per episode; [] otherwise)."""
        found = self.growing()
        if not found:
            if self.warned_at is not None and step - self.warned_at > self.window:
                self.warned_at = None
            return []
        if self.warned_at is not None:
            return []
        self.warned_at, self.warned = step, found
        return found

    def recent(self, step: int) -> list[Growth]:
        """The growth behind a NaN at `step`: still growing, or warned lately."""
        found = self.growing()
        if found:
            return found
        if self.warned_at is not None and step - self.warned_at <= self.window:
            return self.warned
        return []

    def growing_at(self, step: int) -> bool:
        """Whether a warning is active (a snapshot now is not a good one)."""
        return self.warned_at is not None and step - self.warned_at <= self.window
