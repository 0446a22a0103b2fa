"""The whole RL control cycle on real ranks: the test process plays the engine and flips the shared-memory
status NORMAL -> CLEARING -> (CLEARED) -> UPDATING -> NORMAL while the workers run their event loop, on both
transports and with lookahead (a status then takes effect that many steps after rank 0 read it, on every rank
at the same step)."""

from __future__ import annotations

import math
import threading
import time

import pytest

from fastdeploy_patch.ipc_signal import StatusSignal
from fastdeploy_patch.status import ModelWeightsStatus
from fastdeploy_patch.testing.plugin import PaddleRanks
from tests.distributed import rank_fns
from tests.distributed.conftest import new_status_signal

STEP_INTERVAL_S = 0.005
MAX_STEPS = 6000
TAIL_STEPS = 5
SETTLE_STEPS = 3
DRIVER_WAIT_S = 60.0


class Driver(threading.Thread):
    """The engine: waits until the workers run, writes CLEARING, waits for rank 0's CLEARED, lets the workers run a
    few CLEARED steps, writes UPDATING, waits for NORMAL. ``progress`` is rank 0's step count, so every wait is in
    worker steps.

    The first wait has no deadline of its own: it may include the start of the pool's ranks (14 s seen for 4 ranks on
    a busy host, where 60 s was its bound); the call's own timeouts bound it, and the test stops the driver once the
    call is over. Each later wait starts with the workers running, and ``DRIVER_WAIT_S`` guards it against a hang."""

    def __init__(self, status: StatusSignal, progress: StatusSignal) -> None:
        super().__init__(name="engine-driver", daemon=True)
        self.status, self.progress = status, progress
        self.stop = threading.Event()
        self.seen: list[tuple[str, int]] = []
        self.error: str | None = None

    def _until(self, what: str, condition, wait_s: float = DRIVER_WAIT_S) -> None:
        deadline = time.monotonic() + wait_s
        while not condition():
            if self.stop.is_set():
                raise TimeoutError(f"driver stopped while waiting for {what}: the ranks are gone")
            if time.monotonic() > deadline:
                raise TimeoutError(f"driver waited {wait_s:g} s for {what}")
            time.sleep(0.001)
        self.seen.append((what, int(self.progress.value[0])))

    def _write(self, status: ModelWeightsStatus) -> None:
        self.status.value[0] = status

    def run(self) -> None:
        try:
            self._until("workers running", lambda: self.progress.value[0] >= SETTLE_STEPS, wait_s=math.inf)
            self._write(ModelWeightsStatus.CLEARING)
            self._until("CLEARED", lambda: self.status.value[0] == ModelWeightsStatus.CLEARED)
            cleared_at = int(self.progress.value[0])
            self._until("CLEARED steps", lambda: self.progress.value[0] >= cleared_at + SETTLE_STEPS)
            self._write(ModelWeightsStatus.UPDATING)
            self._until("NORMAL", lambda: self.status.value[0] == ModelWeightsStatus.NORMAL)
        except TimeoutError as exc:
            self.error = str(exc)


CASES = [(2, "gloo", 0), (4, "gloo", 0), (2, "shm", 0), (4, "shm", 0), (2, "shm", 4), (4, "shm", 4)]


@pytest.mark.parametrize(
    ("nranks", "transport", "lookahead"), CASES, ids=[f"{n}ranks-{t}-lookahead{d}" for n, t, d in CASES]
)
def test_every_rank_sees_each_transition_at_the_same_step_and_params_come_back(
    paddle_ranks: PaddleRanks, nranks: int, transport: str, lookahead: int
) -> None:
    with new_status_signal() as status, new_status_signal() as progress:
        driver = Driver(status, progress)
        driver.start()
        try:
            reports = paddle_ranks.run(
                rank_fns.rl_cycle,
                nranks,
                kwargs={
                    "status_name": status.name,
                    "progress_name": progress.name,
                    "step_interval": STEP_INTERVAL_S,
                    "max_steps": MAX_STEPS,
                    "tail": TAIL_STEPS,
                    "transport": transport,
                    "lookahead": lookahead,
                },
            )
        finally:
            # The ranks are gone: a wait whose condition is not met yet never will be (each condition, once met,
            # stays met, so a driver that only lags behind still sees it).
            driver.stop.set()
            driver.join(DRIVER_WAIT_S)
        final_status = int(status.value[0])
    assert driver.error is None, driver.error
    assert [what for what, _ in driver.seen] == ["workers running", "CLEARED", "CLEARED steps", "NORMAL"]
    assert final_status == ModelWeightsStatus.NORMAL

    transitions = reports[0]["transitions"]
    assert [status for _, status in transitions] == [
        ModelWeightsStatus.CLEARING,
        ModelWeightsStatus.CLEARED,
        ModelWeightsStatus.UPDATING,
        ModelWeightsStatus.NORMAL,
    ]
    (cleared_step, _), (cleared_seen, _), (update_step, _), (normal_step, _) = transitions
    # Rank 0 publishes CLEARED (NORMAL) the step after the clear (update) ran; it takes effect lookahead steps
    # later.
    assert cleared_seen == cleared_step + 1 + lookahead and normal_step == update_step + 1 + lookahead
    assert update_step - cleared_seen >= SETTLE_STEPS - 1
    for report in reports:
        rank = report["rank"]
        assert (report["transport"], report["lookahead"]) == (transport, lookahead)
        assert report["transitions"] == transitions, f"rank {rank} saw the transitions at other steps"
        assert report["steps"] == normal_step + TAIL_STEPS
        n_params = len(report["checksums_before"])
        assert report["initialized_after_clear"] == [False] * n_params, f"rank {rank} kept its parameters"
        assert report["released"] == n_params and report["restored"] == n_params
        assert report["checksums_after"] == report["checksums_before"], f"rank {rank} reloaded other values"
        assert report["manager_status"] == ModelWeightsStatus.NORMAL
        # A forward pass on every NORMAL step, none while clearing, cleared or updating.
        assert report["forward_passes"] == report["steps"] - (normal_step - cleared_step)
    # Each rank seeds its own model: identical checksums across ranks would hide a cross-rank mix-up.
    assert len({str(r["checksums_before"]) for r in reports}) == nranks
