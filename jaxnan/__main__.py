"""Command line: ``python -m jaxnan demo``."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    """Runs the jaxnan command line and returns its exit status."""
    parser = argparse.ArgumentParser(prog="python -m jaxnan")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="a training run that goes nonfinite, kept alive")
    demo.add_argument("--steps", type=int, default=60)
    args = parser.parse_args(argv)
    if args.command == "demo":
        from jaxnan._src import demo as demo_mod

        return demo_mod.run(steps=args.steps)
    return 2  # pragma: no cover


if __name__ == "__main__":
    sys.exit(main())
