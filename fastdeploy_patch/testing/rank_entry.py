"""What each rank started by ``fastdeploy_patch.testing.launcher`` runs, through ``launcher.RANK_BOOTSTRAP``."""

from __future__ import annotations

import importlib
import json
import os
import signal
import sys
import traceback
from pathlib import Path

from fastdeploy_patch.paddle_warnings import silence_ccache_warning
from fastdeploy_patch.testing import rank_calls


def main(argv: list[str]) -> int:
    """Join the distributed world (when it has more than one rank), run the spec's target, and write its JSON
    result. Returns the exit code: 0, or 1 after printing the target's traceback."""
    # The rank is the package's own process: Paddle's ccache hint, printed on import, would open every rank log.
    silence_ccache_warning()
    spec_path, result_path = argv
    spec = json.loads(Path(spec_path).read_text())
    module_name, func_name = spec["target"].split(":", 1)
    try:
        if int(os.environ.get("PADDLE_TRAINERS_NUM", "1")) > 1:
            import paddle.distributed as dist

            dist.init_parallel_env()
        target = getattr(importlib.import_module(module_name), func_name)
        # `import paddle` replaces the Python-level SIGTERM handler (coverage's, when measuring) with a C++
        # one; putting it back lets a rank killed by the launcher still save its coverage data.
        signal.signal(signal.SIGTERM, signal.getsignal(signal.SIGTERM))
        rank_calls.set_reply_delivery(lambda result, code: write_result(result_path, result))
        result = target(**spec["kwargs"])
    except BaseException:  # noqa: BLE001 - any failure, SystemExit included, is reported to the launcher
        traceback.print_exc()
        sys.stderr.flush()
        return 1
    finally:
        rank_calls.set_reply_delivery(None)
    write_result(result_path, result)
    return 0


def write_result(result_path: str, result: object) -> None:
    """Write ``result`` as JSON to ``result_path`` in one step: the launcher never reads half a file."""
    tmp = Path(result_path + ".tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(result_path)
