"""How a rank the package starts imports Paddle: with the package's warning filter, and, when coverage measures the
rank, outside the measurement.

Under a Python tracer (coverage's on Python 3.11) ``import paddle.distributed`` takes about a third longer: here
2.1-2.4 s of CPU plain, 2.8-3.3 s measured, 2.3-2.4 s with the measurement paused around it. A suite that starts a
hundred ranks pays that a hundred times, and none of those lines is recorded unless the coverage configuration names
Paddle, in which case nothing is paused.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

from fastdeploy_patch.paddle_warnings import silence_ccache_warning

PADDLE_MODULE = "paddle.distributed"


def running_coverage() -> Any | None:
    """The coverage measurement running in this process when its configuration cannot record Paddle's lines (no
    ``source``, ``source_pkgs`` or ``include`` entry mentions Paddle), else None. Imports nothing: a process that
    coverage does not measure has not loaded it."""
    coverage = sys.modules.get("coverage")
    current = getattr(getattr(coverage, "Coverage", None), "current", None)
    cov = current() if current is not None else None
    if cov is None:
        return None
    config = cov.config
    named = [*(config.source or ()), *(config.source_pkgs or ()), *(config.run_include or ())]
    if any("paddle" in entry.lower() for entry in named):
        return None
    return cov


def import_paddle(load: Callable[[str], ModuleType] = importlib.import_module) -> ModuleType:
    """Import ``paddle.distributed`` (through ``load``) after silencing Paddle's ccache hint, with any coverage
    measurement that ``running_coverage`` returns stopped for the import and started again after it, also when the
    import fails. Returns the module."""
    silence_ccache_warning()
    cov = running_coverage()
    if cov is None:
        return load(PADDLE_MODULE)
    cov.stop()
    try:
        return load(PADDLE_MODULE)
    finally:
        cov.start()
