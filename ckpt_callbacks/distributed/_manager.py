"""CheckpointManager with sharded state: collective save / restore on every rank.

A plain manager's ``save`` writes from one process; a sharded save is a collective (what
``CheckpointManager.save`` / ``restore(into=)`` hand a state with ``DTensor`` leaves to, and what
:func:`manager`'s managers always do), so it goes through DCP with :class:`StorageWriter`, and the
coordinator's ``finish`` (after every rank reported success) commits through the manager's own
commit (``CheckpointManager._commit_written``: the state file through retention, rolled back on
failure, then the dropped checkpoints' files deleted: all N data files of each).

``async_save=True``: ``save`` blocks only for the staging copy (:mod:`._staging`: each rank copies
its local shards into CPU buffers the manager keeps between saves); the manager's background worker
then runs ``dcp.save`` over a gloo process group of the manager's own, created once by
:func:`manager` (or by the first async sharded save, a collective anyway), so the training
collectives keep running while the checkpoint is written.
"""

from __future__ import annotations

import os
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from .. import _format as fmt
from .. import _warn
from .._checkpoint_io import meta_doc as _meta_doc
from .._checkpoint_io import remove_quietly as _remove_quietly
from .._checkpoint_read import read_index as _read_index
from .._manager import CheckpointManager
from .._names import INDEX_SUFFIX, checkpoint_name
from .._state import Record
from .._validation import check_flags
from ..errors import CheckpointError, CheckpointWriteError, CorruptCheckpointError
from . import _staging
from ._dcp import StorageWriter
from ._reader import StorageReader, check_files


def _rank(process_group: Any) -> int:
    return dist.get_rank(process_group) if dist.is_available() and dist.is_initialized() else 0


class _ShardedManager(CheckpointManager):
    """The manager :func:`manager` returns: its ``save`` and ``restore(into=)`` are always the
    collective sharded ones, whatever the state holds (a plain :class:`CheckpointManager` goes
    sharded when the state holds ``DTensor`` leaves)."""

    def save(
        self, state: Any, step: int, metrics: dict | None = None, meta: dict | None = None, **kw: Any
    ) -> str:
        """A collective sharded save on every rank: the same as :func:`save` with this manager."""
        return save(self, state, step, metrics=metrics, meta=meta, _info=kw.get("_info"))

    def restore(self, path: Any = None, *, into: Any = None) -> Any:
        """With ``into`` (the state to fill, as :func:`restore` takes it) and no ``path``: a collective
        restore of the newest valid checkpoint into ``into``, returned filled, or None when there is
        none. Otherwise the plain single-process :meth:`CheckpointManager.restore`."""
        if into is None or path is not None:
            return super().restore(path, into=into)
        return into if restore(self, into) is not None else None


def _own_group(mgr: CheckpointManager, ranks: list[int] | None) -> None:
    """Give an async manager the gloo process group its background sharded saves run on (a
    collective call on every rank of the default group), destroyed when the manager closes."""
    if getattr(mgr, "_staging", None) is not None:
        return
    group = dist.new_group(ranks=ranks, backend="gloo") if dist.is_initialized() else None
    mgr._ckpt_group = group
    mgr._staging = {}  # each rank's CPU copies of its shards, reused between saves

    def release() -> None:
        mgr._staging = mgr._ckpt_group = None
        if group is not None and dist.is_initialized():
            try:
                dist.destroy_process_group(group)
            except Exception:  # noqa: BLE001 - the default group is gone already: so is this one
                pass

    mgr._on_close.append(release)


def manager(directory: str | os.PathLike, *, process_group: Any = None, **kwargs: Any) -> CheckpointManager:
    """A :class:`~ckpt_callbacks.CheckpointManager` for sharded saves, created on every rank.

    Rank 0 (DCP's coordinator) gets the directory's writer lock and does retention; the other ranks
    get a manager that only reads (no lock, no leftovers cleanup), as under DDP. ``kwargs`` are the
    manager's (``max_to_keep``, ``keep_checkpoint_every_n_hours``, ``storage_options``,
    ``async_save``, ...).

    With ``async_save=True`` this creates a gloo process group for the background saves (over the
    ranks of ``process_group``, default all): a collective call on every rank of the default group.
    """
    check_flags(async_save=kwargs.get("async_save", False))
    mgr = _ShardedManager(directory, _allow_concurrent_writers=_rank(process_group) != 0, **kwargs)
    if mgr._async:
        try:
            _own_group(mgr, None if process_group is None else dist.get_process_group_ranks(process_group))
        except BaseException:
            mgr.close()
            raise
    return mgr


def _failed_ranks(e: CheckpointException) -> str:
    parts = []
    for rank, wrapped in sorted(e.failures.items()):
        exc = wrapped[0] if isinstance(wrapped, tuple) else wrapped
        parts.append(f"rank {rank}: {type(exc).__name__}: {exc}")
    return "; ".join(parts)


class _Job:
    """One sharded save for the background worker: ``dcp.save`` of the staged state over the
    manager's own process group, then the commit (on the coordinator, inside ``finish``)."""

    def __init__(
        self, mgr: CheckpointManager, name: str, state: dict, record: Record, meta_doc: dict
    ) -> None:
        self.mgr, self.name, self.state, self.record, self.meta_doc = mgr, name, state, record, meta_doc

    def __call__(self) -> None:
        _collective_save(self.mgr, self.name, self.state, self.record, self.meta_doc, self.mgr._ckpt_group)


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
    if mgr._closed:
        raise CheckpointError("This CheckpointManager is closed; create a new one to save.")
    name = checkpoint_name(mgr._prefix, step)
    timestamp = float(mgr._clock())
    record = Record(name, step, timestamp, "active", mgr._metric(metrics), None)
    meta_doc = _meta_doc(step, timestamp, metrics, meta, _info or {"framework": "torch"})
    if mgr._async:
        _own_group(mgr, None if process_group is None else dist.get_process_group_ranks(process_group))
        mgr._wait_previous(name)  # the staging buffers are free again; a failure of the last save raises here
        staged = _staging.stage(mgr._staging, state)
        mgr._submit((name, _Job(mgr, name, staged, record, meta_doc)))
    else:
        mgr._raise_pending_error()
        _collective_save(mgr, name, state, record, meta_doc, process_group)
    return mgr._storage.url_of(name)


def _collective_save(
    mgr: CheckpointManager, name: str, state: dict, record: Record, meta_doc: dict, group: Any
) -> None:
    """``dcp.save`` through :class:`StorageWriter`, committed by the manager's own commit."""
    storage = mgr._storage

    def commit(storage: Any, name: str, step: int, shards: int) -> None:
        mgr._commit_written(Record(name, step, record.timestamp, "active", record.metric, shards))

    writer = StorageWriter(
        storage.url_of(name), storage_options=mgr._storage_options, _commit=commit, _meta=meta_doc
    )
    try:
        dcp.save(state, storage_writer=writer, process_group=group)
    except (CheckpointException, Exception) as e:
        # CheckpointException (a BaseException): DCP gathered a failure of some rank(s). Anything
        # else: a collective itself failed, e.g. a peer died mid-save (gloo: "Connection closed").
        raise _write_error(mgr, name, e, group) from None
    if _rank(group) != 0:
        with mgr._lock:  # follow the commit the coordinator made
            mgr._load_state()


def _write_error(mgr: CheckpointManager, name: str, e: BaseException, group: Any) -> CheckpointWriteError:
    storage = mgr._storage
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
        else f"Nothing was committed; the latest checkpoint is still {mgr.latest_checkpoint!r}"
    )
    return CheckpointWriteError(f"Sharded save of {storage.url_of(name)!r} failed on {what}. {outcome}.")


def restore(mgr: CheckpointManager, state: dict, *, process_group: Any = None) -> str | None:
    """Load the newest valid checkpoint into ``state`` in place (``dcp.load``); collective.

    Rank 0 picks the newest checkpoint whose index is valid and whose data files all exist with
    their sizes (a corrupt one is skipped with a warning, like ``CheckpointManager.restore``) and
    tells the others. Works whatever the number of ranks that wrote it. Returns its path, or None
    when there is none (``state`` untouched).
    """
    mgr._wait(raise_error=False)  # a pending async save first (its failure stays for the next save)
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
    load_into(path, state, mgr._storage_options, process_group=process_group)
    mgr.resumed_from = name
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


def _newest_valid(mgr: CheckpointManager) -> str | None:
    with mgr._lock:
        names = [r.name for r in mgr._records]
        if mgr._latest:
            names = [n for n in names if n != mgr._latest] + [mgr._latest]
    for name in reversed(names):
        try:
            check_files(mgr._storage, name, _read_index(mgr._storage, name))
        except CheckpointError as e:
            _warn.warn(
                f"Checkpoint {mgr._storage.url_of(name)!r} is unusable ({e}); falling back to an older one."
            )
            continue
        return name
    return None
