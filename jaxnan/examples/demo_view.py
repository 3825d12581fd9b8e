"""What the demo shows: its progress bar, its incident table and its plot.

`rich` draws the bar and the table and `matplotlib` the plot, both from the
``demo`` extra (``pip install "jaxnan[demo]"``); without them the demo prints
plain lines and says how to get them. Neither is imported by ``import jaxnan``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxnan._src.core import errors
from jaxnan._src.guard import incidents as records

INSTALL = 'pip install "jaxnan[demo]"'  # or pip install -e ".[demo]" in a clone


class Progress:
    """A `rich` progress bar when rich is installed, a line per 10 steps if not."""

    def __init__(self, steps: int, fancy: bool):
        self.steps, self.bar, self.task = steps, None, None
        if not fancy:
            return
        try:
            import rich.progress as rp
        except ImportError:
            print(f"progress: one line per 10 steps (for a progress bar: {INSTALL})")
            return
        self.bar = rp.Progress(
            rp.TextColumn("training"),
            rp.BarColumn(),
            rp.MofNCompleteColumn(),
            rp.TextColumn("{task.fields[status]}"),
            rp.TimeElapsedColumn(),
            transient=False,
        )
        self.task = self.bar.add_task("train", total=steps, status="")

    def __enter__(self):
        if self.bar is not None:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def update(self, step: int, figures: Any, incidents: Sequence[Any]) -> None:
        """Shows step `step` done, with the last healthy loss and the counts."""
        bad = sum(1 for x in incidents if x.action != records.Action.WARNED)
        undone = sum(len(x.undone) for x in incidents)
        status = f"bad steps {bad}, undone {undone}"
        healthy = [f for f in figures if not f[4]]
        if healthy:
            status = f"loss {healthy[-1][1]:7.4f}  {status}"
        if self.bar is not None:
            self.bar.update(self.task, completed=step + 1, status=status)
        elif (step + 1) % 10 == 0 or step + 1 == self.steps:
            print(f"step {step + 1:3d}/{self.steps}  {status}", flush=True)


@dataclasses.dataclass(frozen=True)
class Undone:
    """What the rollbacks of a run undid: steps, dropped and skipped batches."""

    steps: tuple[int, ...]
    dropped: tuple[int, ...]  # good batches whose updates were undone
    skipped: tuple[int, ...]  # the bad batches themselves

    @classmethod
    def of(cls, incidents: Sequence[Any]) -> Undone:
        """What the rollbacks among `incidents` undid."""
        steps = sorted({s for i in incidents for s in i.undone})
        bad = {i.step for i in incidents if i.action != records.Action.WARNED}
        return cls(
            tuple(steps),
            tuple(s for s in steps if s not in bad),
            tuple(sorted(bad)),
        )

    def sentence(self, total: int) -> str:
        """The run's losses, said aloud: what was undone, dropped and skipped."""
        kept = total - len(set(self.steps) | set(self.skipped))
        if not self.steps:
            return (
                f"skipped: {len(self.skipped)} bad batches "
                f"({records.steps_text(self.skipped) or 'none'}); "
                f"{kept} of {total} batches trained on"
            )
        return (
            f"undone by rollbacks: {len(self.steps)} steps; "
            f"{len(self.dropped)} good batches dropped "
            f"({records.steps_text(self.dropped) or 'none'}) and "
            f"{len(self.skipped)} bad ones skipped "
            f"({records.steps_text(self.skipped)}); {kept} of {total} batches "
            "trained on"
        )


HEADER = ("step", "action", "cause", "where", "examples")


def rows(incidents: Sequence[Any]) -> list[tuple[str, ...]]:
    """One row of text per incident, in the order of `HEADER`."""
    out = []
    for i in incidents:
        if i.rows:
            noun = "row" if len(i.rows) == 1 else "rows"
            what = f"{i.leaf or 'batch'} {noun} {', '.join(str(r) for r in i.rows)}"
        elif i.action == records.Action.WARNED:
            what = "-"
        else:
            what = "every example"
        if i.where:
            where = errors.shown_location(i.where)
        elif i.cause == "input_data":
            where = "the batch"
        else:
            where = "-"
        out.append(
            (
                str(i.step),
                i.action.value.replace("_", " "),
                i.cause,
                where,
                what,
            )
        )
    return out


def plain_table(summary: dict, incidents: Sequence[Any]) -> str:
    """The summary and the incidents as aligned plain text."""
    table = [HEADER, *rows(incidents)]
    widths = [max(len(r[c]) for r in table) for c in range(len(HEADER))]
    right = {0}  # the step column, numbers

    def line(r: Sequence[str]) -> str:
        cells = [
            cell.rjust(w) if c in right else cell.ljust(w)
            for c, (cell, w) in enumerate(zip(r, widths))
        ]
        return "  " + "  ".join(cells).rstrip()

    lines = [
        "",
        "summary",
        f"  steps       {summary['steps']}",
        f"  bad steps   {summary['bad_steps']} ({_actions(summary)})",
        f"  warnings    {summary['warnings']} (before any NaN)",
        f"  causes      {_causes(summary)}",
        "",
        line(HEADER),
        line(["-" * w for w in widths]),
        *(line(r) for r in table[1:]),
    ]
    return "\n".join(lines)


def _actions(summary: dict) -> str:
    """What was done with the bad steps: ``4 rolled back``, ``1 skipped in place``."""
    done = (
        ("rolled_back", "rolled back"),
        ("skipped", "skipped in place"),
        ("raised", "raised"),
    )
    text = ", ".join(f"{summary[k]} {v}" for k, v in done if summary.get(k))
    return text or "none"


def _causes(summary: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in summary["causes"].items()) or "none"


def rich_table(summary: dict, incidents: Sequence[Any]) -> bool:
    """The incidents as a `rich` table; False when rich is not installed.

    The ``where`` column never wraps or cuts: a ``file:line`` is only worth
    something whole. The other text columns fold when the terminal is narrow.
    """
    try:
        from rich import box
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        return False
    body = rows(incidents)
    table = Table(
        title="jaxnan.guard incidents",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        padding=(0, 1, 0, 0),
    )
    for c, name in enumerate(HEADER):
        width = max([len(name)] + [len(r[c]) for r in body])
        if name in ("step", "where"):
            table.add_column(
                name,
                no_wrap=True,
                min_width=width,
                justify="right" if c == 0 else "left",
            )
        else:
            table.add_column(name, overflow="fold")
    for r in body:
        table.add_row(*r)
    console = Console()
    console.print(table)
    console.print(
        f"steps {summary['steps']}, bad {summary['bad_steps']} "
        f"({_actions(summary)}), warnings {summary['warnings']}, causes: "
        f"{_causes(summary)}"
    )
    return True


def _mark_steps(ax, bad_steps, warned_steps, spans) -> None:
    """Grey spans over the undone steps, red lines at bad ones, orange warnings."""
    for first, last in spans:
        ax.axvspan(first - 0.5, last + 0.5, color="0.85", lw=0, zorder=0)
    for s in bad_steps:
        ax.axvline(s, color="tab:red", alpha=0.6, lw=1)
    for s in warned_steps:
        ax.axvline(s, color="tab:orange", ls="--", lw=1)


def _spans(steps: Sequence[int]) -> list[tuple[int, int]]:
    runs: list[list[int]] = []
    for s in sorted(steps):
        if runs and s == runs[-1][1] + 1:
            runs[-1][1] = s
        else:
            runs.append([s, s])
    return [(a, b) for a, b in runs]


def plot(figures, incidents, path: str) -> str | None:
    """Loss, gradient norm and update ratio per step; None without matplotlib.

    The kept trajectory is the solid line; steps a rollback undid are drawn
    apart (grey, hollow, on a grey band), and bad steps are red lines.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    steps = np.array([f[0] for f in figures])
    values = {
        "loss": np.array([f[1] for f in figures]),
        "grad norm": np.array([f[2] for f in figures]),
        "update / param": np.array([f[3] for f in figures]),
    }
    bad = np.array([f[4] for f in figures])
    undone = Undone.of(incidents)
    gone = np.isin(steps, undone.steps) & ~bad
    warned = [i.step for i in incidents if i.action == records.Action.WARNED]
    fig, axes = plt.subplots(3, 1, figsize=(8, 7), sharex=True)
    for ax, (name, v) in zip(axes, values.items()):
        kept = ~bad & ~gone & np.isfinite(v)
        ax.semilogy(steps[kept], np.abs(v[kept]), ".-", lw=1, label="kept")
        shown = gone & np.isfinite(v)
        ax.semilogy(
            steps[shown],
            np.abs(v[shown]),
            "o",
            mfc="none",
            color="0.5",
            ms=4,
            label="undone by a rollback",
        )
        _mark_steps(ax, steps[bad], warned, _spans(undone.steps))
        ax.set_ylabel(name)
    axes[0].legend(loc="upper right", fontsize="small")
    axes[0].set_title(
        "jaxnan.guard: red = bad step (skipped), grey = undone (batch dropped), "
        "orange = early warning",
        fontsize="small",
    )
    axes[-1].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
