"""One Paddle warning the package's own processes silence: "No ccache found", which ``import paddle`` emits.

It matters only when building C++ extensions, yet it would stand in front of all the output of the
``fastdeploy-patch`` command and of every rank the package starts. Only those processes, which this package owns,
call ``silence_ccache_warning()``, before they import Paddle; importing the package changes no warning filter, so
a library user keeps every warning.
"""

from __future__ import annotations

import warnings

CCACHE_WARNING_MODULE = r"paddle\.utils\.cpp_extension\.extension_utils$"
CCACHE_WARNING_MESSAGE = "No ccache found"


def silence_ccache_warning() -> None:
    """Hide Paddle's ccache hint from now on in this process, and nothing else: another message from that module,
    another module or another category still shows. Calling it twice installs one filter."""
    warnings.filterwarnings(
        "ignore", message=CCACHE_WARNING_MESSAGE, category=UserWarning, module=CCACHE_WARNING_MODULE
    )
