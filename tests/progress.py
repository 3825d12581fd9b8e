"""One line per test file as it finishes, instead of a screen of dots.

The suite is compile-bound and runs for minutes; with ``-q`` pytest (and
pytest-xdist, whose workers report to one process) prints a dot per test,
which says nothing about where the run is. This plugin prints, in the
process that writes the terminal, one line per test file when its last test
has reported, in place of the file's letters::

    [ 212/761]  tests/test_guard.py  12 passed  (41 s)

Doctests are grouped by folder (``jaxnan/_src/guard/ (doctests)``). The
line counts failures, errors, skips and xfails; pytest's own report of each
failure and its summary are unchanged. It is off with ``-v`` (pytest then names every
test) and in xdist workers and the default-compiler child (they write no
terminal); ``-p no:jaxnan-progress`` turns it off.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict

import pytest

NAME = "jaxnan-progress"


def pytest_configure(config: pytest.Config) -> None:
    """Registers the plugin in the process that writes the terminal."""
    if hasattr(config, "workerinput") or config.option.verbose > 0:
        return  # an xdist worker, or -v: pytest names each test itself
    if config.option.collectonly:
        return
    config.pluginmanager.register(ModuleProgress(config), NAME)


def group(nodeid: str) -> str:
    """The line a test reports under: its file, or a doctest's folder.

    Examples:
        >>> group("tests/test_guard.py::test_rollback[3]")
        'tests/test_guard.py'
        >>> group("jaxnan/_src/guard/step.py::jaxnan._src.guard.step.GuardedStep")
        'jaxnan/_src/guard/ (doctests)'
    """
    path = nodeid.split("::", 1)[0]
    if path.startswith("tests/") or "/" not in path:
        return path
    return path.rsplit("/", 1)[0] + "/ (doctests)"


class ModuleProgress:
    """Counts each file's tests as they report; prints its line when done."""

    def __init__(self, config: pytest.Config):
        self.config = config  # its terminal reporter may not be made yet
        self.start = time.monotonic()
        self.totals: Counter[str] = Counter()
        self.done: Counter[str] = Counter()
        self.outcomes: defaultdict[str, Counter[str]] = defaultdict(Counter)
        self.pending: dict[str, str] = {}  # nodeid -> its outcome so far
        self.finished = 0

    def _expect(self, nodeids) -> None:
        if not self.totals:  # every xdist worker collects the same items
            self.totals.update(group(n) for n in nodeids)

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        self._expect(item.nodeid for item in session.items)

    @pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist, when loaded
    def pytest_xdist_node_collection_finished(self, node, ids) -> None:
        self._expect(ids)

    @pytest.hookimpl(wrapper=True)
    def pytest_report_teststatus(self, report, config):
        status = yield
        if status is None or not status[1]:
            return status
        category, _, word = status
        return category, "", word  # no letter: the file's line counts it

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        outcome = _outcome(report)
        if outcome is not None and (
            report.nodeid not in self.pending or outcome == "error"
        ):
            self.pending[report.nodeid] = outcome
        if report.when != "teardown":
            return
        key = group(report.nodeid)
        self.outcomes[key][self.pending.pop(report.nodeid, "passed")] += 1
        self.done[key] += 1
        self.finished += 1
        if self.done[key] == self.totals.get(key, -1):
            self._line(key)

    def _line(self, key: str) -> None:
        counts = self.outcomes[key]
        order = ("failed", "error", "passed", "skipped", "xfailed", "xpassed")
        text = ", ".join(f"{counts[o]} {o}" for o in order if counts[o])
        total = sum(self.totals.values())
        width = len(str(total))
        elapsed = time.monotonic() - self.start
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is None:  # -p no:terminal
            return
        reporter.write_line(
            f"[{self.finished:>{width}}/{total}]  {key}  {text}  ({elapsed:.0f} s)"
        )


def _outcome(report: pytest.TestReport) -> str | None:
    """A test's outcome as this report tells it; None when it tells nothing."""
    xfail = hasattr(report, "wasxfail")
    if report.when == "call":
        if xfail:
            return "xpassed" if report.passed else "xfailed"
        return report.outcome  # passed, failed, skipped
    if report.failed:
        return "error"  # a fixture, in setup or teardown
    if report.skipped:
        return "xfailed" if xfail else "skipped"
    return None
