"""When a save or restore is a collective: state sharded across the ranks of a process group.

A state holding ``DTensor`` leaves (FSDP2, tensor parallelism, ``get_state_dict`` of a sharded model)
has its bytes spread over every rank, so :class:`~ckpt_callbacks.CheckpointManager` and
:func:`~ckpt_callbacks.load_checkpoint` hand it to :mod:`ckpt_callbacks.distributed` (DCP with this
library's writer and reader), called on every rank. The core never imports torch: these checks look
``torch.distributed`` up in ``sys.modules``, where a process that has DTensors or a process group has
it already, and import the sharded code by name only when a state needs it.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType
from typing import Any

_SHARDED_OPS = "ckpt_callbacks.distributed._manager"


def _dtensor_type() -> type | None:
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None) if module is not None else None


def is_sharded(tree: Any) -> bool:
    """True when ``tree`` (dicts, lists, tuples) holds a ``DTensor`` leaf."""
    dtensor = _dtensor_type()
    if dtensor is None:
        return False
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, dtensor):
            return True
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend(node)
    return False


def follower_rank() -> bool:
    """True in a non-zero rank of an initialized ``torch.distributed`` process group of 2+ ranks.

    Such a rank's manager takes the directory's writer lock only when it first saves by itself: in
    a sharded save rank 0 commits and the others follow its state file, as non-zero DDP ranks do.
    """
    dist = sys.modules.get("torch.distributed")
    try:
        return bool(
            dist is not None and dist.is_available() and dist.is_initialized() and dist.get_rank() != 0
        )
    except (RuntimeError, ValueError):  # torn down meanwhile
        return False


def ops() -> ModuleType:
    """:mod:`ckpt_callbacks.distributed._manager`: ``save``, ``restore`` and ``load_into``."""
    return importlib.import_module(_SHARDED_OPS)
