"""The ``pl`` fixture: each test that takes it runs under both Lightning package names."""

from __future__ import annotations

import importlib

import pytest

NAMESPACES = {"lightning": "lightning.pytorch", "pytorch_lightning": "pytorch_lightning"}


@pytest.fixture(params=list(NAMESPACES))
def pl(request):
    """``lightning.pytorch`` or ``pytorch_lightning`` (skipped with a reason where not installed)."""
    try:
        return importlib.import_module(NAMESPACES[request.param])
    except ImportError as e:
        pytest.skip(f"{request.param} is not installed ({e})")
