"""Keras on a multi-process JAX job (``jax.distributed``): every process checkpoints together.

The same ``CheckpointCallback(directory)`` runs on every process. A save is a :class:`ProcessWriter`
on each (the manager's writer seam): every process writes the shards it addresses (one replica each,
:mod:`._jax_shards`) into its own data file ``<name>.data-<p>-of-<N>`` and reports the file's
description, or its failure, to process 0 through JAX's coordination service (its key-value store,
so no device collective runs beside training). Process 0 alone holds the directory's writer lock:
once every process reported success it writes ``.meta`` and ``.index`` and commits the ``checkpoint``
state file through its manager (retention included), then tells the others, which reload the state
file. A failure or silence of any process (past :data:`BARRIER_TIMEOUT_S`) means no commit, and
``CheckpointWriteError`` on every process.

Resume: process 0 picks the newest valid checkpoint and publishes its name; every process then reads
only the chunks its own devices need (:func:`._jax_shards.load_state`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import time
from typing import Any

import jax

from .._checkpoint import _incremental
from .._checkpoint._checkpoint_io import crash_point, meta_file, remove_quietly, write_data_file
from .._checkpoint._incremental import place_reused
from .._format import _chunks
from .._format import _format as fmt
from .._format._names import INDEX_SUFFIX, META_SUFFIX, data_file_name
from .._manager import _async
from .._manager._sharding import Collective
from .._manager._writer import SaveJob, SaveTarget
from .._storage import Storage
from ..errors import CheckpointError, CheckpointWriteError
from . import _compat

logger = logging.getLogger("ckpt_callbacks")

# How long a process waits for the others' reports (process 0) or for the commit's outcome (the
# others): a process that died or hangs fails the save after this many seconds, not never.
BARRIER_TIMEOUT_S = 600.0
# How long each process waits, when its callback starts, for every other process to start one too.
ROLL_CALL_TIMEOUT_S = 120.0
_counters: dict[str, itertools.count] = {}


def multi_process() -> bool:
    return jax.process_count() > 1


def _key(storage: Any, what: str) -> str:
    """A coordination-service key unique to this directory and call: every process makes the same
    sequence of saves and restores, so the n-th call of each meets the n-th of the others."""
    space = hashlib.sha1(storage.url.encode()).hexdigest()[:16]
    n = next(_counters.setdefault(f"{space}/{what}", itertools.count()))
    return f"ckpt_callbacks/{space}/{what}/{n}"


def _publish(key: str, doc: dict) -> None:
    _compat.jax_coordination_client().key_value_set(key, json.dumps(doc))


def _wait_for(key: str, who: str, timeout: float) -> dict:
    try:
        return json.loads(_compat.jax_coordination_client().blocking_key_value_get(key, int(timeout * 1000)))
    except Exception as e:  # noqa: BLE001 - a timeout, or the coordination service lost a process
        return {"ok": False, "error": f"no word from {who} within {timeout:g} s ({type(e).__name__}: {e})"}


class ProcessWriter:
    """One process's half of a multi-process save (:class:`.._writer.CheckpointWriter`)."""

    default_info: dict | None = None

    def __init__(self, incremental: bool = True) -> None:
        self._buffers = _async.SnapshotBuffers()
        self._tracker = _incremental.Tracker(incremental)

    def prepare(self, state: Any, *, snapshot: bool, options: dict | None) -> Any:
        encoded = fmt.encode_tree(state)
        return encoded, (_async.snapshot(self._buffers, encoded) if snapshot else None)

    def write(self, target: SaveTarget, job: SaveJob) -> None:
        storage, name = target.storage, job.name
        me, world = jax.process_index(), jax.process_count()
        key = _key(storage, f"save/{name}")
        encoded, arrays = job.payload
        pieces = {p for _, _, parts in encoded.chunked.values() for p, _ in parts}
        # Process 0 writes the state's small, unsharded leaves; every process its own shards.
        tensors = [t for t in encoded.tensors if me == 0 or t.name in pieces]
        fname = data_file_name(name, me, world)
        plan = self._tracker.plan(storage, name, target.incremental_base)
        try:
            storage.makedirs()
            crash_point("before_data")
            # incremental: the pieces unchanged since the latest checkpoint are reported, not written
            tensors = plan.split(tensors, arrays) if plan is not None else tensors
            wrote = write_data_file(storage, fname, tensors, arrays, plan=plan)
            crash_point("after_data")
            if plan is not None:
                plan.learn([(wrote.entry(), wrote.tensors)])
            report = {
                "ok": True,
                "file": wrote.entry(),
                "tensors": wrote.tensors,
                "reused": plan.report() if plan is not None else {},
                "chunked": {n: parts for n, (_, _, parts) in encoded.chunked.items()},
            }
        except Exception as e:  # noqa: BLE001 - reported to process 0, raised below
            remove_quietly(storage, [fname])
            report = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        _publish(f"{key}/report/{me}", report)
        if me == 0:
            outcome = self._commit(target, job, encoded, key, world, report)
            _publish(f"{key}/outcome", outcome)
        else:
            outcome = _wait_for(f"{key}/outcome", "process 0", BARRIER_TIMEOUT_S)
            if outcome.get("ok"):
                target.follow()
            elif not outcome.get("unknown") and not storage.exists(name + INDEX_SUFFIX):
                remove_quietly(storage, [fname])
        if outcome.get("ok"):
            self._tracker.committed(name, plan)
        else:
            raise CheckpointWriteError(
                f"Multi-process save of {storage.url_of(name)!r} failed: {outcome.get('error')}. Nothing was "
                f"committed; the latest checkpoint is still {target.latest_checkpoint!r}."
            )

    def _commit(
        self, target: SaveTarget, job: SaveJob, encoded: fmt.EncodedState, key: str, world: int, own: dict
    ) -> dict:
        """Process 0: every report, then .meta, .index and the commit. The outcome for the others."""
        storage, name = target.storage, job.name
        reports = [own] + [
            _wait_for(f"{key}/report/{p}", f"process {p}", BARRIER_TIMEOUT_S) for p in range(1, world)
        ]
        failed = [f"process {p}: {r.get('error')}" for p, r in enumerate(reports) if not r.get("ok")]
        data_files = [data_file_name(name, p, world) for p in range(world)]
        if failed:
            remove_quietly(storage, data_files)
            return {"ok": False, "error": "; ".join(failed)}
        written = list(data_files)
        try:
            index_tensors, chunked, reused = {}, {}, {}
            for p, r in enumerate(reports):
                for n, entry in r["tensors"].items():
                    index_tensors[n] = {**entry, "file": p}
                for n, parts in r["chunked"].items():
                    chunked.setdefault(n, []).extend(parts)
                reused.update(r["reused"])
            files = [r["file"] for r in reports]
            refs = place_reused(files, index_tensors, reused)  # pieces in earlier checkpoints' files
            layout = {
                n: (d, s, [(p, tuple(o)) for p, o in chunked.get(n, [])])
                for n, (d, s, _) in encoded.chunked.items()
            }
            _chunks.join(index_tensors, layout)
            meta_bytes, meta_entry = meta_file(name, job.meta_doc)
            storage.write_bytes(name + META_SUFFIX, meta_bytes)
            written.append(name + META_SUFFIX)
            storage.sync_dir()
            index = {
                "format": fmt.FORMAT_NAME,
                "format_version": fmt.FORMAT_VERSION,
                "step": job.step,
                "files": [*files, meta_entry],
                "tensors": index_tensors,
                "tree": encoded.tree,
            }
            fmt.validate_index(index)  # what every reader will check (the chunks tile each tensor)
            crash_point("after_meta")
            storage.write_bytes(name + INDEX_SUFFIX, fmt.dump_index(index))
            written.append(name + INDEX_SUFFIX)
            storage.sync_dir()
            crash_point("after_index")
        except Exception as e:  # noqa: BLE001 - nothing committed: the others are told
            remove_quietly(storage, sorted(written, key=lambda n: not n.endswith(INDEX_SUFFIX)))
            return {"ok": False, "error": f"process 0: {type(e).__name__}: {e}"}
        t0 = time.perf_counter()
        try:
            target.commit(job.record(world, refs))
        except Exception as e:  # noqa: BLE001 - the manager's commit cleaned up after itself
            return {"ok": False, "unknown": storage.exists(name + INDEX_SUFFIX), "error": f"process 0: {e}"}
        logger.info(
            "Committed %s from %d processes (%.3f s)", storage.url_of(name), world, time.perf_counter() - t0
        )
        return {"ok": True}

    def close(self) -> None:
        self._buffers.clear()


class _Backend:
    """The sharded backend of :mod:`.._sharding` for a Keras model on a multi-process JAX job. Only
    saves go through the seam; the callback restores through :func:`agree_on_checkpoint`."""

    def writer(self, async_save: bool, options: dict | None, incremental: bool) -> ProcessWriter:
        return ProcessWriter(incremental)

    def load_into(self, *args: Any) -> Any:
        raise NotImplementedError("restore a Keras model with ckpt_callbacks.keras.restore")

    def restore_newest(self, *args: Any) -> Any:
        raise NotImplementedError("the Keras callback resumes through ckpt_callbacks.keras")


COLLECTIVE = Collective(_Backend())


def manager_kwargs() -> dict:
    """What the callback's manager takes on a multi-process job: this collective for every save,
    and on processes other than 0 no writer lock (process 0 commits)."""
    return {"_collective": COLLECTIVE, "_allow_concurrent_writers": jax.process_index() != 0}


def roll_call(directory: str, storage_options: dict | None) -> None:
    """Every process of the job runs the callback (its saves and resumes are collective): each says
    so, and a process whose peer never does fails here with ValueError, before training, instead of
    in the first save's barrier or the resume's assignment (a collective the other never enters)."""
    me, world = jax.process_index(), jax.process_count()
    key = _key(Storage(directory, storage_options), "roll-call")
    _publish(f"{key}/{me}", {"ok": True})
    for p in range(world):
        doc = {"ok": True} if p == me else _wait_for(f"{key}/{p}", f"process {p}", ROLL_CALL_TIMEOUT_S)
        if not doc.get("ok"):
            raise ValueError(
                f"CheckpointCallback({directory!r}) runs on process {me} of a {world}-process JAX job, but "
                f"process {p} started none ({doc.get('error')}). Expected the same CheckpointCallback(directory) "
                "in model.fit on every process: each writes its own shards and process 0 commits once all "
                "reported. Add it to every process's fit (or run the job as one process)."
            )


def agree_on_checkpoint(directory: str, storage_options: dict | None, pick: Any) -> str | None:
    """``pick()`` on process 0 (a checkpoint path or None), published to every process."""
    key = _key(Storage(directory, storage_options), "resume")
    if jax.process_index() == 0:
        try:
            chosen = pick()
        except BaseException as e:
            _publish(key, {"ok": False, "error": f"{type(e).__name__}: {e}"})
            raise
        _publish(key, {"ok": True, "path": chosen})
        return chosen
    doc = _wait_for(key, "process 0", BARRIER_TIMEOUT_S)
    if not doc.get("ok"):
        raise CheckpointError(f"Process 0 could not pick the checkpoint to resume from: {doc.get('error')}.")
    return doc["path"]
