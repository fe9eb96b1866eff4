"""Sharded state (FSDP / FSDP2, DTensor, tensor parallelism) through ``torch.distributed.checkpoint``.

Importing this package imports torch; ``import ckpt_callbacks`` does not import it.

- :class:`StorageWriter` / :class:`StorageReader`: a DCP writer / reader pair in this library's
  format, for ``dcp.save(state, storage_writer=...)`` and ``dcp.load(state, storage_reader=...)``.
- :func:`manager`, :func:`save`, :func:`restore`: the same with a :class:`~ckpt_callbacks.CheckpointManager`
  (retention, the state file, falling back past corrupt checkpoints), collective calls on every rank.

Example:
    >>> from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    >>> mgr = ckpt_callbacks.distributed.manager("s3://b/run", max_to_keep=3)   # on every rank
    >>> model_sd, optim_sd = get_state_dict(model, optimizer)
    >>> ckpt_callbacks.distributed.save(mgr, {"model": model_sd, "optim": optim_sd}, step=1000)
"""

from __future__ import annotations

from ._dcp import StorageWriter
from ._manager import manager, restore, save
from ._reader import StorageReader

__all__ = ["StorageReader", "StorageWriter", "manager", "restore", "save"]
