"""How call arguments and results cross between the test process and the ranks: pickles (protocol 5), so tuples,
dicts with any keys, sets, bytes, numpy arrays and any other picklable object arrive as they left."""

from __future__ import annotations

import io
import pickle
import sys
from typing import Any

PROTOCOL = 5


class _Pickler(pickle.Pickler):
    def reducer_override(self, obj: object) -> Any:
        paddle = sys.modules.get("paddle")
        if paddle is not None and isinstance(obj, paddle.Tensor):
            # Unpickling one would import Paddle (seconds) into the test process, which never imports it.
            raise TypeError("a paddle.Tensor does not cross to the test process: return tensor.numpy() instead")
        return NotImplemented


def dumps(value: object, who: str) -> bytes:
    """``value`` pickled; ``TypeError`` naming ``who`` (the side that pickles it, and what it is) and the value's type
    when it cannot be."""
    buffer = io.BytesIO()
    try:
        _Pickler(buffer, protocol=PROTOCOL).dump(value)
    except Exception as exc:  # noqa: BLE001 - pickle raises many types (TypeError, PicklingError, AttributeError...)
        raise TypeError(
            f"{who}: a {type(value).__name__} that cannot be pickled ({type(exc).__name__}: {exc})"
        ) from None
    return buffer.getvalue()


def loads(data: bytes) -> Any:
    """What ``dumps`` pickled."""
    return pickle.loads(data)
