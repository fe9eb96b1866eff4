"""CheckpointManager with sharded state: collective save / restore on every rank.

The manager's own ``save`` writes from one process; a sharded save is a collective, so it goes
through DCP with :class:`StorageWriter`, and the coordinator's ``finish`` (after every rank reported
success) commits the state file through the manager's retention, then deletes the dropped
checkpoints' files (all N data files of each).
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from .. import _format as fmt
from .._checkpoint_io import meta_doc as _meta_doc
from .._checkpoint_io import remove_quietly as _remove_quietly
from .._checkpoint_read import files_of as _files_of
from .._checkpoint_read import read_index as _read_index
from .._manager import CheckpointManager
from .._names import INDEX_SUFFIX
from .._state import Record, dump_state
from .._storage import Storage
from ..errors import CheckpointError, CheckpointWriteError, CorruptCheckpointError
from ._dcp import StorageReader, StorageWriter, check_files


def _rank(process_group: Any) -> int:
    return dist.get_rank(process_group) if dist.is_available() and dist.is_initialized() else 0


def manager(directory: str | os.PathLike, *, process_group: Any = None, **kwargs: Any) -> CheckpointManager:
    """A :class:`~ckpt_callbacks.CheckpointManager` for sharded saves, created on every rank.

    Rank 0 (DCP's coordinator) gets the directory's writer lock and does retention; the other ranks
    get a manager that only reads (no lock, no leftovers cleanup), as under DDP. ``kwargs`` are the
    manager's (``max_to_keep``, ``keep_checkpoint_every_n_hours``, ``storage_options``, ...).
    """
    if kwargs.get("async_save"):
        raise ValueError(
            "async_save=True is not supported for sharded saves yet. Received: async_save=True. "
            "Use async_save=False (the default)."
        )
    return CheckpointManager(directory, _allow_concurrent_writers=_rank(process_group) != 0, **kwargs)


def _failed_ranks(e: CheckpointException) -> str:
    parts = []
    for rank, wrapped in sorted(e.failures.items()):
        exc = wrapped[0] if isinstance(wrapped, tuple) else wrapped
        parts.append(f"rank {rank}: {type(exc).__name__}: {exc}")
    return "; ".join(parts)


def save(
    mgr: CheckpointManager,
    state: dict,
    step: int,
    *,
    metrics: dict | None = None,
    meta: dict | None = None,
    process_group: Any = None,
    _info: dict | None = None,
) -> str:
    """Save sharded ``state`` as ``f"{prefix}-{step}"``; a collective call on every rank.

    ``state`` is what ``dcp.save`` takes (e.g. ``{"model": ..., "optim": ...}`` from
    ``torch.distributed.checkpoint.state_dict.get_state_dict``). Returns the checkpoint path once it
    is committed. A failure on any rank raises :class:`~ckpt_callbacks.CheckpointWriteError` on every
    rank naming the failed ranks; nothing is committed and the previous checkpoint stays the latest.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an int >= 0. Received: step={step!r}.")
    storage: Storage = mgr._storage
    name = f"{mgr._prefix}-{step}"
    timestamp = float(mgr._clock())
    metric = mgr._metric(metrics)
    writer = StorageWriter(
        storage.url_of(name),
        storage_options=mgr._storage_options,
        _commit=_commit_into(mgr, timestamp, metric),
        _meta=_meta_doc(step, timestamp, metrics, meta, _info or {"framework": "torch"}),
    )
    try:
        dcp.save(state, storage_writer=writer, process_group=process_group)
    except (CheckpointException, Exception) as e:
        # CheckpointException (a BaseException): DCP gathered a failure of some rank(s). Anything
        # else: a collective itself failed, e.g. a peer died mid-save (gloo: "Connection closed").
        world = dist.get_world_size(process_group) if dist.is_initialized() else 1
        # Each rank removes its own data file, never committed; the coordinator's finish removed
        # its files already when the failure was its.
        if not storage.exists(name + INDEX_SUFFIX):
            _remove_quietly(storage, [fmt.data_file_name(name, _rank(process_group), world)])
        if isinstance(e, CheckpointException):
            what = _failed_ranks(e)
        else:
            what = f"a collective of rank {_rank(process_group)} ({type(e).__name__}: {e}); another rank may have died"
        raise CheckpointWriteError(
            f"Sharded save of {storage.url_of(name)!r} failed on {what}. Nothing was committed; "
            f"the latest checkpoint is still {mgr.latest_checkpoint!r}."
        ) from None
    if _rank(process_group) != 0:
        with mgr._lock:  # follow the commit the coordinator made
            mgr._load_state()
    return storage.url_of(name)


def _commit_into(mgr: CheckpointManager, timestamp: float, metric: float | None) -> Any:
    """The coordinator's commit for a sharded save: the manager's state file and retention.

    The same steps as the commit half of ``CheckpointManager._save_now`` (which has no separate
    method yet): state file through retention, then deletion of what retention drops.
    """

    def commit(storage: Storage, name: str, step: int, shards: int) -> None:
        with mgr._commit_lock:
            mgr._follow_other_writer()
            with mgr._lock:
                records = [r for r in mgr._records if r.name != name]
                records.append(Record(name, step, timestamp, "active", metric, shards))
                decision = mgr._retention(name).apply(records, mgr._last_preserved)
            state_bytes = dump_state(name, decision.kept, decision.last_preserved)
            try:
                mgr._commit_state(state_bytes)
            except BaseException:
                if not mgr._state_file_is(state_bytes):
                    raise
            with mgr._lock:
                mgr._records = decision.kept
                mgr._latest = name
                mgr._last_preserved = decision.last_preserved
                mgr._state_bytes = state_bytes
                if mgr.resumed_from is not None and mgr.resumed_from != name:
                    mgr.resumed_from = None
        for r in decision.deleted:
            if r.shards is None and not mgr._written_by_us(r.name + INDEX_SUFFIX):
                continue
            _remove_quietly(storage, [r.name + INDEX_SUFFIX, *_files_of(r.name, r.shards, storage)])

    return commit


def restore(mgr: CheckpointManager, state: dict, *, process_group: Any = None) -> str | None:
    """Load the newest valid checkpoint into ``state`` in place (``dcp.load``); collective.

    Rank 0 picks the newest checkpoint whose index is valid and whose data files all exist with
    their sizes (a corrupt one is skipped with a warning, like ``CheckpointManager.restore``) and
    tells the others. Works whatever the number of ranks that wrote it. Returns its path, or None
    when there is none (``state`` untouched).
    """
    chosen = [None]
    if _rank(process_group) == 0:
        chosen[0] = _newest_valid(mgr)
    if dist.is_initialized():
        dist.broadcast_object_list(
            chosen, src=dist.get_global_rank(process_group, 0) if process_group else 0, group=process_group
        )
    name = chosen[0]
    if name is None:
        return None
    path = mgr._storage.url_of(name)
    try:
        dcp.load(
            state,
            storage_reader=StorageReader(path, storage_options=mgr._storage_options),
            process_group=process_group,
        )
    except CheckpointException as e:
        raise CorruptCheckpointError(f"Loading {path!r} failed on {_failed_ranks(e)}.") from None
    mgr.resumed_from = name
    return path


def _newest_valid(mgr: CheckpointManager) -> str | None:
    with mgr._lock:
        names = [r.name for r in mgr._records]
        if mgr._latest:
            names = [n for n in names if n != mgr._latest] + [mgr._latest]
    for name in reversed(names):
        try:
            check_files(mgr._storage, name, _read_index(mgr._storage, name))
        except CheckpointError as e:
            warnings.warn(
                f"Checkpoint {mgr._storage.url_of(name)!r} is unusable ({e}); falling back to an older one.",
                stacklevel=3,
            )
            continue
        return name
    return None
