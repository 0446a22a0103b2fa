"""The signal group on real ranks, on both transports: broadcasts, stale values, bad input, idle CPU, created
once, safe shutdown, lookahead sequences, the upstream bug.

One call per rank count and transport runs every check (``rank_fns.signal_checks``); each test asserts one
part of it. The gloo calls run on the session's pools; the shared-memory ones on fresh worlds, because their
upstream check needs a Paddle registry that holds the default group only, which no earlier test's gloo group may
have joined.
"""

from __future__ import annotations

import pytest

from fastdeploy_patch.signal_group import INT32_MAX, INT32_MIN, MAX_LOOKAHEAD
from fastdeploy_patch.status import ModelWeightsStatus
from fastdeploy_patch.testing.plugin import PaddleRanks
from tests.distributed import rank_fns
from tests.distributed.conftest import new_status_signal

STEPS = 1200
LOOP_STEPS = 50
CYCLES = 20
PROFILE_STEPS = 10
IDLE_S = 1.0
# The bound: a rank that waits 1 s uses at most 10% of one core in that second.
IDLE_CPU_FRACTION = 0.10
LOOKAHEADS = [4, MAX_LOOKAHEAD]
LOOKAHEAD_STEPS = 2000


@pytest.fixture(
    scope="module",
    params=[(2, "gloo"), (4, "gloo"), (2, "shm"), (4, "shm")],
    ids=lambda p: f"{p[0]}ranks-{p[1]}",
)
def reports(request: pytest.FixtureRequest, paddle_ranks: PaddleRanks) -> list[dict]:
    nranks, transport = request.param
    with new_status_signal() as status:
        return paddle_ranks.run(
            rank_fns.signal_checks,
            nranks,
            kwargs={
                "transport": transport,
                "status_name": status.name,
                "steps": STEPS,
                "loop_steps": LOOP_STEPS,
                "cycles": CYCLES,
                "profile_steps": PROFILE_STEPS,
                "idle_s": IDLE_S,
                "lookaheads": LOOKAHEADS if transport == "shm" else [],
                "lookahead_steps": LOOKAHEAD_STEPS,
            },
        )


def _is_gloo(reports: list[dict]) -> bool:
    return reports[0]["transport"] == "gloo"


def test_every_rank_uses_the_transport_asked_for(reports: list[dict]) -> None:
    assert len({r["transport"] for r in reports}) == 1
    for report in reports:
        worker = report["worker"]
        assert worker["worker_transport"] == report["transport"], f"rank {report['rank']}"


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


def test_src_sending_zero_right_after_another_value_is_received_as_zero(reports: list[dict]) -> None:
    cleared, updating = int(ModelWeightsStatus.CLEARING), int(ModelWeightsStatus.UPDATING)
    expected = [cleared, 0, updating, 0, 0, int(ModelWeightsStatus.CLEARED), 0]
    for report in reports:
        assert report["stale"] == expected, f"rank {report['rank']}"


def test_a_rank_waiting_a_second_for_its_value_stays_nearly_idle(reports: list[dict]) -> None:
    for report in reports[1:]:
        idle = report["idle"]
        assert idle["value"] == 31337
        # It really waited (rank 0 slept before publishing), so the CPU share below is a share of that wait.
        assert idle["wall"] >= IDLE_S / 2, f"rank {report['rank']}: {idle}"
        if not _is_gloo(reports):
            assert idle["cpu"] <= IDLE_CPU_FRACTION * idle["wall"], f"rank {report['rank']}: {idle}"


def test_lookahead_returns_the_value_published_that_many_calls_earlier(reports: list[dict]) -> None:
    if _is_gloo(reports):
        assert all(report["lookahead"] == {} for report in reports)
        return
    nranks = len(reports)
    for lookahead in LOOKAHEADS:
        expected = [
            -7
            if step < lookahead
            else rank_fns.stream_value(step - lookahead, rank_fns.stream_src(step - lookahead, nranks))
            for step in range(LOOKAHEAD_STEPS)
        ]
        for report in reports:
            got = report["lookahead"][str(lookahead)]
            assert (got["transport"], got["lookahead"]) == ("shm", lookahead)
            assert got["mismatches"] == [], f"rank {report['rank']}, lookahead {lookahead}: [step, src, got, expected]"
            assert got["digest"] == rank_fns.stream_digest(expected), f"rank {report['rank']}, lookahead {lookahead}"
            assert got["after_close"]["type"] == "SignalGroupError"
            assert "is unusable: it was closed" in got["after_close"]["message"]


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
        # A gloo signal group is a Paddle group; a shared-memory one registers nothing with Paddle.
        paddle_groups = [worker["worker_group"]] if _is_gloo(reports) else []
        assert worker["new_groups_at_init"] == paddle_groups, f"rank {report['rank']}"
        assert worker["created_at_init"] == 1
        assert worker["created_in_loop"] == 0
        assert worker["registry_unchanged_by_loop"] is True
        assert worker["steps"] == [LOOP_STEPS, LOOP_STEPS]
        assert worker["transitions"] == [] and worker["status"] == 0
    assert len({r["worker"]["worker_group"] for r in reports}) == 1
    if _is_gloo(reports):
        assert reports[0]["worker"]["worker_group"] != reports[0]["signal_group_name"]


def test_a_gloo_signal_group_is_registered_under_the_same_name_on_every_rank(reports: list[dict]) -> None:
    names = {r["signal_group_name"] for r in reports}
    assert len(names) == 1
    for report in reports:
        assert report["registry_grew_by"] == (list(names) if _is_gloo(reports) else [])
    assert (names == {None}) is not _is_gloo(reports)


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
        if _is_gloo(reports):
            assert report["signal_group_name"] in safe["registry"]
        # Groups of the whole session's calls on this pool: those this rank belongs to are gloo, and those of
        # subsets it is not in (other tests make some) have no process group on it at all.
        rank = report["rank"]
        groups = safe["registry"].values()
        assert {backend for _, ranks, backend in groups if rank in ranks} == {"ProcessGroupGloo"}
        assert {backend for _, ranks, backend in groups if rank not in ranks} <= {"NoneType"}
        assert safe["received"] == [7000 + cycle for cycle in range(CYCLES)], f"rank {report['rank']}"


def test_upstream_shutdown_process_group_still_raises_attribute_error_with_a_gloo_group(reports: list[dict]) -> None:
    # Pinned upstream bug: when this fails, Paddle fixed shutdown_process_group() and the workaround can go.
    if not _is_gloo(reports):
        # Shared-memory groups are no Paddle groups: with only the default group, Paddle's shutdown has nothing
        # to trip on.
        assert all(report["upstream_bug"] is None for report in reports)
        return
    for report in reports:
        assert report["upstream_bug"] is not None, f"rank {report['rank']}: Paddle's shutdown no longer raises"
        assert report["upstream_bug"]["type"] == "AttributeError"
        assert "ProcessGroupGloo' object has no attribute 'shutdown'" in report["upstream_bug"]["message"]
