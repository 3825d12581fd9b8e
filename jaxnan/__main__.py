"""Command line: ``python -m jaxnan demo``, ``python -m jaxnan lint TARGET``."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    """Runs the jaxnan command line and returns its exit status."""
    parser = argparse.ArgumentParser(prog="python -m jaxnan")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="a guarded training run that goes nonfinite three ways, kept alive",
        description=(
            "Train a small MLP under jaxnan.guard on synthetic data with a NaN "
            "row, an outlier row and a learning-rate surge; print one diagnosis "
            "per incident, a summary table and a plot."
        ),
    )
    demo.add_argument(
        "--steps", type=int, default=60, help="training steps (default 60)"
    )
    demo.add_argument(
        "--policy",
        choices=["skip", "raise", "rollback"],
        default="rollback",
        help="what the guard does with a bad step (default rollback)",
    )
    demo.add_argument(
        "--snapshot-every",
        type=int,
        default=5,
        help="steps between on-device snapshots for rollback (default 5)",
    )
    demo.add_argument(
        "--plot",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="write a PNG of loss, gradient norm and update ratio, bad and undone "
        "steps marked (matplotlib, in the demo extra; default on)",
    )
    demo.add_argument(
        "--plot-file",
        default="jaxnan_demo.png",
        help="where to write the plot (default jaxnan_demo.png)",
    )
    demo.add_argument(
        "--log", metavar="FILE", default=None, help="append incidents as JSON lines"
    )
    demo.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="progress bar and table with rich, in the demo extra (default on)",
    )
    from jaxnan._src.lint import command as lint_command

    lint = sub.add_parser(
        "lint",
        help="lint losses for NaN-prone code; exit 0 clean, 1 findings, 2 usage error",
        description=lint_command.__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    lint_command.add_arguments(lint)
    args = parser.parse_args(argv)
    if args.command == "lint":
        return lint_command.run(args, lint)
    if args.command == "demo":
        from jaxnan.examples import demo as demo_mod

        return demo_mod.run(
            steps=args.steps,
            plot_path=args.plot_file if args.plot else None,
            log=args.log,
            progress=args.progress,
            policy=args.policy,
            snapshot_every=args.snapshot_every,
        )
    return 2  # pragma: no cover


if __name__ == "__main__":
    sys.exit(main())
