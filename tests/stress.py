"""``tox -e stress [-- --seed N] [-- --suite unit|distributed]``: both suites on a host busier than CI's.

Not part of ``.ci/run``. Each suite runs with more xdist workers than cores (``-n 4`` on 2), its test files in a seeded
shuffled order, while one process spins on a core beside it. A test that only passes on a quiet host, or after
some other file, fails here. The seed is printed, so that a failing order can be run again.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import time
from pathlib import Path

SUITES = {
    "unit": (["tests/unit", "tests/gate", "tests/nopaddle"], ["--timeout=120"]),
    "distributed": (["tests/distributed"], ["--timeout=150", "--dist", "loadfile", "-rs"]),
}
WORKERS = 4


def shuffled_files(dirs: list[str], seed: int) -> list[str]:
    """Every ``test_*.py`` file under ``dirs``, in an order given by ``seed``."""
    files = sorted(str(path) for d in dirs for path in Path(d).rglob("test_*.py"))
    random.Random(seed).shuffle(files)
    return files


def run_suite(name: str, seed: int, extra: list[str]) -> int:
    dirs, options = SUITES[name]
    files = shuffled_files(dirs, seed)
    command = [sys.executable, "-m", "pytest", *files, "-n", str(WORKERS), "-p", "no:cacheprovider", *options, *extra]
    print(f"stress: {name}, seed {seed}, {WORKERS} workers on {os.cpu_count()} cores beside a CPU hog", flush=True)
    # The hog spins for as long as the suite runs; it is killed whatever the suite does.
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    started = time.monotonic()
    try:
        status = subprocess.call(command)
    finally:
        hog.kill()
        hog.wait()
    print(f"stress: {name} exited {status} after {time.monotonic() - started:.0f} s (seed {seed})", flush=True)
    return status


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tox -e stress --", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=None, help="file-order seed (default: a new one, printed)")
    parser.add_argument("--suite", choices=sorted(SUITES), action="append", help="one suite only (repeatable)")
    args, extra = parser.parse_known_args(argv)
    seed = random.randrange(2**32) if args.seed is None else args.seed
    statuses = [run_suite(name, seed, extra) for name in args.suite or ["unit", "distributed"]]
    return next((status for status in statuses if status != 0), 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
