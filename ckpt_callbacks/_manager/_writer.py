"""How the bytes of one checkpoint get written: the seam between the manager and a writer.

:class:`~ckpt_callbacks.CheckpointManager` owns naming, the record, the background worker, the
commit and retention. A :class:`CheckpointWriter` owns the bytes of one checkpoint, in two halves:
``prepare`` runs on the caller's thread (encode; for an async save also the snapshot copy, all a
training step waits for), ``write`` on the worker or right away (write the files, then commit
through the :class:`SaveTarget` the manager hands it). The manager picks the writer once per save
and carries the save as a :class:`SaveJob`.

:class:`PlainWriter` is this process writing every file. Writers of sharded state (torch DCP in
:mod:`ckpt_callbacks.distributed`) register with :mod:`._sharding` when their package is imported.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Protocol

from .._checkpoint import _checkpoint_io as _cio
from .._checkpoint import _incremental
from .._format import _format as fmt
from .._storage import Storage
from . import _async
from ._retention import Record

logger = logging.getLogger("ckpt_callbacks")


@dataclasses.dataclass(frozen=True)
class SaveJob:
    """One save, from ``save()`` to its commit: what the manager decided and what the writer prepared."""

    name: str
    step: int
    timestamp: float
    metric: float | None
    meta_doc: dict[str, Any]
    writer: CheckpointWriter
    payload: Any  # what ``writer.prepare`` returned

    def record(self, shards: int | None, refs: tuple[str, ...] = ()) -> Record:
        """The state file's record of this checkpoint, once its ``shards`` data files are written
        (``refs``: the earlier checkpoints' data files it points into)."""
        return Record(self.name, self.step, self.timestamp, "active", self.metric, shards, refs)


class SaveTarget(Protocol):
    """What the manager offers a writer: its storage, and its commit."""

    storage: Storage
    storage_options: dict[str, Any] | None

    @property
    def latest_checkpoint(self) -> str | None: ...

    def replacing(self, name: str) -> _cio.Replaced | None:
        """What a re-save of the already listed ``name`` must be able to put back; None for a new step."""

    def commit(self, record: Record, replacing: _cio.Replaced | None = None) -> None:
        """Commit a checkpoint whose files are all written (the state file through retention)."""

    def follow(self) -> None:
        """Reload the state file another process (a sharded save's coordinator) committed."""

    def incremental_base(self) -> str | None:
        """The name of the checkpoint an incremental save compares with: the latest, or after a
        resume that passed over unusable checkpoints the one it read (None: write every tensor)."""


class CheckpointWriter(Protocol):
    """How one checkpoint's bytes get written (see the module docstring)."""

    # merged into the .meta when the caller gives no ``_info`` (e.g. ``{"framework": "torch"}``)
    default_info: dict[str, Any] | None

    def prepare(self, state: Any, *, snapshot: bool, options: dict[str, Any] | None) -> Any:
        """On the caller's thread: what :meth:`write` needs. ``snapshot``: ``state`` may change as
        soon as this returns (an async save). ``options``: the writer's own, from the caller."""

    def write(self, target: SaveTarget, job: SaveJob) -> None:
        """Write the checkpoint's files and commit them through ``target``."""

    def close(self) -> None:
        """The manager is closing: release what the writer holds between saves."""


class PlainWriter:
    """This process writes every file: :func:`._checkpoint_io.write_checkpoint`, then the commit.

    ``incremental``: tensors unchanged since the latest checkpoint are not written again
    (:mod:`._incremental`; the writer remembers the tensors of the last checkpoint it committed).
    """

    default_info: dict[str, Any] | None = None

    def __init__(self, allow_pickle: bool, buffers: _async.SnapshotBuffers, incremental: bool = True) -> None:
        self._allow_pickle = allow_pickle
        self._buffers = buffers  # the manager's snapshot buffers, kept between saves
        self._tracker = _incremental.Tracker(incremental)

    def prepare(self, state: Any, *, snapshot: bool, options: dict[str, Any] | None) -> Any:
        encoded = fmt.encode_tree(state, allow_pickle=self._allow_pickle)
        return encoded, (_async.snapshot(self._buffers, encoded) if snapshot else None)

    def write(self, target: SaveTarget, job: SaveJob) -> None:
        """Write, commit (rolled back on failure), log."""
        t0 = time.perf_counter()
        storage = target.storage
        storage.makedirs()
        encoded, arrays = job.payload
        replacing = target.replacing(job.name)
        plan = self._tracker.plan(storage, job.name, target.incremental_base)
        # defer_sync: the state file's temp is written while the last directory fsync runs
        shards = _cio.write_checkpoint(
            storage, job.name, encoded, job.step, job.meta_doc, arrays, replacing, defer_sync=True, plan=plan
        )
        target.commit(job.record(shards, _incremental.refs_of(plan)), replacing)
        self._tracker.committed(job.name, plan)
        dt, nbytes = time.perf_counter() - t0, sum(t.nbytes for t in encoded.tensors)
        logger.info(
            "Saved %s (%d bytes in %.3f s, %.1f MiB/s)",
            storage.url_of(job.name),
            nbytes,
            dt,
            nbytes / 2**20 / max(dt, 1e-9),
        )

    def close(self) -> None:
        pass
