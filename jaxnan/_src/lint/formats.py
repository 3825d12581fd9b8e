"""Lint output: text (one block per finding), JSON and SARIF 2.1.0.

Each writer takes ``[(target, findings)]`` and returns the text to print.
SARIF is the format code-scanning UIs (GitHub, GitLab, VS Code's SARIF
viewer) read to show a finding on its line.
"""

from __future__ import annotations

import enum
import json
import os
from collections.abc import Sequence

from jax.extend import source_info_util

from jaxnan._src.lint import registry
from jaxnan._src.lint.registry import Severity

source_info_util.register_exclusion(__file__)

SARIF_SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"
_SARIF_LEVEL = {
    Severity.ERROR: "error",
    Severity.WARNING: "warning",
    Severity.INFO: "note",
}
_URL = "https://github.com/jaxnan/jaxnan#lint-find-nan-prone-code-before-it-runs"


class Format(str, enum.Enum):
    """The output formats of ``python -m jaxnan lint --format``."""

    TEXT = "text"
    JSON = "json"
    SARIF = "sarif"

    def __str__(self) -> str:
        return self.value


Results = Sequence[tuple[str, Sequence]]  # [(target, [Finding, ...]), ...]


def _counts(results: Results) -> tuple[int, int]:
    findings = [f for _, fs in results for f in fs]
    return len(findings), sum(f.severity is Severity.ERROR for f in findings)


def text(results: Results) -> str:
    """One block per finding, then one summary line per target."""
    lines = []
    for target, findings in results:
        lines += [str(f) for f in findings]
        n_err = sum(f.severity is Severity.ERROR for f in findings)
        lines.append(
            f"jaxnan lint: {len(findings)} finding(s), {n_err} error(s) in {target}"
        )
    return "\n".join(lines)


def as_json(results: Results) -> str:
    """``{"findings": [...], "summary": {...}}``, each finding with its target."""
    n, n_err = _counts(results)
    findings = [{"target": target, **f.to_dict()} for target, fs in results for f in fs]
    summary = {"findings": n, "errors": n_err, "targets": [t for t, _ in results]}
    return json.dumps({"findings": findings, "summary": summary}, indent=2)


def _uri(path: str, root: str) -> str:
    path = os.path.abspath(path)
    rel = os.path.relpath(path, root)
    if rel.startswith(".."):
        return "file://" + path.replace(os.sep, "/")
    return rel.replace(os.sep, "/")


def _sarif_rule(rule: registry.LintRule) -> dict:
    return {
        "id": rule.rule,
        "name": "".join(w.capitalize() for w in rule.rule.split("-")),
        "shortDescription": {"text": rule.summary},
        "help": {"text": f"fix: {rule.fix}\nbad: {rule.bad}\ngood: {rule.good}"},
        "defaultConfiguration": {"level": _SARIF_LEVEL[rule.severity]},
        "helpUri": _URL,
    }


def _sarif_result(target: str, f, index: dict, root: str) -> dict:
    text_ = f.message + (f" Witness: {f.witness}." if f.witness else "")
    result = {
        "ruleId": f.rule,
        "ruleIndex": index[f.rule],
        "level": _SARIF_LEVEL[f.severity],
        "message": {"text": f"{text_} Fix: {f.fix}"},
        "properties": {"target": target, "confidence": str(f.confidence)},
    }
    if f.file and f.line:
        region = {"startLine": f.line}
        if f.code:
            region["snippet"] = {"text": f.code}
        result["locations"] = [
            {
                "physicalLocation": {
                    "artifactLocation": {
                        "uri": _uri(f.file, root),
                        "uriBaseId": "SRCROOT",
                    },
                    "region": region,
                }
            }
        ]
    return result


def sarif(results: Results, root: str | None = None, version: str = "") -> str:
    """A SARIF 2.1.0 log with one run; paths relative to `root` (the cwd)."""
    root = os.path.abspath(root or os.getcwd())
    rules = list(registry.LINT_RULES.values())
    index = {r.rule: i for i, r in enumerate(rules)}
    run = {
        "tool": {
            "driver": {
                "name": "jaxnan",
                "version": version,
                "informationUri": _URL,
                "rules": [_sarif_rule(r) for r in rules],
            }
        },
        "originalUriBaseIds": {
            "SRCROOT": {"uri": "file://" + root.replace(os.sep, "/") + "/"}
        },
        "results": [_sarif_result(t, f, index, root) for t, fs in results for f in fs],
    }
    log = {"$schema": SARIF_SCHEMA, "version": "2.1.0", "runs": [run]}
    return json.dumps(log, indent=2)


WRITERS = {Format.TEXT: text, Format.JSON: as_json, Format.SARIF: sarif}
