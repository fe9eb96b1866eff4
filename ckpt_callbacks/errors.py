"""The exception tree of ckpt_callbacks.

Every class also subclasses the builtin a caller would already catch::

    CheckpointError(Exception)
    ├── CheckpointNotFoundError(CheckpointError, FileNotFoundError)
    ├── CorruptCheckpointError(CheckpointError, ValueError)      # checksum / header / offsets / truncated
    ├── IncompatibleCheckpointError(CheckpointError, ValueError)  # names, shapes or dtypes don't fit; newer format
    └── CheckpointWriteError(CheckpointError, OSError)            # disk full, permission, network

A failed save never removes the previous checkpoint: after ``CheckpointWriteError`` the
``checkpoint`` state file still names the last good one.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "CheckpointNotFoundError",
    "CheckpointWriteError",
    "CorruptCheckpointError",
    "IncompatibleCheckpointError",
]


class CheckpointError(Exception):
    """Base class of every error this library raises on purpose."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No checkpoint (or no file of one) exists at the given path."""


class CorruptCheckpointError(CheckpointError, ValueError):
    """A checkpoint's files exist but fail validation: checksum, header, offsets, truncation."""


class IncompatibleCheckpointError(CheckpointError, ValueError):
    """A valid checkpoint that does not fit the target (names, shapes, dtypes, format version)."""


class CheckpointWriteError(CheckpointError, OSError):
    """Writing a checkpoint failed (disk full, permission, network); the previous one is intact."""
