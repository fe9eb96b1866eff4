from __future__ import annotations

import os

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
pytest.importorskip("keras", reason="the Keras tests need keras (pip install 'ckpt-callbacks[keras]')")

from keras_helpers import FakeClock  # noqa: E402


@pytest.fixture
def fake_clock() -> FakeClock:
    return FakeClock()
