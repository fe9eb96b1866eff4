"""The exception tree of ckpt_callbacks.

Every class also subclasses the builtin a caller would already catch::

    CheckpointError(Exception)
    ├── CheckpointNotFoundError(CheckpointError, FileNotFoundError)
    ├── CorruptCheckpointError(CheckpointError, ValueError)      # checksum / header / offsets / truncated
    ├── IncompatibleCheckpointError(CheckpointError, ValueError)  # names, shapes or dtypes don't fit; newer format
    │   └── PickleRefusedError(IncompatibleCheckpointError, TypeError)  # a pickled leaf, no allow_pickle
    └── CheckpointWriteError(CheckpointError, OSError)            # disk full, permission, network

Two more are not checkpoint errors (nothing is wrong with a checkpoint)::

    ArgumentTypeError(TypeError, ValueError)      # a constructor argument of the wrong type
    UnsupportedStorageLibraryError(RuntimeError)  # the installed s3fs / gcsfs / aiohttp lacks an
                                                  # internal our writers rely on

``ArgumentTypeError`` is a ``ValueError`` too, for callers that catch bad arguments by that.

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


class PickleRefusedError(IncompatibleCheckpointError, TypeError):
    """A valid checkpoint holding a pickled leaf, loaded without ``allow_pickle=True``.

    Not corruption (its checksums match), so ``restore()`` does not skip it for an older one; a
    ``TypeError`` too, like the refusal to save such a leaf without the opt-in.
    """


class ArgumentTypeError(TypeError, ValueError):
    """A constructor argument of the wrong type."""


class UnsupportedStorageLibraryError(RuntimeError):
    """The installed s3fs / gcsfs / aiohttp lacks an internal our writers rely on.

    Raised instead of falling back to the library's own writer; the message names the installed
    version and the supported range (the ``s3`` / ``gcs`` extras).
    """
