"""Cause accuracy of `jaxnan.guard` on the guard-loop scenarios from public reports.

Every `tests/guard_cases/case_*.py` trains under `jaxnan.guard` for many steps
until a fault reported in a public issue (cited in its docstring) strikes.
Per case this records the first bad step's incident: its cause, phase and
fix, scored as the tests score them (`tests/test_guard_cases.py`): *right
cause* = the expected cause; *helpful fix* = the fix holds every expected
phrase and none of the unhelpful ones; *evidence* = the incident lists the
evidence its cause rests on.

``--jaxnan PATH`` imports jaxnan from another checkout (PATH holds its
`jaxnan/` package), to measure it on the same scenarios: the guard's
keywords that checkout does not know (``schedule=``) are dropped, and a case
that fails to run counts as wrong.

Usage:
    python benchmarks/guard_cause_accuracy.py [--jaxnan PATH] [--json FILE]
        [--only NAME ...]
    python benchmarks/guard_cause_accuracy.py --table BEFORE.json AFTER.json
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import inspect
import json
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
CASES = ROOT / "tests" / "guard_cases"


def load(path: pathlib.Path):
    spec = importlib.util.spec_from_file_location(f"guard_case_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def guard_accepting(jaxnan):
    """`jaxnan.guard` that drops the keywords this checkout does not know."""
    known = set(inspect.signature(jaxnan.guard).parameters)

    def guard(fn, **kwargs):
        return jaxnan.guard(fn, **{k: v for k, v in kwargs.items() if k in known})

    return guard


def score(name: str, module, guard) -> dict:
    expect = module.EXPECT
    row = {"case": name, "expected": expect["cause"], "phase_expected": expect["phase"]}
    start = time.perf_counter()
    try:
        step = module.run(guard=guard)
        incident = next(i for i in step.incidents if i.action != "warned")
    except Exception as e:  # noqa: BLE001 - a case that fails to run is wrong
        return {
            **row,
            "cause": f"error: {e!r}"[:120],
            "phase": None,
            "right": False,
            "fix_ok": False,
            "evidence": False,
            "seconds": 0.0,
        }
    fix = incident.diagnosis.fix if incident.diagnosis else incident.message
    fix_ok = all(w in (fix or "") for w in expect["fix"]) and not any(
        w in (fix or "") for w in expect.get("not_fix", ())
    )
    return {
        **row,
        "cause": incident.cause,
        "phase": str(incident.phase) if incident.phase is not None else None,
        "step": incident.step,
        "right": incident.cause == expect["cause"],
        "fix_ok": fix_ok,
        "evidence": bool(getattr(incident, "evidence", ())),
        "fix": fix,
        "seconds": round(time.perf_counter() - start, 2),
    }


def table(before: list[dict], after: list[dict]) -> str:
    """The per-cause markdown table of two runs over the same cases."""
    by = collections.defaultdict(lambda: [0, 0, 0, 0, 0])
    for b, a in zip(before, after):
        t = by[a["expected"]]
        t[0] += 1
        t[1] += b["right"]
        t[2] += a["right"]
        t[3] += b["right"] and b["fix_ok"]
        t[4] += a["right"] and a["fix_ok"]
    lines = [
        "| expected cause | cases | right cause before | after "
        "| right cause and helpful fix before | after |",
        "|---|---|---|---|---|---|",
    ]
    total = [0] * 5
    for cause in sorted(by):
        t = by[cause]
        total = [x + y for x, y in zip(total, t)]
        lines.append(f"| {cause} | {t[0]} | {t[1]} | {t[2]} | {t[3]} | {t[4]} |")
    lines.append("| **all** | " + " | ".join(f"**{x}**" for x in total) + " |")
    lines.append("")
    lines.append("| case | expected | before | after |")
    lines.append("|---|---|---|---|")
    for b, a in zip(before, after):
        mark = lambda r: f"{r['cause']}{'' if r['fix_ok'] else ' (fix unhelpful)'}"  # noqa: E731
        lines.append(f"| {a['case']} | {a['expected']} | {mark(b)} | {mark(a)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jaxnan", help="a checkout whose jaxnan/ to measure")
    parser.add_argument("--json", help="write the rows to this file")
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument("--table", nargs=2, metavar=("BEFORE", "AFTER"))
    args = parser.parse_args(argv)
    if args.table:
        rows = [json.loads(pathlib.Path(p).read_text()) for p in args.table]
        print(table(*rows))
        return 0
    sys.path.insert(
        0, str(pathlib.Path(args.jaxnan).resolve() if args.jaxnan else ROOT)
    )
    import jaxnan

    print(f"jaxnan from {pathlib.Path(jaxnan.__file__).parent}", file=sys.stderr)
    guard = guard_accepting(jaxnan)
    rows = []
    for path in sorted(CASES.glob("case_*.py")):
        name = path.stem[len("case_") :]
        if args.only and name not in args.only:
            continue
        rows.append(score(name, load(path), guard))
        r = rows[-1]
        print(
            f"{name:34s} expected {r['expected']:18s} got {r['cause']:18s} "
            f"fix {'ok' if r['fix_ok'] else 'unhelpful'} ({r['seconds']} s)",
            file=sys.stderr,
        )
    right = sum(r["right"] for r in rows)
    print(f"right cause: {right} of {len(rows)}", file=sys.stderr)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
