"""CheckpointManager: numbered checkpoints in one directory, committed through the ``checkpoint``
state file, rotated by retention, restored newest-valid-first, optionally saved in the background.

The pieces it drives live next to it: :mod:`._checkpoint_io` writes one checkpoint,
:mod:`._checkpoint_read` reads one, :mod:`._state` reads and writes the state file,
:mod:`._retention` decides what to keep, :mod:`._leftovers` sweeps interrupted saves at start,
:mod:`._async` holds the background-save helpers, :mod:`._lock` the one-writer lock.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from . import _async, _foreign, _leftovers, _lock, _sharding, _validation, _warn
from . import _checkpoint_io as _cio
from . import _format as fmt
from ._checkpoint_read import files_of, load, written_by_us
from ._mode import MonitoredMetric, resolve_mode
from ._names import INDEX_SUFFIX, checkpoint_name, split_url
from ._retention import BestN, EveryNHours, LatestN, Retention
from ._state import (
    Record,
    checked_name,
    dump_state,
    no_best_error,
    read_state,
    read_state_bytes,
    restart_records,
    write_state,
)
from ._storage import Storage
from .errors import CheckpointError, CheckpointNotFoundError, CorruptCheckpointError

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
        _allow_concurrent_writers: bool = False,
    ) -> None:
        _validation.check_directory(directory)
        _validation.check_storage_options(storage_options)
        _validation.check_flags(async_save=async_save, allow_pickle=allow_pickle)
        _validation.check_manager_args(
            prefix, max_to_keep, keep_checkpoint_every_n_hours, keep_best, monitor, mode, clock
        )
        self._storage = Storage(directory, storage_options)
        self._storage_options = storage_options
        self.directory = self._storage.url
        self._prefix = prefix
        self._max_to_keep = max_to_keep
        self._hours = keep_checkpoint_every_n_hours
        self._keep_best = keep_best
        self._monitor = monitor
        self._mode = resolve_mode(monitor, mode)
        self._async = async_save
        self._allow_pickle = allow_pickle
        self._clock = clock
        self._lock = threading.RLock()
        self._buffers = _async.SnapshotBuffers()  # async snapshot buffers, kept between saves
        self._metric = MonitoredMetric(monitor, keep_best)  # metrics[monitor] as a number, or None
        self._commit_lock = threading.Lock()
        self.resumed_from: str | None = None
        self._closed = False
        _foreign.check_not_foreign(
            self._storage, prefix, self._written_by_us
        )  # before any write: foreign files are never touched
        # One writer per directory: the leftovers cleanup below would delete another writer's in-flight
        # files. `_allow_concurrent_writers` (readers, e.g. non-zero DDP ranks) skips both; a non-zero
        # rank of a process group defers both to its first save of its own (rank 0 commits sharded ones).
        self._lock_deferred = not _allow_concurrent_writers and _sharding.follower_rank()
        reader = _allow_concurrent_writers or self._lock_deferred
        self._writer_lock = None if reader else _lock.acquire(self._storage, self)
        self._on_close: list[Callable[[], None]] = []  # e.g. releases the sharded saves' process group
        try:
            self._load_state()
            self.aborted_uploads: list[str] = []  # names whose pending multipart upload was aborted
            self.removed_leftovers = [] if reader else self._remove_leftovers()
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
        last_preserved = state.last_preserved_timestamp
        if now < last_preserved:
            logger.warning(
                "The clock (%s) is before the last preserved checkpoint time (%s); time went backwards. "
                "Preservation restarts from now and nothing is deleted because of it.",
                now,
                last_preserved,
            )
            last_preserved = now
        self._last_preserved = last_preserved
        self._records = restart_records(state, records, now, last_preserved)

    def _remove_leftovers(self) -> list[str]:
        """Delete files of interrupted saves (see :mod:`._leftovers`); returns their names."""
        swept = _leftovers.sweep(self._storage, self._records, self._latest, self._prefix, self._state_found)
        self.aborted_uploads = swept.aborted_uploads
        return swept.removed

    def _written_by_us(self, fname: str) -> bool:
        return written_by_us(self._storage, fname)

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
        protected = frozenset({resumed} if resumed and resumed == committing else ())
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
        every rank: :func:`ckpt_callbacks.distributed.save` with this manager.
        """
        if self._closed:
            raise CheckpointError("This CheckpointManager is closed; create a new one to save.")
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"step must be an int >= 0. Received: step={step!r}.")
        step = int(step)
        if _sharding.is_sharded(state):
            return _sharding.ops().save(self, state, step, metrics=metrics, meta=meta, _info=_info)
        if self._lock_deferred:  # a non-zero rank saving by itself: the writer now
            self._writer_lock = _lock.acquire(self._storage, self)
            self._lock_deferred = False
            self.removed_leftovers = self._remove_leftovers()
        name = checkpoint_name(self._prefix, step)
        timestamp = float(self._clock())
        metric = self._metric(metrics)
        meta_doc = _cio.meta_doc(step, timestamp, metrics, meta, _info)
        if self._async:
            self._wait_previous(name)
            encoded = fmt.encode_tree(state, allow_pickle=self._allow_pickle)
            arrays = _async.snapshot(self._buffers, encoded)
            self._submit((name, step, timestamp, metric, encoded, meta_doc, arrays))
        else:
            self._raise_pending_error()
            encoded = fmt.encode_tree(state, allow_pickle=self._allow_pickle)
            self._save_now(name, step, timestamp, metric, encoded, meta_doc, None)
        return self._storage.url_of(name)

    def _save_now(self, name, step, timestamp, metric, encoded, meta_doc, arrays) -> None:
        """Write, commit (under the commit lock, rolled back on failure), rotate, log."""
        t0 = time.perf_counter()
        self._storage.makedirs()
        replacing = self._replacing(name)
        write = _cio.write_checkpoint  # defer_sync: the state file's temp is written meanwhile
        shards = write(self._storage, name, encoded, step, meta_doc, arrays, replacing, defer_sync=True)
        self._commit_written(Record(name, step, timestamp, "active", metric, shards), replacing)
        self._log_saved(name, sum(t.nbytes for t in encoded.tensors), time.perf_counter() - t0)

    def _commit_written(self, record: Record, replacing: _cio.Replaced | None = None) -> None:
        """The commit half of a save whose files are all written: the state file through retention
        (:meth:`_commit`: rolled back on failure, kept when the store may have committed after all),
        then the files of a replaced copy and of the checkpoints retention dropped are deleted.

        Every save commits here: this manager's own and a sharded save's coordinator
        (``ckpt_callbacks.distributed``), whose ranks wrote ``record.shards`` data files.
        """
        decision = self._commit(record, replacing)
        if replacing is not None:  # the replaced copy's data files (its .meta and .index were overwritten)
            new = set(files_of(record.name, record.shards))
            _cio.remove_quietly(self._storage, [n for n in replacing.data_files if n not in new])
        self._delete_rotated(decision.deleted)

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
        put back), unless the store may have committed after all."""
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
            try:
                _cio.crash_point("before_state")
                write_state(self._storage, state_bytes)  # the commit point
                _cio.crash_point("after_state")
            except BaseException as e:
                self._after_failed_commit(e, state_bytes, record, replacing)
            with self._lock:
                self._records = decision.kept
                self._latest = name
                self._last_preserved = decision.last_preserved
                self._state_bytes = state_bytes
                if self.resumed_from is not None and self.resumed_from != name:
                    self.resumed_from = None  # a newer checkpoint is committed: no longer protected
        return decision

    def _after_failed_commit(
        self, error: BaseException, state_bytes: bytes, record: Record, replacing: _cio.Replaced | None
    ) -> None:
        """The state file's write reported ``error``; returns only when the commit took place anyway.

        The store may have committed it (a reply lost after the retries, an interrupt after the
        rename): look before removing anything.
        """
        storage, name = self._storage, record.name
        committed = self._state_file_is(state_bytes)
        if committed:
            logger.warning(
                "Writing the state file reported %s: %s, but the new state file is committed "
                "and names %s; the save succeeded.",
                type(error).__name__,
                error,
                storage.url_of(name),
            )
            return
        if committed is not None:  # None, unknown: leave the files; a next start removes them if unnamed
            files = [name + INDEX_SUFFIX, *files_of(name, record.shards)]
            if replacing is not None:
                replacing.roll_back(storage, files)
            else:
                # Index first: without it the checkpoint does not exist for any reader.
                _cio.remove_quietly(storage, files)
        raise error

    def _delete_rotated(self, deleted: list[Record]) -> None:
        """Remove the files of the checkpoints retention just dropped from the state file."""
        storage = self._storage
        for r in deleted:
            if r.shards is None and not self._written_by_us(r.name + INDEX_SUFFIX):
                # Listed by a state file another writer (TensorFlow) wrote, in another format: only
                # files of this format are ever deleted. It just stops being listed.
                logger.info("Not deleting %s: not a ckpt_callbacks checkpoint", storage.url_of(r.name))
                continue
            _cio.crash_point("before_delete")
            _cio.remove_quietly(storage, [r.name + INDEX_SUFFIX, *files_of(r.name, r.shards, storage)])
            _cio.crash_point("after_delete")

    def _log_saved(self, name: str, nbytes: int, dt: float) -> None:
        logger.info(
            "Saved %s (%d bytes in %.3f s, %.1f MiB/s)",
            self._storage.url_of(name),
            nbytes,
            dt,
            nbytes / 2**20 / max(dt, 1e-9),
        )

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

    def _state_file_is(self, data: bytes) -> bool | None:
        """Whether the state file on storage is exactly ``data``; None when it cannot be read."""
        try:
            return read_state_bytes(self._storage) == data
        except Exception:  # noqa: BLE001 - unreadable now: unknown
            return None

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
            while self._on_close:
                self._on_close.pop()()

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
            if _sharding.is_sharded(into):
                return _sharding.ops().load_into(storage.url_of(name), into, self._storage_options)
            return self._prepared(
                load(storage, name, verify=True, allow_pickle=self._allow_pickle, into=into)
            )
        return self.restore_with_path(into=into)[1]

    def restore_with_path(self, *, into: Any = None) -> tuple[str | None, Any]:
        """``(path, state)`` of the newest valid checkpoint, or ``(None, None)``.

        Like :meth:`restore` without a path, and also says which checkpoint was read (corrupt newer
        ones are skipped with a warning). ``resumed_from`` then names it too. With ``into`` holding
        ``DTensor`` leaves: a collective restore on every rank (:func:`ckpt_callbacks.distributed.restore`).
        """
        self._wait(raise_error=False)
        if _sharding.is_sharded(into):
            path = _sharding.ops().restore(self, into)
            return (path, into) if path is not None else (None, None)
        with self._lock:
            names = [r.name for r in self._records]
            if self._latest and self._latest not in names:
                names.append(self._latest)
            elif self._latest:
                names = [n for n in names if n != self._latest] + [self._latest]
        for name in reversed(names):
            try:
                state = load(self._storage, name, verify=True, allow_pickle=self._allow_pickle, into=into)
            except (CorruptCheckpointError, CheckpointNotFoundError) as e:
                _warn.warn(
                    f"Checkpoint {self._storage.url_of(name)!r} is unusable ({e}); falling back to an older one."
                )
                continue
            self.resumed_from = name
            self._prepare_snapshot(state)
            return self._storage.url_of(name), state
        return None, None

    def __repr__(self) -> str:
        return f"CheckpointManager({self.directory!r}, prefix={self._prefix!r}, max_to_keep={self._max_to_keep!r})"
