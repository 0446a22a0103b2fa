"""The single place where fastdeploy_patch reaches into Paddle's private API."""

from __future__ import annotations

import functools
from typing import Any

import paddle


@functools.cache
def paddle_private(owner: Any, name: str) -> Any:
    """Return Paddle's private callable ``owner.<name>`` (``owner`` is a Paddle module or class), looked up
    once per pair.

    Raises ``RuntimeError`` naming the installed Paddle version when that version does not have it, so an
    upgrade that moves Paddle's internals fails loudly at first use instead of misbehaving.
    """
    found = getattr(owner, name, None)
    if not callable(found):
        raise RuntimeError(
            f"{getattr(owner, '__name__', owner)}.{name} is missing in the installed Paddle {paddle.__version__}; "
            "fastdeploy_patch relies on it and is tested with Paddle 3.3"
        )
    return found
