"""PyTorch Lightning integration: ``CheckpointCallback``, ``ModelCheckpoint``, ``FsspecCheckpointIO``,
``load_from_checkpoint``.

Works with both package names, ``lightning`` (``lightning.pytorch``) and ``pytorch_lightning``:
a callback or plugin is bound to the Lightning package(s) imported when it is created.

Example:
    >>> from ckpt_callbacks.lightning import CheckpointCallback, FsspecCheckpointIO, load_from_checkpoint
    >>> trainer = Trainer(callbacks=[CheckpointCallback("s3://bucket/run", save_every_n_steps=100)])
    >>> trainer.fit(model)                                   # resumes from the newest valid checkpoint
    >>> trainer = Trainer(plugins=[FsspecCheckpointIO()])    # Lightning's ModelCheckpoint, our format
    >>> from ckpt_callbacks.lightning import ModelCheckpoint  # or the drop-in: only the import changes
    >>> model = load_from_checkpoint(MyModule, "s3://bucket/run")  # MyModule.load_from_checkpoint's semantics
"""

from __future__ import annotations

import importlib.util

if importlib.util.find_spec("torch") is None or not any(
    importlib.util.find_spec(ns) is not None for ns in ("lightning", "pytorch_lightning")
):  # pragma: no cover - depends on the environment
    raise ImportError(
        "ckpt_callbacks.lightning needs torch and PyTorch Lightning ('lightning' or 'pytorch_lightning'). "
        "Install them with: pip install 'ckpt-callbacks[lightning]'"
    )

from ._callback import CheckpointCallback
from ._io import FsspecCheckpointIO
from ._load import load_from_checkpoint
from ._model_checkpoint import ModelCheckpoint

__all__ = ["CheckpointCallback", "FsspecCheckpointIO", "ModelCheckpoint", "load_from_checkpoint"]
