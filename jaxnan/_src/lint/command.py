"""``python -m jaxnan lint TARGET``: lint from the command line, for CI.

A target names a *factory*, a function taking no arguments that returns
``(fn, args)``, the loss and example arguments to lint it with:

- ``pkg.module:factory`` (imported, the current directory on the path),
- ``path/to/file.py:factory``,
- ``path/to/file.py``: every factory defined in the file (the functions
  named ``factory`` or ``*_factory``).

Exit status, as Python linters (ruff, flake8) do: 0 when nothing is found, 1
when a finding is reported, 2 for a usage error or a target whose own code
raises (an argparse message on stderr naming the place, no traceback).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import os
import sys
import traceback
from collections.abc import Callable, Sequence

from jax.extend import source_info_util

from jaxnan._src.lint import config, core, formats
from jaxnan._src.lint.formats import Format

source_info_util.register_exclusion(__file__)


class UsageError(Exception):
    """A target, option or configuration that cannot be used (exit status 2)."""


def _is_factory_name(name: str) -> bool:
    return name == "factory" or name.endswith("_factory")


def _load_file(path: str):
    if not os.path.isfile(path):
        raise UsageError(f"no such file: {path!r}")
    name = "jaxnan_lint_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def _import(where: str):
    if where.endswith(".py") or os.sep in where or "/" in where:
        return _load_file(where)
    try:
        return importlib.import_module(where)
    except ModuleNotFoundError as e:
        if e.name and where.startswith(e.name):
            raise UsageError(
                f"cannot import module {where!r} (run from the directory that "
                "contains it, or pass path/to/file.py:factory)"
            ) from None
        raise


def factories(target: str) -> list[tuple[str, Callable]]:
    """``[(name, factory)]`` for `target` (see the module docstring).

    Raises:
        UsageError: when the target cannot be resolved.
    """
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    where, sep, attr = target.rpartition(":")
    if not sep or "/" in attr or attr.endswith(".py"):  # a whole file
        where, attr = target, ""
    if not where:
        raise UsageError(f"target {target!r} names no module or file")
    if not attr and not where.endswith(".py"):
        raise UsageError(
            f"target {target!r} must be pkg.module:factory, "
            "path/to/file.py:factory or path/to/file.py"
        )
    mod = _import(where)
    if attr:
        fn = getattr(mod, attr, None)
        if not callable(fn):
            raise UsageError(f"{where!r} has no function {attr!r}")
        return [(target, fn)]
    found = [
        (f"{where}:{name}", obj)
        for name, obj in vars(mod).items()
        if _is_factory_name(name)
        and inspect.isfunction(obj)
        and obj.__module__ == mod.__name__
    ]
    if not found:
        raise UsageError(
            f"{where!r} defines no factory (a function named factory or "
            "*_factory returning (fn, args))"
        )
    return found


def _required(fn: Callable) -> list[str]:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature
        return []
    return [
        p.name
        for p in params
        if p.default is p.empty
        and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]


def _call(name: str, factory: Callable):
    required = _required(factory)
    if required:
        raise UsageError(
            f"{name} takes arguments ({', '.join(required)}): a target is a "
            "factory taking none and returning (fn, args); wrap the loss in one"
        )
    made = factory()
    if not (isinstance(made, tuple) and len(made) == 2 and callable(made[0])):
        raise UsageError(f"{name}() must return (fn, args), got {type(made).__name__}")
    fn, args = made
    return fn, tuple(args)


def _crash(e: Exception) -> str:
    """One line for an exception raised by the target's code, with its place."""
    frames = traceback.extract_tb(e.__traceback__)
    where = f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    return f"the target raised {type(e).__name__}: {e}{where}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the options of the lint subcommand to `parser`."""
    parser.add_argument(
        "targets",
        nargs="+",
        metavar="TARGET",
        help="pkg.module:factory, path/to/file.py:factory or path/to/file.py; "
        "a factory returns (fn, args)",
    )
    parser.add_argument(
        "--format",
        type=Format,
        choices=list(Format),
        default=Format.TEXT,
        help="output format (default text; sarif: SARIF 2.1.0 for code scanning)",
    )
    parser.add_argument(
        "--argnums",
        type=int,
        nargs="+",
        default=[0],
        help="the differentiated argument indices (default 0)",
    )
    parser.add_argument(
        "--rule",
        action="append",
        default=[],
        metavar="RULE=LEVEL",
        help="set a rule's level: error, warning, info or off (repeatable; "
        "overrides [tool.jaxnan.lint] rules in pyproject.toml)",
    )
    parser.add_argument(
        "--config",
        default="pyproject.toml",
        help="the pyproject.toml to read [tool.jaxnan.lint] from (default: the "
        "one in the current directory, if any)",
    )
    parser.add_argument(
        "--no-witness",
        action="store_true",
        help="do not evaluate witnesses (every finding 'unchecked')",
    )


def _levels(args) -> dict[str, str]:
    levels = config.from_pyproject(args.config)
    for item in args.rule:
        rule_id, sep, level = item.partition("=")
        if not sep:
            raise UsageError(
                f"--rule {item!r} must be RULE=LEVEL, e.g. div-no-epsilon=off"
            )
        levels[rule_id.strip()] = level.strip()
    config.levels(levels)  # checked before anything is traced
    return levels


def lint_targets(targets: Sequence[str], *, argnums=(0,), rules=None, witness=True):
    """``[(target, findings)]`` for each factory the targets name."""
    nums = argnums[0] if len(argnums) == 1 else tuple(argnums)
    results = []
    for target in targets:
        for name, factory in factories(target):
            fn, fargs = _call(name, factory)
            found = core.lint(fn, *fargs, argnums=nums, rules=rules, witness=witness)
            results.append((name, found))
    return results


def run(args: argparse.Namespace, parser: argparse.ArgumentParser, out=None) -> int:
    """Runs the lint subcommand; usage errors go through ``parser.error`` (2)."""
    out = sys.stdout if out is None else out
    try:
        rules = _levels(args)
        results = lint_targets(
            args.targets, argnums=args.argnums, rules=rules, witness=not args.no_witness
        )
    except (UsageError, ValueError) as e:
        parser.error(str(e).removeprefix("jaxnan: "))
    except Exception as e:  # noqa: BLE001 - the target's own code failed: 2, not 1
        parser.error(_crash(e))
    from jaxnan import __version__

    if args.format is Format.SARIF:
        text = formats.sarif(results, version=__version__)
    else:
        text = formats.WRITERS[args.format](results)
    print(text, file=out)
    return 1 if any(found for _, found in results) else 0


def cli(
    target: str, *, argnums: Sequence[int] = (0,), out=None, fmt: str = "text"
) -> int:
    """Lints `target` and prints the findings; the exit status (0, 1 or 2).

    Args:
        target: ``pkg.module:factory``, ``path/to/file.py:factory`` or a file.
        argnums: the differentiated argument indices.
        out: a text stream (default: sys.stdout).
        fmt: ``"text"``, ``"json"`` or ``"sarif"``.

    Returns:
        0 when nothing is found, 1 when something is, 2 for a usage error
        (its message on stderr).
    """
    parser = argparse.ArgumentParser(prog="python -m jaxnan lint", exit_on_error=False)
    add_arguments(parser)
    argv = [target, "--format", fmt, "--argnums", *map(str, argnums)]
    try:
        return run(parser.parse_args(argv), parser, out=out)
    except SystemExit as e:
        return int(e.code or 0)
