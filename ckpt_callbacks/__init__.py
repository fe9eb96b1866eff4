"""Crash-safe, pickle-free, cloud-native checkpoints for Keras 3 and PyTorch Lightning.

The core is framework-free: ``import ckpt_callbacks`` imports no framework and no cloud backend.
Framework callbacks live in ``ckpt_callbacks.keras`` and ``ckpt_callbacks.lightning``.
"""

__version__ = "0.1.0"

from ._manager import (
    CheckpointManager,
    get_checkpoint_state,
    latest_checkpoint,
    list_variables,
    load_checkpoint,
    save_checkpoint,
)
from ._state import CheckpointState
from .errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointWriteError,
    CorruptCheckpointError,
    IncompatibleCheckpointError,
)

__all__ = [
    "CheckpointError",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "CheckpointState",
    "CheckpointWriteError",
    "CorruptCheckpointError",
    "IncompatibleCheckpointError",
    "get_checkpoint_state",
    "latest_checkpoint",
    "list_variables",
    "load_checkpoint",
    "save_checkpoint",
]
