"""Creating a signal group on real ranks when a rank never calls, calls late, dies, or hosts the store and dies:
every rank ends within ``create_timeout`` plus 5 s with an error that names the cause, learns of another rank's
failure or the store host's exit well before its own deadline, refuses every later creation at once, and leaves
nothing in /dev/shm (the suite's leak check). And 50 gloo creations beside a process that keeps grabbing ports of
the range ``FASTDEPLOY_PATCH_GLOO_PORTS`` allows: none aborts.

Every case runs on a fresh world (a failed creation leaves its ranks out of step for good) with a short
``create_timeout``, so that the waits stay short.
"""

from __future__ import annotations

import random
import re
import socket
import subprocess
import sys
import textwrap

import pytest

from fastdeploy_patch.testing.plugin import PaddleRanks
from tests.distributed import rank_fns_creation
from tests.distributed.harness import rank_env

CREATE_TIMEOUT_S = 3.0
OVERRUN_S = 5.0
"""The promise: no rank stays in creation longer than ``create_timeout`` plus this."""
LONG_TIMEOUT_S = 60.0
"""A create_timeout that a rank must never wait out in these tests: it learns of the failure first."""
LEARN_BOUND_S = 10.0
"""A hang guard on how long a rank takes to learn of another's failure or of the store's exit: the promise is 2 s
(a poll every 50 ms at most), a busy host only delays it, and missing the marker would wait ``LONG_TIMEOUT_S``."""
RESTART = "restart every rank of the world"


def _timed_out_or_told(report: dict, late: str) -> None:
    """A rank that waited for a missing one: timed out itself naming it, or learned it from a rank that timed out
    first."""
    if report["type"] == "TimeoutError":
        assert f"(create_timeout {CREATE_TIMEOUT_S:g} s): {late}" in report["message"], report
    else:
        assert report["type"] == "PeerFailed", report
        assert "could not create it (TimeoutError: " in report["message"] and late in report["message"], report
    assert report["message"].endswith(
        "restart every rank of the world: creation is collective over the whole world and numbered in call order, "
        "so no rank can join or repeat a creation that failed"
    )
    assert report["elapsed"] < CREATE_TIMEOUT_S + OVERRUN_S, report


@pytest.mark.timeout(150)
def test_a_rank_that_never_calls_is_named_and_one_that_comes_late_is_told_at_once(paddle_ranks: PaddleRanks) -> None:
    reports = paddle_ranks.run(
        rank_fns_creation.missing_then_late,
        3,
        kwargs={"absent": 2, "create_timeout": CREATE_TIMEOUT_S, "late_timeout": LONG_TIMEOUT_S},
    )
    never = "ranks [2] never arrived: they did not call new_signal_group() for it"
    for report in reports[:2]:
        rank = report["rank"]
        _timed_out_or_told(report["first"], never)
        # Every later creation on that rank raises at once, whatever its create_timeout.
        again = report["again"]
        assert again["type"] == "SignalGroupError", again
        assert again["message"].startswith(
            f"creating signal group #2 (ranks [0, 1, 2]) on rank {rank} cannot start: creation #1 failed on this rank "
        )
        assert again["elapsed"] < LEARN_BOUND_S, again
    late = reports[2]["late"]
    assert late["type"] == "PeerFailed", late
    assert re.match(
        r"creating signal group #1 \(ranks \[0, 1, 2\]\) on rank 2 failed after \d+\.\d s: rank [01] could not create "
        r"it \(TimeoutError: ",
        late["message"],
    ), late
    assert never in late["message"]
    assert late["elapsed"] < LEARN_BOUND_S, late


@pytest.mark.timeout(150)
def test_a_rank_that_calls_late_but_in_time_gets_the_group_like_the_others(paddle_ranks: PaddleRanks) -> None:
    reports = paddle_ranks.run(
        rank_fns_creation.late_in_time, 3, kwargs={"late": 1, "delay": 2.0, "create_timeout": 30.0}
    )
    assert [report["made"]["type"] for report in reports] == [None, None, None]
    assert [(report["made"]["transport"], report["made"]["value"]) for report in reports] == [("shm", 7)] * 3


DEAD_CASES = [("before", "auto", "never arrived"), ("handshake", "shm", "did not answer the shared-memory handshake")]
DEAD_CASES += [("store", "gloo", "did not connect to the gloo group's own store")]


@pytest.mark.timeout(150)
@pytest.mark.parametrize(("when", "transport", "named"), DEAD_CASES, ids=[when for when, _, _ in DEAD_CASES])
def test_a_rank_that_dies_is_named_by_every_other_within_the_create_timeout(
    paddle_ranks: PaddleRanks, when: str, transport: str, named: str
) -> None:
    reports = paddle_ranks.run(
        rank_fns_creation.dies_in_creation,
        3,
        kwargs={"victim": 2, "when": when, "transport": transport, "create_timeout": CREATE_TIMEOUT_S},
    )
    assert reports[2] == {"died": when}
    for report in reports[:2]:
        _timed_out_or_told(report["made"], f"ranks [2] {named}")


@pytest.mark.timeout(150)
def test_the_store_hosts_exit_fails_every_other_rank_well_before_its_deadline(paddle_ranks: PaddleRanks) -> None:
    reports = paddle_ranks.run(
        rank_fns_creation.store_host_dies,
        3,
        kwargs={"create_timeout": LONG_TIMEOUT_S, "keep_sockets": False},
    )
    died_at = reports[0]["died_at"]
    for report in reports[1:]:
        made = report["made"]
        assert made["type"] == "SignalGroupError", made
        assert "Paddle's global store, hosted by rank 0, failed (" in made["message"], made
        assert made["message"].endswith(
            f"that rank has probably exited; {RESTART}" + made["message"].split(RESTART)[1]
        )
        print(f"rank {report['rank']} learned the store host's exit {made['at'] - died_at:.3f} s after it")
        assert made["at"] - died_at < LEARN_BOUND_S, made


@pytest.mark.timeout(150)
def test_a_store_host_whose_child_holds_its_sockets_is_given_up_at_the_create_timeout(
    paddle_ranks: PaddleRanks,
) -> None:
    reports = paddle_ranks.run(
        rank_fns_creation.store_host_dies,
        3,
        kwargs={"create_timeout": CREATE_TIMEOUT_S, "keep_sockets": True},
    )
    for report in reports[1:]:
        made = report["made"]
        assert made["type"] == "TimeoutError", made
        assert (
            "Paddle's global store, hosted by rank 0, did not answer: that rank is stopped, or it exited while a "
            "process it forked still holds its connections" in made["message"]
        ), made
        assert made["elapsed"] < CREATE_TIMEOUT_S + OVERRUN_S, made


GRABBER = textwrap.dedent(
    """
    import collections, random, signal, socket, sys, time
    low, high, held_at_once, seconds = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    grabs, held = 0, collections.deque()
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            if len(held) >= held_at_once:
                held.popleft().close()
            sock = socket.socket()
            way = random.choice((0, 0, 0, 1, 2))
            try:
                if way == 0:
                    # A scan of the range for a free port, as a plain bind makes it.
                    sock.bind(("0.0.0.0", random.randint(low, high)))
                elif way == 1:
                    # Any free port, from the kernel.
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    sock.bind(("0.0.0.0", 0))
                else:
                    # The free-port idiom: a port free a moment ago, bound again (as a server binds, SO_REUSEADDR).
                    sock.bind(("0.0.0.0", 0))
                    port = sock.getsockname()[1]
                    sock.close()
                    sock = socket.socket()
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    sock.bind(("0.0.0.0", port))
                sock.listen()
            except OSError:
                sock.close()
                continue
            grabs += 1
            held.append(sock)
    finally:
        print(grabs, flush=True)
    """
)
"""Keeps ``held_at_once`` ports listening and keeps changing which, taken three ways: a plain bind to a port of
LOW-HIGH (3 grabs in 5), a free port from the kernel, and the free-port idiom (a kernel port released and bound
again, as a server binds it: with SO_REUSEADDR)."""


CREATIONS = 50
GRABBED = 40


def _free_ports(length: int) -> range:
    """``length`` consecutive ports that nobody holds right now."""
    for _ in range(100):
        first = random.randrange(20000, 60000 - length)
        held = []
        try:
            for port in range(first, first + length):
                sock = socket.socket()
                held.append(sock)
                sock.bind(("0.0.0.0", port))
        except OSError:
            continue
        finally:
            for sock in held:
                sock.close()
        return range(first, first + length)
    pytest.fail(f"no {length} free ports in a row")


@pytest.mark.timeout(240)
@pytest.mark.parametrize("confined", [True, False], ids=["in-a-range", "any-free-port"])
def test_fifty_gloo_creations_beside_a_port_grabber_never_abort(paddle_ranks: PaddleRanks, confined: bool) -> None:
    # Each gloo group keeps its store, and so its port, as long as Paddle keeps the group: for the process's life.
    ports = _free_ports(CREATIONS + 2 * GRABBED)
    grabber = subprocess.Popen(
        [sys.executable, "-c", GRABBER, str(ports[0]), str(ports[-1]), str(GRABBED), "180"],
        stdout=subprocess.PIPE,
        text=True,
        env={**rank_env(), "PATH": "/usr/bin:/bin"},
    )
    try:
        reports = paddle_ranks.run(
            rank_fns_creation.many_gloo_groups,
            2,
            kwargs={"creations": CREATIONS},
            env={"FASTDEPLOY_PATCH_GLOO_PORTS": f"{ports[0]}-{ports[-1]}" if confined else ""},
            timeout=200,
        )
    finally:
        grabber.terminate()
        grabs = int(grabber.communicate(timeout=30)[0] or 0)
    print(f"the grabber held {grabs} ports meanwhile")
    assert grabs > 0
    for report in reports:
        assert report["values"] == list(range(1, CREATIONS + 1)), report["rank"]
    assert len(set(reports[0]["ports"])) == CREATIONS
    assert all(port in ports for port in reports[0]["ports"]) is confined
