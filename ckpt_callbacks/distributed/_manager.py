"""CheckpointManager with sharded state: collective save / restore on every rank.

A plain manager's ``save`` writes from one process; a sharded save is a collective, so it goes
through DCP with :class:`StorageWriter`. :class:`_DcpBackend` is this package's
:class:`~ckpt_callbacks._manager._sharding.ShardedBackend`, registered when the package is imported: the
manager asks it for a :class:`DcpWriter` (the core's writer seam, :mod:`ckpt_callbacks._manager._writer`)
for a state with ``DTensor`` leaves, or for every save of a manager :func:`manager` made. The
coordinator's ``finish`` (after every rank reported success) commits through the manager's commit
(the state file through retention, rolled back on failure, then the dropped checkpoints' files
deleted: all N data files of each, except those a kept checkpoint points into); the other ranks then
follow the state file it wrote.

Saves are incremental (the manager's ``incremental``): each rank's writer remembers the chunks of
the last checkpoint it committed (:class:`ckpt_callbacks._checkpoint._incremental.Tracker`), writes
only those that changed and points the others into the earlier data files holding them.

``async_save=True``: ``save`` blocks only for the staging copy (:mod:`._staging`: each rank copies
its local shards into CPU buffers the writer keeps between saves); the manager's background worker
then runs ``dcp.save`` over a gloo process group of the writer's own, created once by
:func:`manager` (or by the first async sharded save, a collective anyway), so the training
collectives keep running while the checkpoint is written.
"""

from __future__ import annotations

import os
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from .._checkpoint import _incremental
from .._checkpoint._checkpoint_io import remove_quietly as _remove_quietly
from .._checkpoint._checkpoint_read import newest_valid
from .._checkpoint._checkpoint_read import read_index as _read_index
from .._format import _format as fmt
from .._format._names import INDEX_SUFFIX
from .._manager import _sharding
from .._manager._manager import CheckpointManager
from .._manager._writer import SaveJob, SaveTarget
from .._storage import Storage
from .._validation import check_flags
from ..errors import CheckpointWriteError, CorruptCheckpointError
from . import _staging
from ._dcp import StorageWriter
from ._reader import StorageReader, check_files


def _rank(process_group: Any) -> int:
    return dist.get_rank(process_group) if dist.is_available() and dist.is_initialized() else 0


def _group_of(options: dict | None) -> Any:
    return (options or {}).get("process_group")


class DcpWriter:
    """Writes one sharded checkpoint with ``dcp.save`` on every rank (a :class:`ckpt_callbacks._manager._writer.
    CheckpointWriter`). Async: the gloo process group and the staging buffers are its own, kept
    between saves and released when the manager closes. ``incremental``: this rank's chunks that did
    not change since the latest checkpoint are not written again (its tracker remembers them)."""

    default_info: dict | None = {"framework": "torch"}

    def __init__(self, async_save: bool, options: dict | None, incremental: bool = True) -> None:
        self._tracker = _incremental.Tracker(incremental)
        self._group: Any = None
        self._staging: dict | None = None
        if async_save:
            group = _group_of(options)
            ranks = None if group is None else dist.get_process_group_ranks(group)
            self._group = dist.new_group(ranks=ranks, backend="gloo") if dist.is_initialized() else None
            self._staging = {}  # each rank's CPU copies of its shards, reused between saves

    def prepare(self, state: Any, *, snapshot: bool, options: dict | None) -> Any:
        if snapshot:
            assert self._staging is not None, "an async sharded save needs an async DcpWriter"
            return _staging.stage(self._staging, state), self._group
        return state, _group_of(options)

    def write(self, target: SaveTarget, job: SaveJob) -> None:
        """``dcp.save`` through :class:`StorageWriter`, committed by the coordinator's ``finish``."""
        state, group = job.payload
        storage = target.storage
        plan = self._tracker.plan(storage, job.name, target.incremental_base)

        def commit(storage: Storage, name: str, step: int, shards: int, refs: tuple[str, ...]) -> None:
            target.commit(job.record(shards, refs))

        writer = StorageWriter(
            storage.url_of(job.name),
            storage_options=target.storage_options,
            _commit=commit,
            _meta=job.meta_doc,
            _plan=plan,
        )
        try:
            dcp.save(state, storage_writer=writer, process_group=group)
        except (CheckpointException, Exception) as e:
            # CheckpointException (a BaseException): DCP gathered a failure of some rank(s). Anything
            # else: a collective itself failed, e.g. a peer died mid-save (gloo: "Connection closed").
            raise _write_error(target, job.name, e, group) from None
        if _rank(group) != 0:
            target.follow()  # the commit the coordinator made
        self._tracker.committed(job.name, plan)

    def close(self) -> None:
        group, self._group, self._staging = self._group, None, None
        if group is not None and dist.is_initialized():
            try:
                dist.destroy_process_group(group)
            except Exception:  # noqa: BLE001 - the default group is gone already: so is this one
                pass


class _DcpBackend:
    """This package's :class:`ckpt_callbacks._manager._sharding.ShardedBackend`: DCP with this format."""

    def writer(self, async_save: bool, options: dict | None, incremental: bool) -> DcpWriter:
        return DcpWriter(async_save, options, incremental)

    def load_into(self, path: str, into: Any, storage_options: dict | None, options: dict | None) -> Any:
        return load_into(path, into, storage_options, process_group=_group_of(options))

    def restore_newest(
        self,
        storage: Storage,
        storage_options: dict | None,
        names: list[str],
        into: Any,
        options: dict | None,
    ) -> str | None:
        """Rank 0 picks the newest checkpoint of ``names`` whose index is valid and whose data files
        all exist with their sizes (a corrupt one is skipped with a warning) and tells the others."""
        group = _group_of(options)
        chosen = [None]
        if _rank(group) == 0:
            chosen[0] = _newest_valid(storage, names)
        if dist.is_initialized():
            dist.broadcast_object_list(
                chosen, src=dist.get_global_rank(group, 0) if group else 0, group=group
            )
        name = chosen[0]
        if name is not None:
            load_into(storage.url_of(name), into, storage_options, process_group=group)
        return name


_BACKEND = _DcpBackend()
_sharding.register("torch.distributed.tensor:DTensor", _BACKEND)


def _collective(process_group: Any) -> _sharding.Collective:
    return _sharding.Collective(_BACKEND, {"process_group": process_group})


def manager(directory: str | os.PathLike, *, process_group: Any = None, **kwargs: Any) -> CheckpointManager:
    """A :class:`~ckpt_callbacks.CheckpointManager` for sharded saves, created on every rank.

    Rank 0 (DCP's coordinator) gets the directory's writer lock and does retention; the other ranks
    get a manager that only reads (no lock, no leftovers cleanup), as under DDP. ``kwargs`` are the
    manager's (``max_to_keep``, ``keep_checkpoint_every_n_hours``, ``storage_options``,
    ``async_save``, ...). Its ``save`` and ``restore(into=)`` (without a path) are always the
    collective sharded ones, whatever the state holds.

    With ``async_save=True`` this creates a gloo process group for the background saves (over the
    ranks of ``process_group``, default all): a collective call on every rank of the default group.
    """
    check_flags(async_save=kwargs.get("async_save", False))
    return CheckpointManager(
        directory,
        _allow_concurrent_writers=_rank(process_group) != 0,
        _collective=_collective(process_group),
        **kwargs,
    )


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

    With a manager made with ``async_save=True`` it returns after the staging copy; the write and
    the commit follow in the background, and a failure is raised (on every rank) by the next
    ``save``, ``mgr.wait_until_finished()`` or ``mgr.close()``. ``process_group`` is then the one
    given to :func:`manager`.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an int >= 0. Received: step={step!r}.")
    return mgr.save(
        state, step, metrics=metrics, meta=meta, _info=_info, _collective=_collective(process_group)
    )


def _write_error(target: SaveTarget, name: str, e: BaseException, group: Any) -> CheckpointWriteError:
    storage = target.storage
    world = dist.get_world_size(group) if dist.is_initialized() else 1
    # Each rank removes its own data file, never committed; the coordinator's finish (or the
    # commit) removed its files already when the failure was theirs. An index still there means the
    # commit's outcome is unknown: its files stay and the state file decides.
    unknown = storage.exists(name + INDEX_SUFFIX)
    if not unknown:
        _remove_quietly(storage, [fmt.data_file_name(name, _rank(group), world)])
    if isinstance(e, CheckpointException):
        what = _failed_ranks(e)
    else:
        what = f"a collective of rank {_rank(group)} ({type(e).__name__}: {e}); another rank may have died"
    outcome = (
        "Its commit may or may not have taken place (the state file decides; a next start removes its "
        "files if it is not listed)"
        if unknown
        else f"Nothing was committed; the latest checkpoint is still {target.latest_checkpoint!r}"
    )
    return CheckpointWriteError(f"Sharded save of {storage.url_of(name)!r} failed on {what}. {outcome}.")


def restore(mgr: CheckpointManager, state: dict, *, process_group: Any = None) -> str | None:
    """Load the newest valid checkpoint into ``state`` in place (``dcp.load``); collective.

    Rank 0 picks the newest checkpoint whose index is valid and whose data files all exist with
    their sizes (a corrupt one is skipped with a warning, like ``CheckpointManager.restore``) and
    tells the others. Works whatever the number of ranks that wrote it. Returns its path, or None
    when there is none (``state`` untouched).
    """
    path, _ = mgr.restore_with_path(into=state, _collective=_collective(process_group))
    return path


def load_into(path: str, state: Any, storage_options: dict | None, *, process_group: Any = None) -> Any:
    """``dcp.load`` of checkpoint ``path`` into ``state`` in place; collective. Returns ``state``."""
    try:
        dcp.load(
            state,
            storage_reader=StorageReader(path, storage_options=storage_options),
            process_group=process_group,
        )
    except CheckpointException as e:
        raise CorruptCheckpointError(f"Loading {path!r} failed on {_failed_ranks(e)}.") from None
    return state


def _newest_valid(storage: Storage, names: list[str]) -> str | None:
    found = newest_valid(storage, names, lambda name: check_files(storage, name, _read_index(storage, name)))
    return None if found is None else found[0]
