"""Fixtures and fakes shared by every test directory (keras/ and lightning/ included).

Test modules take them as fixtures (``fake_clock``); a module that needs the class itself gets it
as ``type(fake_clock)`` or from ``fake_clock_cls``. (The conformance suite keeps a copy of its own:
integration/ imports it too, where this file is not on the path.)
"""

from __future__ import annotations

import pytest
from storage_reads import StorageReads, count_reads

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


@pytest.fixture
def fake_clock() -> FakeClock:
    """A FakeClock at :data:`T0`."""
    return FakeClock()


@pytest.fixture
def fake_clock_cls() -> type[FakeClock]:
    """The FakeClock class, for tests that need several clocks or another start time."""
    return FakeClock


@pytest.fixture
def storage_reads(monkeypatch) -> StorageReads:
    """Counts reads of checkpoint files from now on (:class:`storage_reads.StorageReads`), for tests
    that a restore reads each byte once."""
    return count_reads(monkeypatch.setattr)
