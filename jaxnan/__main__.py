"""Command line: ``python -m jaxnan demo``, ``python -m jaxnan lint mod:factory``."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    """Runs the jaxnan command line and returns its exit status."""
    parser = argparse.ArgumentParser(prog="python -m jaxnan")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="a training run that goes nonfinite, kept alive")
    demo.add_argument("--steps", type=int, default=60)
    lint = sub.add_parser(
        "lint",
        help="lint a loss for NaN-prone code; exit 1 on error-severity findings",
    )
    lint.add_argument(
        "target", help="module:factory, where factory() returns (fn, args)"
    )
    lint.add_argument(
        "--argnums", type=int, nargs="+", default=[0], help="differentiated args"
    )
    args = parser.parse_args(argv)
    if args.command == "lint":
        from jaxnan._src import lint as lint_mod

        return lint_mod.cli(args.target, argnums=args.argnums)
    if args.command == "demo":
        from jaxnan.examples import demo as demo_mod

        return demo_mod.run(steps=args.steps)
    return 2  # pragma: no cover


if __name__ == "__main__":
    sys.exit(main())
