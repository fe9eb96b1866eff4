"""Test doubles and tables shared by every test directory and the cloud integration tests (a uniquely
named module: tests import it rather than ``conftest``, which pytest imports per directory)."""

from __future__ import annotations

import ml_dtypes
import numpy as np

T0 = 1_764_086_400.0  # an arbitrary fixed epoch for injected clocks


class FakeClock:
    """An injectable clock: time passes only when a test says so (``clock.now += 60`` or
    ``clock.advance(60)``); ``t`` is the same reading under its older name."""

    def __init__(self, now: float = T0) -> None:
        self.now = float(now)

    def __call__(self) -> float:
        return self.now

    @property
    def t(self) -> float:
        return self.now

    @t.setter
    def t(self, value: float) -> None:
        self.now = float(value)

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


# Every numeric dtype the format stores.
NUMERIC_DTYPES = [
    np.bool_,
    np.uint8,
    np.int8,
    np.uint16,
    np.int16,
    np.uint32,
    np.int32,
    np.uint64,
    np.int64,
    np.float16,
    np.float32,
    np.float64,
    np.complex64,
    np.complex128,
    ml_dtypes.bfloat16,
    ml_dtypes.float8_e4m3fn,
    ml_dtypes.float8_e5m2,
    ml_dtypes.float8_e4m3fnuz,
    ml_dtypes.float8_e5m2fnuz,
    ml_dtypes.int4,
]
