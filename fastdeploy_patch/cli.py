"""The ``fastdeploy-patch`` command (also ``python -m fastdeploy_patch``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="fastdeploy-patch", description="CPU signal group and safe shutdown for FastDeploy RL workers."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    smoke = sub.add_parser("smoke", help="quick check: broadcast from each src, safe shutdown, restart")
    smoke.add_argument("--nranks", type=_positive_int, default=2, help="CPU ranks to start (default 2)")
    smoke.add_argument("--timeout", type=float, default=120.0, help="seconds before the ranks are killed")
    return parser


def _smoke(args: argparse.Namespace) -> int:
    from fastdeploy_patch.launcher import RankError, run_ranks
    from fastdeploy_patch.smoke import check_smoke

    print(f"smoke: starting {args.nranks} CPU rank(s)...", flush=True)
    try:
        results = run_ranks("fastdeploy_patch.smoke:smoke_rank", args.nranks, timeout=args.timeout)
    except RankError as exc:
        print(f"smoke: FAILED: {exc}", file=sys.stderr)
        return 1
    for result in results:
        print(
            f"rank {result['rank']}: received {result['received']}, shut down {result['shut_down']}, "
            f"after restart {result['after_restart']}"
        )
    problems = check_smoke(results)
    for problem in problems:
        print(f"smoke: FAILED: {problem}", file=sys.stderr)
    if problems:
        return 1
    print(f"smoke: OK ({args.nranks} ranks agree)")
    return 0


_COMMANDS = {"smoke": _smoke}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (2 for bad arguments)."""
    args = build_parser().parse_args(argv)
    return _COMMANDS[args.command](args)
