"""PyTorch Lightning integration: ``CheckpointCallback`` and ``FsspecCheckpointIO``.

Example:
    >>> from ckpt_callbacks.lightning import CheckpointCallback, FsspecCheckpointIO
    >>> trainer = Trainer(callbacks=[CheckpointCallback("s3://bucket/run", save_every_n_steps=100)])
    >>> trainer.fit(model)                                   # resumes from the newest valid checkpoint
    >>> trainer = Trainer(plugins=[FsspecCheckpointIO()])    # Lightning's ModelCheckpoint, our format
"""

from __future__ import annotations

try:
    import lightning  # noqa: F401
    import torch  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        f"ckpt_callbacks.lightning needs PyTorch Lightning and torch ({e}). "
        "Install them with: pip install 'ckpt-callbacks[lightning]'"
    ) from e

from ._callback import CheckpointCallback
from ._io import FsspecCheckpointIO

__all__ = ["CheckpointCallback", "FsspecCheckpointIO"]
