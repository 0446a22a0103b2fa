"""The ``fastdeploy-patch`` command (also ``python -m fastdeploy_patch``): the parser and ``main`` here, one module
per subcommand (``demo``, ``bench``, ``doctor``, ``smoke``; ``bench`` is a package, one module per mode).

This is a tool beside the patch, not part of it. It may import the patch and the harness in ``testing/``, and takes
signal-group names only from ``fastdeploy_patch.signal_group``, never from that package's internal modules; the
patch never imports anything from here. Nothing outside this package imports it but ``__main__`` and the console
script.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import secrets
import signal
import sys
import threading
from collections.abc import Callable, Sequence

from fastdeploy_patch.paddle_warnings import silence_ccache_warning


def _int_arg(minimum: int, expected: str, maximum: float = math.inf) -> Callable[[str], int]:
    """An argparse type: an integer from ``minimum`` to ``maximum``; anything else is a usage error saying
    ``expected``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not minimum <= value <= maximum:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


_positive_int = _int_arg(1, "a positive integer")
_non_negative_int = _int_arg(0, "an integer >= 0")


def _int_at_least(minimum: int, why: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = _positive_int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{why}, got {text!r}")
        return value

    return parse


def _seconds(text: str) -> float:
    """An argparse type: a positive, finite number of seconds (``inf`` would mean never stopping the ranks)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a positive, finite number of seconds, got {text!r}")
    return value


MAX_SRC_LATE_MS = 10_000
"""The longest ``bench --src-late`` gap: the reader waits through each one, and the gloo group's ops fail after
gloo's fixed 30 s (the shm group, with ``timeout=None``, would wait as long as the src lives)."""


def _milliseconds(text: str) -> float:
    """An argparse type: a positive, finite number of milliseconds, at most ``MAX_SRC_LATE_MS``."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (0 < value <= MAX_SRC_LATE_MS):
        raise argparse.ArgumentTypeError(
            f"expected a number of milliseconds above 0 and at most {MAX_SRC_LATE_MS}, got {text!r}"
        )
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="fastdeploy-patch", description="CPU signal group and safe shutdown for FastDeploy RL workers."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    smoke = sub.add_parser("smoke", help="quick check: broadcast from each src, safe shutdown, restart")
    smoke.add_argument("--nranks", type=_positive_int, default=2, help="CPU ranks to start (default 2)")
    smoke.add_argument(
        "--timeout", type=_seconds, default=120.0, help="seconds before the ranks are killed (default 120)"
    )

    from fastdeploy_patch.cli.demo import MIN_STEPS, STEPS_PER_LOOKAHEAD
    from fastdeploy_patch.signal_group import MAX_LOOKAHEAD, TRANSPORTS

    demo = sub.add_parser(
        "demo", help="RL weight update on N CPU ranks: the engine requests clear, then update; a summary table"
    )
    demo.add_argument("--nranks", type=_positive_int, default=2, help="CPU ranks to start (default 2)")
    demo.add_argument(
        "--steps",
        type=_int_at_least(MIN_STEPS, f"expected at least {MIN_STEPS} steps, room for a whole clear/update cycle"),
        default=200,
        help=f"event-loop steps every rank runs (default 200, at least {MIN_STEPS} plus {STEPS_PER_LOOKAHEAD} per "
        "step of --lookahead)",
    )
    demo.add_argument("--timeout", type=_seconds, help="seconds before the ranks are killed (default: from --steps)")
    demo.add_argument(
        "--transport",
        choices=TRANSPORTS,
        default="auto",
        help="the signal group's transport (default auto: shared memory when every rank can map it, else gloo)",
    )
    demo.add_argument(
        "--lookahead",
        type=_int_arg(0, f"an integer from 0 to {MAX_LOOKAHEAD}", MAX_LOOKAHEAD),
        default=0,
        help=f"steps after rank 0 reads a status that every rank acts on it (0 to {MAX_LOOKAHEAD}, default 0; "
        "needs shared memory)",
    )
    demo.set_defaults(check=_demo_flags_agree, parser=demo)

    bench = sub.add_parser(
        "bench",
        help="per-step signal-sync latency of each path (legacy, gloo, shm); --jitter: loop time under jitter",
    )
    bench.add_argument(
        "--nranks",
        type=_int_at_least(2, "expected at least 2 ranks: a broadcast needs a peer"),
        default=2,
        help="ranks to start (default 2)",
    )
    bench.add_argument("--iters", type=_positive_int, default=5000, help="timed steps per path (default 5000)")
    bench.add_argument("--warmup", type=_non_negative_int, default=200, help="untimed steps first (default 200)")
    bench.add_argument(
        "--jitter",
        action="store_true",
        help="instead: loop time per step when every rank does its own 200-400 us of CPU work each step, for no "
        "sync, gloo, shm and shm with a lookahead",
    )
    bench.add_argument(
        "--src-late",
        type=_milliseconds,
        metavar="MS",
        help="instead: the src sleeps MS ms before each publish while the reader waits (2 ranks); reports the "
        "reader's wake latency p50/p90/p99, its CPU share and the src's publish cost on shm, on gloo and on a bare "
        "futex word (the floor)",
    )
    bench.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    bench.add_argument("--plot", metavar="FILE.png", help="save the distributions as a plot (needs the plot extra)")
    bench.add_argument("--timeout", type=_seconds, help="seconds before the ranks are killed (default: from --iters)")
    bench.set_defaults(check=_bench_flags_agree, parser=bench)
    doctor = sub.add_parser(
        "doctor",
        help="what this machine offers the signal group (Paddle, GPUs, /dev/shm, leftover segments, transport, "
        "multi-host); exits 1 when it cannot work",
    )
    doctor.add_argument(
        "--clean",
        action="store_true",
        help="remove the signal-group segments in /dev/shm whose creator is gone (only those)",
    )
    return parser


def _bench_flags_agree(args: argparse.Namespace) -> str | None:
    if args.src_late is None:
        return None
    if args.jitter:
        return "argument --src-late: not allowed with --jitter (they are two different benchmarks)"
    if args.nranks != 2:
        return f"argument --src-late: runs on exactly 2 ranks (one src, one reader), got --nranks {args.nranks}"
    if args.plot:
        return "argument --src-late: --plot draws per-step latency paths only; leave it out with --src-late"
    return None


def _demo_flags_agree(args: argparse.Namespace) -> str | None:
    from fastdeploy_patch.cli.demo import min_steps

    if args.lookahead and args.transport == "gloo":
        return (
            f"argument --lookahead: lookahead {args.lookahead} needs the shared-memory transport, not gloo: "
            "use --transport shm or auto, or --lookahead 0"
        )
    if args.steps < min_steps(args.lookahead):
        return (
            f"argument --steps: expected at least {min_steps(args.lookahead)} steps with --lookahead "
            f"{args.lookahead}, room for a whole clear/update cycle, got '{args.steps}'"
        )
    return None


def _doctor(args: argparse.Namespace) -> int:
    from fastdeploy_patch.cli import doctor

    findings = doctor.run(clean=args.clean)
    print(doctor.format_findings(findings))
    return doctor.exit_code(findings)


def _smoke(args: argparse.Namespace) -> int:
    from fastdeploy_patch.cli.smoke import check_smoke
    from fastdeploy_patch.testing.launcher import RankError, run_ranks

    print(f"smoke: starting {args.nranks} CPU rank(s)...", flush=True)
    try:
        results = run_ranks("fastdeploy_patch.cli.smoke:smoke_rank", args.nranks, timeout=args.timeout)
    except KeyboardInterrupt:
        print("smoke: interrupted; every rank stopped", file=sys.stderr)
        return 130
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


def _shm_prefix() -> str:
    """The prefix of this run's shared-memory segments: the pid makes leftovers traceable to a run."""
    return f"fdp-demo-{os.getpid()}-{secrets.token_hex(3)}"


def _demo(args: argparse.Namespace) -> int:
    from fastdeploy_patch.cli.demo import DEFAULT_STEP_INTERVAL_S, Driver, check_demo, format_table
    from fastdeploy_patch.ipc_signal import StatusSignal
    from fastdeploy_patch.status import ModelWeightsStatus
    from fastdeploy_patch.testing.launcher import RankError, run_ranks

    # Start-up (import paddle, rendezvous) dominates short runs; each step then costs its pause plus a little.
    timeout = args.timeout or 120.0 + args.steps * (DEFAULT_STEP_INTERVAL_S + 0.05)
    print(
        f"demo: starting {args.nranks} CPU rank(s) for {args.steps} steps (signal transport {args.transport}, "
        f"lookahead {args.lookahead}); the engine drives one clear/update cycle"
    )
    print("demo: waiting for the ranks to start (importing Paddle takes a few seconds)...", flush=True)
    prefix = _shm_prefix()
    stop = threading.Event()
    try:
        with (
            StatusSignal(f"{prefix}-status", create=True, initial=ModelWeightsStatus.NORMAL) as status,
            StatusSignal(f"{prefix}-progress", create=True) as progress,
        ):
            driver = Driver(status, progress, args.steps, out=lambda line: print(line, flush=True))
            engine = threading.Thread(target=driver.run, args=(stop, timeout), name="demo-engine", daemon=True)
            engine.start()
            try:
                kwargs = {
                    "status_name": status.name,
                    "progress_name": progress.name,
                    "steps": args.steps,
                    "step_interval": DEFAULT_STEP_INTERVAL_S,
                    "transport": args.transport,
                    "lookahead": args.lookahead,
                }
                results = run_ranks("fastdeploy_patch.cli.demo:demo_rank", args.nranks, kwargs=kwargs, timeout=timeout)
            finally:
                stop.set()
                engine.join()
    except KeyboardInterrupt:
        print("demo: interrupted; every rank stopped and the shared memory was removed", file=sys.stderr)
        return 130
    except RankError as exc:
        print(f"demo: FAILED: {exc}", file=sys.stderr)
        return 1
    print()
    print(format_table(results))
    problems = ([f"engine: {driver.error}"] if driver.error else []) + check_demo(results, args.steps)
    for problem in problems:
        print(f"demo: FAILED: {problem}", file=sys.stderr)
    if problems:
        return 1
    print(f"demo: OK ({args.nranks} ranks saw the whole clear/update cycle at the same steps)")
    return 0


def _bench(args: argparse.Namespace) -> int:
    import paddle

    from fastdeploy_patch.cli import bench
    from fastdeploy_patch.cli.bench import reports
    from fastdeploy_patch.testing.launcher import RankError, run_ranks

    # Fail before minutes of measuring, not after.
    try:
        plt = reports.load_pyplot() if args.plot else None
    except RuntimeError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    mode = bench.mode_for(args.jitter, args.src_late)
    run = bench.Run(
        args.nranks, args.iters, args.warmup, bench.pick_backend(args.nranks), paddle.__version__, args.src_late
    )
    # stdout carries only the result, so that --json output is one JSON object.
    print(mode.progress(run), file=sys.stderr, flush=True)
    timeout = args.timeout or run.default_timeout()
    try:
        results = run_ranks(
            mode.rank_function, run.nranks, kwargs=run.rank_kwargs(), timeout=timeout, backend=run.backend
        )
    except KeyboardInterrupt:
        print("bench: interrupted; every rank stopped", file=sys.stderr)
        return 130
    except RankError as exc:
        print(f"bench: FAILED: {exc}", file=sys.stderr)
        return 1
    report = mode.report(results, run)
    print(json.dumps(report, indent=2) if args.json else mode.table(report))
    if plt is not None:
        reports.plot_report(results, report, args.plot, plt)
        print(f"bench: distributions saved to {args.plot}", file=sys.stderr)
    return 0


_COMMANDS = {"smoke": _smoke, "demo": _demo, "bench": _bench, "doctor": _doctor}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (2 for bad arguments, 130 after Ctrl-C)."""
    # A shell starts background jobs with SIGINT ignored and Python keeps that; Ctrl-C (or SIGINT from a
    # supervisor) must still stop the ranks, so ask for KeyboardInterrupt explicitly.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    # The command owns its process: Paddle's ccache hint would stand in front of every output (the parser already
    # imports Paddle).
    silence_ccache_warning()
    args = build_parser().parse_args(argv)
    problem = args.check(args) if "check" in args else None
    if problem:
        args.parser.error(problem)
    return _COMMANDS[args.command](args)
