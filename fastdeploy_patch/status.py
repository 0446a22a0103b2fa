"""The model-weights status values the engine and the workers exchange."""

from __future__ import annotations

import enum


class ModelWeightsStatus(enum.IntEnum):
    """Model-weights status, as the engine writes it into its shared-memory int32 signal."""

    NORMAL = 0
    UPDATING = 1
    CLEARING = -1
    CLEARED = -2
