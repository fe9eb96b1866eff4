"""When a save or restore is a collective: state sharded across processes.

A state holding sharded leaves (torch ``DTensor``: FSDP2, tensor parallelism, ``get_state_dict`` of a
sharded model) has its bytes spread over every rank, so :class:`~ckpt_callbacks.CheckpointManager`
and :func:`~ckpt_callbacks.load_checkpoint` hand it to the :class:`ShardedBackend` registered for
that leaf type, called on every rank. The backend's package registers itself (:func:`register`)
when imported; :mod:`._kinds` imports it the first time a state holds one of its leaves. The core
never imports a framework: leaf types are looked up in ``sys.modules``.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import TYPE_CHECKING, Any, Protocol

from .._format import _kinds

if TYPE_CHECKING:
    from .._storage import Storage
    from ._writer import CheckpointWriter


class ShardedBackend(Protocol):
    """Writes and reads sharded state; every call is a collective on every rank."""

    def writer(self, async_save: bool, options: dict[str, Any] | None, incremental: bool) -> CheckpointWriter:
        """A writer for a manager's sharded saves (the manager keeps one for all of them).
        ``incremental``: the manager's flag (the writer may point unchanged tensors into earlier
        checkpoints' data files instead of writing them again)."""

    def load_into(
        self, path: str, into: Any, storage_options: dict[str, Any] | None, options: dict[str, Any] | None
    ) -> Any:
        """Fill ``into`` in place from checkpoint ``path``; returns ``into``."""

    def restore_newest(
        self,
        storage: Storage,
        storage_options: dict[str, Any] | None,
        names: list[str],
        into: Any,
        options: dict[str, Any] | None,
    ) -> str | None:
        """Fill ``into`` from the newest valid checkpoint of ``names`` (newest first); its name, or None."""


@dataclasses.dataclass(frozen=True)
class Collective:
    """A save or restore that goes through ``backend`` on every rank; ``options`` are the backend's
    (e.g. ``{"process_group": group}``)."""

    backend: ShardedBackend
    options: dict[str, Any] | None = None


_BACKENDS: dict[str, ShardedBackend] = {}


def register(key: str, backend: ShardedBackend) -> None:
    """Register ``backend`` for the sharded leaves ``key`` names in :data:`._kinds.SHARDED`."""
    _BACKENDS[key] = backend


def collective_for(tree: Any) -> Collective | None:
    """The collective that saves or restores ``tree`` (dicts, lists, tuples), or None when it holds
    no sharded leaf."""
    types = _kinds.sharded_types()
    if not types or tree is None:
        return None
    leaf_types = tuple(types)
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, leaf_types):
            key = next(k for t, k in types.items() if isinstance(node, t))
            if key not in _BACKENDS:
                _kinds.load_sharded(key)
            return Collective(_BACKENDS[key])
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend(node)
    return None


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
