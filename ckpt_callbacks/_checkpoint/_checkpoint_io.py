"""Writing ONE checkpoint: data file(s), then ``.meta``, then ``.index`` (the seam a sharded writer
reuses), the ``.meta`` document, and putting back a re-saved checkpoint when its re-save fails.

A checkpoint exists once its index is written; it is committed once the ``checkpoint`` state file
names it (:mod:`._state`, written by the manager). Reading and verifying live in
:mod:`._checkpoint_read`.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._format import _chunks
from .._format import _format as fmt
from .._format._index import FileEntry, IndexTensor
from .._format._names import INDEX_SUFFIX, META_SUFFIX, data_file_name
from .._storage import Storage
from ..errors import CheckpointError, CheckpointWriteError
from . import _incremental
from ._checkpoint_read import HASH_BEHIND_BYTES, MAX_META_BYTES, read_bounded, read_index
from ._gather import Gather

logger = logging.getLogger("ckpt_callbacks")

# Small tensors are gathered into one write of this size; big ones go straight to storage.
_COALESCE_BYTES = 4 << 20
# Big tensors are written (and hashed) in chunks of this size: large enough that per-call costs
# vanish, small enough that hashing chunk N overlaps writing it with little left at the end.
_WRITE_CHUNK = 16 << 20
# Above this many bytes an object-store save is split into data shards uploaded concurrently.
_SHARD_BYTES = 256 << 20
# S3's writer uploads the parts of one object in parallel already: there shards only overlap the
# per-object work (Complete) and each one holds a part buffer of its own, so they are larger
# (measured on the local S3 server: 4 shards of 512 MiB beat 8 of 256 MiB for 2 GiB, with 35% less
# memory, and one file beats two for 512 MiB).
_SHARD_BYTES_PARALLEL_PARTS = 512 << 20
_MAX_SHARDS = 8


def _crash_point(name: str) -> None:
    """Test seam, a no-op: crash tests replace it (``_checkpoint_io._crash_point = ...``) to kill the
    process at this step of a save. Every step of a save, the manager's included, calls it here."""


def crash_point(name: str) -> None:
    _crash_point(name)


def write_checkpoint(
    storage: Storage,
    name: str,
    encoded: fmt.EncodedState,
    step: int,
    meta_doc: dict,
    arrays: dict[str, np.ndarray] | None = None,
    replacing: Replaced | None = None,
    *,
    defer_sync: bool = False,
    plan: _incremental.Plan | None = None,
) -> int:
    """Write data file(s), then .meta, then .index. Returns the number of data shards.

    ``plan`` (incremental saves): the tensors it finds unchanged since the last checkpoint are not
    written; the index points at the data files holding them, and ``plan.table`` is set to the new
    checkpoint's tensors.

    On any failure every file of this checkpoint that was written is removed again and
    CheckpointWriteError is raised. ``replacing`` (a re-save of an existing checkpoint): its data
    files keep their names (the new ones get another shard count), and on failure its .meta and
    .index are written back instead of removed, so the old checkpoint stays whole.

    ``defer_sync`` (local disk): the last directory fsync, which makes the index's rename durable,
    is left running; the storage's next rename (the state file's) waits for it, so its temp file is
    written and fsync'd meanwhile.
    """
    tensors = plan.split(encoded.tensors, arrays) if plan is not None else encoded.tensors
    preflight(storage, name, tensors)
    stable = [t for t in tensors if t.name in plan.stable] if plan is not None else []
    if stable:  # unchanged tensors written again: a data file of their own, which later saves keep whole
        changed = [t for t in tensors if t.name not in plan.stable]
        shards = [s for s in _shards(storage, changed) + _shards(storage, stable) if s]
    else:
        shards = _shards(storage, tensors)
    if replacing is not None and len(shards) == replacing.shards:
        shards.append([])  # an empty safetensors file: the new data files must not overwrite the old
    written: list[str] = []
    try:
        crash_point("before_data")
        doc = (step, meta_doc, encoded)
        if storage.is_local:
            _write_local(storage, name, shards, arrays, doc, written, plan)
        else:
            _write_store(storage, name, shards, arrays, doc, written, plan)
        storage.sync_dir(wait=not defer_sync)
        crash_point("after_index")
    except BaseException:
        if replacing is not None:
            replacing.roll_back(storage, written)
        else:
            remove_quietly(storage, written)
        raise
    return len(shards)


def _write_store(
    storage: Storage, name: str, shards: list, arrays: dict | None, doc: tuple, written: list, plan: Any
) -> None:
    """Object stores: each file one whole object, completed in order (data shards concurrently)."""
    step, meta_doc, encoded = doc
    results = write_data_files(storage, name, shards, arrays, plan=plan)
    written += [r.name for r in results]
    crash_point("after_data")
    files, index_tensors = _file_table(results, encoded, plan)
    files.append(write_meta(storage, name, meta_doc))
    written.append(name + META_SUFFIX)
    crash_point("after_meta")
    write_index(storage, name, step, files, index_tensors, encoded.tree)
    written.append(name + INDEX_SUFFIX)


def _write_local(
    storage: Storage, name: str, shards: list, arrays: dict | None, doc: tuple, written: list, plan: Any
) -> None:
    """Local disk: every file's temp written, all fsync'd at once, then renamed in order: data files
    and .meta, a directory fsync (both durable), the .index. The index never becomes visible before
    the files it names are durable; the caller's directory fsync makes it durable in turn."""
    step, meta_doc, encoded = doc
    staged: list[Any] = []  # written, not yet visible; aborted (temp removed) unless committed
    try:
        results = []
        for i, shard in enumerate(shards):
            fname = data_file_name(name, i, len(shards))
            writer, result = stage_data_file(storage, fname, shard, arrays, plan=plan)
            staged.append(writer)
            results.append(result)
        files, index_tensors = _file_table(results, encoded, plan)
        meta_bytes, meta_entry = meta_file(name, meta_doc)
        files.append(meta_entry)
        staged.append(storage.staged_writer(name + META_SUFFIX, meta_bytes))
        staged.append(
            storage.staged_writer(name + INDEX_SUFFIX, index_bytes(step, files, index_tensors, encoded.tree))
        )
        storage.prepare(staged)
        *data, meta, index = staged
        for writer in data:
            writer.commit()
            written.append(writer.name)
        crash_point("after_data")
        meta.commit()
        written.append(meta.name)
        storage.sync_dir()
        crash_point("after_meta")
        index.commit()
        written.append(index.name)
        staged.clear()
    finally:
        for writer in staged:
            if writer.name not in written:
                writer.abort()


def _shards(storage: Storage, tensors: list[fmt.TensorEntry]) -> list[list[fmt.TensorEntry]]:
    """``tensors`` in data files: one, or several of similar size on an object store (uploaded at once)."""
    total = sum(t.nbytes for t in tensors)
    return fmt.plan_shards(tensors, _num_shards(storage, total, len(tensors)))


def _num_shards(storage: Storage, total: int, n_tensors: int) -> int:
    shard_bytes = _SHARD_BYTES_PARALLEL_PARTS if storage.parallel_parts else _SHARD_BYTES
    if storage.streaming and total > shard_bytes:
        return min(_MAX_SHARDS, n_tensors, math.ceil(total / shard_bytes))
    return 1


@dataclass
class WrittenFile:
    """One data file as written: what the index says of it, and of each tensor in it (by name; an
    entry's ``file`` number is the index's to give)."""

    name: str
    size: int
    header_size: int
    checksum: str  # of the safetensors header
    tensors: dict[str, IndexTensor]

    def entry(self) -> FileEntry:
        """Its entry in the index's ``files``."""
        return {
            "name": self.name,
            "kind": "data",
            "size": self.size,
            "header_size": self.header_size,
            "checksum": self.checksum,
        }


def _file_table(
    results: list[WrittenFile], encoded: fmt.EncodedState, plan: Any = None
) -> tuple[list[FileEntry], dict[str, IndexTensor]]:
    """The index's ``files`` entries and ``tensors`` table for the written data files (a chunked
    tensor's pieces joined into its one chunked entry), and (``plan``) the reused tensors' entries
    pointing into the earlier data files that hold them."""
    files = [r.entry() for r in results]
    index_tensors = {n: {**e, "file": no} for no, r in enumerate(results) for n, e in r.tensors.items()}
    if plan is not None:
        plan.learn([(f, r.tensors) for f, r in zip(files, results)])
        _incremental.place_reused(files, index_tensors, plan.report())
    _chunks.join(index_tensors, encoded.chunked)  # a piece reused or written alike
    return files, index_tensors


def meta_file(name: str, meta_doc: dict) -> tuple[bytes, dict]:
    """The bytes of ``<name>.meta`` and its entry for the index's ``files``."""
    meta_bytes = (json.dumps(meta_doc, separators=(",", ":"), allow_nan=False) + "\n").encode()
    entry = {"name": name + META_SUFFIX, "kind": "meta", "size": len(meta_bytes)}
    entry["checksum"] = fmt.checksum_bytes(meta_bytes)
    return meta_bytes, entry


def write_meta(storage: Storage, name: str, meta_doc: dict) -> dict:
    """Write ``<name>.meta``; returns its entry for the index's ``files``."""
    meta_bytes, entry = meta_file(name, meta_doc)
    storage.write_bytes(name + META_SUFFIX, meta_bytes)
    return entry


def index_bytes(step: int, files: list[FileEntry], tensors: dict[str, IndexTensor], tree: Any) -> bytes:
    index = {
        "format": fmt.FORMAT_NAME,
        "format_version": fmt.FORMAT_VERSION,
        "step": step,
        "files": files,
        "tensors": tensors,
        "tree": tree,
    }
    return fmt.dump_index(index)


def write_index(
    storage: Storage, name: str, step: int, files: list[FileEntry], tensors: dict[str, IndexTensor], tree: Any
) -> None:
    """Write ``<name>.index``: from now on the checkpoint exists for every reader."""
    storage.write_bytes(name + INDEX_SUFFIX, index_bytes(step, files, tensors, tree))


@dataclass
class Replaced:
    """What a re-save of an existing checkpoint must be able to put back: its small files' bytes."""

    name: str
    shards: int
    data_files: list[str]
    small: dict[str, bytes]  # .meta and .index contents

    @classmethod
    def read(cls, storage: Storage, name: str) -> Replaced | None:
        """The committed checkpoint ``name`` as it is now, or None when it is unreadable anyway."""
        try:
            small = {name + INDEX_SUFFIX: read_bounded(storage, name + INDEX_SUFFIX, fmt.MAX_INDEX_BYTES)}
            index = read_index(storage, name, data=small[name + INDEX_SUFFIX])
            for f in index["files"]:
                if f.get("kind") == "meta":
                    small[f["name"]] = read_bounded(storage, f["name"], MAX_META_BYTES)
        except CheckpointError:
            return None
        # its own data files: those of earlier checkpoints it points into are not its to remove
        data = [
            f["name"] for f in index["files"] if f.get("kind") != "meta" and f["name"].startswith(name + ".")
        ]
        return cls(name, len(data), data, small)

    def roll_back(self, storage: Storage, written: list[str]) -> None:
        """Undo a failed re-save: new data files removed, the old .meta then .index written back."""
        remove_quietly(storage, [n for n in written if n not in self.small])
        for fname in sorted(self.small, key=lambda n: n.endswith(INDEX_SUFFIX)):
            if fname in written:
                try:
                    storage.write_bytes(fname, self.small[fname])
                except Exception as e:  # noqa: BLE001 - reported; the original error is raised
                    logger.error("Could not restore %s after a failed re-save: %s", storage.url_of(fname), e)


def preflight(storage: Storage, name: str, tensors: list[fmt.TensorEntry]) -> int:
    """Refuse a save that cannot fit in the free space (local disks), before anything changes."""
    total = sum(t.nbytes for t in tensors)
    free = storage.free_bytes()
    if free is not None and total + (1 << 20) > free:
        raise CheckpointWriteError(
            f"Not enough free space to save {name!r}: it needs {total} bytes plus 1 MiB of headroom and "
            f"{storage.url!r} has {free} bytes free. Nothing was written or deleted; free some space (or "
            "save to another directory), then save again."
        )
    return total


def write_data_files(
    storage: Storage, name: str, shards: list[list[fmt.TensorEntry]], arrays: dict | None, plan: Any = None
) -> list[WrittenFile]:
    """Write one data file per shard (concurrently when several); on failure none is left."""
    if len(shards) == 1:
        return [write_data_file(storage, data_file_name(name, 0, 1), shards[0], arrays, plan=plan)]
    with ThreadPoolExecutor(len(shards), thread_name_prefix="ckpt-shard") as pool:
        futures = [
            pool.submit(
                write_data_file, storage, data_file_name(name, i, len(shards)), shard, arrays, plan=plan
            )
            for i, shard in enumerate(shards)
        ]
        results, error = [], None
        for f in futures:
            try:
                results.append(f.result())
            except BaseException as e:  # noqa: BLE001 - collect, clean up, re-raise the first
                error = error or e
        if error is not None:
            remove_quietly(storage, [r.name for r in results])
            raise error
        return results


def write_data_file(
    storage: Storage,
    fname: str,
    tensors: list[fmt.TensorEntry],
    arrays: dict | None = None,
    *,
    plan: Any = None,
) -> WrittenFile:
    """Stream one safetensors file: header, then each tensor's bytes, hashing as they pass.

    ``arrays``: the tensors' bytes by name when already snapshotted (async saves), else each
    entry converts its own source.
    """
    writer, result = stage_data_file(storage, fname, tensors, arrays, plan=plan)
    writer.commit()
    return result


def stage_data_file(
    storage: Storage,
    fname: str,
    tensors: list[fmt.TensorEntry],
    arrays: dict | None = None,
    *,
    plan: Any = None,
) -> tuple[Any, WrittenFile]:
    """:func:`write_data_file` up to its commit: ``(writer, result)``, the writer written, not yet
    committed (the caller commits or aborts it). ``plan`` (incremental saves): tensors it already
    hashed or materialised are not again, and each written tensor's probe is recorded in it."""
    header, spans = fmt.safetensors_header(tensors)
    # Big chunks are hashed on a helper thread while the same chunk is being written (xxhash and
    # os.write both release the GIL): the checksum then costs no wall time. One helper thread keeps
    # each tensor's updates in order; small tensors are gathered and hashed there by batch (_gather).
    big = bool(spans) and spans[-1][1] - spans[0][0] >= HASH_BEHIND_BYTES
    pool = ThreadPoolExecutor(1, thread_name_prefix="ckpt-hash") if big else None
    writer = storage.writer(fname)
    entries: dict[str, IndexTensor] = {}
    try:
        writer.write(header)
        small = Gather(writer, pool, _COALESCE_BYTES, plan.probes if plan is not None else None)
        known = plan.checksums if plan is not None else {}
        for t, (begin, end) in zip(tensors, spans):
            arr = _array_of(t, arrays, plan)
            if arr.nbytes != end - begin:
                raise ValueError(
                    f"Tensor {t.name!r} changed while saving: expected {end - begin} bytes, got {arr.nbytes}."
                )
            entry = _tensor_entry(t, begin, end, known.get(t.name))
            if arr.nbytes < _COALESCE_BYTES:
                small.add(memoryview(arr.reshape(-1).view(np.uint8)), entry, t.name, t.name not in known)
            else:
                small.flush()
                hasher = _stream_tensor(writer, arr, pool, hash_it=t.name not in known)
                entry["checksum"] = known.get(t.name) or fmt.checksum_str(hasher)
                if plan is not None:
                    plan.probes[t.name] = _incremental.probe(arr)
            del arr
            entries[t.name] = entry
        small.finish()
        size = writer.written
    except BaseException:
        writer.abort()
        raise
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    return writer, WrittenFile(fname, size, len(header), fmt.checksum_bytes(header), entries)


def _array_of(t: fmt.TensorEntry, arrays: dict | None, plan: Any) -> np.ndarray:
    if plan is not None and t.name in plan.arrays:
        return plan.arrays.pop(t.name)
    return arrays[t.name] if arrays is not None else t.array()


def _stream_tensor(
    writer: Any, arr: np.ndarray, pool: ThreadPoolExecutor | None, hash_it: bool = True
) -> Any:
    """Write and hash one big tensor's bytes in chunks, each hashed on ``pool`` while it is written.
    Returns the tensor's hasher (None without ``hash_it``: its checksum is known)."""
    hasher = fmt.new_hasher() if hash_it else None
    hashing: Future | None = None
    for chunk in fmt.iter_tensor_bytes(arr, _WRITE_CHUNK):
        if hasher is not None and pool is not None:
            if hashing is not None:
                hashing.result()
            hashing = pool.submit(hasher.update, chunk)
        elif hasher is not None:
            hasher.update(chunk)
        writer.write(chunk)
    if hashing is not None:
        hashing.result()
    return hasher


def _tensor_entry(t: fmt.TensorEntry, begin: int, end: int, checksum: str | None) -> IndexTensor:
    return {
        "dtype": fmt.dtype_str(t.dtype),
        "shape": list(t.shape),
        "offset": begin,
        "length": end - begin,
        "checksum": checksum,
        **({"kind": t.kind} if t.kind != "numpy" else {}),
        **({"byteorder": t.byteorder} if t.byteorder != "<" else {}),
    }


def remove_quietly(storage: Storage, names: list[str]) -> None:
    """Remove files of a failed or rotated save; a failure is logged, not raised."""
    try:
        storage.remove(names)
    except Exception as e:  # noqa: BLE001 - the save already failed; report that one
        logger.warning("Could not remove partial checkpoint files %s: %s", names, e)


# ---------------------------------------------------------------- the .meta document


def jsonable(x: Any, other: Callable[[Any], Any] | None = None, depth: int = 0) -> Any:
    """``x`` as strict JSON (the one sanitiser of what goes into a ``.meta``): non-finite floats
    become strings, numpy scalars and 0-d tensors numbers. Anything else: ``other(x)`` (e.g. a
    repr, for hyper-parameters), or TypeError when there is none (metrics and user meta)."""
    if other is not None and depth > 32:
        return other(x)
    if isinstance(x, dict):
        return {str(k): jsonable(v, other, depth + 1) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v, other, depth + 1) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return repr(x)
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    if hasattr(x, "item") and getattr(x, "ndim", None) == 0:  # 0-d framework tensors
        return jsonable(x.item(), other, depth + 1)
    if other is not None:
        return other(x)
    raise TypeError(
        f"meta and metrics must be JSON-like (dict, list, str, numbers); got {type(x).__name__}: {x!r:.80}"
    )


def meta_doc(step: int, timestamp: float, metrics: dict | None, meta: dict | None, info: dict | None) -> dict:
    """The ``.meta`` JSON (README, "On storage"). Every key is always there: a save through the core
    API has ``framework`` and ``model`` null (no adapter describes a model), and takes ``epoch`` from
    the user's ``meta`` when it has an integer one."""
    doc: dict[str, Any] = {"format": fmt.FORMAT_NAME, "format_version": fmt.FORMAT_VERSION}
    doc.update(jsonable(info or {}))
    user_epoch = (meta or {}).get("epoch")
    doc.setdefault("framework", None)
    doc.setdefault("framework_versions", {})
    doc.setdefault("model", None)
    doc.setdefault(
        "epoch", user_epoch if isinstance(user_epoch, int) and not isinstance(user_epoch, bool) else None
    )
    doc.update(
        {
            "step": step,
            "time": timestamp,
            "metrics": jsonable(metrics or {}),
            "user": jsonable(meta or {}),
            "library": {
                "ckpt_callbacks": _version(),
                "python": sys.version.split()[0],
                "numpy": np.__version__,
            },
        }
    )
    return doc


def _version() -> str:
    from .. import __version__

    return __version__
