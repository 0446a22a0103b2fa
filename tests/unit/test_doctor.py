"""``fastdeploy-patch doctor``: every check's branches with made-up facts, the fact gatherers with fakes, the CLI."""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import paddle
import pytest

from fastdeploy_patch import cli, procfs, signal_group
from fastdeploy_patch.cli import doctor
from fastdeploy_patch.cli.doctor import (
    FAIL,
    GIB,
    MIB,
    OK,
    WARN,
    Finding,
    LeftoverFacts,
    NetworkFacts,
    PaddleFacts,
    ShmFacts,
)
from fastdeploy_patch.procfs import Mount
from fastdeploy_patch.signal_group import shm_diagnostics
from fastdeploy_patch.signal_group.liveness import ProcessIdentity
from fastdeploy_patch.signal_group.shm_diagnostics import Leftover

CPU = PaddleFacts(version="3.3.1", cuda=None, has_gloo=True, gpus=0)
GPU_NO_GLOO = PaddleFacts(version="3.3.0", cuda="12.6", has_gloo=False, gpus=8)
HEALTHY_SHM = ShmFacts("/dev/shm", is_dir=True, fs_type="tmpfs", size=12 * GIB, free=11 * GIB)
NETWORK = NetworkFacts(ifname="eth0", interfaces=["eth0", "lo"], hostname="box", address="10.0.0.5")
NO_LEFTOVERS = LeftoverFacts(found=[], removed=None)
LEFT = [
    Leftover("/dev/shm/fdp_signal_aa", ProcessIdentity(41, 7, 9), "process 41 is gone"),
    Leftover(
        "/dev/shm/fdp_signal_bb",
        ProcessIdentity(42, 8, 9),
        "process 42 is gone (its pid now belongs to another process)",
    ),
]

# --- the checks ----------------------------------------------------------------------------------------------


def test_paddle_with_gloo_is_ok_and_names_version_and_build() -> None:
    assert doctor.paddle_finding(CPU) == Finding(OK, "Paddle", "3.3.1, CPU build, gloo: yes")


def test_paddle_without_gloo_warns_that_only_one_host_can_sync() -> None:
    finding = doctor.paddle_finding(GPU_NO_GLOO)
    assert (finding.level, finding.topic) == (WARN, "Paddle")
    assert finding.text.startswith("3.3.0, GPU build (CUDA 12.6), gloo: NO. Ranks on one host can still use shared")
    assert "ranks on several hosts cannot sync" in finding.text


@pytest.mark.parametrize(
    ("facts", "visible", "text"),
    [
        (CPU, None, "none used: a CPU build of Paddle"),
        (CPU, "", "none used: a CPU build of Paddle (CUDA_VISIBLE_DEVICES='')"),
        (GPU_NO_GLOO, None, "8 seen"),
        (GPU_NO_GLOO, "0,1", "8 seen (CUDA_VISIBLE_DEVICES='0,1')"),
    ],
)
def test_gpus_seen(facts: PaddleFacts, visible: str | None, text: str) -> None:
    assert doctor.gpu_finding(facts, visible) == Finding(OK, "GPUs", text)


def _shm(**changes: object) -> ShmFacts:
    fields = {"path": "/dev/shm", "is_dir": True, "fs_type": "tmpfs", "size": 12 * GIB, "free": 11 * GIB}
    return ShmFacts(**{**fields, **changes})


def test_a_healthy_shm_is_ok_with_its_size_and_free_space() -> None:
    assert doctor.shm_findings(HEALTHY_SHM) == [
        Finding(OK, "/dev/shm", "mounted (tmpfs)"),
        Finding(OK, "/dev/shm", "12.0 GiB, 11.0 GiB free"),
    ]


def test_a_missing_shm_warns_that_ranks_fall_back_to_gloo() -> None:
    assert doctor.shm_findings(_shm(is_dir=False)) == [
        Finding(WARN, "/dev/shm", "missing: ranks cannot share memory, so they fall back to gloo")
    ]


@pytest.mark.parametrize(
    ("fs_type", "text"),
    [
        (None, "not a mount point of its own: segments go to the filesystem below it"),
        ("ext4", "mounted as ext4, not tmpfs: segments may touch a disk"),
    ],
)
def test_a_shm_that_is_not_its_own_tmpfs_warns(fs_type: str | None, text: str) -> None:
    assert doctor.shm_findings(_shm(fs_type=fs_type))[0] == Finding(WARN, "/dev/shm", text)


def test_dockers_default_64_mb_shm_warns_with_the_fix() -> None:
    [mounted, sized] = doctor.shm_findings(_shm(size=64 * MIB, free=60 * MIB))
    assert mounted.level == OK
    assert sized.level == WARN
    assert sized.text.startswith("64 MiB, 60 MiB free: small (Docker's default is 64 MB).")
    assert "--shm-size=1g" in sized.text


def test_the_size_threshold_is_one_gib() -> None:
    assert doctor.SHM_SMALL_BYTES == 2**30
    assert doctor.shm_findings(_shm(size=2**30))[1].level == OK
    assert doctor.shm_findings(_shm(size=2**30 - 1))[1].level == WARN


def test_an_almost_full_shm_warns() -> None:
    assert doctor.SHM_LOW_FREE_BYTES == 16 * 2**20
    [_, sized] = doctor.shm_findings(_shm(free=16 * MIB - 1))
    assert sized == Finding(WARN, "/dev/shm", "12.0 GiB, 16 MiB free: almost full; look for leftover segments there")
    assert doctor.shm_findings(_shm(free=16 * MIB))[1].level == OK


def test_auto_picks_shm_when_shared_memory_works() -> None:
    assert doctor.transport_finding(None, has_gloo=False) == Finding(
        OK, "ranks on this host", 'transport="auto" picks shm (shared memory works here)'
    )


def test_auto_falls_back_to_gloo_with_the_reason() -> None:
    error = OSError(errno.ENOSPC, "cannot create a shared-memory segment in /dev/shm: No space left on device")
    assert doctor.transport_finding(error, has_gloo=True) == Finding(
        WARN,
        "ranks on this host",
        'transport="auto" falls back to gloo (timeouts up to 30 s, no lookahead): shared memory fails: '
        "cannot create a shared-memory segment in /dev/shm: No space left on device",
    )


def test_no_shared_memory_and_no_gloo_fails() -> None:
    finding = doctor.transport_finding(OSError("no /dev/shm"), has_gloo=False)
    assert finding == Finding(
        FAIL,
        "ranks on this host",
        "no transport works: shared memory fails (no /dev/shm) and this Paddle has no gloo",
    )


def test_a_gloo_interface_that_exists_is_ok() -> None:
    assert doctor.multi_host_finding(NETWORK) == Finding(
        OK, "ranks on several hosts", "gloo binds to interface eth0 (GLOO_SOCKET_IFNAME)"
    )


def test_a_gloo_interface_that_does_not_exist_fails() -> None:
    finding = doctor.multi_host_finding(NetworkFacts("eth9", ["eth0", "lo"], "box", "10.0.0.5"))
    assert finding == Finding(
        FAIL,
        "ranks on several hosts",
        "GLOO_SOCKET_IFNAME='eth9' names no interface here (have: eth0, lo): gloo cannot bind",
    )


@pytest.mark.parametrize(
    ("address", "says"),
    [
        ("127.0.1.1", "127.0.1.1 (loopback: other hosts cannot reach it)."),
        ("10.0.0.5", "10.0.0.5. Set"),
        (None, "nothing. Set"),
    ],
)
def test_no_gloo_interface_warns_with_what_the_hostname_resolves_to(address: str | None, says: str) -> None:
    finding = doctor.multi_host_finding(NetworkFacts(None, ["eth0", "lo"], "box", address))
    assert (finding.level, finding.topic) == (WARN, "ranks on several hosts")
    assert finding.text.startswith(
        f"GLOO_SOCKET_IFNAME is not set, so gloo binds to the address hostname 'box' resolves to: {says}"
    )
    assert finding.text.endswith(
        "Set GLOO_SOCKET_IFNAME to the interface the hosts reach each other on, on every rank"
    )
    assert ("loopback" in finding.text) is (address == "127.0.1.1")


FUTEX = ("futex", "SYS_futex 202 on x86_64")


def test_a_futex_reader_wait_is_ok_and_says_the_publish_wakes_it() -> None:
    assert doctor.reader_sleep_finding(*FUTEX) == Finding(
        OK,
        "shm reader wait",
        "futex: a reader that waited long is woken by the src's publish (SYS_futex 202 on x86_64)",
    )


def test_capped_sleeps_warn_that_a_value_is_seen_up_to_a_millisecond_late_and_why() -> None:
    finding = doctor.reader_sleep_finding("capped sleep", "no futex syscall number known for 'riscv64'")
    assert finding == Finding(
        WARN,
        "shm reader wait",
        "capped sleep: a reader that waited long sees a value up to about 1 ms late, because futex is unavailable: "
        "no futex syscall number known for 'riscv64'",
    )


def test_no_leftover_segment_is_ok() -> None:
    assert doctor.leftover_finding(NO_LEFTOVERS) == Finding(
        OK, "leftover segments", "none: no fdp_signal_* segment whose creator is gone"
    )


def test_leftover_segments_warn_with_each_creator_and_the_command_that_removes_them() -> None:
    assert doctor.leftover_finding(LeftoverFacts(LEFT, removed=None)) == Finding(
        WARN,
        "leftover segments",
        "2 fdp_signal_* segment(s) whose creator is gone: fdp_signal_aa (process 41 is gone), fdp_signal_bb (process "
        "42 is gone (its pid now belongs to another process)). `fastdeploy-patch doctor --clean` removes them, and "
        "only them",
    )


def test_removed_leftovers_are_ok_and_named() -> None:
    removed = {found.path: None for found in LEFT}
    finding = doctor.leftover_finding(LeftoverFacts(LEFT, removed))
    assert finding.level == OK and finding.text.startswith(
        "removed 2 fdp_signal_* segment(s) whose creator was gone: fdp_signal_aa (process 41 is gone), "
    )


def test_leftovers_that_could_not_be_removed_warn_with_why() -> None:
    removed = {LEFT[0].path: None, LEFT[1].path: "Permission denied"}
    assert doctor.leftover_finding(LeftoverFacts(LEFT, removed)) == Finding(
        WARN,
        "leftover segments",
        "removed 1 of 2 fdp_signal_* segment(s) whose creator was gone; could not remove "
        "/dev/shm/fdp_signal_bb: Permission denied",
    )


def test_remove_leftovers_unlinks_each_and_says_why_one_could_not_be() -> None:
    unlinked: list[str] = []

    def unlink(path: str) -> None:
        unlinked.append(path)
        if path.endswith("bb"):
            raise PermissionError(errno.EPERM, "Operation not permitted")
        if path.endswith("cc"):
            raise FileNotFoundError(errno.ENOENT, "gone meanwhile")

    third = Leftover("/dev/shm/fdp_signal_cc", ProcessIdentity(43, 1, 9), "process 43 is gone")
    assert doctor.remove_leftovers([*LEFT, third], unlink) == {
        LEFT[0].path: None,
        LEFT[1].path: "Operation not permitted",
        third.path: None,
    }
    assert unlinked == [LEFT[0].path, LEFT[1].path, third.path]


def test_leftover_facts_remove_only_with_clean(tmp_path: Path) -> None:
    path = tmp_path / "fdp_signal_dd"
    path.write_bytes(b"")
    found = [Leftover(str(path), ProcessIdentity(44, 1, 9), "process 44 is gone")]
    assert doctor.leftover_facts(lambda: found, clean=False) == LeftoverFacts(found, None)
    assert path.exists()
    assert doctor.leftover_facts(lambda: found, clean=True) == LeftoverFacts(found, {str(path): None})
    assert not path.exists()


def test_diagnose_lists_every_finding_in_report_order() -> None:
    findings = doctor.diagnose(CPU, None, HEALTHY_SHM, None, FUTEX, NETWORK, NO_LEFTOVERS)
    assert [f.topic for f in findings] == [
        "Paddle",
        "GPUs",
        "/dev/shm",
        "/dev/shm",
        "leftover segments",
        "ranks on this host",
        "shm reader wait",
        "ranks on several hosts",
    ]
    assert all(f.level == OK for f in findings)


def test_the_report_ends_with_a_verdict_and_the_exit_code_follows_failures() -> None:
    good = [Finding(OK, "a", "fine"), Finding(WARN, "b", "hmm")]
    assert doctor.format_findings(good) == (
        "[ OK ] a: fine\n[WARN] b: hmm\ndoctor: the signal group can work here (1 warning(s))"
    )
    assert doctor.exit_code(good) == 0
    bad = [*good, Finding(FAIL, "c", "broken")]
    assert doctor.format_findings(bad).splitlines()[-2:] == [
        "[FAIL] c: broken",
        "doctor: the signal group cannot work here (1 failure(s), 1 warning(s))",
    ]
    assert doctor.exit_code(bad) == 1


# --- gathering facts -----------------------------------------------------------------------------------------


def test_paddle_facts_of_a_cpu_build() -> None:
    with (
        mock.patch.object(paddle, "is_compiled_with_cuda", return_value=False),
        mock.patch.object(paddle.device.cuda, "device_count") as count,
        mock.patch("fastdeploy_patch.paddle_internals.has_gloo", return_value=True),
    ):
        assert doctor.paddle_facts() == PaddleFacts(paddle.__version__, cuda=None, has_gloo=True, gpus=0)
    count.assert_not_called()


def test_paddle_facts_of_a_gpu_build() -> None:
    with (
        mock.patch.object(paddle, "is_compiled_with_cuda", return_value=True),
        mock.patch.object(paddle.version, "cuda", return_value="12.6"),
        mock.patch.object(paddle.device.cuda, "device_count", return_value=2),
        mock.patch("fastdeploy_patch.paddle_internals.has_gloo", return_value=False),
    ):
        assert doctor.paddle_facts() == PaddleFacts(paddle.__version__, cuda="12.6", has_gloo=False, gpus=2)


MOUNTS = [
    Mount("/proc", "proc"),
    Mount("/dev/shm", "tmpfs"),
    Mount("/dev/shm", "ext4"),
    Mount("/dev/shm/sub", "tmpfs"),
]


@pytest.mark.parametrize(("path", "fs_type"), [("/dev/shm", "ext4"), ("/proc", "proc"), ("/dev", None)])
def test_mount_type_takes_the_last_mount_exactly_at_the_path(path: str, fs_type: str | None) -> None:
    assert doctor.mount_type(path, MOUNTS) == fs_type


def test_shm_facts_of_a_directory(tmp_path: Path) -> None:
    stat = SimpleNamespace(f_blocks=1000, f_frsize=4096, f_bavail=250)
    facts = doctor.shm_facts(str(tmp_path), lambda: [Mount(str(tmp_path), "tmpfs")], lambda path: stat)
    assert facts == ShmFacts(str(tmp_path), is_dir=True, fs_type="tmpfs", size=4_096_000, free=1_024_000)


def test_shm_facts_of_a_missing_directory(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope")
    facts = doctor.shm_facts(missing, mock.Mock(), mock.Mock())
    assert facts == ShmFacts(missing, is_dir=False, fs_type=None, size=0, free=0)


def test_read_mounts_reads_this_hosts_mount_table_and_gives_nothing_when_unreadable() -> None:
    assert Mount("/proc", "proc") in doctor._read_mounts()
    with mock.patch.object(procfs, "mounts", side_effect=PermissionError(13, "denied")):
        assert doctor._read_mounts() == []


def test_shm_error_returns_what_the_check_raised_or_none() -> None:
    error = OSError(errno.EACCES, "denied")

    def refuse() -> None:
        raise error

    assert doctor.shm_error(refuse) is error
    assert doctor.shm_error(lambda: None) is None


def test_network_facts_read_the_variable_the_interfaces_and_the_hostname() -> None:
    with (
        mock.patch.object(socket, "gethostname", return_value="box"),
        mock.patch.object(socket, "gethostbyname", return_value="127.0.1.1") as resolve,
    ):
        facts = doctor.network_facts({"GLOO_SOCKET_IFNAME": "eth0"}, lambda: ["lo", "eth0"])
    resolve.assert_called_once_with("box")
    assert facts == NetworkFacts("eth0", ["eth0", "lo"], "box", "127.0.1.1")


def test_network_facts_survive_an_unresolvable_hostname_and_no_sysfs() -> None:
    def no_sysfs() -> list[str]:
        raise FileNotFoundError("/sys/class/net")

    with (
        mock.patch.object(socket, "gethostname", return_value="box"),
        mock.patch.object(socket, "gethostbyname", side_effect=socket.gaierror("unknown host")),
    ):
        assert doctor.network_facts({}, no_sysfs) == NetworkFacts(None, [], "box", None)


@pytest.mark.parametrize("clean", [False, True])
def test_run_gathers_this_machines_facts(clean: bool) -> None:
    error = OSError("no")
    leftovers = LeftoverFacts(LEFT, None)
    with (
        mock.patch.object(doctor, "paddle_facts", return_value=CPU),
        mock.patch.object(doctor, "shm_facts", return_value=HEALTHY_SHM) as shm,
        mock.patch.object(doctor, "shm_error", return_value=error) as probe,
        mock.patch.object(doctor, "network_facts", return_value=NETWORK) as network,
        mock.patch.object(doctor, "leftover_facts", return_value=leftovers) as left,
        mock.patch.object(signal_group, "shm_reader_sleep", return_value=("capped sleep", "why")),
        mock.patch.object(shm_diagnostics, "leftover_segments", return_value=LEFT) as scan,
        mock.patch.dict(os.environ, {"CUDA_VISIBLE_DEVICES": "3"}),
        mock.patch.object(os, "listdir", return_value=["lo"]) as listdir,
    ):
        findings = doctor.run(clean=clean) if clean else doctor.run()
        env, list_interfaces = network.call_args.args
        assert env is os.environ and list_interfaces() == ["lo"]
        find, cleaning = left.call_args.args
        assert find() == LEFT and cleaning is clean
    assert findings == doctor.diagnose(CPU, "3", HEALTHY_SHM, error, ("capped sleep", "why"), NETWORK, leftovers)
    assert shm.call_args.args[0] == "/dev/shm" and shm.call_args.args[1:] == (doctor._read_mounts, os.statvfs)
    probe.assert_called_once_with(shm_diagnostics.check_shm_usable)
    listdir.assert_called_once_with("/sys/class/net")
    scan.assert_called_once_with("/dev/shm")


# --- the command ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("level", "code"), [(OK, 0), (WARN, 0), (FAIL, 1)])
def test_the_doctor_command_prints_the_report_and_exits_1_on_a_failure(level: str, code: int, capsys) -> None:
    findings = [Finding(OK, "Paddle", "3.3.1"), Finding(level, "x", "y")]
    with mock.patch.object(doctor, "run", return_value=findings) as run:
        assert cli.main(["doctor"]) == code
    assert capsys.readouterr().out == doctor.format_findings(findings) + "\n"
    run.assert_called_once_with(clean=False)


def test_doctor_clean_asks_for_the_leftovers_to_be_removed(capsys) -> None:
    findings = [Finding(OK, "leftover segments", "removed 1")]
    with mock.patch.object(doctor, "run", return_value=findings) as run:
        assert cli.main(["doctor", "--clean"]) == 0
    run.assert_called_once_with(clean=True)
    assert capsys.readouterr().out == doctor.format_findings(findings) + "\n"
