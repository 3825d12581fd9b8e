"""`python -m jaxnan lint`: targets, exit codes, formats, levels, suppression."""

import json
import os
import re
import subprocess
import sys

import pytest

import jaxnan
from jaxnan.__main__ import main
from jaxnan._src import lint as lint_mod
from tests.lint_corpus import buggy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUGGY = "tests/lint_corpus/buggy.py"
SRC = open(os.path.join(ROOT, BUGGY)).read().splitlines()


def _line(marker):
    return next(i for i, s in enumerate(SRC, 1) if marker in s)


def _usage_error(capsys, argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: python -m jaxnan lint"), err
    return err


def test_module_target_exit_1_and_text(capsys):
    assert main(["lint", "tests.lint_corpus.buggy:factory"]) == 1
    out = capsys.readouterr().out
    line = _line("# cli: where-nan-grad")
    assert f"buggy.py:{line}: error [where-nan-grad] jaxnan: `sqrt`" in out
    assert "witness: with the argument of `sqrt` = 0: its gradient is NaN" in out
    assert "fix: double where" in out
    assert out.rstrip().endswith(
        "2 finding(s), 1 error(s) in tests.lint_corpus.buggy:factory"
    )


def test_file_targets(capsys):
    assert main(["lint", f"{BUGGY}:clean"]) == 0
    assert "0 finding(s)" in capsys.readouterr().out
    assert main(["lint", f"{BUGGY}:warnings_factory"]) == 1  # any finding fails
    assert "warning [log-softmax]" in capsys.readouterr().out
    assert main(["lint", BUGGY]) == 1  # the whole file: its *factory functions
    out = capsys.readouterr().out
    assert f"in {BUGGY}:factory" in out and f"in {BUGGY}:warnings_factory" in out
    assert ":clean" not in out and ":suppressed" not in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["tests.lint_corpus.nosuch:factory"], "cannot import module"),
        ([f"{BUGGY}:nosuch"], "has no function 'nosuch'"),
        (["tests/nosuch.py:factory"], "no such file"),
        (["tests.lint_corpus.buggy"], "must be pkg.module:factory"),
        ([f"{BUGGY}:not_a_pair"], "must return (fn, args), got ArrayImpl"),
        ([f"{BUGGY}:misspelled"], "names the lint rule 'log-softmx'"),
        ([BUGGY, "--rule", "nosuch=off"], "names the lint rule 'nosuch'"),
        ([BUGGY, "--rule", "log-softmax=loud"], "is not a level"),
        ([BUGGY, "--rule", "log-softmax"], "must be RULE=LEVEL"),
        ([BUGGY, "--format", "xml"], "invalid Format value: 'xml'"),
        ([f"{BUGGY}:loss_itself"], "takes arguments (x): a target is a factory"),
        ([f"{BUGGY}:raising"], "the target raised TypeError: dot_general requires"),
    ],
)
def test_usage_errors_exit_2(capsys, argv, message):
    err = _usage_error(capsys, ["lint", *argv])
    assert message in err, err
    assert "Traceback" not in err


def test_subprocess_exit_codes():
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")

    def run(*argv):
        return subprocess.run(
            [sys.executable, "-m", "jaxnan", "lint", *argv],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    r = run(f"{BUGGY}:factory", f"{BUGGY}:clean", "--format", "json")
    assert r.returncode == 1, r.stderr
    assert json.loads(r.stdout)["summary"]["findings"] == 2
    r = run("tests.lint_corpus.nosuch:factory")
    assert r.returncode == 2
    assert "error: cannot import module" in r.stderr and "Traceback" not in r.stderr


def test_json(capsys):
    assert main(["lint", f"{BUGGY}:factory", "--format", "json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["summary"] == {
        "findings": 2,
        "errors": 1,
        "targets": [f"{BUGGY}:factory"],
    }
    first = data["findings"][0]
    assert first["rule"] == "where-nan-grad" and first["severity"] == "error"
    assert first["line"] == _line("# cli: where-nan-grad")
    assert first["confidence"] == "confirmed" and first["witness"]
    assert first["target"] == f"{BUGGY}:factory"
    assert os.path.samefile(first["file"], os.path.join(ROOT, BUGGY))


# SARIF 2.1.0 (OASIS), the parts code-scanning UIs read: the required members of
# each object and the value sets of `level` and `version`.
_REQUIRED = {
    "log": ("version", "runs"),
    "run": ("tool", "results"),
    "driver": ("name",),
    "rule": ("id",),
    "result": ("message", "ruleId", "level", "locations"),
    "physicalLocation": ("artifactLocation", "region"),
}


def _validate_sarif(log):
    assert log["$schema"].endswith("sarif-2.1.0.json")
    assert log["version"] == "2.1.0"
    for key in _REQUIRED["log"]:
        assert key in log
    (run,) = log["runs"]
    driver = run["tool"]["driver"]
    assert driver["name"] == "jaxnan" and isinstance(driver["rules"], list)
    ids = [r["id"] for r in driver["rules"]]
    assert len(ids) == len(set(ids))
    for r in driver["rules"]:
        assert r["shortDescription"]["text"]
        assert r["defaultConfiguration"]["level"] in ("error", "warning", "note")
    for res in run["results"]:
        for key in _REQUIRED["result"]:
            assert key in res, key
        assert res["level"] in ("none", "note", "warning", "error")
        assert ids[res["ruleIndex"]] == res["ruleId"]
        assert isinstance(res["message"]["text"], str) and res["message"]["text"]
        for loc in res["locations"]:
            phys = loc["physicalLocation"]
            for key in _REQUIRED["physicalLocation"]:
                assert key in phys
            assert phys["artifactLocation"]["uriBaseId"] in run["originalUriBaseIds"]
            assert not os.path.isabs(phys["artifactLocation"]["uri"])
            assert isinstance(phys["region"]["startLine"], int)
            assert phys["region"]["startLine"] >= 1
    return run


def test_sarif(capsys):
    assert main(["lint", f"{BUGGY}:factory", "--format", "sarif"]) == 1
    run = _validate_sarif(json.loads(capsys.readouterr().out))
    assert [r["id"] for r in run["tool"]["driver"]["rules"]] == list(jaxnan.LINT_RULES)
    where = [r for r in run["results"] if r["ruleId"] == "where-nan-grad"]
    (res,) = where
    phys = res["locations"][0]["physicalLocation"]
    assert phys["artifactLocation"]["uri"] == BUGGY
    assert phys["region"]["startLine"] == _line("# cli: where-nan-grad")
    assert res["level"] == "error" and "Fix: double where" in res["message"]["text"]


def test_suppression_comments():
    fn, args = buggy.suppressed()
    assert jaxnan.lint(fn, *args) == []
    fn, args = buggy.misspelled()
    with pytest.raises(ValueError, match=re.escape("'log-softmx', which does not")):
        jaxnan.lint(fn, *args)


def test_rule_levels(capsys, tmp_path):
    fn, args = buggy.factory()
    found = jaxnan.lint(fn, *args, rules={"log-softmax": "off"})
    assert [f.rule for f in found] == ["where-nan-grad"]
    found = jaxnan.lint(fn, *args, rules={"where-nan-grad": "info"})
    assert [(f.rule, f.severity) for f in found] == [
        ("log-softmax", "warning"),
        ("where-nan-grad", "info"),
    ]
    with pytest.raises(ValueError, match=re.escape("rules={'nosuch': ...}")):
        jaxnan.lint(fn, *args, rules={"nosuch": "off"})
    cfg = tmp_path / "pyproject.toml"
    cfg.write_text('[tool.jaxnan.lint]\nrules = {"log-softmax" = "off"}\n')
    argv = ["lint", f"{BUGGY}:warnings_factory", "--config", str(cfg)]
    assert main(argv) == 0
    assert main([*argv, "--rule", "log-softmax=error"]) == 1  # the flag wins
    assert "error [log-softmax]" in capsys.readouterr().out


def test_cli_function_keeps_its_signature(capsys):
    assert lint_mod.cli("tests.lint_corpus.buggy:factory") == 1
    assert lint_mod.cli("tests.lint_corpus.buggy") == 2
    assert "must be pkg.module:factory" in capsys.readouterr().err


def test_no_witness_leaves_findings_unchecked():
    fn, args = buggy.factory()
    found = jaxnan.lint(fn, *args, witness=False)
    assert {f.confidence for f in found} == {"unchecked"}
    assert all(f.witness == "" for f in found)
    assert [f.rule for f in found] == [f.rule for f in jaxnan.lint(fn, *args)]


def test_finding_dict_round_trips():
    f = jaxnan.Finding("log-softmax", "warning", "jaxnan: m", "fix", "a.py", 3, "c")
    assert f.to_dict()["confidence"] == "unchecked"
    assert jaxnan.Finding(**f.to_dict()) == f
