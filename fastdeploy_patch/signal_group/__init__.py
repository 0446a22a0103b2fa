"""The signal group: every rank of a worker learns the model-weights status that rank ``src`` read, every step.

Why each transport exists. **Shared memory** (``shm_transport``) is the fast path on one host: a published value
is one 8-byte store into a ring that every rank maps, about a microsecond a step and no collective, so ranks
need not run in lockstep (``lookahead``) and a timeout can be as long as a slow weight reload. **gloo**
(``gloo_transport``) carries the signal between hosts, where no memory is shared, as a CPU int32 tensor on a
gloo group; Paddle's global TCP store is also where every rank agrees which transport a group uses
(``rendezvous``). **NCCL** never carries the signal: on the default GPU group each step would launch a kernel
and copy device to host, which waits for all queued GPU work.

Modules: ``group`` (the public API), ``arguments`` (checks before any communication), ``creation`` (one creation's
deadline, store calls and failure markers), ``rendezvous`` (the handshakes over the global store), ``gloo_ports``
(the port of a gloo group's own store, held until Paddle binds it), ``shm_transport`` (the ring protocol),
``shm_layout`` (where each word of the segment lives), ``shm_segment`` (the segment's lifetime: create, attach,
unlink, close), ``gloo_transport``, ``waiting`` (the one wait loop), ``futex`` (its sleep on Linux), ``liveness``
(is a peer process alive), ``store_sockets`` (Nagle off on a store's connections), ``errors``.
``shm_diagnostics`` (can shared memory work here, which segments were left behind) serves ``fastdeploy-patch
doctor`` and the test harness, which import it by its own name; the group never calls it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from fastdeploy_patch.signal_group.arguments import (
    GLOO_OP_TIMEOUT_S,
    INT32_MAX,
    INT32_MIN,
    MAX_LOOKAHEAD,
    MAX_TIMEOUT_S,
    TRANSPORTS,
)
from fastdeploy_patch.signal_group.errors import SignalGroupError
from fastdeploy_patch.signal_group.futex import available as futex_support
from fastdeploy_patch.signal_group.shm_layout import SHM_RING_SLOTS
from fastdeploy_patch.signal_group.shm_segment import SEGMENT_PREFIX, SEGMENT_TAG_ENV, SHM_DIR
from fastdeploy_patch.signal_group.store_sockets import store_without_delay
from fastdeploy_patch.signal_group.waiting import shm_reader_sleep

# The names above import no Paddle, so a command can check its arguments against the limits without waiting for
# `import paddle` (over a second); these import it, on first use.
_NEED_PADDLE = {
    "RENDEZVOUS_TIMEOUT_S": "rendezvous",
    "SignalGroup": "group",
    "broadcast_signal": "group",
    "new_signal_group": "group",
}

if TYPE_CHECKING:
    from fastdeploy_patch.signal_group.group import SignalGroup, broadcast_signal, new_signal_group
    from fastdeploy_patch.signal_group.rendezvous import RENDEZVOUS_TIMEOUT_S


def __getattr__(name: str) -> Any:
    """The public names that need Paddle, imported from their module on first use."""
    module = _NEED_PADDLE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


__all__ = [
    "GLOO_OP_TIMEOUT_S",
    "INT32_MAX",
    "INT32_MIN",
    "MAX_LOOKAHEAD",
    "MAX_TIMEOUT_S",
    "RENDEZVOUS_TIMEOUT_S",
    "SEGMENT_PREFIX",
    "SEGMENT_TAG_ENV",
    "SHM_DIR",
    "SHM_RING_SLOTS",
    "TRANSPORTS",
    "SignalGroup",
    "SignalGroupError",
    "broadcast_signal",
    "futex_support",
    "new_signal_group",
    "shm_reader_sleep",
    "store_without_delay",
]
