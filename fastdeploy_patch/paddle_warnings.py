"""Importing this module silences one Paddle warning: "No ccache found", which ``import paddle`` emits.

It matters only when building C++ extensions, and the ``fastdeploy-patch`` command and every rank import Paddle
through the package, so it would stand in front of all their output. The package imports this module before
Paddle; nothing else is filtered.
"""

from __future__ import annotations

import warnings

CCACHE_WARNING_MODULE = r"paddle\.utils\.cpp_extension\.extension_utils$"

warnings.filterwarnings("ignore", message="No ccache found", category=UserWarning, module=CCACHE_WARNING_MODULE)
