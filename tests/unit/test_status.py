"""ModelWeightsStatus: the int32 values the engine and every worker agree on."""

from __future__ import annotations

import enum

import numpy as np
import pytest

from fastdeploy_patch import ModelWeightsStatus


def test_the_values_are_the_engines() -> None:
    assert {status.name: int(status) for status in ModelWeightsStatus} == {
        "NORMAL": 0,
        "UPDATING": 1,
        "CLEARING": -1,
        "CLEARED": -2,
    }


def test_a_status_is_an_int_that_round_trips_through_int32() -> None:
    assert issubclass(ModelWeightsStatus, enum.IntEnum)
    raw = np.array([ModelWeightsStatus.CLEARED], dtype=np.int32)
    assert ModelWeightsStatus(int(raw[0])) is ModelWeightsStatus.CLEARED
    assert ModelWeightsStatus.UPDATING == 1


def test_an_unknown_value_is_refused() -> None:
    with pytest.raises(ValueError, match="7 is not a valid ModelWeightsStatus"):
        ModelWeightsStatus(7)
