"""Crash-safe, pickle-free, cloud-native checkpoints for Keras 3 and PyTorch Lightning.

The core is framework-free: ``import ckpt_callbacks`` imports no framework and no cloud backend.
Framework callbacks live in ``ckpt_callbacks.keras`` and ``ckpt_callbacks.lightning``; errors in
``ckpt_callbacks.errors``. Directories are local paths or any fsspec URL (``s3://``, ``gs://``, ...).

- ``CheckpointManager``: numbered saves into a directory with TensorFlow-style retention
  (``max_to_keep``, ``keep_checkpoint_every_n_hours``) plus ``keep_best``, optionally asynchronous,
  and ``restore()`` of the newest valid checkpoint.
- ``save_checkpoint`` / ``load_checkpoint`` / ``list_variables``: one checkpoint, without a manager.
- ``get_checkpoint_state`` / ``latest_checkpoint``: the directory's ``checkpoint`` state file, as
  ``tf.train.get_checkpoint_state`` / ``tf.train.latest_checkpoint`` read it.

Example:
    >>> import numpy as np
    >>> from ckpt_callbacks import CheckpointManager, load_checkpoint
    >>> with CheckpointManager("runs/a", max_to_keep=3) as mgr:
    ...     path = mgr.save({"w": np.zeros(4)}, step=100, metrics={"loss": 0.5})  # .../runs/a/ckpt-100
    >>> load_checkpoint("runs/a")["w"]
    array([0., 0., 0., 0.])

The ``ckpt-callbacks`` command lists, inspects, verifies, cleans and exports checkpoints
(``ckpt-callbacks --help``).
"""

__version__ = "0.1.0"

from ._api._resolve import (
    get_checkpoint_state,
    latest_checkpoint,
    list_variables,
    load_checkpoint,
    save_checkpoint,
)
from ._manager._manager import CheckpointManager
from ._manager._state import CheckpointState
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
