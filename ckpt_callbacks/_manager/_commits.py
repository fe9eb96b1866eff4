"""The commit half of a save, for :class:`~ckpt_callbacks.CheckpointManager` (a mixin: it uses the
manager's ``_lock``, ``_commit_lock``, ``_storage``, ``_records``, ``_latest``, ``_state_bytes``,
``_base`` and ``_retention``): the state file written through retention, rolled back on failure,
another writer's commits followed, and the checkpoint an incremental save compares with."""

from __future__ import annotations

import logging
from typing import Any

from .._checkpoint import _checkpoint_io as _cio
from .._checkpoint._checkpoint_read import files_of
from .._format._names import INDEX_SUFFIX
from ..errors import CheckpointError, CheckpointWriteError
from . import _leftovers
from ._retention import Record
from ._state import commit_state, dump_state, read_state_bytes, write_state

logger = logging.getLogger("ckpt_callbacks")


class Commits:
    """See the module docstring."""

    def _incremental_base(self) -> str | None:
        """The checkpoint an incremental save compares with (see ``_base``), after catching up with
        another writer's commits on this directory (a second manager here: its tracker would
        otherwise point into files that writer's retention deleted)."""
        with self._commit_lock:
            self._follow_other_writer()
        with self._lock:
            return self._latest if self._base is None else self._base[0]

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
            if self._follow_other_writer():
                self._check_refs(record, replacing)
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
                self._base = None  # the next save compares with this one
                if self._resumed_from is not None and self._resumed_from != name:
                    self._resumed_from = None  # a newer checkpoint is committed: no longer protected
        return decision

    def _check_refs(self, record: Record, replacing: _cio.Replaced | None) -> None:
        """After following another writer's commit made while ``record`` was written: the data files
        it points into must still exist (that writer's retention may have deleted them), or nothing
        is committed."""
        gone = [f for f in record.refs or () if not self._storage.exists(f)]
        if gone:
            files = [record.name + INDEX_SUFFIX, *files_of(record.name, record.shards)]
            if replacing is not None:
                replacing.roll_back(self._storage, files)
            else:
                _cio.remove_quietly(self._storage, files)
            raise CheckpointWriteError(
                f"Another writer on {self.directory!r} deleted {gone[0]!r}, which checkpoint "
                f"{record.name!r} points into, while it was written; nothing was committed. Use one "
                "CheckpointManager per directory."
            )

    def _follow_other_writer(self) -> bool:
        """Continue from the state file on storage if another writer changed it since this manager
        last read or wrote it (a second manager on this directory in this process: the writer lock
        is per process). Without this, this commit would drop the other writer's checkpoints from
        the state file and the next start would delete them as leftovers. One small read per save.
        Whether it changed."""
        try:
            data = read_state_bytes(self._storage)
        except CheckpointError:
            return False  # unreadable now: the commit itself will tell
        if data == self._state_bytes:
            return False
        logger.warning(
            "The state file of %s was changed by another writer since this manager read it; continuing "
            "from the checkpoints it lists. Use one CheckpointManager per directory.",
            self.directory,
        )
        with self._lock:
            self._load_state()
        return True
