"""Keras 3 integration: ``CheckpointCallback`` for ``model.fit``, ``restore``, ``load_model``.

Works on every installed Keras 3 backend. ``ResumableDataset`` is the data-position mechanism for an
exact mid-epoch resume (see docs/keras.md).
"""

from __future__ import annotations

try:
    import keras  # noqa: F401
except ModuleNotFoundError as e:  # pragma: no cover - depends on the environment
    raise ModuleNotFoundError(
        "ckpt_callbacks.keras needs Keras 3. Install it with: pip install 'ckpt-callbacks[keras]'"
    ) from e

from ._callback import CheckpointCallback
from ._data import ResumableDataset
from ._restore import load_model, restore

__all__ = ["CheckpointCallback", "ResumableDataset", "load_model", "restore"]
