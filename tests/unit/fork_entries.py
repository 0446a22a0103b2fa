"""What the warm parent's unit tests fork: entries with ``main(argv)`` that need no Paddle, and warm-ups that stand
in for ``import paddle``. Kept out of ``conftest``: the warm parent imports this module."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time


def trivial() -> int:
    """The least a rank call can do (``tests/fresh_worlds.py`` times it)."""
    return 1


def warm_up() -> None:
    """Nothing: the tests' parent imports no Paddle."""


def warm_up_with_a_thread() -> None:
    """Leave a thread running, as an import that starts BLAS threads would."""
    threading.Thread(target=time.sleep, args=(600,), daemon=True).start()


def main(argv: list[str]) -> int:
    """``argv[0]`` says what to do: ``report FD`` writes what the rank sees to descriptor FD and returns 0;
    ``exit N`` returns N; ``signal`` kills itself with SIGTERM; ``sleep`` sleeps; ``print TEXT`` prints TEXT."""
    what = argv[0]
    if what == "report":
        seen = {
            "pid": os.getpid(),
            "sid": os.getsid(0),
            "ppid": os.getppid(),
            "cwd": os.getcwd(),
            "env": os.environ.get("FDP_TEST_VALUE"),
            "argv": sys.argv[1:],
        }
        with os.fdopen(int(argv[1]), "w") as out:
            out.write(repr(seen))
        return 0
    if what == "exit":
        return int(argv[1])
    if what == "signal":
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(60)
    if what == "print":
        print(argv[1], flush=True)
        return 0
    time.sleep(600)
    return 0
