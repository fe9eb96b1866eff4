from __future__ import annotations

import os

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
pytest.importorskip("keras", reason="the Keras tests need keras (pip install 'ckpt-callbacks[keras]')")
# fake_clock / fake_clock_cls: tests/conftest.py
