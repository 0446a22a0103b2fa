"""tests/distributed/check_rank_coverage.py: lines only non-zero ranks run must be measured in a rank process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from coverage import CoverageData

from tests.distributed import check_rank_coverage as check

pytestmark = pytest.mark.timeout(120)

UNIT_TESTS_OF_THE_RENDEZVOUS = "tests/unit/test_signal_group.py"
RANK_STAND_IN = "tests/unit/test_signal_group.py::test_a_fresh_process_imports_the_rendezvous_without_joining_a_world"
"""Its child process stands in for a rank in the nested runs: it writes a data file of its own (``patch =
["subprocess"]``), for the rendezvous module, and runs no ``gloo_store``. (This folder's conftest strips COVERAGE_*
from the environment, so no test here can play that part.)"""
CHECK_TIMEOUT_S = 600
"""A hang guard on one real run of the check: a nested pytest under coverage, whose test processes (xdist's workers
too) and the rank stand-in's child each import Paddle, one after the other. The slowest such run took 140 s, beside
loops of distributed tests and three other checkouts' suites (load 15-17 on 2 cores); 16-36 s at load 6-8."""

ROOT = Path(__file__).resolve().parents[2]
TEST_PID = 4242
WORKER_PID = 4244
RANK_PID = 4343

RENDEZVOUS = """
def gloo_store(members, rank, key):
    store = make()
    if rank == members[0]:
        serve(store)
        return store
    address = store.get(key)
    return connect(address)
"""


def write_process_data(data_file: Path, pid: int, arcs: list[tuple[int, int]], relpath: str) -> None:
    """A per-process data file, named as coverage's parallel mode names it, with ``arcs`` run in ``relpath``."""
    data = CoverageData(basename=f"{data_file}.vm.pid{pid}.X{pid}")
    data.add_arcs({relpath: arcs})
    data.write()


@pytest.fixture
def fake_root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "fastdeploy_patch" / "signal_group").mkdir(parents=True)
    (root / "fastdeploy_patch" / "signal_group" / "rendezvous.py").write_text(
        RENDEZVOUS.lstrip("\n"), encoding="utf-8"
    )
    return root


# In RENDEZVOUS: the `if` is line 3; lines 6-7 run only for non-first members.
FIRST_MEMBER_ARCS = [(-1, 2), (2, 3), (3, 4), (4, 5), (5, -1)]
OTHER_MEMBER_ARCS = [(-1, 2), (2, 3), (3, 6), (6, 7), (7, -1)]


def test_non_first_member_lines_are_those_after_the_returning_if() -> None:
    assert check.non_first_member_lines(RENDEZVOUS.lstrip("\n")) == (3, [6, 7])


def test_lines_run_in_a_rank_process_pass(fake_root: Path, tmp_path: Path) -> None:
    data_file = tmp_path / "d.coverage"
    write_process_data(data_file, TEST_PID, FIRST_MEMBER_ARCS, "fastdeploy_patch/signal_group/rendezvous.py")
    write_process_data(data_file, RANK_PID, OTHER_MEMBER_ARCS, "fastdeploy_patch/signal_group/rendezvous.py")

    assert check.missing_in_ranks(data_file, {TEST_PID}, fake_root) == []


def test_lines_run_only_in_the_test_process_fail(fake_root: Path, tmp_path: Path) -> None:
    # What mocked unit tests leave: the test process itself ran the non-first-member side; the ranks did not.
    data_file = tmp_path / "d.coverage"
    write_process_data(data_file, TEST_PID, OTHER_MEMBER_ARCS, "fastdeploy_patch/signal_group/rendezvous.py")
    write_process_data(data_file, RANK_PID, FIRST_MEMBER_ARCS, "fastdeploy_patch/signal_group/rendezvous.py")

    assert check.missing_in_ranks(data_file, {TEST_PID}, fake_root) == [
        "fastdeploy_patch/signal_group/rendezvous.py:6 (gloo_store) did not run in any rank",
        "fastdeploy_patch/signal_group/rendezvous.py:7 (gloo_store) did not run in any rank",
        "fastdeploy_patch/signal_group/rendezvous.py: branch 3->6 (not the first member) was never taken in a rank",
    ]


def test_lines_run_only_in_an_xdist_worker_fail_like_the_test_process(fake_root: Path, tmp_path: Path) -> None:
    # Under pytest-xdist the tests run in worker processes: a worker that ran the lines is a test process, not a rank.
    data_file = tmp_path / "d.coverage"
    write_process_data(data_file, TEST_PID, [], "fastdeploy_patch/signal_group/rendezvous.py")
    write_process_data(data_file, WORKER_PID, OTHER_MEMBER_ARCS, "fastdeploy_patch/signal_group/rendezvous.py")
    write_process_data(data_file, RANK_PID, FIRST_MEMBER_ARCS, "fastdeploy_patch/signal_group/rendezvous.py")

    assert check.missing_in_ranks(data_file, {TEST_PID, WORKER_PID}, fake_root) == [
        "fastdeploy_patch/signal_group/rendezvous.py:6 (gloo_store) did not run in any rank",
        "fastdeploy_patch/signal_group/rendezvous.py:7 (gloo_store) did not run in any rank",
        "fastdeploy_patch/signal_group/rendezvous.py: branch 3->6 (not the first member) was never taken in a rank",
    ]
    # The same files, had the worker not been recorded: it would pass for a rank.
    assert check.missing_in_ranks(data_file, {TEST_PID}, fake_root) == []


def test_a_workers_file_alone_counts_as_test_process_data(fake_root: Path, tmp_path: Path) -> None:
    data_file = tmp_path / "d.coverage"
    write_process_data(data_file, WORKER_PID, FIRST_MEMBER_ARCS, "fastdeploy_patch/signal_group/rendezvous.py")
    write_process_data(data_file, RANK_PID, OTHER_MEMBER_ARCS, "fastdeploy_patch/signal_group/rendezvous.py")

    assert check.missing_in_ranks(data_file, {TEST_PID, WORKER_PID}, fake_root) == []


def test_the_writer_pid_comes_from_coverages_file_name() -> None:
    assert check.writer_pid(Path("d.coverage.vm.pid4343.X4343")) == 4343
    assert check.writer_pid(Path("d.coverage.host.pid12.abc.H1h")) == 12
    assert check.writer_pid(Path("d.coverage.host.xpid12.abc")) is None
    assert check.writer_pid(Path("d.coverage.pid12")) is None


def test_as_a_plugin_it_records_each_test_processs_pid_only_when_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pids_file = tmp_path / "pids"
    monkeypatch.delenv(check.TEST_PIDS_VAR, raising=False)
    check.pytest_configure(None)
    assert not pids_file.exists()

    monkeypatch.setenv(check.TEST_PIDS_VAR, str(pids_file))
    check.pytest_configure(None)
    pids_file.write_text(pids_file.read_text() + "99\n")
    check.pytest_configure(None)

    assert pids_file.read_text() == f"{os.getpid()}\n99\n{os.getpid()}\n"
    assert check.recorded_test_pids(pids_file) == {os.getpid(), 99}


def test_lines_reached_without_the_branch_fail(fake_root: Path, tmp_path: Path) -> None:
    data_file = tmp_path / "d.coverage"
    write_process_data(data_file, TEST_PID, [], "fastdeploy_patch/signal_group/rendezvous.py")
    write_process_data(data_file, RANK_PID, [(-1, 6), (6, 7), (7, -1)], "fastdeploy_patch/signal_group/rendezvous.py")

    assert check.missing_in_ranks(data_file, {TEST_PID}, fake_root) == [
        "fastdeploy_patch/signal_group/rendezvous.py: branch 3->6 (not the first member) was never taken in a rank"
    ]


def test_ranks_measured_in_another_file_do_not_count(fake_root: Path, tmp_path: Path) -> None:
    data_file = tmp_path / "d.coverage"
    write_process_data(data_file, TEST_PID, [], "fastdeploy_patch/signal_group/rendezvous.py")
    write_process_data(data_file, RANK_PID, OTHER_MEMBER_ARCS, "fastdeploy_patch/other.py")

    assert check.missing_in_ranks(data_file, {TEST_PID}, fake_root) == [
        "fastdeploy_patch/signal_group/rendezvous.py:6 (gloo_store) did not run in any rank",
        "fastdeploy_patch/signal_group/rendezvous.py:7 (gloo_store) did not run in any rank",
    ]


def test_no_rank_data_fails(fake_root: Path, tmp_path: Path) -> None:
    data_file = tmp_path / "d.coverage"
    write_process_data(data_file, TEST_PID, OTHER_MEMBER_ARCS, "fastdeploy_patch/signal_group/rendezvous.py")

    assert check.missing_in_ranks(data_file, {TEST_PID}, fake_root) == [
        f"no process other than the test processes wrote coverage data next to {data_file}: no rank was measured"
    ]


def test_no_test_process_data_fails(fake_root: Path, tmp_path: Path) -> None:
    data_file = tmp_path / "d.coverage"
    write_process_data(data_file, RANK_PID, OTHER_MEMBER_ARCS, "fastdeploy_patch/signal_group/rendezvous.py")

    assert check.missing_in_ranks(data_file, {TEST_PID}, fake_root) == [
        f"no coverage data from the test processes (pids [{TEST_PID}]) next to {data_file}: were they measured?"
    ]


def test_missing_source_and_function_are_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"none of .* exists under .*: update SOURCES in tests\.distributed"):
        check.rendezvous_source(tmp_path)
    with pytest.raises(ValueError, match=r"no function gloo_store here: update FUNCTION in tests\.distributed"):
        check.non_first_member_lines("def other():\n    pass\n")
    with pytest.raises(ValueError, match="no longer has the shape"):
        check.non_first_member_lines("def gloo_store(r):\n    if r:\n        pass\n    return 1\n")


def test_the_real_rendezvous_has_the_shape_the_check_relies_on() -> None:
    relpath = check.rendezvous_source()
    if_line, lines = check.non_first_member_lines((ROOT / relpath).read_text(encoding="utf-8"))

    assert if_line < lines[0]
    assert lines == list(range(lines[0], lines[0] + len(lines)))


def test_usage_error_without_the_separator(capsys: pytest.CaptureFixture[str]) -> None:
    assert check.main(["only-a-data-file"]) == 2
    assert capsys.readouterr().err == (
        "usage: python -m tests.distributed.check_rank_coverage DATA_FILE -- PYTEST_ARGS...\n"
    )


def run_check(data_file: Path, *pytest_args: str) -> subprocess.CompletedProcess[str]:
    """Run the check as tox does, outside any coverage run of this suite."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("COVERAGE_")}
    return subprocess.run(
        [sys.executable, "-m", "tests.distributed.check_rank_coverage", str(data_file), "--", *pytest_args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=CHECK_TIMEOUT_S,
        check=False,
    )


@pytest.mark.timeout(CHECK_TIMEOUT_S + 30)
def test_a_run_that_collects_no_test_fails_with_pytests_exit_code(tmp_path: Path) -> None:
    data_file = tmp_path / "d.coverage"

    result = run_check(data_file, "tests/gate", "-k", "no_test_has_this_name", "-q", "-p", "no:cacheprovider")

    assert result.returncode == 5, result.stdout + result.stderr
    assert not data_file.exists()


@pytest.mark.timeout(CHECK_TIMEOUT_S + 30)
@pytest.mark.parametrize("workers", [[], ["-n", "2"]], ids=["one-process", "xdist-workers"])
def test_fails_on_the_unit_suites_data(tmp_path: Path, workers: list[str]) -> None:
    # The unit tests of the signal group run the non-first-member side with mocks, in the test process (or in xdist's
    # workers): the data covers the lines, yet no rank ran them, only a process that imported the rendezvous. The check
    # must fail there and leave no combined data for the gate. Only the mocked API tests run: they cover every line of
    # gloo_store; the other signal-group files (real segments, real waits) added minutes under load, and segments
    # that other suites' leak checks saw.
    data_file = tmp_path / "unit.coverage"

    tests = (UNIT_TESTS_OF_THE_RENDEZVOUS, RANK_STAND_IN)
    result = run_check(data_file, *tests, "-q", "-p", "no:cacheprovider", *workers)

    assert (ROOT / UNIT_TESTS_OF_THE_RENDEZVOUS).is_file()
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAIL: fastdeploy_patch/signal_group" in result.stdout
    assert "the lines only non-zero ranks run were not measured in a rank" in result.stdout
    # Failed for that reason: every test process was recorded and measured, and none of them counts as a rank.
    assert "(gloo_store) did not run in any rank" in result.stdout
    assert "no coverage data from the test processes" not in result.stdout
    assert not data_file.exists()


def plant_truncated(data_file: Path, pid: int) -> Path:
    """A per-process data file cut in half, as a process killed while coverage wrote it leaves one."""
    whole = data_file.parent / f"whole{pid}"
    data = CoverageData(basename=str(whole))
    data.add_arcs({"fastdeploy_patch/signal_group/rendezvous.py": OTHER_MEMBER_ARCS})
    data.write()
    raw = whole.read_bytes()
    whole.unlink()
    truncated = data_file.parent / f"{data_file.name}.vm.pid{pid}.XtruncX"
    truncated.write_bytes(raw[: len(raw) // 2])
    return truncated


def test_a_truncated_file_next_to_good_ones_is_skipped_and_named_and_the_rest_is_combined(
    fake_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data_file = tmp_path / "d.coverage"
    write_process_data(data_file, TEST_PID, FIRST_MEMBER_ARCS, "fastdeploy_patch/signal_group/rendezvous.py")
    write_process_data(data_file, RANK_PID, OTHER_MEMBER_ARCS, "fastdeploy_patch/signal_group/rendezvous.py")
    truncated = plant_truncated(data_file, 4444)

    code = check.check_and_combine(data_file, {TEST_PID}, fake_root)

    out = capsys.readouterr().out.splitlines()
    assert code == 0
    assert out[0] == "skipped 1 data file(s) that are not valid coverage data (a process killed while writing it):"
    assert out[1].startswith(f"  {truncated.name}: Couldn't use data file '{truncated}': ")
    assert out[2] == (
        "OK: fastdeploy_patch/signal_group/rendezvous.py:gloo_store: the lines only non-zero ranks run were "
        "measured inside the ranks"
    )
    combined = CoverageData(basename=str(data_file))
    combined.read()
    assert sorted(combined.arcs("fastdeploy_patch/signal_group/rendezvous.py")) == sorted(
        set(FIRST_MEMBER_ARCS) | set(OTHER_MEMBER_ARCS)
    )
    # The good files went into the combined one; the skipped one stays for a look.
    assert check.process_files(data_file) == [truncated]


def test_when_the_only_rank_file_is_truncated_the_check_still_fails(
    fake_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data_file = tmp_path / "d.coverage"
    write_process_data(data_file, TEST_PID, FIRST_MEMBER_ARCS, "fastdeploy_patch/signal_group/rendezvous.py")
    truncated = plant_truncated(data_file, RANK_PID)

    code = check.check_and_combine(data_file, {TEST_PID}, fake_root)

    out = capsys.readouterr().out.splitlines()
    assert code == 1
    assert out[0] == "skipped 1 data file(s) that are not valid coverage data (a process killed while writing it):"
    assert out[1].startswith(f"  {truncated.name}: ")
    assert out[2:] == [
        "FAIL: fastdeploy_patch/signal_group/rendezvous.py:gloo_store: the lines only non-zero ranks run were not "
        "measured in a rank:",
        f"  no process other than the test processes wrote coverage data next to {data_file}: no rank was measured",
    ]
    assert not data_file.exists()


def test_reading_process_files_tells_valid_data_from_invalid(tmp_path: Path) -> None:
    data_file = tmp_path / "d.coverage"
    write_process_data(data_file, RANK_PID, OTHER_MEMBER_ARCS, "fastdeploy_patch/other.py")
    truncated = plant_truncated(data_file, 4444)
    garbage = tmp_path / "d.coverage.vm.pid4545.Xjunk"
    garbage.write_bytes(b"not sqlite at all" * 64)

    readable, invalid = check.read_process_files(check.process_files(data_file))

    assert [path.name for path in readable] == [f"d.coverage.vm.pid{RANK_PID}.X{RANK_PID}"]
    assert sorted(invalid) == [truncated, garbage]
    assert "file is not a database" in invalid[garbage]
    assert check.skipped_report({}) == ""


def test_a_clean_run_prints_nothing_about_skipped_files(
    fake_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data_file = tmp_path / "d.coverage"
    write_process_data(data_file, TEST_PID, FIRST_MEMBER_ARCS, "fastdeploy_patch/signal_group/rendezvous.py")
    write_process_data(data_file, RANK_PID, OTHER_MEMBER_ARCS, "fastdeploy_patch/signal_group/rendezvous.py")

    assert check.check_and_combine(data_file, {TEST_PID}, fake_root) == 0
    assert capsys.readouterr().out.startswith("OK: ")
    assert check.process_files(data_file) == []


def test_the_files_are_read_once_their_names_stop_changing(tmp_path: Path) -> None:
    data_file = tmp_path / "distributed.coverage"
    first = tmp_path / "distributed.coverage.vm.pid1.abc"
    first.write_text("")
    renamed = tmp_path / "distributed.coverage.vm.pid1.abc.H1h"
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        # A process still exiting renames its file during the first wait, as coverage does on save.
        sleeps.append(seconds)
        if first.exists():
            first.rename(renamed)

    assert check.settled_process_files(data_file, sleep=sleep) == [renamed]
    assert sleeps == [check.SETTLE_S, check.SETTLE_S]


def test_settling_gives_up_after_its_tries_and_returns_the_last_listing(tmp_path: Path) -> None:
    data_file = tmp_path / "distributed.coverage"
    count = iter(range(100))

    def sleep(seconds: float) -> None:
        (tmp_path / f"distributed.coverage.vm.pid{next(count)}.x").write_text("")

    files = check.settled_process_files(data_file, sleep=sleep)
    assert len(files) == check.SETTLE_TRIES
