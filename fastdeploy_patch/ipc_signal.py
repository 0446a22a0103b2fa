"""A named shared-memory int32 array, the shape of the engine's IPC signal for the model-weights status."""

from __future__ import annotations

from multiprocessing import resource_tracker, shared_memory

import numpy as np


class StatusSignal:
    """One int32 in named shared memory: the engine (owner) creates it, workers attach to it by name.

    Only the owner unlinks the segment. Attaching never registers it with Python's resource tracker, so a
    worker that exits does not destroy the engine's segment.
    """

    def __init__(self, name: str | None = None, *, create: bool = False, initial: int = 0) -> None:
        if create:
            self._shm = shared_memory.SharedMemory(name=name, create=True, size=np.dtype(np.int32).itemsize)
        else:
            if name is None:
                raise ValueError("name is required to attach to an existing status signal")
            self._shm = shared_memory.SharedMemory(name=name)
            # Python < 3.13 registers attached segments too, and its tracker would unlink them at exit.
            resource_tracker.unregister(self._shm._name, "shared_memory")
        self.owner = create
        self.value = np.ndarray((1,), dtype=np.int32, buffer=self._shm.buf)
        if create:
            self.value[0] = initial

    @property
    def name(self) -> str:
        """The segment name workers attach to."""
        return self._shm.name

    def close(self) -> None:
        """Detach; the owner also unlinks the segment. Safe to call twice."""
        if self._shm is None:
            return
        # The numpy view holds an export of the buffer; drop it or close() raises BufferError.
        del self.value
        self._shm.close()
        if self.owner:
            self._shm.unlink()
        self._shm = None

    def __enter__(self) -> StatusSignal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
