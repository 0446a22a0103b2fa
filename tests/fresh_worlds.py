"""Not part of any suite: what a trivial 2-rank call costs on a fresh world (forked from the warm parent), on a reused
pool, and what one ``import paddle.distributed`` costs in a new interpreter, in alternating runs.

``python -m tests.fresh_worlds [--runs N]`` from the repository root prints each run and the medians. Run it with
coverage off: a measured rank pays for its tracer.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

from fastdeploy_patch.testing.rank_pool import RankPools
from tests.unit.fork_entries import trivial


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="alternating runs of each (default 7)")
    args = parser.parse_args(argv)
    pools = RankPools()
    times: dict[str, list[float]] = {"import paddle.distributed": [], "fresh world": [], "reused pool": []}
    try:
        # The warm parent and the reused pool start once, as in a suite: what is timed is a call.
        pools.run(trivial, 2, timeout=120, fresh=True)
        pools.run(trivial, 2, timeout=120)
        for run in range(args.runs):
            started = time.perf_counter()
            subprocess.run([sys.executable, "-c", "import paddle.distributed"], check=True, capture_output=True)
            times["import paddle.distributed"].append(time.perf_counter() - started)
            started = time.perf_counter()
            pools.run(trivial, 2, timeout=120, fresh=True)
            times["fresh world"].append(time.perf_counter() - started)
            started = time.perf_counter()
            pools.run(trivial, 2, timeout=120)
            times["reused pool"].append(time.perf_counter() - started)
            print(f"run {run}: " + ", ".join(f"{name} {spent[-1]:.3f} s" for name, spent in times.items()), flush=True)
    finally:
        pools.close()
    medians = {name: statistics.median(spent) for name, spent in times.items()}
    for name, median in medians.items():
        print(f"median {name}: {median:.3f} s")
    print(f"fresh world / import: {medians['fresh world'] / medians['import paddle.distributed']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
