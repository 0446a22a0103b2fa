"""The signal group on real gloo ranks: broadcasts, bad input, created once, safe shutdown, the upstream bug.

One launch per rank count runs every check (``rank_fns.signal_checks``); each test asserts one part of it.
"""

from __future__ import annotations

import pytest

from fastdeploy_patch.signal_group import INT32_MAX, INT32_MIN
from tests.distributed import rank_fns
from tests.distributed.conftest import new_status_signal
from tests.distributed.harness import run_ranks_or_fail

STEPS = 1200
LOOP_STEPS = 50
CYCLES = 20
PROFILE_STEPS = 10


@pytest.fixture(scope="module", params=[2, 4], ids=lambda n: f"{n}ranks")
def reports(request: pytest.FixtureRequest) -> list[dict]:
    with new_status_signal() as status:
        return run_ranks_or_fail(
            rank_fns.signal_checks,
            request.param,
            kwargs={
                "status_name": status.name,
                "steps": STEPS,
                "loop_steps": LOOP_STEPS,
                "cycles": CYCLES,
                "profile_steps": PROFILE_STEPS,
            },
        )


def test_every_rank_reports_its_own_rank(reports: list[dict]) -> None:
    assert [r["rank"] for r in reports] == list(range(len(reports)))
    assert {r["nranks"] for r in reports} == {len(reports)}


def test_stream_from_rank_zero_and_nonzero_srcs_arrives_in_order_at_every_rank(reports: list[dict]) -> None:
    nranks = len(reports)
    srcs = {rank_fns.stream_src(step, nranks) for step in range(STEPS)}
    expected = [rank_fns.stream_value(step, rank_fns.stream_src(step, nranks)) for step in range(STEPS)]
    assert srcs == set(range(nranks))
    assert INT32_MIN in expected and INT32_MAX in expected
    for report in reports:
        assert report["stream"]["steps"] == STEPS
        assert report["stream"]["mismatches"] == [], f"rank {report['rank']}: [step, src, got, expected]"
        assert report["stream"]["digest"] == rank_fns.stream_digest(expected), f"rank {report['rank']}"


def test_int32_extremes_from_every_src_reach_every_rank(reports: list[dict]) -> None:
    expected = list(rank_fns._PROBE_VALUES)
    assert INT32_MIN in expected and INT32_MAX in expected
    for report in reports:
        assert report["probes"] == {str(src): expected for src in range(len(reports))}, f"rank {report['rank']}"


def test_bad_value_on_src_raises_there_before_any_communication(reports: list[dict]) -> None:
    src = len(reports) - 1
    bad = reports[src]["bad_input"]
    assert bad["over"] == {
        "type": "ValueError",
        "message": f"signal value {INT32_MAX + 1} is outside int32 range [{INT32_MIN}, {INT32_MAX}]",
    }
    assert bad["under"]["type"] == "ValueError" and str(INT32_MIN - 1) in bad["under"]["message"]
    for label in ("float", "str", "bool"):
        assert bad[label]["type"] == "TypeError", label
        assert bad[label]["message"].startswith("signal value must be an integer"), label
    # The others never called; had src sent anything, this next broadcast would have delivered it instead.
    for report in reports:
        assert report["bad_input"]["after"] == -424242, f"rank {report['rank']}"


def test_bad_src_and_missing_group_raise_on_every_rank(reports: list[dict]) -> None:
    nranks = len(reports)
    for report in reports:
        bad = report["bad_input"]
        assert bad["src_not_member"] == {
            "type": "ValueError",
            "message": f"src {nranks} is not a member of the signal group (ranks {list(range(nranks))})",
        }
        assert bad["src_not_int"] == {"type": "TypeError", "message": "src must be an integer global rank, got '0'"}
        assert bad["no_group"]["type"] == "ValueError"
        assert bad["no_group"]["message"].startswith(
            f"broadcast_signal() needs the signal group in a world of {nranks} ranks"
        )


def test_worker_creates_its_signal_group_once(reports: list[dict]) -> None:
    for report in reports:
        worker = report["worker"]
        assert worker["new_groups_at_init"] == [worker["worker_group"]], f"rank {report['rank']}"
        assert worker["created_at_init"] == 1
        assert worker["created_in_loop"] == 0
        assert worker["registry_unchanged_by_loop"] is True
        assert worker["steps"] == [LOOP_STEPS, LOOP_STEPS]
        assert worker["transitions"] == [] and worker["status"] == 0
    assert len({r["worker"]["worker_group"] for r in reports}) == 1
    assert reports[0]["worker"]["worker_group"] != reports[0]["signal_group_name"]


def test_signal_group_is_registered_under_the_same_name_on_every_rank(reports: list[dict]) -> None:
    names = {r["signal_group_name"] for r in reports}
    assert len(names) == 1
    for report in reports:
        assert report["registry_grew_by"] == list(names)


def test_cpu_profile_of_signal_broadcasts_parses_and_has_no_device_event(reports: list[dict]) -> None:
    for report in reports:
        # At least the root and one node per broadcast: the parser really walked Paddle's tree.
        assert report["profile"]["host_events"] > PROFILE_STEPS, f"rank {report['rank']}"
        assert report["profile"]["device_events"] == 0


def test_safe_shutdown_never_raises_keeps_registry_and_signal_group_over_20_cycles(reports: list[dict]) -> None:
    for report in reports:
        safe = report["safe_shutdown"]
        # On CPU every group is gloo (the default group included): nothing can be shut down.
        assert safe["shut_per_cycle"] == [[] for _ in range(CYCLES)]
        assert safe["registry_changes"] == 0
        assert report["signal_group_name"] in safe["registry"]
        assert {backend for _, _, backend in safe["registry"].values()} == {"ProcessGroupGloo"}
        assert safe["received"] == [7000 + cycle for cycle in range(CYCLES)], f"rank {report['rank']}"


def test_upstream_shutdown_process_group_still_raises_attribute_error_with_a_gloo_group(reports: list[dict]) -> None:
    # Pinned upstream bug: when this fails, Paddle fixed shutdown_process_group() and the workaround can go.
    for report in reports:
        assert report["upstream_bug"] is not None, f"rank {report['rank']}: Paddle's shutdown no longer raises"
        assert report["upstream_bug"]["type"] == "AttributeError"
        assert "ProcessGroupGloo' object has no attribute 'shutdown'" in report["upstream_bug"]["message"]
