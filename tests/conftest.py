"""Fixtures and fakes shared by every test directory (keras/ and lightning/ included).

Test modules take them as fixtures (``fake_clock``); a module that needs the class itself gets it
as ``type(fake_clock)`` or from ``fake_clock_cls``. (The conformance suite keeps a copy of its own:
integration/ imports it too, where this file is not on the path.)
"""

from __future__ import annotations

import pytest
from fakes import T0, FakeClock  # noqa: F401 - T0: re-exported for the tests' clocks
from storage_reads import StorageReads, count_reads


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
