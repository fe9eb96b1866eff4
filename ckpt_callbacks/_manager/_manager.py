"""CheckpointManager: numbered checkpoints in one directory, committed through the ``checkpoint``
state file, rotated by retention, restored newest-valid-first, optionally saved in the background.

The pieces it drives live next to it: :mod:`._checkpoint_io` writes one checkpoint,
:mod:`._checkpoint_read` reads one, :mod:`._state` reads and writes the state file,
:mod:`._retention` decides what to keep, :mod:`._leftovers` sweeps interrupted saves at start,
:mod:`._async` holds the background-save helpers, :mod:`._lock` the one-writer lock.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from .. import _validation
from .._checkpoint import _checkpoint_io as _cio
from .._checkpoint._checkpoint_read import files_of, load, newest_first, newest_valid, written_by_us
from .._format._names import INDEX_SUFFIX, checkpoint_name, split_url
from .._storage import Storage
from ..errors import CheckpointError, CheckpointNotFoundError, CorruptCheckpointError
from . import _async, _foreign, _leftovers, _lock, _sharding
from ._mode import MonitoredMetric, resolve_mode
from ._retention import BestN, EveryNHours, LatestN, Retention
from ._state import (
    Record,
    checked_name,
    commit_state,
    dump_state,
    no_best_error,
    read_state,
    read_state_bytes,
    restart,
    write_state,
)
from ._writer import CheckpointWriter, PlainWriter, SaveJob

logger = logging.getLogger("ckpt_callbacks")


class CheckpointManager(_async.BackgroundSaves):
    """Saves numbered checkpoints into a directory, rotates them, and restores the newest valid one.

    Args:
        directory: local path or any fsspec URL (``"runs/a"``, ``"s3://b/run"``, ``"gs://b/run"``,
            ``"memory://x"``).
        prefix: checkpoint names are ``f"{prefix}-{step}"``.
        max_to_keep: the newest N checkpoints are kept; ``None`` keeps all. Must be >= 1.
        keep_checkpoint_every_n_hours: also keep one checkpoint per N hours, forever.
        keep_best: also keep the best K checkpoints by ``metrics[monitor]`` (``mode`` "min" or "max";
            "auto", the default, is Keras' rule: "max" for accuracy / AUC / precision / recall / F1-like
            names, else "min").
        storage_options: passed to fsspec (credentials, endpoint, ...).
        async_save: ``save()`` returns after an in-memory snapshot; writing, committing and rotation
            continue on a background thread. A save requested while one is in flight first waits for it
            (saves are never coalesced or dropped; each wait is counted in the log). A background
            failure is raised by the next ``save``, ``wait_until_finished`` or ``close``; at interpreter
            exit a pending save is finished (and a failure logged) before the process ends.
        allow_pickle: store (and load) leaves that are not plain tree types with pickle. Off by default:
            loading never executes code unless this is passed on both sides.
        clock: zero-argument callable returning POSIX seconds; tests inject a fake one.
        incremental: a tensor whose dtype, shape and bytes equal the last checkpoint's is not written
            again; the new checkpoint points at the data file holding it (retention keeps such files
            while a kept checkpoint points at them). ``False``: every save writes every tensor.

    Example:
        >>> with CheckpointManager("runs/a", max_to_keep=3, keep_checkpoint_every_n_hours=1) as mgr:
        ...     state = mgr.restore() or {"w": np.zeros(4), "step": 0}
        ...     for step in range(state["step"] + 1, 1001):
        ...         state = {"w": state["w"] + 1, "step": step}
        ...         if step % 100 == 0:
        ...             mgr.save(state, step=step, metrics={"loss": 1.0 / step})
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        prefix: str = "ckpt",
        max_to_keep: int | None = 5,
        keep_checkpoint_every_n_hours: float | None = None,
        keep_best: int | None = None,
        monitor: str | None = None,
        mode: str = "auto",
        storage_options: dict | None = None,
        async_save: bool = False,
        allow_pickle: bool = False,
        clock: Callable[[], float] = time.time,
        incremental: bool = True,
        _allow_concurrent_writers: bool = False,
        _collective: _sharding.Collective | None = None,
        _keep: frozenset[str] = frozenset(),
    ) -> None:
        _validation.check_directory(directory)
        _validation.check_storage_options(storage_options)
        _validation.check_flags(async_save=async_save, allow_pickle=allow_pickle, incremental=incremental)
        _validation.check_manager_args(
            prefix, max_to_keep, keep_checkpoint_every_n_hours, keep_best, monitor, mode, clock
        )
        self._storage, self._storage_options = Storage(directory, storage_options), storage_options
        self.directory = self._storage.url
        self._prefix, self._max_to_keep, self._hours = prefix, max_to_keep, keep_checkpoint_every_n_hours
        self._keep_best, self._monitor, self._mode = keep_best, monitor, resolve_mode(monitor, mode)
        self._async, self._allow_pickle, self._clock = async_save, allow_pickle, clock
        self._lock = threading.RLock()
        self._buffers = _async.SnapshotBuffers()  # async snapshot buffers, kept between saves
        self._metric = MonitoredMetric(monitor, keep_best)  # metrics[monitor] as a number, or None
        self._commit_lock = threading.Lock()
        self.resumed_from: str | None = None
        self._closed = False
        # before any write: foreign files are never touched
        _foreign.check_not_foreign(self._storage, prefix, functools.partial(written_by_us, self._storage))
        # One writer per directory: the leftovers cleanup below would delete another writer's in-flight
        # files. `_allow_concurrent_writers` (readers, e.g. non-zero DDP ranks) skips both; a non-zero
        # rank of a process group defers both to its first save of its own (rank 0 commits sharded ones).
        self._lock_deferred = not _allow_concurrent_writers and _sharding.follower_rank()
        reader = _allow_concurrent_writers or self._lock_deferred
        self._writer_lock = None if reader else _lock.acquire(self._storage, self)
        self._plain = PlainWriter(allow_pickle, self._buffers, incremental)
        self._keep = _keep  # never deleted by this manager (Lightning: the checkpoint a run resumed from)
        # Every save and restore(into=) is this collective (ckpt_callbacks.distributed.manager), or
        # only those of sharded state; one sharded writer (its memory of the last save) serves all.
        self._collective, self._incremental = _collective, incremental
        self._sharded_writer: CheckpointWriter | None = None
        self._target = _Target(self)
        try:
            self._load_state()
            self.aborted_uploads: list[str] = []  # names whose pending multipart upload was aborted
            self.removed_leftovers = [] if reader else self._remove_leftovers()
            if _collective is not None and async_save:  # its process group: a collective, made now
                self._sharded_writer = _collective.backend.writer(True, _collective.options, incremental)
        except BaseException:
            self._release_writer_lock()
            raise

    def _release_writer_lock(self) -> None:
        lock, self._writer_lock = self._writer_lock, None
        if lock is not None:
            lock.release()

    # ------------------------------------------------------------------ state

    def _load_state(self) -> None:
        now = float(self._clock())
        self._latest: str | None = None
        self._records: list[Record] = []
        found = read_state(self._storage)
        if found is None:
            # Like TensorFlow: a second in the past, so a quickly re-created manager does not race.
            self._last_preserved = now - 1.0
            self._state_found = False
            self._state_bytes: bytes | None = None
            return
        state, records, self._state_bytes = found
        self._state_found = True
        for n in [state.model_checkpoint_path, *state.all_model_checkpoint_paths]:
            if n:
                checked_name(n)
        self._latest = state.model_checkpoint_path or None
        self._records, self._last_preserved = restart(state, records, now)

    def _remove_leftovers(self) -> list[str]:
        """Delete files of interrupted saves (see :mod:`._leftovers`); returns their names."""
        swept = _leftovers.sweep(self._storage, self._records, self._latest, self._prefix, self._state_found)
        self.aborted_uploads = swept.aborted_uploads
        return swept.removed

    # ------------------------------------------------------------------ properties

    @property
    def latest_checkpoint(self) -> str | None:
        """Path of the newest committed checkpoint, or None."""
        with self._lock:
            return self._storage.url_of(self._latest) if self._latest else None

    @property
    def best_checkpoint(self) -> str | None:
        """Path of the best kept checkpoint by ``metrics[monitor]`` (``keep_best``), or None.

        None without ``keep_best`` or a kept checkpoint scored; a tie goes to the one scored first.
        """
        with self._lock:
            best = self._best_of(self._records)
            return self._storage.url_of(best) if best else None

    def _best_of(self, records: list[Record]) -> str | None:
        return BestN(self._keep_best, self._monitor, self._mode).top(records) if self._keep_best else None

    @property
    def checkpoints(self) -> list[str]:
        """Every committed checkpoint the manager keeps (preserved ones included), oldest first."""
        with self._lock:
            return [self._storage.url_of(r.name) for r in self._records]

    def _retention(self, committing: str) -> Retention:
        """The policy for the save that commits ``committing``.

        The checkpoint the run resumed from is protected until the run commits another one: this
        very commit ends the protection, so the same save may already delete it (as one uninterrupted
        manager would have).
        """
        resumed = self.resumed_from
        protected = frozenset({resumed} if resumed and resumed == committing else ()) | self._keep
        return Retention(
            LatestN(self._max_to_keep),
            EveryNHours(self._hours) if self._hours else None,
            BestN(self._keep_best, self._monitor, self._mode) if self._keep_best else None,
            protected,
        )

    # ------------------------------------------------------------------ save

    def save(
        self,
        state: Any,
        step: int,
        metrics: dict | None = None,
        meta: dict | None = None,
        *,
        _info: dict | None = None,
        _collective: _sharding.Collective | None = None,
    ) -> str:
        """Save ``state`` as ``f"{prefix}-{step}"`` and apply retention. Returns the checkpoint path.

        Sync: returns once the checkpoint is committed (data, meta, index, then the ``checkpoint``
        state file) and retention has deleted what it drops. Async: returns after an in-memory snapshot
        of the tensors; ``state`` may then be changed freely.

        Args:
            state: a tree of dicts, lists, tuples, numpy arrays, torch tensors, numbers, strings, bytes
                and ``None`` (see :func:`save_checkpoint`).
            step: an int >= 0; saving a step again replaces that checkpoint.
            metrics: JSON-like numbers stored in the ``.meta``; ``metrics[monitor]`` ranks for
                ``keep_best``.
            meta: JSON-like values stored in the ``.meta`` under ``"user"``.

        Raises:
            ValueError: ``step`` is not an int >= 0.
            TypeError: a leaf the format does not store (naming its key path).
            CheckpointWriteError: the storage refused a write, or an earlier async save failed.
            CheckpointError: the manager is closed.

        A ``state`` holding ``DTensor`` leaves (sharded across ranks) makes this a collective call on
        every rank: :func:`ckpt_callbacks.distributed.save` with this manager. ``_collective`` makes
        it one whatever the state holds (that function passes it).
        """
        if self._closed:
            raise CheckpointError("This CheckpointManager is closed; create a new one to save.")
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"step must be an int >= 0. Received: step={step!r}.")
        step = int(step)
        writer, options = self._writer_for(state, _collective)
        if self._lock_deferred and writer is self._plain:  # a non-zero rank saving by itself: the writer now
            self._writer_lock = _lock.acquire(self._storage, self)
            self._lock_deferred = False
            self.removed_leftovers = self._remove_leftovers()
        name = checkpoint_name(self._prefix, step)
        timestamp = float(self._clock())
        metric = self._metric(metrics)
        meta_doc = _cio.meta_doc(step, timestamp, metrics, meta, _info or writer.default_info)
        if self._async:
            self._wait_previous(name)
        else:
            self._raise_pending_error()
        payload = writer.prepare(state, snapshot=self._async, options=options)
        job = SaveJob(name, step, timestamp, metric, meta_doc, writer, payload)
        if self._async:
            self._submit(job)
        else:
            self._run_job(job)
        return self._storage.url_of(name)

    def _writer_for(
        self, state: Any, collective: _sharding.Collective | None
    ) -> tuple[CheckpointWriter, dict | None]:
        """The writer of one save, and its options: the plain one, or a sharded backend's."""
        collective = collective or self._collective or _sharding.collective_for(state)
        if collective is None:
            return self._plain, None
        if self._sharded_writer is None:
            self._sharded_writer = collective.backend.writer(
                self._async, collective.options, self._incremental
            )
        return self._sharded_writer, collective.options

    def _run_job(self, job: SaveJob) -> None:
        job.writer.write(self._target, job)

    def _commit_written(self, record: Record, replacing: _cio.Replaced | None = None) -> None:
        """The commit half of a save whose files are all written: the state file through retention
        (:meth:`_commit`: rolled back on failure, kept when the store may have committed after all),
        then the files of a replaced copy and of the checkpoints retention dropped are deleted.

        Every save commits here, through :class:`_Target` (what a writer sees of the manager).
        """
        decision = self._commit(record, replacing)
        replaced = []  # the replaced copy's data files (its .meta and .index were overwritten)
        if replacing is not None:
            replaced = [n for n in replacing.data_files if n not in files_of(record.name, record.shards)]
        _leftovers.remove_dropped(self._storage, decision.deleted, decision.kept, replaced)

    def _replacing(self, name: str) -> _cio.Replaced | None:
        """What a re-save of the already listed ``name`` must be able to put back; None for a new step.

        Re-saving a step: the old copy stays listed and whole until the state file commits the new
        one. New data files get other names (another shard count); a failure writes the old .meta
        and .index back. Only a crash between the two small writes of the new .meta and .index
        leaves the step unreadable (restore() then falls back to the one before).
        """
        with self._lock:
            if not any(r.name == name for r in self._records):
                return None
        logger.warning("Replacing existing checkpoint %s", self._storage.url_of(name))
        return _cio.Replaced.read(self._storage, name)

    def _commit(self, record: Record, replacing: _cio.Replaced | None) -> Any:
        """Apply retention and write the state file naming ``record``: the commit point. Returns the
        retention decision. On failure the new checkpoint's files go again (or the replaced copy is
        put back), unless the store may have committed after all (:func:`._state.commit_state`)."""
        name = record.name
        # _commit_lock orders commits; self._lock only guards the in-memory view, and is not held
        # across the state file's write + fsync, so readers of latest_checkpoint / checkpoints on
        # other threads never wait for storage.
        with self._commit_lock:
            self._follow_other_writer()
            with self._lock:
                records = [r for r in self._records if r.name != name]  # a re-saved step: the new copy
                records.append(record)
                decision = self._retention(name).apply(records, self._last_preserved)
            best = self._best_of(decision.kept)
            state_bytes = dump_state(name, decision.kept, decision.last_preserved, best)

            def write(data: bytes) -> None:
                _cio.crash_point("before_state")
                write_state(self._storage, data)  # the commit point
                _cio.crash_point("after_state")

            def remove_new_files() -> None:
                files = [name + INDEX_SUFFIX, *files_of(name, record.shards)]
                if replacing is not None:
                    replacing.roll_back(self._storage, files)
                else:  # index first: without it the checkpoint does not exist for any reader
                    _cio.remove_quietly(self._storage, files)

            error = commit_state(self._storage, state_bytes, remove_new_files, write)
            if error is not None:
                logger.warning(
                    "Writing the state file reported %s: %s, but the new state file is committed "
                    "and names %s; the save succeeded.",
                    type(error).__name__,
                    error,
                    self._storage.url_of(name),
                )
            with self._lock:
                self._records = decision.kept
                self._latest = name
                self._last_preserved = decision.last_preserved
                self._state_bytes = state_bytes
                if self.resumed_from is not None and self.resumed_from != name:
                    self.resumed_from = None  # a newer checkpoint is committed: no longer protected
        return decision

    def _follow_other_writer(self) -> None:
        """Continue from the state file on storage if another writer changed it since this manager
        last read or wrote it (a second manager on this directory in this process: the writer lock
        is per process). Without this, this commit would drop the other writer's checkpoints from
        the state file and the next start would delete them as leftovers. One small read per save."""
        try:
            data = read_state_bytes(self._storage)
        except CheckpointError:
            return  # unreadable now: the commit itself will tell
        if data == self._state_bytes:
            return
        logger.warning(
            "The state file of %s was changed by another writer since this manager read it; continuing "
            "from the checkpoints it lists. Use one CheckpointManager per directory.",
            self.directory,
        )
        with self._lock:
            self._load_state()

    def wait_until_finished(self) -> None:
        """Block until every pending save is durable; re-raise a background failure."""
        self._wait(raise_error=True)

    def close(self) -> None:
        """Wait for pending saves, then release the background thread and the writer lock.

        Called by ``with CheckpointManager(...) as mgr:`` on exit; re-raises a background failure.
        Idempotent.
        """
        if self._closed:
            return
        try:
            self._wait(raise_error=True)
        finally:
            self._closed = True
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None
            _async.ASYNC_MANAGERS.discard(self)
            self._buffers.close()
            self._release_writer_lock()
            writer, self._sharded_writer = self._sharded_writer, None
            if writer is not None:
                writer.close()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ restore

    def restore(self, path: str | os.PathLike | None = None, *, into: Any = None) -> Any:
        """The state of ``path``, or of the newest valid checkpoint (None when there is none).

        ``path`` may be ``"latest"`` (the default) or ``"best"`` (:attr:`best_checkpoint`, or CheckpointNotFoundError).

        ``into``: restore in place, as :func:`load_checkpoint` does (async: snapshot buffers mapped too).
        With a path, missing or corrupt checkpoints raise CheckpointNotFoundError /
        CorruptCheckpointError. Without one, corrupt checkpoints are skipped with a warning.
        Pending async saves are waited for first (a path save() just returned is then readable); a
        background failure is not raised here but kept for the next save, wait or close, so the
        checkpoints that did commit can still be restored.
        """
        self._wait(raise_error=False)
        if path == "best":
            path = self.best_checkpoint
            if path is None:
                raise no_best_error(self.directory, ranked=bool(self._keep_best))
        path = None if path == "latest" else path
        if path is not None:
            directory, name = split_url(os.fspath(path))
            storage = Storage(directory, self._storage_options) if directory != "." else self._storage
            collective = _sharding.collective_for(into)
            if collective is not None:
                return collective.backend.load_into(storage.url_of(name), into, self._storage_options, None)
            return self._prepared(
                load(storage, name, verify=True, allow_pickle=self._allow_pickle, into=into)
            )
        return self.restore_with_path(into=into)[1]

    def restore_with_path(
        self, *, into: Any = None, _collective: _sharding.Collective | None = None
    ) -> tuple[str | None, Any]:
        """``(path, state)`` of the newest valid checkpoint, or ``(None, None)``.

        Like :meth:`restore` without a path, and also says which checkpoint was read (corrupt newer
        ones are skipped with a warning). ``resumed_from`` then names it too. With ``into`` holding
        ``DTensor`` leaves: a collective restore on every rank (:func:`ckpt_callbacks.distributed.restore`).
        """
        self._wait(raise_error=False)
        if into is not None:
            _collective = _collective or self._collective or _sharding.collective_for(into)
        with self._lock:
            names = newest_first([r.name for r in self._records], self._latest)
        if _collective is not None:
            backend = _collective.backend
            name = backend.restore_newest(
                self._storage, self._storage_options, names, into, _collective.options
            )
            if name is None:
                return None, None
            self.resumed_from = name
            return self._storage.url_of(name), into

        def open_one(name: str) -> Any:
            return load(self._storage, name, verify=True, allow_pickle=self._allow_pickle, into=into)

        skip = (CorruptCheckpointError, CheckpointNotFoundError)
        found = newest_valid(self._storage, names, open_one, skip=skip)
        if found is None:
            return None, None
        name, state = found
        self.resumed_from = name
        self._prepare_snapshot(state)
        return self._storage.url_of(name), state

    def __repr__(self) -> str:
        return f"CheckpointManager({self.directory!r}, prefix={self._prefix!r}, max_to_keep={self._max_to_keep!r})"


class _Target:
    """What a writer sees of its manager (:class:`._writer.SaveTarget`): storage and the commit."""

    def __init__(self, manager: CheckpointManager) -> None:
        self._manager = manager
        self.storage = manager._storage
        self.storage_options = manager._storage_options

    @property
    def latest_checkpoint(self) -> str | None:
        return self._manager.latest_checkpoint

    def replacing(self, name: str) -> _cio.Replaced | None:
        return self._manager._replacing(name)

    def commit(self, record: Record, replacing: _cio.Replaced | None = None) -> None:
        self._manager._commit_written(record, replacing)

    def follow(self) -> None:
        with self._manager._lock:
            self._manager._load_state()
