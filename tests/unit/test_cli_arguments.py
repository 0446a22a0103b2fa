"""Every numeric flag of every subcommand: bad values exit 2 with usage and one error line, before any rank starts.

The table below must name exactly the parser's numeric flags, so a flag added without a check here fails the suite.
"""

from __future__ import annotations

import argparse
from unittest import mock

import pytest

from fastdeploy_patch import cli

POSITIVE_INT = "expected a positive integer"
NON_NEGATIVE_INT = "expected an integer >= 0"
SECONDS = "expected a positive, finite number of seconds"
NOT_INTEGERS = ("x", "1.5", "nan", "inf", "")

BAD_VALUES: dict[tuple[str, str], list[tuple[str, str]]] = {
    ("smoke", "--nranks"): [(v, POSITIVE_INT) for v in ("0", "-1", *NOT_INTEGERS)],
    ("smoke", "--timeout"): [(v, SECONDS) for v in ("0", "-1", "-0.5", "x", "nan", "inf", "-inf", "")],
    ("demo", "--nranks"): [(v, POSITIVE_INT) for v in ("0", "-1", *NOT_INTEGERS)],
    ("demo", "--steps"): [
        *((v, POSITIVE_INT) for v in ("0", "-3", *NOT_INTEGERS)),
        ("19", "expected at least 20 steps, room for a whole clear/update cycle"),
    ],
    ("demo", "--timeout"): [(v, SECONDS) for v in ("0", "-1", "soon", "nan", "inf", "-inf")],
    ("demo", "--lookahead"): [(v, "expected an integer from 0 to 32") for v in ("-1", "33", "1000", *NOT_INTEGERS)],
    ("bench", "--nranks"): [
        *((v, POSITIVE_INT) for v in ("0", "-2", *NOT_INTEGERS)),
        ("1", "expected at least 2 ranks: a broadcast needs a peer"),
    ],
    ("bench", "--iters"): [(v, POSITIVE_INT) for v in ("0", "-1", "many", *NOT_INTEGERS)],
    ("bench", "--warmup"): [(v, NON_NEGATIVE_INT) for v in ("-1", *NOT_INTEGERS)],
    ("bench", "--timeout"): [(v, SECONDS) for v in ("0", "-1", "x", "nan", "inf")],
    ("bench", "--src-late"): [
        (v, "expected a number of milliseconds above 0 and at most 10000")
        for v in ("0", "-1", "x", "nan", "inf", "10000.5", "60000")
    ],
}

GOOD_VALUES: dict[tuple[str, str], list[tuple[str, object]]] = {
    ("smoke", "--nranks"): [("1", 1), ("4", 4)],
    ("smoke", "--timeout"): [("0.5", 0.5), ("1e3", 1000.0)],
    ("demo", "--nranks"): [("1", 1)],
    ("demo", "--steps"): [("20", 20)],
    ("demo", "--timeout"): [("7", 7.0)],
    ("demo", "--lookahead"): [("0", 0), ("32", 32)],
    ("bench", "--nranks"): [("2", 2), ("4", 4)],
    ("bench", "--iters"): [("1", 1)],
    ("bench", "--warmup"): [("0", 0)],
    ("bench", "--timeout"): [("0.001", 0.001)],
    ("bench", "--src-late"): [("0.05", 0.05), ("2", 2.0), ("300", 300.0), ("1000", 1000.0), ("10000", 10000.0)],
}


def _numeric_flags() -> set[tuple[str, str]]:
    """Every (subcommand, flag) of the real parser that converts its value (everything but switches, choices,
    file names)."""
    parser = cli.build_parser()
    [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return {
        (name, action.option_strings[-1])
        for name, subparser in sub.choices.items()
        for action in subparser._actions
        if action.type is not None and action.choices is None
    }


def test_the_table_covers_every_numeric_flag_of_every_subcommand() -> None:
    assert set(BAD_VALUES) == _numeric_flags()
    assert set(GOOD_VALUES) == _numeric_flags()


CASES = [(command, flag, value, error) for (command, flag), bad in BAD_VALUES.items() for value, error in bad]


@pytest.mark.parametrize(("command", "flag", "value", "error"), CASES)
def test_a_bad_value_exits_2_with_usage_and_one_error_line(command, flag, value, error, capsys) -> None:
    with mock.patch("fastdeploy_patch.testing.launcher.run_ranks") as run, pytest.raises(SystemExit) as exited:
        cli.main([command, f"{flag}={value}"])
    assert exited.value.code == 2
    run.assert_not_called()
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.rstrip("\n").splitlines()
    assert lines[0].startswith(f"usage: fastdeploy-patch {command} ")
    assert lines[-1] == f"fastdeploy-patch {command}: error: argument {flag}: {error}, got {value!r}"
    assert "Traceback" not in captured.err


@pytest.mark.parametrize(
    ("command", "flag", "value", "parsed"),
    [(command, flag, value, parsed) for (command, flag), good in GOOD_VALUES.items() for value, parsed in good],
)
def test_the_smallest_and_usual_good_values_are_accepted(command, flag, value, parsed) -> None:
    # Enough steps for any lookahead, so that only the flag under test decides.
    extra = ["--steps", "1000"] if command == "demo" and flag != "--steps" else []
    args = cli.build_parser().parse_args([command, flag, value, *extra])
    assert args.check(args) is None if command in ("demo", "bench") else "check" not in args
    assert getattr(args, flag.lstrip("-").replace("-", "_")) == parsed


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (["frobnicate"], "fastdeploy-patch: error: argument COMMAND: invalid choice: 'frobnicate'"),
        ([], "fastdeploy-patch: error: the following arguments are required: COMMAND"),
    ],
)
def test_a_missing_or_unknown_command_exits_2(argv, error, capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    assert exited.value.code == 2
    assert capsys.readouterr().err.rstrip("\n").splitlines()[-1].startswith(error)
