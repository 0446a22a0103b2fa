"""fastdeploy_patch.testing.rank_entry, run in-process: joining the world, running the target, reporting the result."""

from __future__ import annotations

import json
import signal
import socket
import time
from unittest import mock

import pytest

from fastdeploy_patch import paddle_internals, signal_group
from fastdeploy_patch.testing import rank_entry


@pytest.fixture
def spec(tmp_path):
    def write(target: str, **kwargs) -> tuple[str, str]:
        spec_path = tmp_path / "spec.json"
        spec_path.write_text(json.dumps({"target": target, "kwargs": kwargs}))
        return str(spec_path), str(tmp_path / "result.json")

    return write


@pytest.fixture(autouse=True)
def no_process_wide_handlers(monkeypatch):
    """main() installs signal handlers; record them, in order, instead of changing the test process. Nor does it pause
    the test process's own coverage measurement around Paddle's import, as it would in a measured rank."""
    monkeypatch.setattr(rank_entry.rank_imports, "running_coverage", lambda: None)
    installed = []
    monkeypatch.setattr(rank_entry.signal, "signal", lambda sig, handler: installed.append(("signal", sig, handler)))
    monkeypatch.setattr(rank_entry.faulthandler, "disable", lambda: installed.append(("faulthandler.disable",)))
    monkeypatch.setattr(
        rank_entry.faulthandler, "enable", lambda **kwargs: installed.append(("faulthandler.enable", kwargs))
    )
    return installed


def test_reclaiming_the_handlers_rearms_faulthandler_for_every_thread_and_puts_sigterm_back(no_process_wide_handlers):
    rank_entry.reclaim_signal_handlers()

    # disable() first: enable() alone does nothing while faulthandler believes it is still enabled.
    assert no_process_wide_handlers == [
        ("faulthandler.disable",),
        ("faulthandler.enable", {"all_threads": True}),
        ("signal", signal.SIGTERM, signal.getsignal(signal.SIGTERM)),
    ]


def test_single_rank_runs_the_target_without_joining_a_world(spec, monkeypatch, no_process_wide_handlers):
    monkeypatch.delenv("PADDLE_TRAINERS_NUM", raising=False)
    spec_path, result_path = spec("tests.unit.rank_targets:echo", value=5)
    monkeypatch.setenv("PADDLE_TRAINER_ID", "0")
    with mock.patch("paddle.distributed.init_parallel_env") as init:
        assert rank_entry.main([spec_path, result_path]) == 0
    init.assert_not_called()
    assert json.loads(open(result_path).read()) == {"value": 5, "rank": 0}
    # The handlers Paddle replaces are taken back once, after the target's imports.
    assert no_process_wide_handlers == [
        ("faulthandler.disable",),
        ("faulthandler.enable", {"all_threads": True}),
        ("signal", signal.SIGTERM, signal.getsignal(signal.SIGTERM)),
    ]


def test_multi_rank_joins_the_world_before_running_the_target(spec, monkeypatch):
    monkeypatch.delenv("PADDLE_MASTER", raising=False)
    monkeypatch.setenv("PADDLE_TRAINERS_NUM", "2")
    monkeypatch.setenv("PADDLE_TRAINER_ID", "1")
    spec_path, result_path = spec("tests.unit.rank_targets:echo", value=9)
    with mock.patch("paddle.distributed.init_parallel_env") as init:
        assert rank_entry.main([spec_path, result_path]) == 0
    init.assert_called_once_with()
    assert json.loads(open(result_path).read()) == {"value": 9, "rank": 1}


def test_a_failing_target_prints_its_traceback_and_writes_no_result(spec, monkeypatch, capsys, tmp_path):
    monkeypatch.delenv("PADDLE_TRAINERS_NUM", raising=False)
    spec_path, result_path = spec("tests.unit.rank_targets:fail", message="nope")
    assert rank_entry.main([spec_path, result_path]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err
    assert "ValueError: nope" in err
    assert not (tmp_path / "result.json").exists()


def test_paddle_is_imported_before_the_world_is_joined_and_a_failed_import_is_reported(spec, monkeypatch, capsys):
    events = []
    monkeypatch.setattr(rank_entry.rank_imports, "import_paddle", lambda: events.append("imported"))
    monkeypatch.setattr(rank_entry, "join_world", lambda: events.append("joined"))
    monkeypatch.setenv("PADDLE_TRAINER_ID", "0")
    spec_path, result_path = spec("tests.unit.rank_targets:echo", value=3)
    assert rank_entry.main([spec_path, result_path]) == 0
    assert events == ["imported", "joined"]
    monkeypatch.setattr(rank_entry.rank_imports, "import_paddle", mock.Mock(side_effect=ImportError("no paddle")))
    assert rank_entry.main([spec_path, result_path]) == 1
    assert "ImportError: no paddle" in capsys.readouterr().err
    assert events == ["imported", "joined"]


def test_a_failing_world_join_is_reported_like_a_target_failure(spec, monkeypatch, capsys):
    monkeypatch.delenv("PADDLE_MASTER", raising=False)
    monkeypatch.setenv("PADDLE_TRAINERS_NUM", "2")
    spec_path, result_path = spec("tests.unit.rank_targets:echo", value=1)
    with mock.patch("paddle.distributed.init_parallel_env", side_effect=RuntimeError("no master")):
        assert rank_entry.main([spec_path, result_path]) == 1
    assert "RuntimeError: no master" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("trainer_id", "master", "waited"),
    [
        ("1", "127.0.0.1:6170", ["127.0.0.1:6170", "store", "no delay 6170"]),
        ("0", "127.0.0.1:6170", ["free 127.0.0.1:6170", "store", "no delay 6170"]),
        ("1", None, []),
        ("0", None, []),
    ],
    ids=["a-later-rank-waits-for-the-master", "rank-0-checks-its-port-is-free", "no-master-named", "no-master-0"],
)
def test_only_a_later_rank_with_a_master_named_waits_for_it_and_the_store_is_quickened_before_joining(
    monkeypatch, trainer_id, master, waited
):
    events: list[str] = []
    monkeypatch.setenv("PADDLE_TRAINERS_NUM", "2")
    monkeypatch.setenv("PADDLE_TRAINER_ID", trainer_id)
    if master is None:
        monkeypatch.delenv("PADDLE_MASTER", raising=False)
    else:
        monkeypatch.setenv("PADDLE_MASTER", master)
    monkeypatch.setattr(rank_entry, "wait_for_master", lambda endpoint: events.append(endpoint))
    monkeypatch.setattr(rank_entry, "check_port_free", lambda endpoint: events.append(f"free {endpoint}"))
    monkeypatch.setattr(paddle_internals, "global_store", lambda: events.append("store"))
    monkeypatch.setattr(signal_group, "store_without_delay", lambda port: events.append(f"no delay {port}"))
    with mock.patch("paddle.distributed.init_parallel_env", side_effect=lambda: events.append("init")):
        rank_entry.join_world()
    assert events == [*waited, "init"]


def test_a_master_port_another_process_listens_on_is_refused_before_paddle_binds_it():
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        with pytest.raises(rank_entry.PortTaken, match=rf"^the master port 127.0.0.1:{port} is taken by another"):
            rank_entry.check_port_free(f"127.0.0.1:{port}")
    rank_entry.check_port_free(f"127.0.0.1:{port}")


def test_a_world_of_one_joins_nothing(monkeypatch):
    monkeypatch.setenv("PADDLE_TRAINERS_NUM", "1")
    monkeypatch.setattr(rank_entry, "wait_for_master", lambda endpoint: pytest.fail("waited for a master"))
    with mock.patch("paddle.distributed.init_parallel_env") as init:
        rank_entry.join_world()
    init.assert_not_called()


def test_waiting_for_the_master_returns_once_it_listens_and_gives_up_after_the_wait():
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        assert rank_entry.wait_for_master(f"127.0.0.1:{port}", wait_s=5.0) is True
    # The port is closed now: every connect is refused until the wait is over.
    started = time.monotonic()
    assert rank_entry.wait_for_master(f"127.0.0.1:{port}", wait_s=0.2) is False
    assert 0.2 <= time.monotonic() - started < 5.0
