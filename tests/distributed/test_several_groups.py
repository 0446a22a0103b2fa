"""Several signal groups in one process, at 3 and 4 ranks, where gloo groups sharing Paddle's global store used to
collide: each group has its own rendezvous keys and delivers only its own values, on gloo and on ``auto`` (which
picks shared memory for ranks on one host)."""

from __future__ import annotations

import pytest

from fastdeploy_patch.testing.plugin import PaddleRanks
from tests.distributed import rank_fns

ROUNDS = 3


@pytest.mark.parametrize(("nranks", "transport"), [(3, "gloo"), (4, "gloo"), (3, "auto"), (4, "auto")])
def test_several_signal_groups_repeatedly_each_deliver_their_own_values(
    paddle_ranks: PaddleRanks, nranks: int, transport: str
) -> None:
    reports = paddle_ranks.run(rank_fns.several_groups, nranks, kwargs={"rounds": ROUNDS, "transport": transport})

    world = list(range(nranks))
    layouts = [world, world, list(range(1, nranks)), [nranks - 1, 0], list(range(nranks - 2, nranks))]
    for report in reports:
        rank = report["rank"]
        # Only gloo signal groups are Paddle groups.
        assert report["registry_grew_by"] == (ROUNDS * len(layouts) if transport == "gloo" else 0), f"rank {rank}"
        assert len(report["rounds"]) == ROUNDS
        for round_, seen in enumerate(report["rounds"]):
            assert seen["members"] == layouts
            assert seen["transports"] == ["gloo" if transport == "gloo" else "shm"] * len(layouts)
            for index, members in enumerate(layouts):
                got = seen["received"][index]
                if rank in members:
                    expected = [100_000 * round_ + 100 * index + src for src in (max(members), min(members))]
                    assert got == expected, f"rank {rank}, round {round_}, group {index} ({members})"
                else:
                    assert got == {
                        "type": "ValueError",
                        "message": f"this process (rank {rank}) is not a member of the signal group "
                        f"(ranks {sorted(members)})",
                    }
