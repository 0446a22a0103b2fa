"""The single place where fastdeploy_patch reaches into Paddle's private API.

The rule: no other module of the package touches a Paddle name that starts with an underscore, or anything in
``paddle.base.core`` (the C++ binding, which has no compatibility promise). They call the functions here, or
``paddle_private`` for a private method that only one caller uses. Public Paddle API (``paddle.distributed.*``
without a leading underscore, ``paddle.full``...) is used directly wherever it is needed. Grepping for
``core.`` or ``._`` on a Paddle object outside this file must find nothing.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import paddle
from paddle.base import core
from paddle.distributed import collective


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


def has_gloo() -> bool:
    """Whether this Paddle build has the gloo process group (the official CPU and GPU wheels do)."""
    return hasattr(core, "ProcessGroupGloo")


def global_store() -> Any:
    """Paddle's global TCP store, made by ``init_parallel_env()``: ``set(key, str)`` and a blocking ``get(key)``
    that returns the value as a list of byte values."""
    return paddle_private(core, "create_or_get_global_tcp_store")()


def open_tcp_store(host: str, port: int, *, is_master: bool, num_workers: int, timeout_s: int) -> Any:
    """A new TCP store on ``host:port``; the master serves it, the others connect to it."""
    return core.TCPStore(host, port, is_master, num_workers, timeout_s)


@contextlib.contextmanager
def default_store_lent(store: Any) -> Iterator[None]:
    """Make ``store`` Paddle's default store for the ``with`` body, then put the global store back (also on error).

    ``paddle.distributed.new_group`` has no store argument: it always rendezvouses on the default store.
    """
    set_default_store = paddle_private(collective, "_set_default_store")
    set_default_store(store)
    try:
        yield
    finally:
        set_default_store(global_store())
